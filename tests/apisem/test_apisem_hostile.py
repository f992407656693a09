"""Regression tests for the hostile-input findings of issue 13 (API server side), each against a
real kproxy-apiserver process on loopback. Every test here failed on the code before the fix."""
from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import urllib3

from controlplane_stub.apiserver.bodies import MAX_DEPTH, MAX_REQUEST_BYTES
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver


class Client:
    def __init__(self, api: APIServerProcess, token: str) -> None:
        self.url = api.url
        self.s = requests.Session()
        self.s.trust_env = False
        self.s.verify = api.ca_file or False
        self.s.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, body: Any = None, ctype: str = "application/json",
             **params: str) -> requests.Response:
        data = body if body is None or isinstance(body, (bytes, str)) else json.dumps(body)
        return self.s.request(method, self.url + path, data=data, params=params, timeout=60,
                              headers={"Content-Type": ctype})


@pytest.fixture(scope="module")
def api(storage_backend: str) -> Iterator[APIServerProcess]:
    urllib3.disable_warnings()
    with running_apiserver() as server:
        yield server


@pytest.fixture(scope="module")
def admin(api: APIServerProcess) -> Client:
    return Client(api, api.token)


@pytest.fixture
def ns(admin: Client) -> str:
    name = "h-" + secrets.token_hex(4)
    r = admin.call("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert r.status_code == 201, r.text
    return name


def causes(r: requests.Response) -> list[str]:
    return [c["field"] for c in r.json()["details"]["causes"]]


def lb_service(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}


@pytest.mark.timeout(120)
def test_load_balancer_ingress_ip_must_be_an_ip(admin: Client, ns: str) -> None:
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/services", lb_service("lb"))
    assert r.status_code == 201, r.text
    svc = r.json()
    path = f"/api/v1/namespaces/{ns}/services/lb/status"
    for bad in ("10.0.0.1\n-A INPUT -j ACCEPT", "fe80::1%eth0\n-A INPUT -j ACCEPT", "not-an-ip", "10.0.0.256"):
        svc["status"] = {"loadBalancer": {"ingress": [{"ip": bad}]}}
        r = admin.call("PUT", path, svc)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["reason"] == "Invalid"
        assert causes(r) == ["status.loadBalancer.ingress[0].ip"]
        # the merge patch kube-controller-manager-like writers use is checked the same way
        r = admin.call("PATCH", path, {"status": {"loadBalancer": {"ingress": [{"ip": bad}]}}},
                       "application/merge-patch+json")
        assert r.status_code == 422, (bad, r.text)
    r = admin.call("GET", f"/api/v1/namespaces/{ns}/services/lb")
    assert r.json()["status"]["loadBalancer"] == {}
    svc = r.json()
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.10", "ipMode": "VIP"}, {"hostname": "lb.example"}]}}
    r = admin.call("PUT", path, svc)
    assert r.status_code == 200, r.text
    svc = r.json()
    svc["status"]["loadBalancer"]["ingress"] = [{"hostname": "192.0.2.1"}, {"ip": "", "ipMode": "VIP"}]
    r = admin.call("PUT", path, svc)
    assert r.status_code == 422
    assert causes(r) == ["status.loadBalancer.ingress[0].hostname", "status.loadBalancer.ingress[1].ipMode"]


def alias_bomb(levels: int, fanout: int = 9) -> bytes:
    """A ConfigMap whose one data value is referenced fanout**levels times through nested aliases."""
    lines = ["apiVersion: v1", "kind: ConfigMap", "metadata: {name: bomb}", "data: {}",
             'x0: &a0 ["' + "x" * 40 + '"]']
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.timeout(120)
def test_yaml_alias_expansion_is_refused(admin: Client, ns: str) -> None:
    # 7**6 * 44 bytes = 5.2 MB once expanded: past the 3 MiB limit, yet small enough for the old
    # code to have survived storing it (it answered 201).
    body = alias_bomb(6, fanout=7)
    assert len(body) < 450
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/configmaps", body, "application/yaml")
    assert r.status_code == 400, r.text[:300]
    assert "aliases expand" in r.json()["message"]
    assert admin.call("GET", f"/api/v1/namespaces/{ns}/configmaps/bomb").status_code == 404
    # the same through server-side apply
    r = admin.call("PATCH", f"/api/v1/namespaces/{ns}/configmaps/bomb", body, "application/apply-patch+yaml",
                   fieldManager="t")
    assert r.status_code == 400, r.text[:300]
    # a recursive alias is refused too, and ordinary anchors still work
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/configmaps",
                   b"metadata: {name: loop}\nx: &a [*a]\n", "application/yaml")
    assert r.status_code == 400, r.text[:300]
    ok = b"metadata: {name: anchors, labels: &l {app: web}}\ndata: {a: '1'}\nx: *l\n"
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/configmaps", ok, "application/yaml")
    assert r.status_code == 201, r.text


@pytest.mark.timeout(120)
def test_unknown_fields_are_never_stored(admin: Client, ns: str) -> None:
    path = f"/api/v1/namespaces/{ns}/configmaps"
    big = "y" * (2 * 1024 * 1024)  # under the request limit, over the 1 MiB ConfigMap data limit
    r = admin.call("POST", path, {"metadata": {"name": "warn"}, "data": {"a": "1"}, "junk": big, "extra": {"b": 1}})
    assert r.status_code == 201, r.text[:300]
    assert r.headers.get("Warning", "").count("unknown field") == 2, r.headers
    stored = admin.call("GET", f"{path}/warn")
    assert "junk" not in stored.json() and "extra" not in stored.json()
    assert len(stored.content) < 2000
    # a field name that would end the Warning header (found by the fuzz campaign: the answer was lost)
    r = admin.call("POST", path, {"metadata": {"name": "nl"}, "a\r\nX-Injected: 1": 1})
    assert r.status_code == 201 and "X-Injected" not in r.headers
    assert '\\u000d\\u000aX-Injected: 1' in r.headers["Warning"]
    r = admin.call("POST", path, {"metadata": {"name": "ign"}, "junk": 1}, fieldValidation="Ignore")
    assert r.status_code == 201 and "Warning" not in r.headers
    assert "junk" not in admin.call("GET", f"{path}/ign").json()
    r = admin.call("POST", path, {"metadata": {"name": "strict"}, "junk": 1}, fieldValidation="Strict")
    assert r.status_code == 400 and 'unknown field "junk"' in r.json()["message"]
    # more than the request limit is refused before it is decoded
    r = admin.call("POST", path, {"metadata": {"name": "huge"}, "junk": "z" * (MAX_REQUEST_BYTES + 1)})
    assert r.status_code == 413, r.text[:300]


@pytest.mark.timeout(120)
def test_deep_nesting_is_400(admin: Client, ns: str) -> None:
    path = f"/api/v1/namespaces/{ns}/configmaps"
    for depth in (MAX_DEPTH + 1, 1000, 100_000):
        body = b'{"metadata":{"name":"deep"},"x":' + b"[" * depth + b"]" * depth + b"}"
        r = admin.call("POST", path, body)
        assert r.status_code == 400, (depth, r.text[:200])
        assert r.json()["kind"] == "Status"
    yaml_body = b"metadata: {name: deep}\nx: " + b"[" * 1000 + b"]" * 1000 + b"\n"
    assert admin.call("POST", path, yaml_body, "application/yaml").status_code == 400
    patch = b'{"x":' + b"{\"a\":" * 1000 + b"1" + b"}" * 1000 + b"}"
    admin.call("POST", path, {"metadata": {"name": "p"}})
    r = admin.call("PATCH", f"{path}/p", patch, "application/merge-patch+json")
    assert r.status_code == 400, r.text[:200]


@pytest.mark.timeout(60)
def test_discovery_roots_with_trailing_slash(admin: Client) -> None:
    r = admin.call("GET", "/api/")
    assert r.status_code == 200 and r.json()["kind"] == "APIVersions"
    r = admin.call("GET", "/apis/")
    assert r.status_code == 200 and r.json()["kind"] == "APIGroupList"


@pytest.mark.timeout(60)
def test_strict_rejects_duplicate_keys_warn_reports_them(admin: Client, ns: str) -> None:
    path = f"/api/v1/namespaces/{ns}/configmaps"
    body = b'{"metadata":{"name":"d1","labels":{"a":"1","a":"2"}},"data":{"k":"1"},"data":{"k":"2"}}'
    r = admin.call("POST", path, body, fieldValidation="Strict")
    assert r.status_code == 400, r.text
    msg = r.json()["message"]
    assert 'duplicate field "data"' in msg and 'duplicate field "metadata.labels.a"' in msg
    r = admin.call("POST", path, body.replace(b"d1", b"d2"))
    assert r.status_code == 201
    assert 'duplicate field \\"data\\"' in r.headers["Warning"]
    assert r.json()["data"] == {"k": "2"}  # the last one wins, as in Go
    yaml_body = b"metadata: {name: d3}\ndata: {k: '1'}\ndata: {k: '2'}\n"
    r = admin.call("POST", path, yaml_body, "application/yaml", fieldValidation="Strict")
    assert r.status_code == 400 and 'duplicate field "data"' in r.json()["message"]


@pytest.mark.timeout(60)
def test_json_patch_of_immutable_cluster_ip_is_422(admin: Client, ns: str) -> None:
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/services", {"metadata": {"name": "c"},
                                                                 "spec": {"ports": [{"port": 80}]}})
    assert r.status_code == 201, r.text
    ip = r.json()["spec"]["clusterIP"]
    other = "10.96.200.200" if ip != "10.96.200.200" else "10.96.200.201"
    for ops in ([{"op": "replace", "path": "/spec/clusterIP", "value": other}],
                [{"op": "replace", "path": "/spec/clusterIPs", "value": [other]}]):
        r = admin.call("PATCH", f"/api/v1/namespaces/{ns}/services/c", ops, "application/json-patch+json")
        assert r.status_code == 422, r.text
        assert causes(r) == ["spec.clusterIPs[0]"]
        assert "may not change once set" in r.json()["message"]
    assert admin.call("GET", f"/api/v1/namespaces/{ns}/services/c").json()["spec"]["clusterIP"] == ip
    # the IP was not kept by the refused request: another Service may have it
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/services", {"metadata": {"name": "d"},
                                                                 "spec": {"ports": [{"port": 80}], "clusterIP": other}})
    assert r.status_code == 201, r.text


@pytest.mark.timeout(60)
def test_readonly_identity_cannot_read_secrets(api: APIServerProcess, admin: Client, ns: str) -> None:
    r = admin.call("POST", f"/api/v1/namespaces/{ns}/secrets", {"metadata": {"name": "s"}, "data": {"k": "dg=="}})
    assert r.status_code == 201
    ro = Client(api, api.readonly_token)
    for path, params in ((f"/api/v1/namespaces/{ns}/secrets/s", {}), (f"/api/v1/namespaces/{ns}/secrets", {}),
                         ("/api/v1/secrets", {}), (f"/api/v1/namespaces/{ns}/secrets", {"watch": "true"}),
                         (f"/api/v1/watch/namespaces/{ns}/secrets", {})):
        r = ro.call("GET", path, **params)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["reason"] == "Forbidden" and "dg==" not in r.text
    # everything the view role allows still works
    assert ro.call("GET", f"/api/v1/namespaces/{ns}/configmaps").status_code == 200
    assert ro.call("GET", f"/api/v1/namespaces/{ns}/services").status_code == 200


@pytest.mark.timeout(60)
def test_string_data_is_merged_into_data_and_never_stored(admin: Client, ns: str) -> None:
    path = f"/api/v1/namespaces/{ns}/secrets"
    r = admin.call("POST", path, {"metadata": {"name": "sd"}, "data": {"a": "eA==", "b": "eA=="},
                                  "stringData": {"b": "pässword", "c": "plain"}})
    assert r.status_code == 201, r.text
    for got in (r.json(), admin.call("GET", f"{path}/sd").json()):
        assert "stringData" not in got
        assert got["data"] == {"a": "eA==", "b": "cMOkc3N3b3Jk", "c": "cGxhaW4="}
    r = admin.call("PATCH", f"{path}/sd", {"stringData": {"a": "new"}}, "application/merge-patch+json")
    assert r.status_code == 200 and r.json()["data"]["a"] == "bmV3" and "stringData" not in r.json()


@pytest.mark.timeout(60)
def test_data_dir_and_store_files_are_private() -> None:
    import tempfile

    data = tempfile.mkdtemp(prefix="kproxy-apiserver-modes-")
    os.chmod(data, 0o755)
    leftover = os.path.join(data, "old-notes.txt")
    with open(leftover, "w") as f:
        f.write("x")
    os.chmod(leftover, 0o644)
    with running_apiserver(data_dir=data, storage="sqlite") as api:  # the SQLite store's files
        c = Client(api, api.token)
        assert c.call("POST", "/api/v1/namespaces/default/secrets",
                      {"metadata": {"name": "s"}, "data": {"k": "dg=="}}).status_code == 201
        assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
        names = set()
        for root, dirs, files in os.walk(data):
            for d in dirs:
                assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
            for name in files:
                names.add(name)
                mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
                assert mode == 0o600, (name, oct(mode))
        assert {"store.db", "store.db-wal", "tokens.csv", "admin.kubeconfig", "old-notes.txt"} <= names
    import shutil

    shutil.rmtree(data, ignore_errors=True)

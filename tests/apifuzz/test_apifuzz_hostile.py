"""Fuzz campaign, part 2: hand-made hostile bodies, each sent as create, replace and patch where it
applies: YAML alias bombs, nesting, huge and odd numbers, every field of valid objects set to every
wrong type, unicode and invalid UTF-8, duplicate keys, content types, truncated bodies; then
hypothesis byte-level mutations of valid bodies. No 500, every error a Status, the server alive."""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from apifuzz_helpers import FUZZ_NAMESPACE, FuzzClient, assert_alive, fuzz_examples
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

NS = FUZZ_NAMESPACE
VALID: dict[str, tuple[str, dict[str, Any]]] = {
    "services": (f"/api/v1/namespaces/{NS}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "h-svc", "labels": {"app": "web"}},
        "spec": {"type": "LoadBalancer", "selector": {"app": "web"}, "externalIPs": ["192.0.2.7"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
    "endpointslices": (f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "h-eps", "labels": {"kubernetes.io/service-name": "h-svc"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True},
                                               "nodeName": "n1", "zone": "a"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
    "nodes": ("/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "h-node"},
        "spec": {"podCIDRs": ["10.244.7.0/24"], "taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.9"}],
                   "capacity": {"cpu": "2", "pods": "110"}}}),
    "pods": (f"/api/v1/namespaces/{NS}/pods", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "h-pod", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "img:1", "ports": [{"containerPort": 8080}],
                                 "env": [{"name": "A", "value": "b"}],
                                 "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "1"}}}]}}),
    # labels and spec null broke the server-set namespace label and finalizers (500, found by the
    # OpenAPI fuzz campaign): every namespace field is in the wrong-type sweep now.
    "namespaces": ("/api/v1/namespaces", {
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "h-ns", "labels": {"team": "a"}},
        "spec": {"finalizers": ["kubernetes"]}}),
    "secrets": (f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "h-sec"}, "data": {"k": "dg=="},
        "stringData": {"s": "plain"}}),
}
WRONG_VALUES: list[Any] = [None, True, -1, 2**63 - 1, 1.5, "x\ny", "\u202e\U0001f600", [None], {"a": {"b": []}},
                           "10.0.0.1\n-A INPUT -j ACCEPT"]
HUGE_NUMBERS = [b"1e400", b"-1e400", b"1e-400", b"18446744073709551616", b"-9223372036854775809",
                b"9223372036854775807", b"123456789012345678901234567890123456789", b"1" * 5000,
                b"0.000000000000000000000000001", b"-0", b"1E+2", b"NaN", b"Infinity", b"-Infinity", b"0x10"]
CONTENT_TYPES = ["application/json", "application/yaml", "application/vnd.kubernetes.protobuf", "text/html",
                 "application/xml", "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                 "", "application/x-www-form-urlencoded", "application/merge-patch+json", "*/*", "\u00e9/\u00e9"]
PATCH_TYPES = ["application/merge-patch+json", "application/strategic-merge-patch+json",
               "application/json-patch+json", "application/apply-patch+yaml"]


def leaf_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into obj (objects, lists and leaves alike), except apiVersion/kind/metadata.name."""
    if prefix and prefix not in (("apiVersion",), ("kind",), ("metadata", "name")):
        yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaf_paths(v, (*prefix, i))


def set_path(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    out = copy.deepcopy(obj)
    cur = out
    for step in path[:-1]:
        cur = cur[step]
    cur[path[-1]] = value
    return out


def alias_bombs() -> Iterator[bytes]:
    for levels, fanout in ((4, 10), (8, 9), (30, 2), (12, 4)):
        lines = ['metadata: {name: bomb}', 'a0: &a0 ["' + "lol" * 10 + '"]']
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]" for i in range(1, levels + 1)]
        yield ("\n".join(lines) + "\n").encode()
    yield b"metadata: {name: bomb}\nx: &a [*a, *a]\n"  # recursive
    yield b"metadata: &m {name: bomb, labels: *m}\n"  # alias to an open mapping
    yield b"a: &a {x: 1}\n<<: [*a, *a, *a]\nmetadata: {name: merge}\n"  # merge keys
    yield b"metadata: {name: t}\ndata: {when: 2024-01-01, on: yes, 1: 2, null: ~, .inf: .nan}\n"
    yield b"metadata: {name: t}\ndata: !!binary aGVsbG8=\n"
    yield b"metadata: {name: t}\ndata: !!set {a, b}\n"
    yield b"metadata: {name: t}\ndata: !!omap [a: 1, b: 2]\n"
    yield b"metadata: {name: t}\ndata: !!python/object:os.system ls\n"
    yield b"--- {metadata: {name: a}}\n--- {metadata: {name: b}}\n"
    yield b"metadata: {name: t}\n\tdata: {}\n"
    yield b"? [a, b]\n: c\nmetadata: {name: t}\n"
    yield b"metadata: {name: t}\ndata: {k: " + b"9" * 5000 + b"}\n"


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return b'{"metadata":{"name":"deep"},"data":{"k":"v"},"x":' + opener * depth + closer * depth + b"}"


def hostile_bodies() -> Iterator[tuple[str, bytes]]:
    """(content type, body) pairs, for a create of kind `services` or `secrets` (see the test)."""
    for body in alias_bombs():
        yield "application/yaml", body
    for depth in (50, 99, 100, 101, 1000, 50_000):
        yield "application/json", nested(depth)
        yield "application/json", nested(depth, b'{"a":', b"}").replace(b'{"a":}', b'{"a":1}')
        yield "application/yaml", b"metadata: {name: deep}\nx: " + b"[" * depth + b"]" * depth + b"\n"
        yield "application/yaml", b"metadata: {name: deep}\nx:\n" + b"".join(
            b" " * i + b"- \n" for i in range(min(depth, 3000)))
    for number in HUGE_NUMBERS:
        for field in (b'"port"', b'"nodePort"', b'"x"'):
            yield "application/json", (b'{"metadata":{"name":"num"},"spec":{"ports":[{' + field + b":" + number
                                       + b"}]}}")
    for raw in (b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"metadata":', b"\xff\xfe{}", b"\xef\xbb\xbf{}",
                b'{"metadata":{"name":"\xc0\xaf"}}', b'{"metadata":{"name":"\\ud800"}}',
                b'{"metadata":{"name":"\\udfff\\ud800"}}', b'{"metadata":{"name":"a\\u0000b"}}',
                b'{"metadata":{"name":"x"},"data":{"\\ud83d":"a"}}', b"\x00" * 64,
                b'{"metadata":{"name":"x"}}' + b" " * 1000 + b"garbage",
                b'{"metadata":{"name":"dup","name":"dup2"},"spec":{"ports":[{"port":80,"port":81}]},"spec":{}}',
                b'{"metadata":{"name":"x"},"kind":"Pod","apiVersion":"v2"}', b'{"metadata":[]}',
                b'{"metadata":{"name":"x","namespace":"other"}}', b'{"metadata":{"name":"x","labels":"a=b"}}'):
        yield "application/json", raw
        yield "application/yaml", raw
    for ctype in CONTENT_TYPES:
        yield ctype, b'{"metadata":{"name":"ct"},"spec":{"ports":[{"port":80}]}}'
        yield ctype, b"\x0a\x03\x6b\x38\x73\x00\x00\x01\x02\xff\xff\xff\xff\x0f"
    yield "application/vnd.kubernetes.protobuf", b"k8s\x00" + b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"
    yield "application/vnd.kubernetes.protobuf", b"k8s\x00" + bytes(range(256))


@pytest.mark.timeout(900)
def test_hand_made_hostile_bodies(fuzz_client: FuzzClient) -> None:
    started, before = time.monotonic(), fuzz_client.sent
    for ctype, body in hostile_bodies():
        for path in (f"/api/v1/namespaces/{NS}/services", f"/api/v1/namespaces/{NS}/secrets"):
            fuzz_client.send("POST", path, body, ctype)
            fuzz_client.send("PUT", path + "/h-none", body, ctype)
        fuzz_client.send("PATCH", f"/api/v1/namespaces/{NS}/configmaps/nothing", body, ctype)
    # every field of valid objects set to every wrong type: create, replace, merge patch, status
    for kind, (path, obj) in VALID.items():
        r = fuzz_client.json("POST", path, obj)
        assert r.status_code == 201, (kind, r.text)
        name = obj["metadata"]["name"]
        for leaf in list(leaf_paths(obj)):
            rv = fuzz_client.send("GET", f"{path}/{name}").json()["metadata"]["resourceVersion"]
            for value in WRONG_VALUES:
                bad = set_path(obj, leaf, value)
                if isinstance(bad["metadata"], dict):
                    bad["metadata"] = {**bad["metadata"], "name": name + "-b"}
                fuzz_client.json("POST", path, bad, fieldValidation="Strict")
                if isinstance(bad["metadata"], dict):
                    bad["metadata"] = {**bad["metadata"], "name": name, "resourceVersion": rv}
                status = kind in ("services", "nodes", "pods")  # the status writers' path, else a replace
                fuzz_client.json("PUT", f"{path}/{name}/status" if status else f"{path}/{name}", bad)
        for ctype in PATCH_TYPES:
            for body in (b"{}", b"[]", b"null", b'{"spec":null}', b'[{"op":"copy","from":"/spec","path":"/x"}]',
                         b'{"metadata":{"name":"other"}}', b'{"metadata":{"resourceVersion":"1"}}',
                         b'{"$patch":"replace"}', b'{"spec":{"$retainKeys":[1]}}', b'{"a":' * 200 + b"1" + b"}" * 200,
                         b"apiVersion: v1\nkind: X\n", b'[{"op":"add","path":"/metadata/labels/a~1b","value":1}]'):
                fuzz_client.send("PATCH", f"{path}/{name}", body, ctype, params={"fieldManager": "h"})
    # JSON patch copies that would double the object past the limit
    svc_path = VALID["services"][0] + "/h-svc"
    big = "v" * 200_000
    fuzz_client.send("PATCH", svc_path, json.dumps({"metadata": {"annotations": {"a": big}}}).encode(),
                     "application/merge-patch+json")
    ops = [{"op": "copy", "from": "/metadata/annotations", "path": f"/metadata/labels{i}"} for i in range(40)]
    r = fuzz_client.send("PATCH", svc_path, json.dumps(ops).encode(), "application/json-patch+json")
    assert r.status_code in (413, 422), r.text[:300]
    sent = fuzz_client.sent - before
    print(f"hostile bodies: {sent} requests in {time.monotonic() - started:.1f}s, "
          f"codes {dict(sorted(fuzz_client.codes.items()))}")
    assert sent >= 2500
    assert_alive(fuzz_client)


MUTATION_REQUESTS = fuzz_examples(1000)


@pytest.mark.timeout(600)
def test_mutated_bodies(fuzz_client: FuzzClient) -> None:
    """Hypothesis flips, inserts and deletes bytes of valid JSON and YAML bodies."""
    seeds = [json.dumps(obj).encode() for _, obj in VALID.values()]
    paths = [path for path, _ in VALID.values()]
    before = fuzz_client.sent
    edits = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["flip", "insert", "delete"]),
                               st.binary(min_size=1, max_size=8)), min_size=1, max_size=6)

    @settings(max_examples=MUTATION_REQUESTS // 5, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def batch(data: st.DataObject) -> None:
        for _ in range(5):
            i = data.draw(st.integers(0, len(seeds) - 1))
            body = bytearray(seeds[i])
            for pos, how, chunk in data.draw(edits):
                at = pos % (len(body) + 1)
                if how == "flip" and at < len(body):
                    body[at] ^= chunk[0]
                elif how == "insert":
                    body[at:at] = chunk
                else:
                    del body[at:at + len(chunk)]
            ctype = data.draw(st.sampled_from(["application/json", "application/yaml",
                                               "application/vnd.kubernetes.protobuf"]))
            fuzz_client.send("POST", paths[i], bytes(body), ctype)

    batch()
    assert fuzz_client.sent - before >= MUTATION_REQUESTS
    assert_alive(fuzz_client)


SUBRESOURCE_BODIES = [b"", b"null", b"[]", b"1", b'"x"', b"{", b'{"target":null}', b'{"target":[]}',
                      b'{"target":{"name":1}}', b'{"target":{"name":"n","kind":[]}}', b'{"metadata":[]}',
                      b'{"metadata":{"uid":1},"target":{"name":"n"}}', b'{"spec":{"replicas":"x"}}', b'{"spec":[]}',
                      b'{"spec":{"replicas":-1}}', b'{"spec":{"replicas":1e400}}',
                      b'{"metadata":{"resourceVersion":1},"spec":{"replicas":1}}',
                      b'{"spec":{"replicas":99999999999999999999}}',
                      b'[{"op":"replace","path":"/spec/replicas","value":"x"}]', b"spec: {replicas: [1]}\n"]


@pytest.mark.timeout(300)
def test_subresources_and_query_parameters(fuzz_client: FuzzClient) -> None:
    """pods/binding, deployments/scale (every patch type) and deletecollection, which the OpenAPI
    document does not list, with broken bodies; lists and deletes with broken query parameters."""
    before = fuzz_client.sent
    fuzz_client.json("POST", f"/api/v1/namespaces/{NS}/pods", {
        "metadata": {"name": "bind-me"}, "spec": {"containers": [{"name": "c", "image": "i"}]}})
    fuzz_client.json("POST", f"/apis/apps/v1/namespaces/{NS}/deployments", {
        "metadata": {"name": "scale-me"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
            "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}})
    scale = f"/apis/apps/v1/namespaces/{NS}/deployments/scale-me/scale"
    targets = [("POST", f"/api/v1/namespaces/{NS}/pods/bind-me/binding", "application/json"),
               ("PUT", scale, "application/json"), ("PUT", scale, "application/yaml"),
               *(("PATCH", scale, ctype) for ctype in PATCH_TYPES),
               ("DELETE", f"/api/v1/namespaces/{NS}/configmaps", "application/json")]
    for body in SUBRESOURCE_BODIES:
        for method, path, ctype in targets:
            fuzz_client.send(method, path, body, ctype, params={"fieldManager": "h"})
    for params in ({"labelSelector": "a in ("}, {"fieldSelector": "x"}, {"labelSelector": "\x00"},
                   {"limit": "1e3"}, {"limit": "-5"}, {"continue": "!!"}, {"resourceVersion": "-1"},
                   {"resourceVersionMatch": "Exact", "resourceVersion": "99999999999"},
                   {"gracePeriodSeconds": "x"}, {"propagationPolicy": "x"}, {"dryRun": "x"}):
        for method in ("GET", "DELETE"):
            fuzz_client.send(method, f"/api/v1/namespaces/{NS}/configmaps", None, None, params=params)
    assert fuzz_client.sent - before >= 180
    assert_alive(fuzz_client)

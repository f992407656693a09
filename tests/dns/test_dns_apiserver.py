"""kproxy-dns fed by a real kproxy-apiserver through kproxy's Reflector: a Service or
EndpointSlice change shows in the answers right after the watch event."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest
import requests
import urllib3
from dns_helpers import ZONE, KdnsProcess, endpoint_slice, start_kdns

testing = pytest.importorskip("controlplane_stub.apiserver.testing", reason="the API server is not in this tree")


class Api:
    def __init__(self, api: Any) -> None:
        self.url = api.url
        self.s = requests.Session()
        self.s.trust_env = False
        self.s.verify = api.ca_file or False
        self.s.headers["Authorization"] = f"Bearer {api.token}"

    def call(self, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
        r = self.s.request(method, self.url + path, json=body if ctype == "application/json" else None,
                           data=None if ctype == "application/json" else __import__("json").dumps(body),
                           headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json()


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Api, KdnsProcess]]:
    urllib3.disable_warnings()
    with testing.running_apiserver() as api:
        client = Api(api)
        client.call("POST", "/api/v1/namespaces/default/services",
                    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "before"},
                     "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
        p = start_kdns(None, ["--kubeconfig", api.kubeconfig, "--upstream", "127.0.0.1:9",
                              "--upstream-timeout", "0.2"])
        try:
            yield client, p
        finally:
            p.stop()


def eventually(fn: Callable[[], Any], timeout: float = 5.0) -> tuple[Any, float]:
    """Polls fn until it returns something truthy; returns it and the seconds it took."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        last = fn()
        if last:
            return last, time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"condition not met in {timeout}s (last={last!r})")


def addrs(p: KdnsProcess, name: str, rdtype: str = "A") -> list[str]:
    m = p.query(name, rdtype)
    if m.rcode() != dns.rcode.NOERROR:
        return []
    return sorted(r.to_text() for rrset in m.answer for r in rrset)


@pytest.mark.timeout(60)
def test_dns_follows_the_api_server(cluster: tuple[Api, KdnsProcess]) -> None:
    api, p = cluster
    # the list: a Service created before kproxy-dns started
    _, took = eventually(lambda: p.http("/ready")[0] == 200, timeout=15)
    before = api.call("GET", "/api/v1/namespaces/default/services/before")
    assert addrs(p, f"before.default.svc.{ZONE}") == [before["spec"]["clusterIP"]]

    # a watch ADDED: the next queries see it
    created = api.call("POST", "/api/v1/namespaces/default/services",
                       {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    ip = created["spec"]["clusterIP"]
    _, took = eventually(lambda: addrs(p, f"web.default.svc.{ZONE}") == [ip])
    assert took < 3.0
    assert addrs(p, f"_http._tcp.web.default.svc.{ZONE}", "SRV") == [f"0 100 80 web.default.svc.{ZONE}."]

    # headless Service + EndpointSlice, then the slice changes
    api.call("POST", "/api/v1/namespaces/default/services",
             {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
              "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}})
    api.call("POST", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
             endpoint_slice("db-x", "db", [("10.5.0.1", "db-0", True), ("10.5.0.2", None, False)],
                            ports=[("pg", 5432, "TCP")]))
    eventually(lambda: addrs(p, f"db.default.svc.{ZONE}") == ["10.5.0.1"])
    assert addrs(p, f"db-0.db.default.svc.{ZONE}") == ["10.5.0.1"]
    api.call("PATCH", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/db-x",
             {"endpoints": [{"addresses": ["10.5.0.1"], "hostname": "db-0", "conditions": {"ready": True}},
                            {"addresses": ["10.5.0.2"], "conditions": {"ready": True}}]},
             ctype="application/merge-patch+json")
    _, took = eventually(lambda: addrs(p, f"db.default.svc.{ZONE}") == ["10.5.0.1", "10.5.0.2"])
    assert took < 3.0
    assert addrs(p, "2.0.5.10.in-addr.arpa", "PTR") == [f"10-5-0-2.db.default.svc.{ZONE}."]

    # DELETED: NXDOMAIN again, and the PTR of its ClusterIP goes too
    api.call("DELETE", "/api/v1/namespaces/default/services/web")
    eventually(lambda: p.query(f"web.default.svc.{ZONE}", "A").rcode() == dns.rcode.NXDOMAIN)
    reverse = ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
    assert addrs(p, reverse, "PTR") == []
    assert p.alive()


def _post(api: Api, obj: dict[str, Any]) -> dict[str, Any]:
    ns = obj["metadata"].get("namespace", "default")
    if obj["kind"] == "Service":
        return api.call("POST", f"/api/v1/namespaces/{ns}/services", obj)  # type: ignore[no-any-return]
    return api.call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", obj)  # type: ignore[no-any-return]


@pytest.mark.timeout(60)
def test_dns_record_types_from_the_api_server(cluster: tuple[Api, KdnsProcess]) -> None:
    """The record matrix of test_dns_records.py, with the objects validated and stored by the API
    server (IPv6 is not configured on that cluster: the AAAA cases stay in test_dns_records.py)."""
    api, p = cluster
    eventually(lambda: p.http("/ready")[0] == 200, timeout=15)
    svc = {"apiVersion": "v1", "kind": "Service"}
    api_svc = _post(api, {**svc, "metadata": {"name": "api-web", "namespace": "default"},
                          "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                             {"name": "dns", "port": 53, "protocol": "UDP"}]}})
    ip = api_svc["spec"]["clusterIP"]
    _post(api, {**svc, "metadata": {"name": "api-ext", "namespace": "default"},
                "spec": {"type": "ExternalName", "externalName": "www.example.com"}})
    dns_svc = _post(api, {**svc, "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                          "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}})
    _post(api, {**svc, "metadata": {"name": "api-hl", "namespace": "default"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    _post(api, endpoint_slice("api-hl-1", "api-hl", [(f"10.6.0.{i}", f"h{i}" if i < 3 else None, True)
                                                     for i in range(1, 71)], ports=[("http", 8080, "TCP")]))
    eventually(lambda: len(addrs(p, f"api-hl.default.svc.{ZONE}", "A")) == 70)

    assert addrs(p, f"api-web.default.svc.{ZONE}") == [ip]
    assert addrs(p, f"_dns._udp.api-web.default.svc.{ZONE}", "SRV") == [f"0 100 53 api-web.default.svc.{ZONE}."]
    reverse = ".".join(reversed(ip.split("."))) + ".in-addr.arpa"
    assert addrs(p, reverse, "PTR") == [f"api-web.default.svc.{ZONE}."]
    assert addrs(p, f"api-ext.default.svc.{ZONE}", "A") == ["www.example.com."]  # the CNAME
    assert addrs(p, f"h1.api-hl.default.svc.{ZONE}") == ["10.6.0.1"]
    assert addrs(p, f"10-6-0-9.api-hl.default.svc.{ZONE}") == ["10.6.0.9"]
    assert addrs(p, "1.0.6.10.in-addr.arpa", "PTR") == [f"h1.api-hl.default.svc.{ZONE}."]
    assert addrs(p, f"10-1-2-3.default.pod.{ZONE}") == ["10.1.2.3"]
    assert addrs(p, f"dns-version.{ZONE}", "TXT") == ['"1.1.0"']
    ns = p.query(ZONE, "NS")
    assert [r.to_text() for rr in ns.additional for r in rr] == [dns_svc["spec"]["clusterIP"]]
    nx, nodata = p.query(f"nope.default.svc.{ZONE}", "A"), p.query(f"api-web.default.svc.{ZONE}", "AAAA")
    assert nx.rcode() == dns.rcode.NXDOMAIN and nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nx.authority and nodata.authority  # both carry the SOA
    # 70 headless addresses: truncated over plain UDP, whole over TCP, and dig follows by itself
    assert p.query(f"api-hl.default.svc.{ZONE}", "A", payload=None).flags & dns.flags.TC
    assert len(p.query(f"api-hl.default.svc.{ZONE}", "A", tcp=True).answer[0]) == 70
    assert "ANSWER: 70" in p.dig(f"api-hl.default.svc.{ZONE}", "+noedns")
    assert p.dig(f"_http._tcp.api-hl.default.svc.{ZONE}", "SRV", "+tcp", "+short").count(" 8080 ") == 70

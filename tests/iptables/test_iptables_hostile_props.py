"""Hostile API objects -> ingestion -> iptables restore input, without a kernel.

Arbitrary strings and numbers go into every Service, EndpointSlice and Node field a proxier uses;
the objects then take kproxy's own path (msgspec decode into the trimmed types, kproxy.kube.ingest,
the ProxyServer's handlers and change trackers, the iptables proxier's full-sync plan rendered by
both renderer twins). The properties: the restore input only ever holds values the validators
produce (tests/iptables/iptables_rulecheck.py), every record handed to the IPVS and userspace
proxiers holds canonical values, and a valid Service beside the hostile one is always programmed.

The iptables tool is replaced by a stand-in that returns empty dumps (these tests render, they do
not apply; the same objects against the real kernel, through the real API server and the kproxy
process, are in test_iptables_hostile.py).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iptables_rulecheck import rule_problems

from kproxy import _fastpath, _purepath
from kproxy.config import KProxyConfig
from kproxy.kube.ingest import EndpointSlice, InvalidObject, Node, Service, node_ips, service_ports, slice_endpoints
from kproxy.model import Endpoint, ServicePort
from kproxy.proxiers.iptables import IptablesProxier
from kproxy.proxiers.ipvs import IPVSOptions, build_fragment
from kproxy.server import ProxyServer

INJECT = [
    "198.51.100.7\n-A INPUT -j ACCEPT",
    "10.0.0.1 -j ACCEPT",
    'a" -j ACCEPT -m comment --comment "b',
    "0.0.0.0/0\n-A INPUT -j ACCEPT",
    "1.2.3.4/24 -s 0.0.0.0/0",
    "::ffff:1.2.3.4",
    "fe80::1%eth0",
    "010.0.0.1",
    "10.0.0.256",
    "",
    " ",
    "x" * 300,
    "web\n",
    "Web",
    "1web",
]
hostile_text = st.one_of(st.sampled_from(INJECT), st.text(max_size=24))
hostile_int = st.one_of(st.sampled_from([0, -1, 65536, 70000, 2**31, 2**63 - 1, 86401]),
                        st.integers(min_value=-(2**40), max_value=2**40))


def maybe(valid: Any, bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field that is valid most of the time, so that one hostile field at a time is common."""
    return st.one_of(st.just(valid), st.just(valid), bad)


@st.composite
def hostile_service(draw: st.DrawFn) -> dict[str, Any]:
    lb_ip = draw(maybe("198.51.100.9", hostile_text))
    return {
        "metadata": {"name": draw(maybe("evil", hostile_text)), "namespace": draw(maybe("ns", hostile_text))},
        "spec": {
            "type": draw(maybe("LoadBalancer", st.sampled_from(["NodePort", "ClusterIP", "Bogus", ""]))),
            "clusterIPs": [draw(maybe("10.96.0.20", hostile_text))],
            "ports": [{
                "name": draw(maybe("http", hostile_text)),
                "port": draw(maybe(80, hostile_int)),
                "protocol": draw(maybe("TCP", st.one_of(hostile_text, st.sampled_from(["UDP", "SCTP", "tcp"])))),
                "nodePort": draw(maybe(30080, hostile_int)),
            }],
            "externalIPs": [draw(maybe("192.0.2.10", hostile_text))],
            "loadBalancerSourceRanges": [draw(maybe("203.0.113.0/24", hostile_text))],
            "sessionAffinity": draw(st.sampled_from(["None", "ClientIP"])),
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": draw(maybe(60, hostile_int))}},
            "externalTrafficPolicy": draw(st.sampled_from(["Cluster", "Local", "x\ny"])),
            "healthCheckNodePort": draw(maybe(31000, hostile_int)),
        },
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}},
    }


@st.composite
def hostile_slice(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "metadata": {"name": "evil-abc", "namespace": draw(maybe("ns", hostile_text)),
                     "labels": {"kubernetes.io/service-name": draw(maybe("evil", hostile_text))}},
        "addressType": draw(maybe("IPv4", st.sampled_from(["IPv6", "FQDN", "x"]))),
        "ports": [{"name": draw(maybe("http", hostile_text)), "port": draw(maybe(8080, hostile_int)),
                   "protocol": draw(maybe("TCP", hostile_text))}],
        "endpoints": [{"addresses": [draw(maybe("10.1.0.9", hostile_text))], "nodeName": draw(hostile_text),
                       "zone": draw(hostile_text), "hostname": draw(hostile_text)}],
    }


GOOD_SERVICE = {"metadata": {"name": "web", "namespace": "good"},
                "spec": {"type": "NodePort", "clusterIPs": ["10.96.0.10"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30010}]}}
GOOD_SLICE = {"metadata": {"name": "web-abc", "namespace": "good", "labels": {"kubernetes.io/service-name": "web"}},
              "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
              "endpoints": [{"addresses": ["10.1.0.2"]}, {"addresses": ["10.1.0.3"]}]}


class _NoKernel:
    """The iptables tool, for plan(): an empty kernel (no chains, no jumps yet)."""

    backend = "nft"

    def save(self, table: str) -> str:
        return ""

    def chain_rules(self, table: str, chain: str) -> list[str]:
        return []


def _server() -> ProxyServer:
    # Only the handlers and the change trackers are used: no proxier, no API client.
    return ProxyServer(KProxyConfig(mode="iptables", hostname_override="node-1"), lambda _: None,  # type: ignore[arg-type,return-value]
                       client=None)  # type: ignore[arg-type]


def _canonical_ip(value: str) -> bool:
    return str(ipaddress.ip_address(value)) == value


def _check_records(services: dict[Any, ServicePort], endpoints: dict[Any, tuple[Endpoint, ...]]) -> None:
    """What the IPVS and userspace proxiers consume: canonical values only, and IPVS builds."""
    for sp in services.values():
        assert sp.protocol in ("TCP", "UDP", "SCTP")
        assert 1 <= sp.port <= 65535 and 0 <= sp.node_port <= 65535 and 0 <= sp.health_check_node_port <= 65535
        for ip in (*sp.cluster_ips, *sp.external_ips, *sp.load_balancer_ips):
            assert _canonical_ip(ip), ip
        for cidr in sp.load_balancer_source_ranges:
            assert str(ipaddress.ip_network(cidr)) == cidr
        if sp.session_affinity_timeout is not None:
            assert 1 <= sp.session_affinity_timeout <= 86400
        build_fragment(sp, endpoints.get(sp.name, ()), ["192.168.7.2"], IPVSOptions())
    for eps in endpoints.values():
        for e in eps:
            assert _canonical_ip(e.ip) and 1 <= e.port <= 65535


def _pipeline(svc_doc: dict[str, Any], slice_doc: dict[str, Any], renderer: Any) -> str:
    server = _server()
    for key, doc in (("good/web", GOOD_SERVICE), ("evil", svc_doc)):
        server.on_service(key, None, msgspec.convert(doc, Service))
    for key, doc in (("good/web-abc", GOOD_SLICE), ("evil/evil-abc", slice_doc)):
        es = msgspec.convert(doc, EndpointSlice)
        server.on_slice(key, None, es)
    co = server.state.checkout(True)
    services, endpoints = co.request.services, co.request.endpoints
    assert any(n.namespace == "good" and n.name == "web" for n in services), "the valid Service was dropped"
    _check_records(services, endpoints)
    proxier = IptablesProxier(_NoKernel(), pure_renderer=renderer is _purepath,  # type: ignore[arg-type]
                              node_ips=("192.168.7.2",))
    text = proxier.plan(co.request, full=True).data.decode()
    assert '"good/web:http cluster IP"' in text and "10.1.0.3:8080" in text
    return text


@pytest.mark.parametrize("renderer", [_fastpath, _purepath], ids=["compiled", "pure"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(svc_doc=hostile_service(), slice_doc=hostile_slice())
def test_hostile_fields_never_reach_the_restore_input(renderer: Any, svc_doc: dict[str, Any],
                                                       slice_doc: dict[str, Any]) -> None:
    text = _pipeline(svc_doc, slice_doc, renderer)
    assert rule_problems(text) == []


@settings(max_examples=200, deadline=None)
@given(addresses=st.lists(st.tuples(st.sampled_from(["InternalIP", "ExternalIP", "Hostname"]),
                                    st.one_of(hostile_text, st.ip_addresses().map(str))), max_size=5))
def test_node_ips_are_only_parsed_addresses(addresses: list[tuple[str, str]]) -> None:
    node = msgspec.convert({"metadata": {"name": "node-1"},
                            "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]}}, Node)
    ips = node_ips(node)
    assert all(_canonical_ip(ip) for ip in ips)
    assert len({":" in ip for ip in ips}) == len(ips) <= 2


# ---- the findings of issue 13, one each; each failed before ingestion validated its fields ----

def _svc(spec: dict[str, Any], status: dict[str, Any] | None = None) -> Service:
    return msgspec.convert({"metadata": {"name": "evil", "namespace": "ns"}, "spec": spec,
                            "status": status or {}}, Service)


def test_lb_ingress_ip_with_a_newline_is_left_out_not_rendered() -> None:
    # As kube-proxy's filter: the bad ingress IP is left out (and reported), the good one and the
    # rest of the Service are programmed.
    evil = {"type": "LoadBalancer", "clusterIPs": ["10.96.0.20"], "ports": [{"port": 80, "nodePort": 30080}]}
    status = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7\n-A INPUT -j ACCEPT"}, {"ip": "198.51.100.8"}]}}
    reported: list[InvalidObject] = []
    (port,) = service_ports(_svc(evil, status), reported.append).values()
    assert port.load_balancer_ips == ("198.51.100.8",) and port.cluster_ips == ("10.96.0.20",)
    assert [e.reason for e in reported] == ["ip"] and "\n" not in str(reported[0])
    text = _pipeline(msgspec.to_builtins(_svc(evil, status)), GOOD_SLICE, _fastpath)
    assert "-A INPUT" not in text and "198.51.100.7" not in text and rule_problems(text) == []
    assert "198.51.100.8" in text and "10.96.0.20" in text


@pytest.mark.parametrize("spec, status, kept", [
    ({"externalIPs": ["192.0.2.1 -j ACCEPT", "", "192.0.2.2"]}, None, {"external_ips": ("192.0.2.2",)}),
    ({"type": "LoadBalancer", "loadBalancerSourceRanges": ["0.0.0.0/0 -j ACCEPT", " ", "203.0.113.0/24"],
      "ports": [{"port": 80, "nodePort": 30081}]}, None, {"load_balancer_source_ranges": ("203.0.113.0/24",)}),
], ids=["external-ip", "source-range"])
def test_one_bad_entry_of_a_filtered_list_is_left_out(spec: dict[str, Any], status: dict[str, Any] | None,
                                                      kept: dict[str, Any]) -> None:
    reported: list[InvalidObject] = []
    (port,) = service_ports(_svc({"clusterIPs": ["10.96.0.21"], "ports": [{"port": 80}], **spec}, status),
                            reported.append).values()
    assert {k: getattr(port, k) for k in kept} == kept
    assert len(reported) == 1 and "-j ACCEPT" in str(reported[0]) and "\n" not in str(reported[0])


def test_every_source_range_bad_drops_the_service() -> None:
    # kube-proxy would program no firewall at all (every source let in); here it fails closed.
    evil = {"type": "LoadBalancer", "clusterIPs": ["10.96.0.22"], "ports": [{"port": 80, "nodePort": 30082}],
            "loadBalancerSourceRanges": ["10.0.0.0/33", "not-a-cidr"]}
    reported: list[InvalidObject] = []
    with pytest.raises(InvalidObject) as exc:
        service_ports(_svc(evil), reported.append)
    assert exc.value.reason == "cidr" and reported == []


def test_a_quote_in_a_port_name_is_refused_not_rendered() -> None:
    evil = {"clusterIPs": ["10.96.0.20"], "ports": [{"name": 'a" -j ACCEPT -m comment --comment "b', "port": 80}]}
    with pytest.raises(InvalidObject) as exc:
        service_ports(_svc(evil))
    assert exc.value.reason == "name"
    text = _pipeline(msgspec.to_builtins(_svc(evil)), GOOD_SLICE, _purepath)
    assert "ACCEPT -m comment" not in text and rule_problems(text) == []


def test_port_70000_skips_that_service_only_and_counts_it() -> None:
    server = _server()
    server.on_service("good/web", None, msgspec.convert(GOOD_SERVICE, Service))
    server.on_service("ns/evil", None, _svc({"clusterIPs": ["10.96.0.20"], "ports": [{"port": 70000}]}))
    co = server.state.checkout(True)
    assert {n.name for n in co.request.services} == {"web"}
    assert server.metrics.invalid_objects.labels(kind="Service", reason="port")._value.get() == 1
    text = server.metrics.exposition().decode()
    assert 'kproxy_invalid_objects_total{kind="Service",reason="port"} 1.0' in text


def test_an_invalid_new_version_removes_the_services_rules_and_a_valid_one_restores_them() -> None:
    server = _server()
    good = msgspec.convert(GOOD_SERVICE, Service)
    server.on_service("good/web", None, good)
    assert len(server.state.checkout(True).request.services) == 1
    bad = msgspec.convert({**GOOD_SERVICE, "spec": {**GOOD_SERVICE["spec"], "clusterIPs": ["10.96.0.300"]}}, Service)
    server.on_service("good/web", "", bad)
    assert server.state.checkout(True).request.services == {}
    server.on_service("good/web", "", good)
    assert len(server.state.checkout(True).request.services) == 1


def test_garbage_node_internal_ip_is_skipped_not_fatal() -> None:
    node = msgspec.convert({"metadata": {"name": "node-1"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "10.0.0.1\n-A INPUT -j ACCEPT"},
        {"type": "InternalIP", "address": "not-an-ip"}]}}, Node)
    assert node_ips(node) == []
    # The iptables proxier is built from the node IPs the server found: none, so no NodePort
    # is bound to a node address of its own, and building it does not raise.
    proxier = IptablesProxier(_NoKernel(), nodeport_addresses=("primary",), node_ips=tuple(node_ips(node)))  # type: ignore[arg-type]
    assert proxier.nodeport_addresses == ()


def test_invalid_endpointslice_is_skipped_whole() -> None:
    doc = {**GOOD_SLICE, "endpoints": [{"addresses": ["10.1.0.2"]}, {"addresses": ["10.1.0.3\n-j ACCEPT"]}]}
    with pytest.raises(InvalidObject) as exc:
        slice_endpoints(msgspec.convert(doc, EndpointSlice), "node-1")
    assert exc.value.kind == "EndpointSlice" and exc.value.reason == "ip"

"""kproxy.trace.ipvs: the IPVS-mode walk over iptables rules, ipsets and virtual servers (pure
logic, no kernel: IPVS runs only in the VM, where tests/vm/inside/test_ipvs_conformance.py checks
the trace against real packets). The rules are IPVS mode's own (kproxy.proxiers.ipvs.render_iptables)."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.backends.ipvs import IP_VS_SVC_F_PERSISTENT, RealServer, VirtualServer
from kproxy.proxiers.ipvs import JUMPS, IPVSOptions, render_iptables
from kproxy.trace import summarize
from kproxy.trace.iptables import Outcome, TraceError
from kproxy.trace.ipvs import IPVSTracer, parse_ipsets

NODE = "192.168.50.1"
LOCAL = {NODE, "10.96.0.10", "10.98.0.10", "127.0.0.1"}  # kube-ipvs0 holds the Service addresses
# iptables-save prints appended rules: the renderer's "-I CHAIN 1" jumps become "-A CHAIN".
DUMP = re.sub(r"^-I (\S+) 1 ", r"-A \1 ", render_iptables(IPVSOptions(cluster_cidr="10.0.0.0/8"), JUMPS).decode(),
              flags=re.MULTILINE)
SETS = """create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-CLUSTER-IP 10.96.0.10,tcp:80
create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536
add KUBE-LOOP-BACK 10.1.0.2,tcp:8080,10.1.0.2
create KUBE-LOAD-BALANCER hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-LOAD-BALANCER 10.98.0.10,tcp:80
create KUBE-LOAD-BALANCER-FW hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-LOAD-BALANCER-FW 10.98.0.10,tcp:80
create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536
add KUBE-LOAD-BALANCER-SOURCE-CIDR 10.98.0.10,tcp:80,203.0.113.0/24
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535
add KUBE-NODE-PORT-TCP 31000
create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535
add KUBE-HEALTH-CHECK-NODE-PORT 32000
create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536
add KUBE-IPVS-IPS 10.96.0.10
add KUBE-IPVS-IPS 10.98.0.10
""" + "".join(f"create {n} hash:ip,port family inet hashsize 1024 maxelem 65536\n" for n in (
    "KUBE-EXTERNAL-IP", "KUBE-EXTERNAL-IP-LOCAL", "KUBE-LOAD-BALANCER-LOCAL")) + "".join(
    f"create {n} bitmap:port range 0-65535\n" for n in ("KUBE-NODE-PORT-LOCAL-TCP", "KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP"))
PODS = [RealServer("10.1.0.2", 8080), RealServer("10.2.0.2", 8080)]


def tracer(weights: tuple[int, ...] = (1, 1), persistent: bool = False) -> IPVSTracer:
    dests = [RealServer(rs.address, rs.port, w) for rs, w in zip(PODS, weights)]
    flags, timeout = (IP_VS_SVC_F_PERSISTENT, 60) if persistent else (0, 0)
    services = [(VirtualServer("10.96.0.10", 80, "TCP", "rr", flags, timeout), dests),
                (VirtualServer("10.98.0.10", 80, "TCP"), dests),
                (VirtualServer(NODE, 31000, "TCP"), dests),
                (VirtualServer("10.96.0.10", 81, "TCP"), [])]
    return IPVSTracer(DUMP, LOCAL, parse_ipsets(SETS), services)


def test_cluster_ip_from_outside_is_scheduled_and_masqueraded() -> None:
    routes = summarize(tracer().paths("192.168.50.2", "10.96.0.10", 80))
    assert {(r.endpoint, r.probability, r.masquerade) for r in routes} == {
        ("10.1.0.2:8080", 0.5, True), ("10.2.0.2:8080", 0.5, True)}
    assert any(h.startswith("ipvs/TCP 10.96.0.10:80 rr") for h in routes[0].hops)


def test_pod_source_keeps_its_address_but_hairpin_is_masqueraded() -> None:
    t = tracer()
    assert t.trace("10.1.0.3", "10.96.0.10", 80) == {Outcome("ACCEPT", "10.1.0.2:8080", False),
                                                     Outcome("ACCEPT", "10.2.0.2:8080", False)}
    assert Outcome("ACCEPT", "10.1.0.2:8080", True) in t.trace("10.1.0.2", "10.96.0.10", 80)


@given(st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=2).filter(lambda w: sum(w) > 0))
@settings(max_examples=25, deadline=None)
def test_weights_give_the_shares_and_zero_weight_gets_nothing(weights: list[int]) -> None:
    routes = summarize(tracer(tuple(weights)).paths("192.168.50.2", "10.96.0.10", 80))
    got = {r.endpoint: r.probability for r in routes}
    want = {f"{rs.address}:{rs.port}": w / sum(weights) for rs, w in zip(PODS, weights) if w}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-9 for k in want)


def test_persistence_is_affinity() -> None:
    routes = summarize(tracer(persistent=True).paths("192.168.50.2", "10.96.0.10", 80))
    assert {r.endpoint for r in routes if r.affinity} == {"10.1.0.2:8080", "10.2.0.2:8080"}
    assert any("persistent 60s" in h for h in routes[0].hops)


def test_source_ranges_drop_others_no_real_server_rejects_unknown_ports_rejected() -> None:
    t = tracer()
    assert t.trace("192.168.50.2", "10.98.0.10", 80) == {Outcome("DROP", "", False)}
    assert {o.endpoint for o in t.trace("203.0.113.9", "10.98.0.10", 80)} == {"10.1.0.2:8080", "10.2.0.2:8080"}
    assert t.trace("192.168.50.2", "10.96.0.10", 81) == {Outcome("REJECT", "", False)}  # no real servers
    assert t.trace("192.168.50.2", "10.96.0.10", 82) == {Outcome("REJECT", "", False)}  # KUBE-IPVS-FILTER


def test_node_port_from_node_and_outside_health_port_and_others() -> None:
    t = tracer()
    for src in ("192.168.50.2", NODE):
        assert {o.endpoint for o in t.trace(src, NODE, 31000)} == {"10.1.0.2:8080", "10.2.0.2:8080"}
    assert t.trace("192.168.50.2", NODE, 32000) == {Outcome("ACCEPT", "", False)}
    assert t.trace("192.168.50.2", "10.3.0.9", 80) == {Outcome("ACCEPT", "", False)}  # routed, not a Service


@pytest.mark.parametrize("bad, word", [
    ("create S hash:ip family inet\nadd S 10.0.0.300\n", "bad ip"),
    ("create S hash:ip,port family inet\nadd S 10.0.0.3,tcp:70000\n", "bad port"),
    ("create S hash:ip,port family inet\nadd S 10.0.0.3\n", "does not fit"),
    ("add S 10.0.0.3\n", "undeclared"),
    ("create S hash:mac\n", "bad set"),
    ("flush S\n", "unexpected line"),
    ("create S hash:ip\n" + "add S " + "1" * 9000 + "\n", "line of"),
])
def test_bad_ipset_output_is_an_error_naming_it(bad: str, word: str) -> None:
    with pytest.raises(TraceError, match=word):
        parse_ipsets(bad)


def test_bad_virtual_servers_and_missing_sets_are_errors() -> None:
    with pytest.raises(TraceError, match="bad address"):
        IPVSTracer(DUMP, LOCAL, parse_ipsets(SETS), [(VirtualServer("10.96.0.x", 80, "TCP"), [])])
    with pytest.raises(TraceError, match="bad virtual server"):
        IPVSTracer(DUMP, LOCAL, parse_ipsets(SETS), [(VirtualServer("10.96.0.1", 80, "TCP", "r r"), [])])
    with pytest.raises(TraceError, match="does not have"):
        IPVSTracer(DUMP, LOCAL, {}, []).trace("192.168.50.2", "10.96.0.10", 80)


@given(st.text(alphabet=st.sampled_from(list("createaddhash:ip,portnetbitmap KUBE-S 0123456789./tcp\n")), max_size=300))
@settings(max_examples=300, deadline=None)
def test_ipset_garbage_is_an_error_or_sets(text: str) -> None:
    try:
        parse_ipsets(text)
    except TraceError:
        pass

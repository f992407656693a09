"""kproxy.proxy against a from-scratch model of Kubernetes' Service semantics.

The model below is written from the rules as Kubernetes documents them (Service traffic
policies, terminating endpoints KEP-1669, topology-aware routing, servicehealth, UDP conntrack),
each traffic kind on its own, not from the module's structure: hypothesis compares the two on
random Services and endpoint sets, and named cases pin the conformance scenarios.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.backends.conntrack import Conntrack
from kproxy.healthcheck import NamespacedName
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxy import (
    SourceRanges,
    apply_cleanup,
    categorize,
    health_checks,
    service_endpoints,
    udp_conntrack_cleanup,
)

ZONE = "zone-a"

# ---- the model --------------------------------------------------------------------------------


def usable(e: Endpoint) -> bool:
    return e.ready or (e.serving and e.terminating)


def model_local(eps: list[Endpoint]) -> set[str]:
    """This node's ready endpoints; if it has none, this node's serving+terminating ones."""
    mine = [e for e in eps if e.is_local]
    ready = {e.addr for e in mine if e.ready}
    return ready or {e.addr for e in mine if e.serving and e.terminating}


def model_cluster(eps: list[Endpoint], node_zone: str) -> set[str]:
    """Every ready endpoint (only the ones hinted for this zone when hints are complete and one
    names this zone); if none is ready anywhere, every serving+terminating one, zones ignored."""
    ready = [e for e in eps if e.ready]
    hinted = bool(node_zone) and all(e.zone_hints for e in ready) and any(node_zone in e.zone_hints for e in ready)
    if hinted:
        ready = [e for e in ready if node_zone in e.zone_hints]
    if ready:
        return {e.addr for e in ready}
    return {e.addr for e in eps if e.serving and e.terminating}


def model_external_reachable(svc: ServicePort) -> bool:
    return bool(svc.node_port or svc.external_ips or svc.load_balancer_ips)


@dataclass
class Expected:
    internal: set[str]
    external: set[str]
    has_any: bool


def model(svc: ServicePort, eps: list[Endpoint], node_zone: str) -> Expected:
    internal = model_local(eps) if svc.internal_policy_local else model_cluster(eps, node_zone)
    if not model_external_reachable(svc):
        external: set[str] = set()  # no NodePort, external IP or LoadBalancer IP: no such traffic
    elif svc.external_policy_local:
        external = model_local(eps)
    else:
        external = model_cluster(eps, node_zone)
    return Expected(internal, external, any(usable(e) for e in eps))


# ---- strategies -------------------------------------------------------------------------------

NAME = ServicePortName("ns", "svc", "p", "TCP")


def svc(**kw: object) -> ServicePort:
    base: dict[str, object] = dict(name=NAME, type="NodePort", node_port=30080, cluster_ips=("10.96.0.10",),
                                   port=80, protocol="TCP")
    base.update(kw)
    return ServicePort(**base)  # type: ignore[arg-type]


def ep(n: int, *, ready: bool = True, serving: bool | None = None, terminating: bool = False,
       local: bool = False, hints: tuple[str, ...] = ()) -> Endpoint:
    return Endpoint(ip=f"10.244.0.{n}", port=8080, ready=ready,
                    serving=ready if serving is None else serving, terminating=terminating,
                    node_name="me" if local else "other", is_local=local, zone_hints=hints)


endpoint_st = st.builds(
    lambda n, ready, serving, terminating, local, hints: ep(
        n, ready=ready, serving=serving, terminating=terminating, local=local, hints=hints),
    st.integers(1, 12), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
    st.sampled_from([(), ("zone-a",), ("zone-b",), ("zone-a", "zone-b")]),
)
service_st = st.builds(
    lambda typ, itp, etp, eips, lbs: svc(
        type=typ,
        node_port=30080 if typ != "ClusterIP" else 0,
        external_ips=eips,
        load_balancer_ips=lbs if typ == "LoadBalancer" else (),
        internal_policy_local=itp,
        external_policy_local=etp,
    ),
    st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), st.booleans(), st.booleans(),
    st.sampled_from([(), ("192.0.2.7",)]), st.sampled_from([(), ("198.51.100.9",)]),
)


def dedup(eps: list[Endpoint]) -> list[Endpoint]:
    return list({e.addr: e for e in eps}.values())


@settings(max_examples=400, deadline=None)
@given(service_st, st.lists(endpoint_st, max_size=8), st.sampled_from(["", ZONE, "zone-c"]))
def test_matches_model(s: ServicePort, eps: list[Endpoint], zone: str) -> None:
    eps = dedup(eps)
    got = service_endpoints(s, eps, zone)
    want = model(s, eps, zone)
    assert {e.addr for e in got.internal} == want.internal
    assert {e.addr for e in got.external} == want.external
    assert got.has_any == want.has_any
    # pod and node traffic to an external address short-circuits to the cluster-wide endpoints
    if model_external_reachable(s) or not s.internal_policy_local:
        assert {e.addr for e in got.cluster} == model_cluster(eps, zone)
    else:
        assert got.cluster == ()
    # every endpoint some traffic goes to has a place in `reachable`, and nothing else does
    reach = {e.addr for e in got.reachable}
    assert want.internal | want.external <= reach
    assert reach <= {e.addr for e in eps if usable(e)}
    assert len(got.reachable) == len(reach)  # no endpoint twice


@settings(max_examples=200, deadline=None)
@given(service_st, st.lists(endpoint_st, max_size=8))
def test_order_of_input_does_not_matter(s: ServicePort, eps: list[Endpoint]) -> None:
    eps = dedup(eps)
    a, b = categorize(s, eps, ZONE), categorize(s, list(reversed(eps)), ZONE)
    for x, y in ((a.cluster, b.cluster), (a.local, b.local), (a.reachable, b.reachable)):
        assert sorted(x) == sorted(y)
    assert (a.has_any, a.topology) == (b.has_any, b.topology)


# ---- the conformance cases, named -------------------------------------------------------------

CASES: list[tuple[str, ServicePort, list[Endpoint], str, set[int], set[int], bool]] = [
    # (case, service, endpoints, node zone, internal endpoint numbers, external ones, has_any)
    ("ready endpoints serve", svc(), [ep(1), ep(2)], "", {1, 2}, {1, 2}, True),
    ("not ready and not serving: no endpoints (refused)", svc(), [ep(1, ready=False)], "", set(), set(), False),
    ("terminating fallback: only serving+terminating left", svc(),
     [ep(1, ready=False, serving=True, terminating=True), ep(2, ready=False, serving=False, terminating=True)],
     "", {1}, {1}, True),
    ("a ready endpoint wins over terminating ones", svc(),
     [ep(1), ep(2, ready=False, serving=True, terminating=True)], "", {1}, {1}, True),
    ("ITP Local: only local (external traffic keeps Cluster)", svc(internal_policy_local=True),
     [ep(1, local=True), ep(2)], "", {1}, {1, 2}, True),
    ("ITP Local, only remote: dropped, not refused", svc(type="ClusterIP", node_port=0, internal_policy_local=True),
     [ep(2)], "", set(), set(), True),
    ("ITP Local, local serving+terminating and a remote ready (the IPVS bug)",
     svc(internal_policy_local=True),
     [ep(1, ready=False, serving=True, terminating=True, local=True), ep(2)], "", {1}, {2}, True),
    ("ETP Local NodePort: external local, internal cluster",
     svc(type="NodePort", node_port=30080, external_policy_local=True),
     [ep(1, local=True), ep(2)], "", {1, 2}, {1}, True),
    ("ETP Local, only remote: external dropped",
     svc(type="NodePort", node_port=30080, external_policy_local=True), [ep(2)], "", {2}, set(), True),
    ("ETP Local, only a local terminating one",
     svc(type="LoadBalancer", node_port=30080, load_balancer_ips=("198.51.100.9",), external_policy_local=True),
     [ep(1, ready=False, serving=True, terminating=True, local=True), ep(2)], "", {2}, {1}, True),
    ("ETP Local on a ClusterIP Service means nothing", svc(type="ClusterIP", node_port=0, external_policy_local=True),
     [ep(1, local=True), ep(2)], "", {1, 2}, set(), True),
    ("PreferClose: same-zone endpoint only", svc(),
     [ep(1, hints=("zone-a",)), ep(2, hints=("zone-b",))], ZONE, {1}, {1}, True),
    ("PreferClose: a ready endpoint without hints disables topology", svc(),
     [ep(1, hints=("zone-a",)), ep(2)], ZONE, {1, 2}, {1, 2}, True),
    ("PreferClose: no endpoint for this zone disables topology", svc(),
     [ep(1, hints=("zone-b",)), ep(2, hints=("zone-b",))], ZONE, {1, 2}, {1, 2}, True),
    ("PreferClose: a node without a zone ignores hints", svc(),
     [ep(1, hints=("zone-a",)), ep(2, hints=("zone-b",))], "", {1, 2}, {1, 2}, True),
    ("PreferClose with ITP Local: local wins, zones ignored", svc(internal_policy_local=True),
     [ep(1, hints=("zone-b",), local=True), ep(2, hints=("zone-a",))], ZONE, {1}, {2}, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_conformance_case(case: tuple[str, ServicePort, list[Endpoint], str, set[int], set[int], bool]) -> None:
    _, s, eps, zone, internal, external, has_any = case
    got = service_endpoints(s, eps, zone)
    assert {e.ip for e in got.internal} == {f"10.244.0.{n}" for n in internal}
    assert {e.ip for e in got.external} == {f"10.244.0.{n}" for n in external}
    assert got.has_any is has_any
    assert got.drops_internal == (has_any and not internal)
    assert got.drops_external == (has_any and not external and s.node_port != 0)
    want = model(s, eps, zone)  # the model agrees with every named case
    assert (want.internal, want.external) == ({f"10.244.0.{n}:8080" for n in internal},
                                              {f"10.244.0.{n}:8080" for n in external})


def test_reachable_merges_local_terminating_with_remote_ready() -> None:
    got = categorize(svc(type="NodePort", node_port=30080, external_policy_local=True),
                     [ep(1, ready=False, serving=True, terminating=True, local=True), ep(2)])
    assert sorted(e.ip for e in got.reachable) == ["10.244.0.1", "10.244.0.2"]


# ---- health-check node ports ------------------------------------------------------------------

def test_health_checks_count_distinct_local_ready_ips_per_service() -> None:
    lb = dict(type="LoadBalancer", node_port=30080, load_balancer_ips=("198.51.100.9",),
              external_policy_local=True, health_check_node_port=32000)
    p1 = ServicePortName("ns", "svc", "a", "TCP")
    p2 = ServicePortName("ns", "svc", "b", "UDP")
    other = ServicePortName("ns", "plain", "", "TCP")
    services = {p1: svc(name=p1, **lb), p2: svc(name=p2, protocol="UDP", **lb), other: svc(name=other)}
    endpoints = {
        p1: (ep(1, local=True), ep(2, local=True), ep(3), ep(4, ready=False, serving=True, terminating=True, local=True)),
        p2: (ep(1, local=True),),
        other: (ep(5, local=True),),
    }
    ports, counts = health_checks(services, endpoints)
    nsn = NamespacedName("ns", "svc")
    assert ports == {nsn: 32000}
    assert counts == {nsn: 2}  # 10.244.0.1 counted once over two ports; the terminating one not
    ports, counts = health_checks(services, {})
    assert counts == {nsn: 0}


@settings(max_examples=200, deadline=None)
@given(st.lists(endpoint_st, max_size=8), st.booleans())
def test_health_check_count_model(eps: list[Endpoint], etp_local: bool) -> None:
    s = svc(type="LoadBalancer", node_port=30080, load_balancer_ips=("198.51.100.9",),
            external_policy_local=etp_local, health_check_node_port=32000)
    ports, counts = health_checks({NAME: s}, {NAME: tuple(eps)})
    if not etp_local:
        assert ports == {} and counts == {}
        return
    assert counts[NamespacedName("ns", "svc")] == len({e.ip for e in eps if e.is_local and e.ready})


# ---- UDP conntrack ----------------------------------------------------------------------------

UDP = ServicePortName("ns", "dns", "", "UDP")
UDP_SVC = ServicePort(name=UDP, type="LoadBalancer", cluster_ips=("10.96.0.53",), port=53, protocol="UDP",
                      node_port=30053, external_ips=("192.0.2.7",), load_balancer_ips=("198.51.100.9",))


def test_conntrack_stale_endpoint_and_newly_active() -> None:
    gone = ep(3)
    plan = udp_conntrack_cleanup({UDP: UDP_SVC}, [(UDP, gone)], [UDP])
    assert plan.service_ips == {"10.96.0.53", "192.0.2.7", "198.51.100.9"}
    assert plan.node_ports == {30053}
    assert plan.nat == {(ip, "10.244.0.3") for ip in ("10.96.0.53", "192.0.2.7", "198.51.100.9")}
    assert plan.port_nat == {(30053, "10.244.0.3")}
    ct = Conntrack(binary="true")  # `true` accepts any arguments: only the calls are checked
    apply_cleanup(ct, plan)
    assert ["--orig-dst", "10.96.0.53", "--dst-nat", "10.244.0.3", "-p", "udp"] in ct.deletions
    assert ["-p", "udp", "--dport", "30053", "--dst-nat", "10.244.0.3"] in ct.deletions
    assert len(ct.deletions) == 3 + 1 + 3 + 1


def test_conntrack_ignores_tcp_other_family_and_unknown() -> None:
    tcp = svc()
    assert not udp_conntrack_cleanup({NAME: tcp}, [(NAME, ep(1))], [NAME])
    v6 = Endpoint(ip="fd00::1", port=53)
    assert not udp_conntrack_cleanup({UDP: UDP_SVC}, [(UDP, v6)], [])
    assert not udp_conntrack_cleanup({}, [(UDP, ep(1))], [UDP])


def test_conntrack_deleted_service_uses_previous_state() -> None:
    plan = udp_conntrack_cleanup({}, [(UDP, ep(4))], [], previous={UDP: UDP_SVC})
    assert ("10.96.0.53", "10.244.0.4") in plan.nat


# ---- source ranges ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("ranges", "ip", "allowed"),
    [
        ((), "203.0.113.5", True),
        (("203.0.113.0/24",), "203.0.113.5", True),
        (("203.0.113.0/24",), "198.18.0.1", False),
        (("203.0.113.0/24", "garbage"), "198.18.0.1", False),
        ((" 10.0.0.0/8 ",), "10.1.2.3", True),
        (("10.0.0.1/8",), "10.1.2.3", True),  # host bits set: accepted as the API server does
        (("fd00::/8",), "10.1.2.3", False),
        (("203.0.113.0/24",), "not-an-ip", False),
    ],
)
def test_source_ranges(ranges: tuple[str, ...], ip: str, allowed: bool) -> None:
    assert SourceRanges.parse(ranges).allows(ip) is allowed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(8, 32)), max_size=4), st.integers(0, 2**32 - 1))
def test_source_ranges_model(nets: list[tuple[int, int]], addr: int) -> None:
    ranges = [f"{a}.0.0.0/{p}" for a, p in nets]
    got = SourceRanges.parse(ranges).allows(f"{addr >> 24}.{(addr >> 16) & 255}.{(addr >> 8) & 255}.{addr & 255}")
    want = not nets or any(((addr ^ (a << 24)) >> (32 - p)) == 0 for a, p in nets)
    assert got is want


# ---- the iptables renderer takes its endpoints from kproxy.proxy --------------------------------

@pytest.mark.parametrize("impl", ["pure", "compiled"])
@settings(max_examples=150, deadline=None)
@given(s=service_st, eps=st.lists(endpoint_st, max_size=6), zone=st.sampled_from(["", ZONE]))
def test_renderer_jumps_only_to_chains_it_declares(impl: str, s: ServicePort, eps: list[Endpoint], zone: str) -> None:
    """internalTrafficPolicy and externalTrafficPolicy both Local on a NodePort used to jump to a
    KUBE-SVC chain that was never declared (the whole iptables-restore failed)."""
    from kproxy import _fastpath, _purepath

    r = _purepath if impl == "pure" else _fastpath
    eps = sorted(dedup(eps))
    filt, disp, decls, rules, names, has = r.render_service_port(s, tuple(eps), False, "10.244.0.0/16", False, (), zone)
    declared = set(names)
    assert {ln[1:].split()[0] for ln in decls.splitlines()} == declared
    for line in rules.splitlines() + disp.splitlines():
        target = line.split(" -j ")[-1].split()[0] if " -j " in line else ""
        if target.startswith(("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")):
            assert target in declared, line
    # the DNAT targets are exactly the endpoints kproxy.proxy says some traffic reaches
    dnat = {ln.split("--to-destination ")[1] for ln in rules.splitlines() if "--to-destination" in ln}
    assert dnat == {e.addr for e in categorize(s, eps, zone).reachable}

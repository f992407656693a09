"""Real packets through rules kproxy programmed, on both iptables back ends.

The Proxier is driven directly with SyncRequests; its iptables-restore/conntrack calls run in the
test's "node" namespace. Backends are real TCP/UDP servers that answer with their own name and the
source address they saw, so SNAT (or its absence) is observed, not inferred.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from iptables_helpers import ep, request, spn, strip_dump, svc
from iptables_topology import CLIENT_IP, NODE_IP, PODS, Topology

from kproxy.backends.conntrack import Conntrack
from kproxy.backends.iptables import IPTables
from kproxy.proxiers.iptables import IptablesProxier

pytestmark = [pytest.mark.e2e]

VIP = "172.30.0.10"
LB_IP = "192.168.60.10"
EXT_IP = "192.168.61.10"
P1, P2, P3 = PODS["pod1"], PODS["pod2"], PODS["pod3"]
# Addresses the node masquerades to, per backend: its address on the backend's link.
NODE_SIDE = {"pod1": "10.1.0.1", "pod2": "10.1.0.1", "pod3": "10.2.0.1"}


@pytest.fixture(params=["nft", "legacy"])
def proxier(request: pytest.FixtureRequest, topology: Topology) -> Iterator[IptablesProxier]:
    ipt = IPTables(backend=request.param, netns=topology.node)
    px = IptablesProxier(ipt, cluster_cidr="10.0.0.0/8", conntrack=Conntrack(netns=topology.node))
    try:
        yield px
    finally:
        assert px.cleanup(), "cleanup failed"
        topology.node_exec("conntrack", "-F", check=False)
        for table in ("nat", "filter", "mangle"):
            left = ipt.save(table)
            assert "KUBE-" not in left, f"cleanup left rules in {table}:\n{left}"


def backends(results: list[dict[str, object]]) -> dict[str, set[str]]:
    """backend name -> source addresses it saw; fails on any error."""
    seen: dict[str, set[str]] = {}
    for r in results:
        assert r["err"] == "", f"request failed: {r}"
        name, peer = str(r["reply"]).split()
        seen.setdefault(name, set()).add(peer)
    return seen


def lb_service(name: str = "web", node_port: int = 30080, **kw: object) -> object:
    return svc(
        spn(name),
        VIP,
        type="LoadBalancer",
        node_port=node_port,
        external_ips=(EXT_IP,),
        load_balancer_ips=(LB_IP,),
        **kw,
    )


@pytest.mark.timeout(60)
def test_every_frontend_reaches_every_backend(proxier: IptablesProxier, topology: Topology) -> None:
    s = lb_service()
    eps = {s.name: (ep(P1), ep(P2), ep(P3))}  # type: ignore[attr-defined]
    res = proxier.sync(request([s], eps))  # type: ignore[list-item]
    assert res.ok, res.error
    for host, port in ((VIP, 80), (NODE_IP, 30080), (LB_IP, 80), (EXT_IP, 80)):
        seen = backends(topology.tcp(host, port, count=24))
        assert set(seen) == {"pod1", "pod2", "pod3"}, f"{host}:{port} reached only {sorted(seen)}"
        # eTP Cluster external traffic and off-cluster ClusterIP traffic are masqueraded.
        for name, peers in seen.items():
            assert peers == {NODE_SIDE[name]}, f"{host}:{port} -> {name} saw {peers}"


@pytest.mark.timeout(60)
def test_session_affinity_pins_a_client(proxier: IptablesProxier, topology: Topology) -> None:
    s = svc(spn("sticky"), VIP, session_affinity_timeout=600)
    res = proxier.sync(request([s], {s.name: (ep(P1), ep(P2), ep(P3))}))
    assert res.ok, res.error
    seen = backends(topology.tcp(VIP, 80, count=12))
    assert len(seen) == 1, f"affinity broken: {seen}"


@pytest.mark.timeout(60)
def test_external_traffic_policy_local(proxier: IptablesProxier, topology: Topology) -> None:
    s = lb_service("local", node_port=30081, external_policy_local=True, health_check_node_port=0)
    eps = {s.name: (ep(P1, is_local=True), ep(P3, is_local=False))}  # type: ignore[attr-defined]
    res = proxier.sync(request([s], eps))  # type: ignore[list-item]
    assert res.ok, res.error
    for host, port in ((NODE_IP, 30081), (LB_IP, 80)):
        seen = backends(topology.tcp(host, port, count=12))
        assert seen == {"pod1": {CLIENT_IP}}, f"{host}:{port}: {seen}"
    # Internal traffic still uses every endpoint (internalTrafficPolicy Cluster).
    assert set(backends(topology.tcp(VIP, 80, count=24))) == {"pod1", "pod3"}


@pytest.mark.timeout(60)
def test_no_endpoints_is_refused_at_once(proxier: IptablesProxier, topology: Topology) -> None:
    s = svc(spn("empty"), VIP, node_port=30082)
    res = proxier.sync(request([s], {}))
    assert res.ok, res.error
    for host, port in ((VIP, 80), (NODE_IP, 30082)):
        (r,) = topology.tcp(host, port, count=1, timeout=3.0)
        assert r["err"] == "refused", f"{host}:{port}: {r}"
        assert float(r["elapsed"]) < 1.0  # type: ignore[arg-type]


@pytest.mark.timeout(60)
def test_endpoint_change_moves_new_connections_in_one_partial_sync(
    proxier: IptablesProxier, topology: Topology
) -> None:
    s = svc(spn("move"), VIP)
    other = svc(spn("other"), "172.30.0.11")
    eps = {s.name: (ep(P1),), other.name: (ep(P3),)}
    assert proxier.sync(request([s, other], eps)).ok
    assert set(backends(topology.tcp(VIP, 80, count=4))) == {"pod1"}
    eps = {s.name: (ep(P2),), other.name: (ep(P3),)}
    res = proxier.sync(request([s, other], eps, changed={s.name}))
    assert res.ok, res.error
    assert set(backends(topology.tcp(VIP, 80, count=4))) == {"pod2"}
    assert set(backends(topology.tcp("172.30.0.11", 80, count=2))) == {"pod3"}
    # The old endpoint's chain is gone and KUBE-SERVICES was left alone by the partial sync.
    dump = proxier.iptables.save("nat")
    assert "10.1.0.2:8080" not in dump and "10.1.0.3:8080" in dump


@pytest.mark.timeout(60)
def test_stale_udp_conntrack_recovers(proxier: IptablesProxier, topology: Topology) -> None:
    a = svc(spn("dns-a", "dns", "UDP"), VIP, port=53)
    b = svc(spn("dns-b", "dns", "UDP"), "172.30.0.12", port=54)
    eps = {a.name: (ep(P1, 8053),), b.name: (ep(P1, 8054),)}
    assert proxier.sync(request([a, b], eps)).ok
    assert backends(topology.udp(VIP, 53, count=2, src=41000)) == {"pod1": {NODE_SIDE["pod1"]}}
    assert backends(topology.udp("172.30.0.12", 54, count=2, src=41001)) == {"pod1": {NODE_SIDE["pod1"]}}
    flows = topology.node_exec("conntrack", "-L", "-p", "udp", "--orig-dst", VIP, check=False).stdout
    assert "10.1.0.2" in flows, f"no conntrack entry to pod1: {flows!r}"

    # Control: move b's endpoint without conntrack cleanup; the old flow keeps going to pod1.
    ct = proxier.conntrack
    proxier.conntrack = None
    eps = {a.name: (ep(P1, 8053),), b.name: (ep(P2, 8054),)}
    assert proxier.sync(request([a, b], eps, changed={b.name})).ok
    assert set(backends(topology.udp("172.30.0.12", 54, count=2, src=41001))) == {"pod1"}

    # With cleanup: moving a's endpoint deletes the flow, the same client socket reaches pod2.
    proxier.conntrack = ct
    eps = {a.name: (ep(P2, 8053),), b.name: (ep(P2, 8054),)}
    assert proxier.sync(request([a, b], eps, changed={a.name})).ok
    assert ct is not None and ["--orig-dst", VIP, "--dst-nat", P1, "-p", "udp"] in ct.deletions
    assert set(backends(topology.udp(VIP, 53, count=2, src=41000))) == {"pod2"}


@pytest.mark.timeout(60)
def test_hairpin_is_masqueraded(proxier: IptablesProxier, topology: Topology) -> None:
    s = svc(spn("hairpin"), VIP)
    assert proxier.sync(request([s], {s.name: (ep(P1),)})).ok
    # pod1 -> its own service -> itself: without SNAT it would answer itself and drop the reply.
    seen = backends(topology.tcp(VIP, 80, count=3, ns=topology.pods["pod1"]))
    assert seen == {"pod1": {NODE_SIDE["pod1"]}}
    # pod2 -> service -> pod1 keeps its source (pod-to-pod traffic is not masqueraded).
    assert backends(topology.tcp(VIP, 80, count=2, ns=topology.pods["pod2"])) == {"pod1": {P2}}


@pytest.mark.timeout(60)
def test_failed_restore_keeps_previous_rules(proxier: IptablesProxier, topology: Topology) -> None:
    good = svc(spn("good"), VIP)
    assert proxier.sync(request([good], {good.name: (ep(P1),)})).ok
    before = {t: strip_dump(proxier.iptables.save(t)) for t in ("filter", "nat")}
    # An invalid address makes iptables-restore reject the whole input.
    bad = svc(spn("bad"), "172.30.0.300")
    res = proxier.sync(request([good, bad], {good.name: (ep(P2),), bad.name: (ep(P2),)}))
    assert not res.ok and "iptables" in res.error
    after = {t: strip_dump(proxier.iptables.save(t)) for t in ("filter", "nat")}
    assert after == before
    assert set(backends(topology.tcp(VIP, 80, count=3))) == {"pod1"}
    # The next sync is forced to be full, even if the caller asks for a partial one.
    res = proxier.sync(request([good], {good.name: (ep(P2),)}, changed={good.name}))
    assert res.ok, res.error
    assert proxier.last_plan is not None and proxier.last_plan.full
    assert set(backends(topology.tcp(VIP, 80, count=3))) == {"pod2"}

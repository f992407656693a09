"""Rendered rulesets for representative services, applied to a real kernel and traced.

Expectations are written from upstream's documented behaviour (kube-proxy iptables mode,
pkg/proxy/iptables/proxier.go comments and KEPs 1669/2086/1672): each test checks the restore
input we generate for the lines that carry the behaviour, then loads it into a namespace with the
real iptables back end and traces packets through the kernel's own iptables-save output.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from iptables_helpers import ep, request, spn, svc

from kproxy.backends.iptables import IPTables
from kproxy.model import Endpoint
from kproxy.proxiers.iptables import IptablesProxier
from kproxy.trace.iptables import Outcome, Tracer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

NODE = "192.168.7.2"
LOCAL_IPS = {NODE, "10.0.0.5"}
EXTERNAL = "203.0.113.9"
POD_SRC = "10.0.0.2"
VIP = "172.30.0.41"
E1, E2 = "10.180.0.1", "10.180.2.1"


@pytest.fixture(params=["nft", "legacy"])
def px(request: pytest.FixtureRequest, rules_netns: str) -> Iterator[IptablesProxier]:
    p = IptablesProxier(IPTables(backend=request.param, netns=rules_netns), cluster_cidr="10.0.0.0/8")
    try:
        yield p
    finally:
        assert p.cleanup()


def applied(p: IptablesProxier, req: object) -> tuple[str, Tracer]:
    res = p.sync(req)  # type: ignore[arg-type]
    assert res.ok, res.error
    assert p.last_plan is not None
    dump = "".join(p.iptables.save(t) for t in ("filter", "nat"))
    return p.last_plan.data.decode(), Tracer(dump, LOCAL_IPS)


def eps_of(*outs: Outcome) -> set[str]:
    return {o.endpoint for o in outs}


def test_cluster_ip(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP)
    data, tr = applied(px, request([s], {s.name: (ep(E1, 80), ep(E2, 80))}))
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80'
        " -j KUBE-SVC-XPGD46QRK7WJZT7O\n" in data
    )
    assert (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random'
        " --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ\n" in data
    )
    assert (
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ\n"
        in data
    )
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x004000\n" in data
    # Pods reach every endpoint unmasqueraded; off-cluster sources are masqueraded (cluster CIDR).
    assert tr.trace(POD_SRC, VIP, 80) == {
        Outcome("ACCEPT", f"{E1}:80", False),
        Outcome("ACCEPT", f"{E2}:80", False),
    }
    assert tr.trace(EXTERNAL, VIP, 80) == {
        Outcome("ACCEPT", f"{E1}:80", True),
        Outcome("ACCEPT", f"{E2}:80", True),
    }
    assert tr.trace(POD_SRC, VIP, 81) == {Outcome("ACCEPT", "", False)}  # other ports are not ours


def test_no_endpoints_rejects_in_filter(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP, node_port=3001, external_ips=("192.168.99.11",))
    data, tr = applied(px, request([s], {}))
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.41'
        " --dport 80 -j REJECT\n" in data
    )
    assert "KUBE-SVC-" not in data and "KUBE-SEP-" not in data
    assert tr.trace(POD_SRC, VIP, 80) == {Outcome("REJECT", "", False)}
    assert tr.trace(EXTERNAL, "192.168.99.11", 80) == {Outcome("REJECT", "", False)}
    assert tr.trace(EXTERNAL, NODE, 3001) == {Outcome("REJECT", "", False)}


def test_external_traffic_policy_local(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP, node_port=3001, external_ips=("192.168.99.11",), external_policy_local=True)
    data, tr = applied(px, request([s], {s.name: (ep(E1, 80), ep(E2, 80, is_local=True))}))
    assert "-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVL-XPGD46QRK7WJZT7O\n" in data
    assert (
        '-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j KUBE-SEP-'
        in data
    )
    local_only = {Outcome("ACCEPT", f"{E2}:80", False)}
    both = {Outcome("ACCEPT", f"{E1}:80", False), Outcome("ACCEPT", f"{E2}:80", False)}
    # External clients keep their source and reach only the local endpoint...
    assert tr.trace(EXTERNAL, "192.168.99.11", 80) == local_only
    assert tr.trace(EXTERNAL, NODE, 3001) == local_only
    # ...pods are short-circuited to the cluster-wide chain, ClusterIP stays Cluster.
    assert tr.trace(POD_SRC, "192.168.99.11", 80) == both
    assert tr.trace(POD_SRC, VIP, 80) == both
    # The node itself is masqueraded to the cluster-wide chain.
    assert tr.trace(NODE, "192.168.99.11", 80) == {
        Outcome("ACCEPT", f"{E1}:80", True),
        Outcome("ACCEPT", f"{E2}:80", True),
    }


def test_external_traffic_policy_local_without_local_endpoints_drops(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP, node_port=3001, external_policy_local=True)
    data, tr = applied(px, request([s], {s.name: (ep(E1, 80),)}))
    assert (
        '--comment "ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP'
        in data
    )
    assert tr.trace(EXTERNAL, NODE, 3001) == {Outcome("DROP", "", False)}
    assert tr.trace(POD_SRC, VIP, 80) == {Outcome("ACCEPT", f"{E1}:80", False)}


def test_load_balancer_source_ranges(px: IptablesProxier) -> None:
    s = svc(
        spn("svc1"),
        VIP,
        type="LoadBalancer",
        node_port=3001,
        load_balancer_ips=("1.2.3.4",),
        load_balancer_source_ranges=("203.0.113.0/25",),
    )
    data, tr = applied(px, request([s], {s.name: (ep(E1, 80),)}))
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-FW-'
        in data
    )
    assert (
        '-A KUBE-PROXY-FIREWALL -m comment --comment "ns1/svc1:p80 traffic not accepted by KUBE-FW-' in data
    )
    assert tr.trace(EXTERNAL, "1.2.3.4", 80) == {Outcome("ACCEPT", f"{E1}:80", True)}
    assert tr.trace("198.51.100.1", "1.2.3.4", 80) == {Outcome("DROP", "", False)}
    # NodePorts are not subject to source ranges (upstream's documented limitation).
    assert tr.trace("198.51.100.1", NODE, 3001) == {Outcome("ACCEPT", f"{E1}:80", True)}


def test_session_affinity(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP, session_affinity_timeout=10800)
    data, tr = applied(px, request([s], {s.name: (ep(E1, 80), ep(E2, 80))}))
    assert (
        "-m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --rcheck --seconds 10800 --reap -j KUBE-SEP-SXIVWICOYRO3J4NJ\n"
        in data
    )
    assert (
        "-m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80\n"
        in data
    )
    # rcheck rules come before the random split in the SVC chain.
    svc_rules = [
        ln for ln in data.splitlines() if ln.startswith("-A KUBE-SVC-XPGD46QRK7WJZT7O") and "-> " in ln
    ]
    assert ["--rcheck" in ln for ln in svc_rules] == [True, True, False, False]
    assert eps_of(*tr.trace(POD_SRC, VIP, 80)) == {f"{E1}:80", f"{E2}:80"}


def test_terminating_endpoints_are_a_fallback(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP)
    term = (
        Endpoint(E1, 80, ready=False, serving=True, terminating=True),
        Endpoint(E2, 80, ready=False, serving=False, terminating=True),
    )
    _, tr = applied(px, request([s], {s.name: term}))
    assert eps_of(*tr.trace(POD_SRC, VIP, 80)) == {f"{E1}:80"}
    # As soon as one endpoint is ready, terminating ones are not used.
    _, tr = applied(px, request([s], {s.name: (*term, Endpoint("10.180.3.1", 80))}))
    assert eps_of(*tr.trace(POD_SRC, VIP, 80)) == {"10.180.3.1:80"}


def test_internal_traffic_policy_local(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP, internal_policy_local=True)
    data, tr = applied(px, request([s], {s.name: (ep(E1, 80),)}))
    assert (
        '--comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP'
        in data
    )
    assert tr.trace(POD_SRC, VIP, 80) == {Outcome("DROP", "", False)}
    _, tr = applied(px, request([s], {s.name: (ep(E1, 80), ep(E2, 80, is_local=True))}))
    assert tr.trace(POD_SRC, VIP, 80) == {Outcome("ACCEPT", f"{E2}:80", False)}


def test_partial_sync_rewrites_only_changed_chains(px: IptablesProxier) -> None:
    services = [svc(spn(f"s{i}"), f"172.30.1.{i + 1}") for i in range(30)]
    eps = {s.name: (ep(f"10.1.{i}.1"), ep(f"10.1.{i}.2")) for i, s in enumerate(services)}
    applied(px, request(services, eps))
    assert px.last_plan is not None
    # 90 chains: on nf_tables the restore takes the "-Z" all-chains cache path (see the proxier).
    assert (b"\n-Z\n" in px.last_plan.data) == (px.iptables.backend == "nft")
    target = services[3].name
    eps[target] = (ep("10.1.3.1"), ep("10.1.3.9"))
    data, tr = applied(px, request(services, eps, changed={target}))
    assert ":KUBE-SERVICES" not in data and "*filter" not in data  # dispatch unchanged: not rewritten
    assert data.count("-j DNAT") == 2 and "-X KUBE-SEP-" in data  # one chain replaced, one deleted
    assert eps_of(*tr.trace(POD_SRC, "172.30.1.4", 80)) == {"10.1.3.1:8080", "10.1.3.9:8080"}
    assert eps_of(*tr.trace(POD_SRC, "172.30.1.5", 80)) == {"10.1.4.1:8080", "10.1.4.2:8080"}
    # Removing a service rewrites the dispatch chain and deletes its chains in the same restore.
    gone = services.pop(5).name
    data, tr = applied(px, request(services, eps, changed={gone}))
    assert ":KUBE-SERVICES - [0:0]" in data and data.count("-X ") == 3
    assert tr.trace(POD_SRC, "172.30.1.6", 80) == {Outcome("ACCEPT", "", False)}
    nat = px.iptables.save("nat")
    assert nat.count(":KUBE-SVC-") == 29 and nat.count(":KUBE-SEP-") == 58


def test_full_sync_removes_chains_left_by_a_previous_process(px: IptablesProxier) -> None:
    a, b = svc(spn("a"), "172.30.2.1"), svc(spn("b"), "172.30.2.2")
    applied(px, request([a, b], {a.name: (ep(E1),), b.name: (ep(E2),)}))
    fresh = IptablesProxier(px.iptables, cluster_cidr="10.0.0.0/8")
    _, tr = applied(fresh, request([a], {a.name: (ep(E1),)}))
    nat = px.iptables.save("nat")
    assert nat.count(":KUBE-SVC-") == 1 and nat.count(":KUBE-SEP-") == 1
    assert tr.trace(POD_SRC, "172.30.2.2", 80) == {Outcome("ACCEPT", "", False)}
    # Jumps from the built-in chains are not duplicated by the second process.
    assert px.iptables.save("nat").count("-A PREROUTING") == 1


def test_periodic_full_sync_removes_chains_of_a_vanished_service(px: IptablesProxier) -> None:
    # No dump on a periodic full sync: the stale chains come from what this proxier programmed.
    a, b = svc(spn("a"), "172.30.3.1"), svc(spn("b"), "172.30.3.2")
    applied(px, request([a, b], {a.name: (ep(E1), ep(E2)), b.name: (ep(E2),)}))
    data, tr = applied(px, request([a], {a.name: (ep(E1),)}))
    assert data.count("-X KUBE-SEP-") == 2 and data.count("-X KUBE-SVC-") == 1
    nat = px.iptables.save("nat")
    assert nat.count(":KUBE-SVC-") == 1 and nat.count(":KUBE-SEP-") == 1
    assert tr.trace(POD_SRC, "172.30.3.2", 80) == {Outcome("ACCEPT", "", False)}
    assert eps_of(*tr.trace(POD_SRC, "172.30.3.1", 80)) == {f"{E1}:8080"}


def test_nodeport_addresses_and_masquerade_all(rules_netns: str) -> None:
    p = IptablesProxier(
        IPTables(backend="nft", netns=rules_netns),
        nodeport_addresses=("192.168.7.0/24",),
        masquerade_all=True,
    )
    try:
        s = svc(spn("svc1"), VIP, node_port=3001)
        data, tr = applied(p, request([s], {s.name: (ep(E1, 80),)}))
        assert (
            '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule'
            ' in this chain" -d 192.168.7.2 -j KUBE-NODEPORTS\n' in data
        )
        assert tr.trace(EXTERNAL, NODE, 3001) == {Outcome("ACCEPT", f"{E1}:80", True)}
        assert tr.trace(EXTERNAL, "10.0.0.5", 3001) == {
            Outcome("ACCEPT", "", False)
        }  # not a nodeport address
        assert tr.trace(POD_SRC, VIP, 80) == {Outcome("ACCEPT", f"{E1}:80", True)}  # masquerade-all
    finally:
        assert p.cleanup()


def test_nodeport_addresses_primary_means_the_nodes_own_ips(rules_netns: str) -> None:
    p = IptablesProxier(IPTables(backend="nft", netns=rules_netns), nodeport_addresses=("primary",),
                        node_ips=(NODE,))
    try:
        s = svc(spn("svc1"), VIP, node_port=3001)
        data, tr = applied(p, request([s], {s.name: (ep(E1, 80),)}))
        tail = [ln for ln in data.splitlines() if ln.startswith("-A KUBE-SERVICES") and ln.endswith("-j KUBE-NODEPORTS")]
        assert tail == ['-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be'
                        f' the last rule in this chain" -d {NODE} -j KUBE-NODEPORTS'], tail
        assert tr.trace(EXTERNAL, NODE, 3001) == {Outcome("ACCEPT", f"{E1}:80", True)}
        assert tr.trace(EXTERNAL, "10.0.0.5", 3001) == {Outcome("ACCEPT", "", False)}  # local, not primary
    finally:
        assert p.cleanup()


def test_large_cluster_drops_endpoint_comments(px: IptablesProxier) -> None:
    services = [svc(spn(f"s{i}"), f"172.30.3.{i + 1}") for i in range(101)]
    eps = {s.name: tuple(ep(f"10.2.{i}.{j + 1}") for j in range(10)) for i, s in enumerate(services)}
    data, tr = applied(px, request(services, eps))  # 1,010 endpoints > upstream's 1,000 threshold
    sep_rules = [ln for ln in data.splitlines() if ln.startswith("-A KUBE-SEP-")]
    assert len(sep_rules) == 2020 and not any("--comment" in ln for ln in sep_rules)
    assert len(eps_of(*tr.trace(POD_SRC, "172.30.3.7", 80))) == 10


def test_flushed_tables_are_detected_by_the_canary(px: IptablesProxier) -> None:
    s = svc(spn("svc1"), VIP)
    applied(px, request([s], {s.name: (ep(E1, 80),)}))
    # A firewall reload wipes every table (what upstream's iptables Monitor watches for).
    for table in ("nat", "filter", "mangle"):
        px.iptables.command("-t", table, "-F")
        px.iptables.command("-t", table, "-X")
    px.canary_interval = 0
    other = svc(spn("svc2"), "172.30.0.42")
    _, tr = applied(
        px, request([s, other], {s.name: (ep(E1, 80),), other.name: (ep(E2, 80),)}, changed={other.name})
    )
    assert px.last_plan is not None and px.last_plan.full
    assert tr.trace(POD_SRC, VIP, 80) == {Outcome("ACCEPT", f"{E1}:80", False)}
    assert tr.trace(POD_SRC, "172.30.0.42", 80) == {Outcome("ACCEPT", f"{E2}:80", False)}


def test_backend_detection_prefers_the_one_holding_kube_rules(
    rules_netns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kproxy.backends.iptables import BACKEND_ENV, detect_backend

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    legacy = IPTables(backend="legacy", netns=rules_netns)
    assert detect_backend(rules_netns) == "nft"  # nothing anywhere: the image default
    legacy.command("-t", "mangle", "-N", "KUBE-KUBELET-CANARY")  # what a legacy kubelet leaves
    try:
        assert detect_backend(rules_netns) == "legacy"
        monkeypatch.setenv(BACKEND_ENV, "nft")
        assert detect_backend(rules_netns) == "nft"
        monkeypatch.setenv(BACKEND_ENV, "bogus")
        with pytest.raises(ValueError, match=BACKEND_ENV):
            detect_backend(rules_netns)
    finally:
        legacy.command("-t", "mangle", "-X", "KUBE-KUBELET-CANARY")

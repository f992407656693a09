"""The ip6tables proxier on both back ends, against the real kernel in a namespace of its own:
what ip6tables-save reads back (the kernel's own rendering) is IPv6 through and through, and
the compiled and pure renderers give the same bytes for IPv6 Services."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iptables_topology import NODE_IP, NODE_IP6, PODS, PODS6, Topology, sh

from kproxy import _fastpath, _purepath
from kproxy.backends.iptables import IPTables
from kproxy.config import KProxyConfig
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.iptables import IptablesProxier, new_proxier
from kproxy.proxiers.meta import MetaProxier

N = ServicePortName("ns", "web", "http")
U = ServicePortName("ns", "dns", "dns", "UDP")
LB = ServicePort(name=N, type="LoadBalancer", cluster_ips=("fd02:96::a", "10.96.0.10"), port=80, protocol="TCP",
                 node_port=30080, external_ips=("fd02:99::1", "192.0.2.1"), load_balancer_ips=("fd02:98::1",),
                 load_balancer_source_ranges=("fd00:50::/64", "192.168.0.0/16"), session_affinity_timeout=60,
                 external_policy_local=True, health_check_node_port=30000)
EMPTY = ServicePort(name=U, type="NodePort", cluster_ips=("fd02:96::35",), port=53, protocol="UDP", node_port=30053)
EPS = (Endpoint("fd01:1::2", 8080, is_local=True, node_name="n"), Endpoint("fd01:2::2", 8080, node_name="m"))


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_ip6tables_rules_in_the_kernel(rules_netns: str, backend: str) -> None:
    sh("ip", "-n", rules_netns, "addr", "replace", "fd00:7::2/64", "dev", "eth0", "nodad")
    px = IptablesProxier(IPTables(backend=backend, netns=rules_netns, ipv6=True),  # type: ignore[arg-type]
                         cluster_cidr="10.0.0.0/8,fd01::/16", node_ips=("192.168.7.2", "fd00:7::2"))
    try:
        assert px.family == "IPv6" and px.cluster_cidr == "fd01::/16"
        res = px.sync(SyncRequest({N: LB, U: EMPTY}, {N: EPS}))
        assert res.ok, res.error
        saved = sh("ip", "netns", "exec", rules_netns, f"ip6tables-{backend}-save").stdout
        v4 = sh("ip", "netns", "exec", rules_netns, f"iptables-{backend}-save").stdout
        assert "KUBE-SVC-" not in v4  # the IPv4 tables are the IPv4 proxier's business
        assert "-d fd02:96::a/128" in saved and "--to-destination [fd01:1::2]:8080" in saved
        assert any("! -s fd01::/16" in line and line.endswith("-j KUBE-MARK-MASQ") for line in saved.splitlines())
        assert any("-s fd00:50::/64" in line and "-j KUBE-EXT-" in line for line in saved.splitlines())
        assert "192.168.0.0/16" not in saved  # the other family's source range is not this table's
        assert "-d fd02:99::1/128" in saved and "192.0.2.1" not in saved and "10.96.0.10" not in saved
        # ip6tables' REJECT answers icmp6-port-unreachable (iptables': icmp-port-unreachable).
        reject = [line for line in saved.splitlines() if "fd02:96::35/128" in line]
        assert reject and all(line.endswith("-j REJECT --reject-with icmp6-port-unreachable") for line in reject)
        # NodePorts on every local address but never ::1 (upstream: no IPv6 localhost NodePorts).
        assert "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS" in saved and "! -d ::1/128" in saved
        assert "127.0.0.0/8" not in saved and "KUBE-FIREWALL" not in saved
        # A partial sync of an endpoint change, then cleanup leaves no kproxy chain in ip6tables.
        res = px.sync(SyncRequest({N: LB, U: EMPTY}, {N: EPS[:1]}, changed=frozenset({N}), full=False))
        assert res.ok, res.error
        assert "fd01:2::2" not in sh("ip", "netns", "exec", rules_netns, f"ip6tables-{backend}-save").stdout
    finally:
        assert px.cleanup()
    assert "KUBE-" not in sh("ip", "netns", "exec", rules_netns, f"ip6tables-{backend}-save").stdout


@pytest.mark.e2e
def test_ipv6_nodeport_addresses(rules_netns: str) -> None:
    """--nodeport-addresses with CIDRs of both families: the IPv6 proxier takes the IPv6 ones
    and sends NodePorts only for its node addresses inside them."""
    sh("ip", "-n", rules_netns, "addr", "replace", "fd00:7::2/64", "dev", "eth0", "nodad")
    sh("ip", "-n", rules_netns, "addr", "replace", "fd00:8::5/64", "dev", "eth1", "nodad")
    px = IptablesProxier(IPTables(backend="nft", netns=rules_netns, ipv6=True),
                         nodeport_addresses=("192.168.7.0/24", "fd00:7::/64"))
    try:
        assert px.nodeport_addresses == ("fd00:7::/64",)
        assert px.sync(SyncRequest({N: LB}, {N: EPS})).ok
        saved = sh("ip", "netns", "exec", rules_netns, "ip6tables-nft-save", "-t", "nat").stdout
        tails = [line for line in saved.splitlines() if line.startswith("-A KUBE-SERVICES") and "KUBE-NODEPORTS" in line]
        assert len(tails) == 1 and "-d fd00:7::2/128" in tails[0], tails
    finally:
        assert px.cleanup()


_v6 = st.integers(1, 0xFFFF).map(lambda n: f"fd01:{n:x}::2")


@settings(max_examples=60, deadline=None)
@given(eps=st.lists(_v6, min_size=0, max_size=6, unique=True), affinity=st.booleans(), local=st.booleans(),
       large=st.booleans())
def test_ipv6_renderer_twins_agree(eps: list[str], affinity: bool, local: bool, large: bool) -> None:
    svc = ServicePort(name=N, type="LoadBalancer", cluster_ips=("fd02:96::a",), port=80, protocol="TCP",
                      node_port=30080, load_balancer_ips=("fd02:98::1",), load_balancer_source_ranges=("fd00::/8",),
                      session_affinity_timeout=60 if affinity else None, external_policy_local=local)
    endpoints = tuple(Endpoint(ip, 8080, is_local=i % 2 == 0) for i, ip in enumerate(eps))
    args = (svc, endpoints, False, "fd01::/16", large, ("fd00:50::1",), "", True)
    got = _fastpath.render_service_port(*args)
    assert got == _purepath.render_service_port(*args)
    text = "".join(got[:4])
    assert not re.search(r"\d+\.\d+\.\d+\.\d+", text)  # no IPv4 address or mask in an IPv6 rule set
    assert all(f"[{ip}]:8080" in text for ip in eps)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_ipv6_udp_conntrack_cleanup_per_family(topology: Topology) -> None:
    """A UDP flow to an IPv6 ClusterIP keeps its conntrack entry (same source port) until the
    IPv6 proxier deletes it when its endpoint goes; then it reaches the new endpoint (without the
    deletion it stays on the old one: checked by hand with the conntrack calls disabled). The
    IPv4 half of the same dual-stack Service is checked the same way."""
    cfg = KProxyConfig(mode="iptables", netns=topology.node, cluster_cidr="10.0.0.0/8,fd01::/16",
                       node_ips=(NODE_IP, NODE_IP6), iptables_backend="nft", hostname_override="n")
    px = new_proxier(cfg)
    name = ServicePortName("ns", "dns6", "dns", "UDP")
    svc = ServicePort(name=name, type="ClusterIP", cluster_ips=("10.96.9.53", "fd02:96::53"), port=53,
                      protocol="UDP")
    both = {p: (Endpoint(PODS[p], 8053), Endpoint(PODS6[p], 8053)) for p in ("pod1", "pod2")}
    try:
        assert isinstance(px, MetaProxier) and px.families == ("IPv4", "IPv6")
        assert px.sync(SyncRequest({name: svc}, {name: both["pod1"]})).ok
        for vip in ("fd02:96::53", "10.96.9.53"):
            got = topology.udp(vip, 53, count=2, src=40053)
            assert [r["reply"].split()[0] for r in got] == ["pod1", "pod1"], got
        res = px.sync(SyncRequest({name: svc}, {name: both["pod2"]}, changed=frozenset({name}), full=False,
                                  stale_endpoints=[(name, e) for e in both["pod1"]]))
        assert res.ok, res.error
        v6 = px.proxiers["IPv6"]
        assert isinstance(v6, IptablesProxier) and v6.conntrack is not None and v6.conntrack.family == "IPv6"
        assert any("fd02:96::53" in args for args in v6.conntrack.deletions), v6.conntrack.deletions
        for vip in ("fd02:96::53", "10.96.9.53"):
            got = topology.udp(vip, 53, count=2, src=40053)  # the same 5-tuple as before
            assert [r["reply"].split()[0] for r in got] == ["pod2", "pod2"], (vip, got)
    finally:
        px.close()
        assert px.cleanup()

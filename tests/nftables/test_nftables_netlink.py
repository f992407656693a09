"""kproxy's own nfnetlink encoding (kproxy.backends.nftnl) against `nft -f`: the same transactions
through both leave identical rulesets in the kernel (read back with `nft -j list table`), for
every conformance Service (each kind of rule kproxy writes) and random ones, in the `ip` and the
`ip6` table (IPv6 and dual-stack conformance Services as the IPv6 proxier sees them); a refused batch
leaves nothing behind; what the grammar does not cover is refused before anything is sent."""
from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nft_state import endpoints, kernel_entries, name, sh, state

from kproxy.backends import nftnl
from kproxy.backends.nftables import Nft, NftError
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.nftables import NftablesProxier
from kproxy.proxy.families import endpoints_for_family, service_for_family

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conformance"))
import conformance_table as ct  # noqa: E402

pytestmark = pytest.mark.e2e


def _proxier(netns: str, netlink: bool, family: ct.Family = "IPv4") -> NftablesProxier:
    return NftablesProxier(Nft(netns, netlink=netlink), cluster_cidr=f"{ct.CLUSTER_CIDR},{ct.CLUSTER_CIDR6}",
                           node_ips=(ct.NODE_IP, ct.NODE_IP6), node_zone=ct.NODE_ZONE,
                           service_cidrs=("10.96.0.0/12", "fd00:10:96::/108"), family=family)


def _conformance_state(phase: int, family: ct.Family) -> tuple[dict, dict]:
    """The conformance Services as the family's proxier gets them (kproxy.proxiers.meta's cut)."""
    services, eps = ct.state(phase, (family, "dual") if family == "IPv6" else ("IPv4",))
    cut = {n: v for n, v in ((n, service_for_family(s, family)) for n, s in services.items()) if v is not None}
    return cut, {n: endpoints_for_family(e, family) for n, e in eps.items()}


def _steps(family: ct.Family = "IPv4") -> list[SyncRequest]:
    """A full sync of a few Services, then partial syncs that add every conformance Service
    (phase 1), move their endpoints (phase 2), change endpoint counts, and delete some."""
    few, few_eps = state(3, 2, node_ports=True, family=family)
    s1, e1 = _conformance_state(1, family)
    s2, e2 = _conformance_state(2, family)
    all1 = {**few, **s1}
    steps = [SyncRequest(few, few_eps)]
    steps.append(SyncRequest(all1, {**few_eps, **e1}, changed=frozenset(s1), full=False))
    steps.append(SyncRequest({**few, **s2}, {**few_eps, **e2}, changed=frozenset(s2), full=False))
    grown = {**few_eps, **e2, name(1): endpoints(1, 5, family=family)}
    steps.append(SyncRequest({**few, **s2}, grown, changed=frozenset({name(1)}), full=False))
    gone = dict(list(s2.items())[::2])
    steps.append(SyncRequest({**few, **gone}, grown, changed=frozenset(s2), full=False))
    # The periodic resync (flush and refill, the table kept), then one that brings Services back.
    steps.append(SyncRequest({**few, **gone}, {**grown, name(0): endpoints(0, 1, family=family)}, full=True))
    steps.append(SyncRequest({**few, **s2}, grown, changed=frozenset(s2) | {name(0)}, full=False))
    return steps


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_netlink_and_nft_leave_identical_rulesets(netns: str, netns2: str, family: ct.Family) -> None:
    a, b = _proxier(netns, True, family), _proxier(netns2, False, family)
    nft_family = "ip6" if family == "IPv6" else "ip"
    for i, step in enumerate(_steps(family)):
        ra, rb = a.sync(step), b.sync(step)
        assert ra.ok and rb.ok, (ra.error, rb.error)
        assert a.last_transaction == b.last_transaction
        assert a.nft.last_way == "netlink", f"step {i} went through nft"
        assert a.last_stats["recreate"] == (i == 0)
        assert b.nft.last_way == "nft"
        ka, kb = kernel_entries(netns, nft_family), kernel_entries(netns2, nft_family)
        assert ka == kb, f"step {i}: only netlink {sorted(ka - kb)[:4]} only nft {sorted(kb - ka)[:4]}"
    assert a.cleanup() and b.cleanup()


def test_a_full_resync_keeps_the_table_and_affinity(netns: str) -> None:
    """The periodic resync flushes and refills: a client recorded in an affinity set stays."""
    p = _proxier(netns, True)
    services, eps = ct.state(1)
    assert p.sync(SyncRequest(services, eps)).ok
    sticky = sorted(e for e in kernel_entries(netns) if e.startswith("set ") and '"affinity-' in e)
    assert sticky, "no conformance Service with ClientIP affinity"
    set_name = sticky[0].split('"name": "')[1].split('"')[0]
    sh("ip", "netns", "exec", netns, "nft", "add", "element", "ip", "kube-proxy", set_name, "{ 192.0.2.7 }")
    before = kernel_entries(netns)
    assert p.sync(SyncRequest(services, eps, full=True)).ok
    assert p.last_stats["recreate"] == 0.0 and p.nft.last_way == "netlink"
    after = kernel_entries(netns)
    assert any(e.startswith(f"elem {set_name} ") and "192.0.2.7" in e for e in after), "the client was forgotten"
    assert before == after
    assert p.cleanup()


def test_a_refused_batch_changes_nothing(netns: str) -> None:
    p = _proxier(netns, True)
    services, eps = state(10, 3)
    assert p.sync(SyncRequest(services, eps)).ok
    before = kernel_entries(netns)
    t = "ip kube-proxy"
    batch = nftnl.translate([f"add chain {t} fresh\n", f"add rule {t} fresh drop\n",
                             f"add element {t} hairpin-ips {{ 10.9.9.9 . 10.9.9.9 }}\n",
                             f"flush chain {t} no-such-chain\n"])  # the kernel refuses the last
    with pytest.raises(nftnl.BatchError, match="no-such-chain"):
        nftnl.send(batch, netns)
    assert kernel_entries(netns) == before
    with pytest.raises(NftError):
        p.nft.apply([f"delete element {t} hairpin-ips {{ 10.9.9.9 . 10.9.9.9 }}\n"])
    assert kernel_entries(netns) == before


@pytest.mark.parametrize("line", [
    "add rule ip kube-proxy c ip daddr 300.1.1.1 drop",
    "add rule ip kube-proxy c ip daddr 10.0.0.0/33 drop",
    "add rule ip kube-proxy c tcp dport 70000 drop",
    "add rule ip kube-proxy c counter drop",
    "add rule ip kube-proxy c numgen random mod x == 0 drop",
    "add rule ip kube-proxy c meta l4proto tcp dnat to 10.1.1.1:80",
    "add element ip kube-proxy m { 10.1.1.1 : jump }",
    "add element ip kube-proxy m { 10.1.1.1 . tcp . 99999 }",
    "add table ip kube-proxy { flags dormant ; }",
    "add chain ip kube-proxy c { type route hook output priority 0 ; }",
    "add set ip kube-proxy s { type ipv6_addr . ipv4_addr ; comment \"x\" ; }",
    "add rule ip6 kube-proxy c ip daddr 10.1.1.1 drop",
    "add rule ip kube-proxy c ip6 daddr fd00::1 drop",
    "add rule ip6 kube-proxy c ip6 daddr fd00::/129 drop",
    "add rule ip6 kube-proxy c ip6 saddr 10.0.0.1 drop",
    "add rule ip6 kube-proxy c meta l4proto tcp dnat ip6 to fd00::1:80",
    "add rule ip6 kube-proxy c meta l4proto tcp dnat ip to 10.1.1.1:80",
    "add rule ip6 kube-proxy c ip daddr . ip6 daddr @s",
    "add element ip6 kube-proxy m { fd00::g . tcp . 80 }",
    "add rule ip kube-proxy c ip daddr . ip saddr vmap",
    "add rule ip other c drop\nadd rule ip kube-proxy c drop",
])
def test_outside_the_grammar_is_untranslatable(line: str) -> None:
    with pytest.raises(nftnl.Untranslatable):
        nftnl.translate([line + "\n"])


words = st.sampled_from(["ip", "ip6", "fd00::1", "fd00::/64", "[fd00::1]:80", "saddr", "daddr", "!=", "10.1.1.1", "10.0.0.0/8", "tcp", "dport", "80", "meta",
                         "l4proto", "numgen", "random", "mod", "3", "==", "0", "jump", "goto", "x", "drop",
                         "dnat", "to", "10.1.1.1:80", "@s", "{", "}", "update", "fib", "type", "local", "map"])


@settings(max_examples=500, deadline=None)
@given(st.lists(words, max_size=14), st.sampled_from(["ip", "ip6"]))
def test_any_rule_text_translates_or_is_refused(ws: list[str], family: str) -> None:
    try:
        exprs = nftnl.rule_expressions(" ".join(ws), family)
    except nftnl.Untranslatable:
        return
    assert len(exprs) >= 4


ips6 = st.builds(lambda a, b: f"fd01::{a:x}:{b:x}", st.integers(0, 0xFFFF), st.integers(1, 0xFFFF))
endpoint6 = st.builds(Endpoint, ip=ips6, port=st.integers(1, 65535), ready=st.booleans(), serving=st.booleans(),
                      terminating=st.booleans(), is_local=st.booleans())
service6 = st.builds(
    lambda kind, proto, np, ext, lb, ranges, aff, etp, itp: ServicePort(
        name=ServicePortName("ns", "svc", "p", proto), type=kind, cluster_ips=("fd00:10:96::9",), port=80,
        protocol=proto, node_port=np if kind != "ClusterIP" else 0, external_ips=ext,
        load_balancer_ips=lb if kind == "LoadBalancer" else (), load_balancer_source_ranges=ranges,
        session_affinity_timeout=aff, external_policy_local=etp, internal_policy_local=itp),
    st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), st.sampled_from(["TCP", "UDP", "SCTP"]),
    st.integers(30000, 32767), st.sampled_from([(), ("fd00:99::1",)]), st.sampled_from([(), ("fd00:98::1",)]),
    st.sampled_from([(), ("fd00:50::/64",), ("2001:db8::/32", "2001:db8:1::/48")]),
    st.sampled_from([None, 60]), st.booleans(), st.booleans())


@settings(max_examples=150, deadline=None)
@given(service6, st.lists(endpoint6, max_size=5, unique_by=lambda e: (e.ip, e.port)), st.booleans())
def test_any_ipv6_service_translates_to_netlink(svc: ServicePort, eps: list[Endpoint], masq: bool) -> None:
    """Whatever an IPv6 Service is, its table's whole transaction (the first sync: skeleton and
    the Service's chains, sets, maps, elements) is in the encoder's grammar: no `nft -f` fallback.
    (No kernel: translation only; the kernel's view of the same is the identical-rulesets test.)"""
    p = NftablesProxier(Nft("unused"), cluster_cidr="fd01::/16", node_ips=("fd00:50::1",), masquerade_all=masq,
                        family="IPv6", service_cidrs=("fd00:10:96::/108",))
    lines, _, _, _ = p._full({svc.name: svc}, {svc.name: tuple(eps)}, recreate=True)
    batch = nftnl.translate(lines)
    rules = [line for line in lines if line.startswith("add rule ")]
    assert batch.family == "ip6" and rules
    assert sum(1 for command in batch.origin if command.startswith("add rule ")) == len(rules)  # one message each

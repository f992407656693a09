"""The nftables mode against the kernel, in a network namespace this test creates: partial syncs
change only the changed Service's chains and elements (read back with `nft -j list table`), a
failed transaction leaves the previous ruleset (both in the `ip` and in the `ip6` table),
--cleanup removes both tables (from every mode), and
another table and iptables-nft rules beside kproxy's are left as they were.
Packets through the rules: tests/conformance (every scenario in nftables mode)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import msgspec
import pytest
from nft_state import endpoints, kernel_entries, name, service, sh, state, table_exists

from kproxy.backends.nftables import Nft
from kproxy.model import Endpoint, ServicePort
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers import nftables
from kproxy.proxiers.nftables import NftablesProxier, load_renderer

pytestmark = pytest.mark.e2e
KPROXY = os.path.join(os.path.dirname(sys.executable), "kproxy")


class CountingNft(Nft):
    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        self.transactions: list[str] = []

    def apply(self, transaction: str | list[str]) -> None:
        self.transactions.append(transaction if isinstance(transaction, str) else "".join(transaction))
        super().apply(transaction)


NFT_FAMILY = {"IPv4": "ip", "IPv6": "ip6"}


def proxier(netns: str, family: str = "IPv4") -> NftablesProxier:
    return NftablesProxier(CountingNft(netns), cluster_cidr="10.0.0.0/8,fd00:10::/64",
                           node_ips=("192.168.77.1", "fd00:77::1"), family=family)  # type: ignore[arg-type]


def _belongs(entry: str, svc: ServicePort, eps: tuple[Endpoint, ...]) -> bool:
    readable = f"{svc.name.namespace}/{svc.name.name}/"
    return readable in entry or any(f'"{ip}"' in entry for ip in (*svc.cluster_ips, *(e.ip for e in eps)))


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_partial_sync_changes_only_the_changed_service(netns: str, family: str) -> None:
    p = proxier(netns, family)
    fam = NFT_FAMILY[family]
    services, eps = state(50, 3, node_ports=True, family=family)
    assert p.sync(SyncRequest(services, eps)).ok
    before = kernel_entries(netns, fam)
    old_eps = eps[name(7)]
    eps = dict(eps)
    eps[name(7)] = old_eps[:2] + endpoints(7, 1, first=5, family=family)  # one endpoint replaced
    p.nft.transactions.clear()  # type: ignore[attr-defined]
    res = p.sync(SyncRequest(services, eps, changed=frozenset({name(7)}), full=False))
    assert res.ok, res.error
    assert len(p.nft.transactions) == 1  # type: ignore[attr-defined]  # ONE transaction
    after = kernel_entries(netns, fam)
    changed = before ^ after
    assert changed, "the endpoint change did not reach the kernel"
    foreign = [e for e in changed if not _belongs(e, services[name(7)], old_eps + eps[name(7)])]
    assert not foreign, f"entries of other Services changed: {foreign[:5]}"
    new_ip, old_ip = eps[name(7)][2].ip, old_eps[2].ip
    # The endpoint moved in the Service's endpoint map; no rule changed (a changed rule costs a
    # validation of the whole table in the kernel).
    assert any(new_ip in e and e.startswith("elem endpoints-tcp-") for e in after - before)
    assert not any(e.startswith("rule ") for e in changed), sorted(changed)
    assert any(new_ip in e and e.startswith("elem hairpin-ips") for e in after - before)
    assert not any(old_ip in e for e in after), "the removed endpoint is still in the ruleset"
    # NodePort -> ClusterIP: its external- chain is flushed now and deleted after the grace period.
    svc3 = dict(services)
    svc3[name(3)] = service(3, family=family)
    assert p.sync(SyncRequest(svc3, eps, changed=frozenset({name(3)}), full=False)).ok
    final = kernel_entries(netns, fam)
    ext = [e for e in final if e.startswith("chain ") and '"external-' in e and "/svc-3/" in e]
    assert ext and not any(e.startswith("rule external-") and "/svc-3/" in e for e in final)
    changed = after ^ final
    assert changed and all(_belongs(e, svc3[name(3)], eps[name(3)]) for e in changed), changed
    assert not any("service-nodeports" in e and "external-" in e and "/svc-3/" in e for e in final)
    p.stale_grace = 0.0
    svc3[name(4)] = service(4, family=family)  # the next partial sync deletes the stale chain, in its transaction
    assert p.sync(SyncRequest(svc3, eps, changed=frozenset({name(4)}), full=False)).ok
    assert "delete chain" in p.last_transaction
    assert p.nft.last_way == "netlink"
    final = kernel_entries(netns, fam)
    assert not any(e.startswith("chain ") and '"external-' in e and "/svc-3/" in e for e in final)
    assert p.cleanup() and not table_exists(netns, fam, "kube-proxy")


class BadRenderer:
    """The real renderer, except that one Service gets a rule the kernel refuses."""

    def __init__(self, bad: str) -> None:
        self.real: Any = load_renderer()
        self.bad = bad

    def render_service_port(self, svc: ServicePort, *args: Any) -> Any:
        r = self.real.render_service_port(svc, *args)
        if svc.name.name != self.bad:
            return r
        chains = tuple((c, (*body, (("l4proto", "tcp"), ("dnat", "ip", "300.1.1.1:80")))) for c, body in r.chains)
        return type(r)(chains, r.elements, r.sets)


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_failed_transaction_leaves_the_previous_ruleset(netns: str, family: str) -> None:
    p = proxier(netns, family)
    fam = NFT_FAMILY[family]
    services, eps = state(20, 2, family=family)
    assert p.sync(SyncRequest(services, eps)).ok
    before = kernel_entries(netns, fam)
    eps2 = dict(eps)
    eps2[name(4)] = endpoints(4, 2, first=3, family=family)
    eps2[name(5)] = endpoints(5, 2, first=3, family=family)
    good = p.render
    p.render = BadRenderer("svc-5")
    res = p.sync(SyncRequest(services, eps2, changed=frozenset({name(4), name(5)}), full=False))
    assert not res.ok and "exited" in res.error
    assert kernel_entries(netns, fam) == before, "a failed partial transaction changed the kernel"
    res = p.sync(SyncRequest(services, eps2, full=True))  # a failed full sync, too
    assert not res.ok
    assert kernel_entries(netns, fam) == before, "a failed full transaction changed the kernel"
    p.render = good
    res = p.sync(SyncRequest(services, eps2, changed=frozenset(), full=False))
    assert res.ok and p.last_stats["full"] == 1.0, "the sync after a failure must be full"
    after = kernel_entries(netns, fam)
    assert any(endpoints(5, 2, first=3, family=family)[0].ip in e for e in after)
    # A partial sync after them counts shared elements from what that full sync counted (the
    # failed one's counts were never kept): back to the first endpoints, back to the first table.
    res = p.sync(SyncRequest(services, eps, changed=frozenset({name(4), name(5)}), full=False))
    assert res.ok and p.last_stats["full"] == 0.0
    assert kernel_entries(netns, fam) == before
    assert p.cleanup()


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_cleanup_of_every_mode_removes_the_table(netns: str, mode: str) -> None:
    for family in ("IPv4", "IPv6"):
        services, eps = state(5, 2, family=family)
        assert proxier(netns, family).sync(SyncRequest(services, eps)).ok
    assert table_exists(netns, "ip", "kube-proxy") and table_exists(netns, "ip6", "kube-proxy")
    out = sh("ip", "netns", "exec", netns, KPROXY, "--cleanup", "--proxy-mode", mode,
             "--iptables-backend", "nft", "--hostname-override", "n1", check=False)
    assert out.returncode == 0, out.stderr
    assert not table_exists(netns, "ip", "kube-proxy")
    assert not table_exists(netns, "ip6", "kube-proxy")
    # Nothing to remove: still clean, exit 0.
    out = sh("ip", "netns", "exec", netns, KPROXY, "--cleanup", "--proxy-mode", mode,
             "--iptables-backend", "nft", "--hostname-override", "n1", check=False)
    assert out.returncode == 0, out.stderr


OTHER_TABLE = """table inet kpx-other {
    set blocked { type ipv4_addr ; elements = { 203.0.113.7 } ; }
    chain input { type filter hook input priority 0 ; policy accept ;
        ip saddr @blocked counter drop
        tcp dport 9999 counter accept
    }
}
"""


def _iptables_rules(netns: str) -> list[str]:
    out = sh("ip", "netns", "exec", netns, "iptables-nft-save").stdout
    return sorted(line for line in out.splitlines() if line.startswith("-A "))


def test_coexists_with_another_table_and_iptables_nft_rules(netns: str) -> None:
    sh("ip", "netns", "exec", netns, "nft", "-f", "-", inp=OTHER_TABLE)
    sh("ip", "netns", "exec", netns, "iptables-nft", "-A", "INPUT", "-s", "198.51.100.9", "-j", "DROP")
    sh("ip", "netns", "exec", netns, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "198.51.100.0/24",
       "-j", "MASQUERADE")
    other = kernel_entries(netns, "inet", "kpx-other")
    rules = _iptables_rules(netns)
    assert len(rules) == 2
    p = proxier(netns)
    services, eps = state(30, 3, node_ports=True)
    steps = [
        SyncRequest(services, eps),
        SyncRequest(services, {**eps, name(2): endpoints(2, 1)}, changed=frozenset({name(2)}), full=False),
        SyncRequest(services, eps, full=True),
    ]
    for step in steps:
        res = p.sync(step)
        assert res.ok, res.error
        assert kernel_entries(netns, "inet", "kpx-other") == other
        assert _iptables_rules(netns) == rules
    assert p.cleanup()
    assert not table_exists(netns, "ip", "kube-proxy")
    assert kernel_entries(netns, "inet", "kpx-other") == other
    assert _iptables_rules(netns) == rules


def _connect(netns: str, ip: str, port: int, timeout: float = 1.0) -> str:
    """What a TCP connect from the node itself gets: "connected", "refused" or "timeout"."""
    import socket

    from kproxy.relay import socket_in_netns

    with socket_in_netns(netns, socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
        except ConnectionRefusedError:
            return "refused"
        except (TimeoutError, socket.timeout):
            return "timeout"
    return "connected"


@pytest.mark.parametrize("family", ["IPv4", "IPv6"])
def test_unallocated_cluster_ips_are_dropped(netns: str, family: str) -> None:
    """Upstream 1.33: traffic to an address of the service CIDRs that no Service has is dropped,
    to a ClusterIP on a port the Service does not have rejected (ICMPv6 in the ip6 table); other
    addresses untouched; each family's table takes its family's CIDR. Real connections from the
    node's own namespace (the output hook) to listeners on its lo."""
    import socket

    from kproxy.relay import socket_in_netns

    v6 = family == "IPv6"
    # The ICMPv6 error of a reject in the output hook comes back while connect() still holds its
    # socket, which makes it a soft error for the SYN (tcp_v6_err); the retransmitted SYN, ~1 s
    # later, gets the refusal. ip6tables' REJECT behaves the same here (measured).
    wait = 2.5 if v6 else 1.0
    services, eps = state(3, 1, family=family)  # ClusterIPs 10.96.0.0-2 (fd00:10:96::-2)
    if v6:
        unallocated, allocated, outside = "fd00:10:96::5:5", "fd00:10:96::1", "fd00:10:97::1"
    else:
        unallocated, allocated, outside = "10.96.5.5", "10.96.0.1", "10.97.0.1"
    listeners = []
    try:
        for ip in (unallocated, allocated, outside):
            sh("ip", "-n", netns, "addr", "add", f"{ip}/{128 if v6 else 32}", "dev", "lo")
            srv = socket_in_netns(netns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((ip, 8081))
            srv.listen(8)
            listeners.append(srv)
        assert [_connect(netns, ip, 8081, wait) for ip in (unallocated, allocated, outside)] == ["connected"] * 3
        p = NftablesProxier(Nft(netns), cluster_cidr="10.0.0.0/8,fd00:10::/32", node_ips=("192.168.77.1",),
                            service_cidrs=("10.96.0.0/16", "fd00:10:96::/108"), family=family)  # type: ignore[arg-type]
        assert p.sync(SyncRequest(services, eps)).ok
        assert p.nft.last_way == "netlink"
        assert [_connect(netns, ip, 8081, wait) for ip in (unallocated, allocated, outside)] == ["timeout", "refused", "connected"]
        p.set_service_cidrs(())  # the ServiceCIDR went away: the next (full) sync drops the rule
        assert p.sync(SyncRequest(services, eps, changed=frozenset(), full=False)).ok
        assert p.last_stats["full"] == 1.0 and p.last_stats["recreate"] == 0.0
        assert [_connect(netns, ip, 8081, wait) for ip in (unallocated, allocated, outside)] == ["connected", "refused", "connected"]
        assert p.cleanup()
    finally:
        for srv in listeners:
            srv.close()


def test_nodeport_addresses_per_family(netns: str) -> None:
    """--nodeport-addresses of both families: each table's nodeport-ips set holds its family's
    node addresses only (the netns's own, found on its interfaces); without the flag the ip6
    table takes NodePorts on every local address but ::1, as upstream."""
    sh("ip", "-n", netns, "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad")
    services, eps = state(2, 1, node_ports=True, family="IPv6")
    p = NftablesProxier(Nft(netns), nodeport_addresses=("192.168.77.0/24", "fd00:77::/64"), family="IPv6")
    assert p.sync(SyncRequest(services, eps)).ok
    entries = kernel_entries(netns, "ip6")
    assert {e for e in entries if e.startswith("elem nodeport-ips ")} == {'elem nodeport-ips "fd00:77::1"'}
    assert p.cleanup()
    everywhere = NftablesProxier(Nft(netns), family="IPv6")
    assert everywhere.sync(SyncRequest(services, eps)).ok
    assert "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports" in everywhere.last_transaction
    assert everywhere.cleanup()


def _size(netns: str, kind: str, set_name: str) -> int:
    out = sh("ip", "netns", "exec", netns, "nft", "-j", "list", kind, "ip", "kube-proxy", set_name).stdout
    return int(next(item[kind] for item in json.loads(out)["nftables"] if kind in item)["size"])


def _sticky(i: int) -> ServicePort:
    return msgspec.structs.replace(service(i), session_affinity_timeout=600)


def test_sets_grow_and_shrink_past_their_declared_size(netns: str, netns2: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed sets are declared with a size, which the kernel enforces (ENFILE beyond it): a
    sync that would outgrow one declares it bigger in a full sync that keeps the table (an
    affinity set's client stays); a full sync shrinks one far too big; `nft -f` takes the same
    transactions and leaves the same ruleset."""
    monkeypatch.setattr(nftables, "MIN_CAPACITY", 4)
    monkeypatch.setattr(nftables, "CAPACITY_STEP", 4)
    a = proxier(netns)
    b = NftablesProxier(Nft(netns2, netlink=False), cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",))
    services, eps = state(4, 1)
    services[name(0)] = _sticky(0)
    for p in (a, b):
        assert p.sync(SyncRequest(services, eps)).ok
    assert _size(netns, "set", "cluster-ips") == 8 and _size(netns, "map", "service-ips") == 8  # 4 and half again
    sticky = next(e.split('"name": "')[1].split('"')[0] for e in kernel_entries(netns) if '"affinity-' in e)
    sh("ip", "netns", "exec", netns, "nft", "add", "element", "ip", "kube-proxy", sticky, "{ 192.0.2.7 }")
    # The cap is the kernel's: 5 more ClusterIPs than the 8 it was sized for are refused, nothing added.
    before = kernel_entries(netns)
    refused = sh("ip", "netns", "exec", netns, "nft", "add", "element", "ip", "kube-proxy", "cluster-ips",
                 "{ " + ", ".join(f"10.255.0.{k}" for k in range(1, 6)) + " }", check=False)
    assert refused.returncode != 0 and "Too many open files" in refused.stderr, refused.stderr
    assert kernel_entries(netns) == before
    for i in range(4, 12):  # one Service per partial sync: 8 fit, the 9th makes the sets bigger
        services[name(i)], eps[name(i)] = service(i), endpoints(i, 1)
        for p in (a, b):
            assert p.sync(SyncRequest(services, eps, changed=frozenset({name(i)}), full=False)).ok
        assert a.last_stats["full"] == (1.0 if i == 8 else 0.0) and a.last_stats["recreate"] == 0.0
        assert a.nft.last_way == "netlink"
    assert _size(netns, "set", "cluster-ips") == 16 and _size(netns, "set", "hairpin-ips") == 16
    after = kernel_entries(netns)
    assert any(e.startswith(f"elem {sticky} ") and "192.0.2.7" in e for e in after), "the resize lost the table"
    assert sum(e.startswith("elem cluster-ips ") for e in after) == 12
    assert {e for e in after if not e.startswith(f"elem {sticky} ")} == kernel_entries(netns2)
    # Back to one Service: the periodic full sync declares the sets small again.
    few = {name(0): services[name(0)]}
    for p in (a, b):
        assert p.sync(SyncRequest(few, eps, full=True)).ok
    assert _size(netns, "set", "cluster-ips") == 4 and _size(netns, "map", "service-nodeports") == 4
    assert kernel_entries(netns) - {e for e in kernel_entries(netns) if e.startswith(f"elem {sticky} ")} == \
        kernel_entries(netns2)
    assert a.cleanup() and b.cleanup()


def test_a_set_filled_from_outside_fails_one_sync_and_the_next_full_one_refills_it(
        netns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the cap: elements kproxy did not count (added by someone else) fill a set; the sync
    that adds one more is refused whole (ENFILE), the next is full and writes kproxy's own."""
    monkeypatch.setattr(nftables, "MIN_CAPACITY", 4)
    monkeypatch.setattr(nftables, "CAPACITY_STEP", 4)
    p = proxier(netns)
    services, eps = state(4, 1)
    assert p.sync(SyncRequest(services, eps)).ok  # cluster-ips: 4 of 8
    sh("ip", "netns", "exec", netns, "nft", "add", "element", "ip", "kube-proxy", "cluster-ips",
       "{ 10.255.0.1, 10.255.0.2, 10.255.0.3, 10.255.0.4 }")
    before = kernel_entries(netns)
    services[name(4)], eps[name(4)] = service(4), endpoints(4, 1)
    res = p.sync(SyncRequest(services, eps, changed=frozenset({name(4)}), full=False))
    assert not res.ok and "Too many open files" in res.error, res.error
    assert kernel_entries(netns) == before
    res = p.sync(SyncRequest(services, eps, changed=frozenset(), full=False))
    assert res.ok and p.last_stats["full"] == 1.0
    ips = sorted(e for e in kernel_entries(netns) if e.startswith("elem cluster-ips "))
    assert ips == sorted(f'elem cluster-ips "{service(i).cluster_ips[0]}"' for i in range(5))
    assert p.cleanup()

"""Coexistence (issue 13): kproxy's restores touch only its own chains and counters.

Another program's chain and rules, with counters, sit in the same nat and filter tables of a
network namespace; kproxy's full sync, a large partial sync and --cleanup run beside them on both
back ends, and the other program's rules and counters must come out unchanged. On nf_tables a
large restore used to start with a bare "-Z" (a workaround for iptables-nft-restore's chain-list
cost), which zeroed every counter in the nat table, the other program's included.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from iptables_helpers import ep, request, spn, svc

from kproxy.backends.iptables import IPTables
from kproxy.proxiers.iptables import IptablesProxier, only_kproxy_in

pytestmark = pytest.mark.e2e
N = 40  # > NFT_ALL_CHAINS_THRESHOLD / 3 Services: the size at which "-Z" was used

FOREIGN = """*nat
:FOREIGN-NAT - [0:0]
[7:700] -A FOREIGN-NAT -d 10.9.9.9/32 -j RETURN
[3:300] -A PREROUTING -j FOREIGN-NAT
[5:500] -A OUTPUT -d 10.9.9.8/32 -j RETURN
COMMIT
*filter
:FOREIGN-FLT - [0:0]
[11:1100] -A FOREIGN-FLT -s 10.9.9.7/32 -j ACCEPT
[13:1300] -A INPUT -j FOREIGN-FLT
COMMIT
"""
FOREIGN_COUNTED = [
    "[7:700] -A FOREIGN-NAT -d 10.9.9.9/32 -j RETURN",
    "[3:300] -A PREROUTING -j FOREIGN-NAT",
    "[5:500] -A OUTPUT -d 10.9.9.8/32 -j RETURN",
    "[11:1100] -A FOREIGN-FLT -s 10.9.9.7/32 -j ACCEPT",
    "[13:1300] -A INPUT -j FOREIGN-FLT",
]


def _ns_run(netns: str, *cmd: str, stdin: str | None = None) -> str:
    out = subprocess.run(["ip", "netns", "exec", netns, *cmd], input=stdin, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout


def _save_counted(netns: str, backend: str) -> str:
    return _ns_run(netns, f"iptables-{backend}-save", "-c")


def _services(n: int, port: int = 80) -> tuple[list, dict]:  # type: ignore[type-arg]
    svcs, eps = [], {}
    for i in range(n):
        name = spn(f"s{i}")
        svcs.append(svc(name, f"10.96.1.{i + 1}", port=port))
        eps[name] = (ep(f"10.1.{i}.1"), ep(f"10.1.{i}.2"))
    return svcs, eps


@pytest.fixture(params=["nft", "legacy"])
def proxier(request: pytest.FixtureRequest, rules_netns: str) -> Iterator[tuple[IptablesProxier, str]]:
    backend = str(request.param)
    _ns_run(rules_netns, f"iptables-{backend}-restore", "-w", "30", "-c", "--noflush", stdin=FOREIGN)
    p = IptablesProxier(IPTables(backend=backend, netns=rules_netns))  # type: ignore[arg-type]
    try:
        yield p, backend
    finally:
        p.cleanup()
        flush = "*nat\n-F FOREIGN-NAT\n-D PREROUTING -j FOREIGN-NAT\n-D OUTPUT -d 10.9.9.8/32 -j RETURN\n" \
                "-X FOREIGN-NAT\nCOMMIT\n*filter\n-F FOREIGN-FLT\n-D INPUT -j FOREIGN-FLT\n-X FOREIGN-FLT\nCOMMIT\n"
        subprocess.run(["ip", "netns", "exec", rules_netns, f"iptables-{backend}-restore", "-w", "30", "--noflush"],
                       input=flush, text=True, capture_output=True, timeout=60, check=False)


@pytest.mark.timeout(180)
def test_other_softwares_rules_and_counters_survive_syncs_and_cleanup(proxier: tuple[IptablesProxier, str],
                                                                       rules_netns: str) -> None:
    p, backend = proxier
    svcs, eps = _services(N)
    assert p.sync(request(svcs, eps)).ok
    assert p.last_plan is not None and "-Z" not in p.last_plan.data.decode().splitlines()
    dump = _save_counted(rules_netns, backend)
    for line in FOREIGN_COUNTED:
        assert line in dump, f"after the full sync: {line!r} changed\n{dump[:3000]}"
    assert sum(1 for line in dump.splitlines() if line.startswith(":KUBE-SVC-")) == N
    # A partial sync that changes every Service (the other path that used "-Z").
    svcs2, _ = _services(N, port=81)
    assert p.sync(request(svcs2, eps, changed={s.name for s in svcs2})).ok
    dump = _save_counted(rules_netns, backend)
    for line in FOREIGN_COUNTED:
        assert line in dump, f"after the partial sync: {line!r} changed"
    assert "--dport 81" in dump
    assert p.cleanup()
    dump = _save_counted(rules_netns, backend)
    for line in FOREIGN_COUNTED:
        assert line in dump, f"after cleanup: {line!r} changed"
    assert "KUBE-SVC-" not in dump


@pytest.mark.timeout(120)
def test_alone_in_the_table_the_fast_zero_path_is_kept(rules_netns: str) -> None:
    """Without other software in the nat table, a large nf_tables restore still starts with -Z
    (the chain-list shortcut that keeps a 10,000-Service full sync at seconds)."""
    p = IptablesProxier(IPTables(backend="nft", netns=rules_netns))
    # kubelet's rule-less canary chain, on every node: nothing to zero in it.
    _ns_run(rules_netns, "iptables-nft", "-t", "nat", "-N", "KUBE-KUBELET-CANARY")
    try:
        svcs, eps = _services(N)
        assert p.sync(request(svcs, eps)).ok  # first sync: decided from the nat dump
        assert p.last_plan is not None and p.last_plan.data.decode().splitlines()[1] == "-Z"
        assert p.sync(request(svcs, eps)).ok  # later full syncs: from the table's chain count
        assert p.last_plan is not None and p.last_plan.data.decode().splitlines()[1] == "-Z"
        # A chain of another program that nothing jumps to: only the chain count sees it.
        _ns_run(rules_netns, "iptables-nft-restore", "-c", "--noflush",
                stdin="*nat\n:LONELY - [0:0]\n[9:900] -A LONELY -d 10.9.9.6/32 -j RETURN\nCOMMIT\n")
        assert p.sync(request(svcs, eps)).ok
        assert p.last_plan is not None and "-Z" not in p.last_plan.data.decode().splitlines()
        assert "[9:900] -A LONELY -d 10.9.9.6/32 -j RETURN" in _save_counted(rules_netns, "nft")
    finally:
        subprocess.run(["ip", "netns", "exec", rules_netns, "iptables-nft-restore", "--noflush"], text=True,
                       input="*nat\n-F LONELY\n-X LONELY\n-X KUBE-KUBELET-CANARY\nCOMMIT\n", capture_output=True,
                       timeout=60, check=False)
        assert p.cleanup()


def test_only_kproxy_in() -> None:
    ours = {"KUBE-SERVICES", "KUBE-SVC-X"}.__contains__
    assert only_kproxy_in(["-A PREROUTING -m comment --comment \"k s\" -j KUBE-SERVICES",
                           "-A KUBE-SVC-X -j RETURN", "-P PREROUTING ACCEPT", ":DOCKER - [0:0]"], ours)
    assert not only_kproxy_in(["-A DOCKER -j RETURN"], ours)
    assert not only_kproxy_in(["-A PREROUTING -j RETURN"], ours)
    assert not only_kproxy_in(["-A PREROUTING -j KUBE-SERVICES -m comment --comment x"], ours)

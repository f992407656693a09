"""The fixed costs of IPVS mode's first sync on an empty node: no modprobe for the kube-ipvs0
lookup, and the jumps from the built-in chains read from the kernel (legacy x_tables) instead
of an iptables-save process, cross-checked against iptables-save. Runs inside the VM."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from ipvs_helpers import in_netns, sh

from kproxy.backends import ipvs as nl
from kproxy.backends import xtables
from kproxy.backends.ipset import IPSets
from kproxy.backends.iptables import IPTables
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.ipvs import JUMPS, SET_SPECS, IPVSOptions, IPVSProxier

MODPROBE = Path("/proc/sys/kernel/modprobe")


@pytest.fixture
def modprobe_log(tmp_path: Path) -> Iterator[Path]:
    """Points the kernel's module loader at a wrapper that logs its arguments, then runs the
    real modprobe: every request_module() the kernel makes meanwhile is recorded."""
    log = tmp_path / "modprobe.log"
    log.touch()
    wrapper = tmp_path / "modprobe"
    real = MODPROBE.read_text().strip()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    MODPROBE.write_text(str(wrapper))
    try:
        yield log
    finally:
        MODPROBE.write_text(real)


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"kptempty{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        sh("ip", "netns", "del", ns)


def test_link_index_of_a_missing_link_runs_no_modprobe(modprobe_log: Path, netns: str) -> None:
    # if_nametoindex(3) makes the kernel run `modprobe netdev-NAME` for an unknown name (a
    # process start, 60-160 ms of a 1,000-Service sync from an empty node under UML).
    assert in_netns(netns, lambda: nl.link_index("kube-ipvs0")) == 0
    assert in_netns(netns, lambda: nl.link_index("lo")) == in_netns(netns, lambda: socket.if_nametoindex("lo"))
    index = in_netns(netns, lambda: nl.ensure_dummy_link("kube-ipvs0"))
    assert index == in_netns(netns, lambda: socket.if_nametoindex("kube-ipvs0")) > 0
    assert "netdev-" not in modprobe_log.read_text()


def _save_jumps(ns: str) -> set[tuple[str, str, str]]:
    """Jumps from built-in chains to user chains (declared with policy "-") in iptables-save."""
    out: set[tuple[str, str, str]] = set()
    user: set[tuple[str, str]] = set()
    table = ""
    for line in sh("ip", "netns", "exec", ns, "iptables-legacy-save").splitlines():
        parts = line.split()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":") and parts[1] == "-":
            user.add((table, parts[0][1:]))
        elif line.startswith("-A ") and parts[1] in xtables.HOOKS and parts[-2] == "-j" and (table, parts[-1]) in user:
            out.add((table, parts[1], parts[-1]))
    return out


def test_builtin_jumps_read_from_the_kernel_match_iptables_save(netns: str) -> None:
    assert in_netns(netns, lambda: xtables.builtin_jumps(("nat", "filter"))) == set()  # no tables yet
    rules = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:A-FOREIGN - [0:0]
:ZZ-LAST - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -p udp -j A-FOREIGN
-A OUTPUT -j KUBE-SERVICES
-A OUTPUT -p tcp
-A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE
-A POSTROUTING -j ZZ-LAST
-A KUBE-SERVICES -j A-FOREIGN
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-EMPTY - [0:0]
-A INPUT -m conntrack --ctstate NEW -j KUBE-PROXY-FIREWALL
-A INPUT -j ACCEPT
-A FORWARD -j KUBE-EMPTY
-A FORWARD -g KUBE-FORWARD
-A OUTPUT -j KUBE-PROXY-FIREWALL
-A KUBE-FORWARD -j DROP
COMMIT
"""
    # Covered: a fall-through (OUTPUT -p tcp, no target), a jump from a user chain (not a
    # built-in's), a goto (-g: iptables-save prints no -j), an empty chain, the first and the
    # last user chain (A-FOREIGN, ZZ-LAST: the bounds of the offset lookup).
    proc = subprocess.run(["ip", "netns", "exec", netns, "iptables-legacy-restore"], input=rules,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = in_netns(netns, lambda: xtables.builtin_jumps(("nat", "filter")))
    assert got == _save_jumps(netns) == {
        ("nat", "PREROUTING", "KUBE-SERVICES"), ("nat", "PREROUTING", "A-FOREIGN"),
        ("nat", "OUTPUT", "KUBE-SERVICES"), ("nat", "POSTROUTING", "ZZ-LAST"),
        ("filter", "INPUT", "KUBE-PROXY-FIREWALL"), ("filter", "FORWARD", "KUBE-EMPTY"),
        ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL"),
    }
    # The iptables-save fallback (another namespace) parses to the same set.
    assert IPTables(backend="legacy", netns=netns).builtin_jumps(("nat", "filter")) == got


def test_first_ipvs_sync_on_an_empty_node_runs_no_iptables_save_and_installs_each_jump_once(netns: str) -> None:
    name = ServicePortName("default", "web", "http", "TCP")
    sp = ServicePort(name=name, type="ClusterIP", port=80, protocol="TCP", cluster_ips=("10.96.7.1",))
    eps = (Endpoint(ip="10.244.7.10", port=8080),)

    def run() -> tuple[int, set[tuple[str, str, str]]]:
        p = IPVSProxier(IPVSOptions(), IPTables(backend="legacy"), IPSets(SET_SPECS), node_ips=lambda: ["10.250.0.1"])
        try:
            for _ in range(2):  # the second full sync finds the jumps in place: no duplicates
                r = p.sync(SyncRequest({name: sp}, {name: eps}))
                assert r.ok, r.error
            return p.iptables.saves, xtables.builtin_jumps(("nat", "filter"))
        finally:
            p.close()

    saves, jumps = in_netns(netns, run)
    assert saves == 0
    assert jumps == {(t, src, dst) for t, src, dst, _ in JUMPS} == _save_jumps(netns)
    dump = sh("ip", "netns", "exec", netns, "iptables-legacy-save")
    for t, src, dst, _ in JUMPS:
        assert sum(1 for line in dump.splitlines() if line.startswith(f"-A {src} ") and line.endswith(f"-j {dst}")) == 1, (t, src, dst)

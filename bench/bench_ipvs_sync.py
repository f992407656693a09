"""IPVS mode vs iptables mode (legacy back end), side by side in ONE User-Mode Linux VM run.

The host kernel has no IPVS, so the host-side test boots the VM (tests/vm/run) and runs this
file's __main__ part inside it; that part times, for 1,000 and 10,000 Services x 10 endpoints:
a full sync from an empty node and one endpoint change (a partial sync), first with kproxy's
IPVS proxier, then with its iptables proxier, and prints the figures as JSON. UML makes
syscalls and process starts far slower than native, so only ratios within one run mean much.

Each measurement runs in a fresh network namespace (an empty node). Why: the kernel keeps the
real servers deleted in the last 1-3 minutes of a namespace in a "dest trash" list that every
IPVS_CMD_NEW_DEST walks linearly (ip_vs_trash_get_dest, kernel 6.1), so measuring 10,000
Services right after cleaning up 1,000 in the same namespace timed that walk (10,000 trashed x
100,000 adds), not the sync. `ipvs_10000.full_s_after_1000_cleanup` measures it on purpose: the
10,000-Service full sync again, in the namespace where the 1,000-Service one was just cleaned up
(what earlier versions of this benchmark timed).

    .venv/bin/pytest bench/bench_ipvs_sync.py --benchmark-enable -s
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import plots  # bench/plots.py: pytest puts bench/ on sys.path
import pytest

REPO = Path(__file__).resolve().parents[1]
SIZES = (1000, 10000)
ENDPOINTS = 10


def _state(n: int) -> tuple[dict[Any, Any], dict[Any, Any]]:
    from kproxy.model import Endpoint, ServicePort, ServicePortName

    services, eps = {}, {}
    for i in range(n):
        name = ServicePortName("bench", f"svc{i}", "http", "TCP")
        services[name] = ServicePort(name=name, type="ClusterIP", port=80, protocol="TCP",
                                     cluster_ips=(f"10.{96 + i // 65000}.{(i // 250) % 256}.{i % 250 + 1}",))
        eps[name] = tuple(Endpoint(ip=f"10.{200 + k // 65000}.{(k // 250) % 256}.{k % 250 + 1}", port=8080)
                          for k in range(i * ENDPOINTS, (i + 1) * ENDPOINTS))
    return services, eps


CLONE_NEWNET = 0x40000000


def _fresh_netns() -> None:
    """Moves this (single-threaded) process into a new network namespace with lo up: IPVS
    refuses real servers whose address has no route type (inet_addr_type) without it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _measure(proxier: Any, n: int) -> dict[str, Any]:
    from kproxy.proxiers.base import SyncRequest

    services, eps = _state(n)
    t = time.perf_counter()
    r = proxier.sync(SyncRequest(services, eps))
    full = time.perf_counter() - t
    assert r.ok, r.error
    full_parts = {k: round(v, 2) for k, v in getattr(proxier, "last_timings", {}).items()}
    first = next(iter(services))
    eps[first] = eps[first][:-1]
    t = time.perf_counter()
    r = proxier.sync(SyncRequest(services, eps, changed=frozenset({first}), full=False))
    change = time.perf_counter() - t
    assert r.ok, r.error
    out: dict[str, Any] = {"full_s": round(full, 3), "change_ms": round(change * 1000, 1)}
    if full_parts:
        out["timings_full_s"] = full_parts
    return out


def inner() -> dict[str, Any]:
    """Runs inside the VM."""
    from kproxy.backends.ipset import IPSets
    from kproxy.backends.iptables import IPTables
    from kproxy.proxiers.iptables import IptablesProxier
    from kproxy.proxiers.ipvs import SET_SPECS, IPVSOptions, IPVSProxier

    # Warm-up in a throwaway namespace: the first use loads the kernel modules (ip_vs, ip_set
    # types, xtables matches) through UML's slow modprobe, once per boot; not part of a sync.
    _fresh_netns()
    for warm in (IPVSProxier(IPVSOptions(), IPTables(backend="legacy"), IPSets(SET_SPECS), node_ips=lambda: ["10.250.0.1"]),
                 IptablesProxier(IPTables(backend="legacy"))):
        _measure(warm, 10)
        warm.cleanup()
    out: dict[str, Any] = {}
    for n in SIZES:
        _fresh_netns()
        p = IPVSProxier(IPVSOptions(), IPTables(backend="legacy"), IPSets(SET_SPECS), node_ips=lambda: ["10.250.0.1"])
        sends = p.ipvs.sends
        res = _measure(p, n)
        res["netlink_sends_full"] = p.ipvs.sends - sends
        res["timings_change_ms"] = {k: round(v * 1000, 1) for k, v in p.last_timings.items()}
        out[f"ipvs_{n}"] = res
        assert p.cleanup()
        p.close()
        _fresh_netns()
        q = IptablesProxier(IPTables(backend="legacy"))
        out[f"iptables_{n}"] = _measure(q, n)
        q.cleanup()
    # The dest trash effect (see the module docstring): 1,000 Services cleaned up, then 10,000.
    _fresh_netns()
    p = IPVSProxier(IPVSOptions(), IPTables(backend="legacy"), IPSets(SET_SPECS), node_ips=lambda: ["10.250.0.1"])
    _measure(p, SIZES[0])
    assert p.cleanup()
    out[f"ipvs_{SIZES[-1]}"][f"full_s_after_{SIZES[0]}_cleanup"] = _measure(p, SIZES[-1])["full_s"]
    assert p.cleanup()
    p.close()
    return out


@pytest.mark.timeout(1700)
def test_ipvs_vs_iptables_sync_in_one_vm(benchmark: Any) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [str(REPO / "tests/vm/run"), "--timeout", "1500", "--mem", "4096M", "--",
           str(Path(sys.executable)), str(Path(__file__).resolve()), "--inner"]

    def run() -> dict[str, Any]:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=1600)
        if proc.returncode == 125:
            pytest.skip(f"VM cannot start: {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result

    figures = benchmark.pedantic(run, rounds=1, iterations=1)
    print(json.dumps(figures, indent=1))
    for n in SIZES:
        ipvs, ipt = figures[f"ipvs_{n}"], figures[f"iptables_{n}"]
        ratio_full = ipt["full_s"] / ipvs["full_s"]
        ratio_change = ipt["change_ms"] / ipvs["change_ms"]
        benchmark.extra_info[f"{n}"] = {"ipvs": ipvs, "iptables": ipt,
                                        "full_ratio": round(ratio_full, 1), "change_ratio": round(ratio_change, 1)}
        print(f"{n} services: full sync ipvs {ipvs['full_s']} s vs iptables {ipt['full_s']} s "
              f"({ratio_full:.1f}x); one change ipvs {ipvs['change_ms']} ms vs iptables {ipt['change_ms']} ms "
              f"({ratio_change:.0f}x); ipvs netlink sends in the full sync: {ipvs['netlink_sends_full']}")
    when = plots.stamp("bench_ipvs_sync.py")
    for mode, label in (("ipvs", "kproxy ipvs"), ("iptables", "kproxy iptables (legacy)")):
        plots.record("ipvs", "ipvs_full_sync", label, {str(n): figures[f"{mode}_{n}"]["full_s"] for n in SIZES}, when)
        plots.record("ipvs", "ipvs_one_change", label, {str(n): figures[f"{mode}_{n}"]["change_ms"] for n in SIZES},
                     when)
    # The limits the issue sets: one change in milliseconds, the netlink path batched.
    assert figures["ipvs_10000"]["change_ms"] < 1000
    assert figures["ipvs_10000"]["netlink_sends_full"] < 1000  # 110,000 messages


if __name__ == "__main__" and "--inner" in sys.argv:
    print(json.dumps(inner()))

"""One measurement of the iptables proxier, run as its own process so RSS is kproxy's alone.

    python bench/bench_iptables_worker.py BACKEND SERVICES NETNS [--no-z-control]

Prints one JSON object: render/assemble/restore seconds of the first full sync, of a partial
sync after one endpoint change and of a periodic full resync, the bare iptables-restore floor
of the same ruleset (our --noflush input, and a flushing restore of it), and max RSS.
The namespace must exist and be empty; the caller creates and deletes it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from kproxy.backends.iptables import IPTables
from kproxy.fastpath import COMPILED
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.iptables import IptablesProxier

ENDPOINTS = 10
PARTIALS = 3


def model(n: int) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    services: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(n):
        name = ServicePortName(f"ns{i % 50}", f"svc{i}", "http")
        vip = f"172.{16 + i // 65000}.{(i // 250) % 256}.{i % 250 + 1}"
        services[name] = ServicePort(name=name, type="ClusterIP", cluster_ips=(vip,), port=80, protocol="TCP")
        eps = []
        for j in range(ENDPOINTS):
            k = i * ENDPOINTS + j
            eps.append(Endpoint(f"10.{k // 62500 + 1}.{(k // 250) % 250}.{k % 250 + 1}", 8080))
        endpoints[name] = tuple(eps)
    return services, endpoints


def timed_restore(backend: str, netns: str, data: bytes, noflush: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds user+sys of the restore process, kernel commit included)."""
    cmd = ["ip", "netns", "exec", netns, f"iptables-{backend}-restore", "-w", "30"]
    if noflush:
        cmd.append("--noflush")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=3600, check=False)
    elapsed = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"bare restore failed: {proc.stderr.decode()[:500]}")
    return elapsed, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def main(argv: list[str]) -> None:
    backend, n, netns = argv[0], int(argv[1]), argv[2]
    z_control = "--no-z-control" in argv
    services, endpoints = model(n)
    ipt = IPTables(backend="legacy" if backend == "legacy" else "nft", netns=netns, timeout=3600)
    px = IptablesProxier(ipt, cluster_cidr="10.0.0.0/8")
    px.keep_input_bytes = 1 << 40  # the floor below restores the same bytes (kept after the sync: no peak)
    out: dict[str, object] = {
        "load_avg_start": os.getloadavg(),
        "backend": backend,
        "services": n,
        "endpoints": n * ENDPOINTS,
        "compiled": COMPILED,
    }

    res = px.sync(SyncRequest(services=services, endpoints=endpoints))
    assert res.ok, res.error
    assert px.last_plan is not None
    out["first_full"] = dict(px.last_plan_stats)
    out["restore_bytes"] = px.last_plan_stats["bytes"]
    out["nat_rules"] = res.rules_total.get("nat", 0)

    # Partial syncs after one endpoint change (a pod replaced): what the runner does on a slice
    # update; three different Services, so the spread on a shared machine shows.
    changed = dict(endpoints)
    partials = []
    names = list(services)
    for k, name in enumerate(names[k * n // PARTIALS] for k in range(PARTIALS)):
        changed[name] = (*endpoints[name][:-1], Endpoint(f"10.250.0.{k + 1}", 8080))
        res = px.sync(SyncRequest(services=services, endpoints=changed, changed=frozenset({name}), full=False))
        assert res.ok, res.error
        partials.append(dict(px.last_plan_stats))
    out["partials"] = partials
    out["partial"] = sorted(partials, key=lambda p: p["total_s"])[len(partials) // 2]  # the median
    # The partial floor, in the same table: a bare iptables-restore --noflush of one chain (the
    # last partial's new endpoint's KUBE-SEP- chain, flushed and refilled with its two rules). On
    # legacy any restore reads and replaces the whole table; on nf_tables any added rule makes
    # the kernel re-validate every chain reachable from the base chains at commit.
    assert px.last_plan is not None
    lines = px.last_plan.data.decode().splitlines()
    dnat = f"--to-destination 10.250.0.{PARTIALS}:8080"
    sep = next(ln.split()[1] for ln in lines if ln.startswith("-A KUBE-SEP-") and dnat in ln)
    one_chain = "*nat\n" + f":{sep} - [0:0]\n" + "".join(ln + "\n" for ln in lines if ln.startswith(f"-A {sep} "))
    floors = [timed_restore(backend, netns, (one_chain + "COMMIT\n").encode(), noflush=True) for _ in range(PARTIALS)]
    out["partial_floor_s"] = [f[0] for f in floors]
    out["partial_floor_cpu_s"] = [f[1] for f in floors]

    # Periodic full resync with everything already in the kernel.
    res = px.sync(SyncRequest(services=services, endpoints=changed))
    assert res.ok, res.error
    out["resync_full"] = dict(px.last_plan_stats)
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The floor's input: the resync's bytes (the same ruleset; jumps already existed, so no -I lines).
    assert px.last_plan is not None
    data = px.last_plan.data

    # The floor: the same bytes restored by a bare iptables-restore into an empty namespace.
    assert px.cleanup()
    out["bare_noflush_s"], out["bare_noflush_cpu_s"] = timed_restore(backend, netns, data, noflush=True)
    assert px.cleanup()
    out["bare_flush_s"], out["bare_flush_cpu_s"] = timed_restore(backend, netns, data, noflush=False)
    assert px.cleanup()
    if backend == "nft" and z_control:
        # What the same input costs without the "-Z" line (upstream's input shape).
        without_z = data.replace(b"\n-Z\n", b"\n")
        out["bare_noflush_without_z_s"], out["bare_noflush_without_z_cpu_s"] = timed_restore(
            backend, netns, without_z, noflush=True
        )
        assert px.cleanup()
    out["load_avg"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])

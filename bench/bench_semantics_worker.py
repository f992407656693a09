"""One measurement of the iptables proxier's rendering, in its own process (see bench_semantics_sync.py).

    python bench/bench_semantics_worker.py SERVICES ROUNDS NETNS

Imports kproxy from PYTHONPATH (the tree under test: today's, or an older commit's), builds
SERVICES ClusterIP Services x 10 endpoints (every tenth with internalTrafficPolicy Local and a
local endpoint, every tenth UDP), and times ROUNDS full syncs' rendering and ROUNDS partial syncs
after one endpoint change (IptablesProxier.plan: the whole restore input, without running
iptables-restore, whose cost this change does not touch). Prints one JSON object: per-round
wall and CPU seconds, the restore input's bytes and its sha256 (the same ruleset before and
after), which renderer ran. NETNS is an empty namespace the caller made: the first full plan
reads the kernel's chain list there, nothing else touches it.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import kproxy
from kproxy.backends.iptables import IPTables
from kproxy.fastpath import COMPILED
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.iptables import IptablesProxier

ENDPOINTS = 10


def model(n: int) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    services: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(n):
        proto = "UDP" if i % 10 == 3 else "TCP"
        name = ServicePortName(f"ns{i % 50}", f"svc{i}", "p", proto)
        vip = f"172.{16 + i // 65000}.{(i // 250) % 256}.{i % 250 + 1}"
        services[name] = ServicePort(name=name, type="ClusterIP", cluster_ips=(vip,), port=80, protocol=proto,
                                     internal_policy_local=i % 10 == 7)
        endpoints[name] = tuple(
            Endpoint(f"10.{(i * ENDPOINTS + j) // 62500 + 1}.{((i * ENDPOINTS + j) // 250) % 250}."
                     f"{(i * ENDPOINTS + j) % 250 + 1}", 8080, is_local=j == 0)
            for j in range(ENDPOINTS))
    return services, endpoints


def timed(fn: object) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str]) -> None:
    n, rounds, netns = int(argv[0]), int(argv[1]), argv[2]
    services, endpoints = model(n)
    px = IptablesProxier(IPTables(backend="nft", netns=netns), cluster_cidr="10.0.0.0/8")
    full = SyncRequest(services=services, endpoints=endpoints)
    plans = []
    out: dict[str, object] = {"services": n, "compiled": COMPILED, "tree": kproxy.__file__}
    full_wall, full_cpu = [], []
    for _ in range(rounds):
        w, c = timed(lambda: plans.append(px.plan(full, True)))
        full_wall.append(w)
        full_cpu.append(c)
        px._need_dump = False  # read the kernel's chain list once, as a running kproxy does
    data = b"".join(x.encode() for x in plans[-1].chunks)
    out["bytes"] = len(data)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    px._programmed = plans[-1].programmed  # as if that full sync was applied
    part_wall, part_cpu = [], []
    names = list(services)
    for k in range(rounds):
        name = names[(k * 7919) % n]
        changed = dict(endpoints)
        changed[name] = (*endpoints[name][:-1], Endpoint(f"10.250.0.{k % 250 + 1}", 8080))
        req = SyncRequest(services=services, endpoints=changed, changed=frozenset({name}), full=False)
        w, c = timed(lambda: px.plan(req, False))
        part_wall.append(w)
        part_cpu.append(c)
    out.update(full_wall=full_wall, full_cpu=full_cpu, partial_wall=part_wall, partial_cpu=part_cpu)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])

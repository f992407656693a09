"""One measurement of kproxy's iptables mode at N Services, single-stack IPv4 or dual-stack, as
kproxy runs it (kproxy.proxiers.meta: one iptables proxier per family, each fed its family's
view), in its own process so RSS is this case's alone.

    python bench/bench_iptables_dualstack_worker.py BACKEND SERVICES NETNS single|dual

single: N IPv4 Services x 10 IPv4 endpoints, the IPv4 proxier alone (a node without IPv6).
dual: the same N Services dual-stack (a ClusterIP of each family) x 10 endpoints of each family,
the IPv4 and the IPv6 proxier. Prints one JSON object: the first full sync, the median of three
partial syncs after one endpoint change (a pod of each family replaced), a full resync, each with
its per-family share (the proxier's own render/restore split), and max RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from bench_iptables_worker import ENDPOINTS, model

from kproxy.backends.iptables import IPTables
from kproxy.fastpath import COMPILED
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.iptables import IptablesProxier
from kproxy.proxiers.meta import MetaProxier

PARTIALS = 3


def _v6_endpoint(k: int) -> Endpoint:
    return Endpoint(f"fd01::{k >> 16:x}:{k & 0xFFFF:x}", 8080)  # 100,000 of them: two 16-bit groups


def dual_model(n: int) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    """model(n) with a second ClusterIP (IPv6) per Service and an IPv6 twin of every endpoint."""
    services, endpoints = model(n)
    for i, (name, svc) in enumerate(services.items()):
        services[name] = ServicePort(name=name, type="ClusterIP", cluster_ips=(*svc.cluster_ips, f"fd00:96::{i + 1:x}"),
                                     port=80, protocol="TCP")
        endpoints[name] = (*endpoints[name], *(_v6_endpoint(i * ENDPOINTS + j + 1) for j in range(ENDPOINTS)))
    return services, endpoints


def main(argv: list[str]) -> None:
    backend, n, netns, stack = argv[0], int(argv[1]), argv[2], argv[3]
    services, endpoints = dual_model(n) if stack == "dual" else model(n)
    families: tuple[IPFamily, ...] = ("IPv4", "IPv6") if stack == "dual" else ("IPv4",)
    proxiers = {f: IptablesProxier(IPTables(backend="legacy" if backend == "legacy" else "nft", netns=netns,
                                            timeout=3600, ipv6=f == "IPv6"),
                                   cluster_cidr="10.0.0.0/8,fd01::/16") for f in families}
    meta = MetaProxier(proxiers)
    out: dict[str, object] = {"load_avg_start": os.getloadavg(), "backend": backend, "services": n,
                              "stack": stack, "endpoints": sum(len(e) for e in endpoints.values()),
                              "compiled": COMPILED}

    def sync(request: SyncRequest) -> dict[str, object]:
        t0 = time.perf_counter()
        res = meta.sync(request)
        total = time.perf_counter() - t0
        assert res.ok, res.error
        fams = {f: dict(p.last_plan_stats) for f, p in proxiers.items()}
        # What the metaproxier adds beyond its proxiers' own syncs: the family views.
        own = sum(float(s.get("total_s", 0.0)) for s in fams.values())
        return {"total_s": total, "view_s": total - own, "families": fams}

    out["first_full"] = sync(SyncRequest(services=services, endpoints=endpoints))
    changed = dict(endpoints)
    names = list(services)
    partials = []
    for k in range(PARTIALS):
        name = names[k * n // PARTIALS]
        eps = list(changed[name])
        eps[0] = Endpoint(f"10.250.0.{k + 1}", 8080)
        if stack == "dual":
            eps[-1] = Endpoint(f"fd01:250::{k + 1}", 8080)
        changed[name] = tuple(eps)
        partials.append(sync(SyncRequest(services=services, endpoints=changed, changed=frozenset({name}), full=False)))
    finish(out, partials, sync(SyncRequest(services=services, endpoints=changed)), meta)


def finish(out: dict[str, object], partials: list[dict[str, object]], resync: dict[str, object],
           meta: MetaProxier) -> None:
    """The end of a dual-stack worker (this one, bench_nftables_dualstack_worker.py): the partial
    syncs and their median, the resync, peak RSS; cleans the tables and prints the JSON line."""
    out["partials"] = partials
    out["partial"] = sorted(partials, key=lambda p: float(p["total_s"]))[len(partials) // 2]  # type: ignore[arg-type]
    out["resync_full"] = resync
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert meta.cleanup()
    out["load_avg"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])

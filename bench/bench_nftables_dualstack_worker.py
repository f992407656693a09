"""One measurement of kproxy's nftables mode at N Services, single-stack IPv4 or dual-stack, as
kproxy runs it (kproxy.proxiers.meta: one nftables proxier per family, `ip kube-proxy` and
`ip6 kube-proxy`, each fed its family's view), in its own process so RSS is this case's alone.

    python bench/bench_nftables_dualstack_worker.py SERVICES single|dual NETNS

single: N IPv4 NodePort/ClusterIP Services x 10 IPv4 endpoints (tests/nftables/nft_state.py),
the IPv4 proxier alone (a node without IPv6). dual: the same N Services dual-stack (a ClusterIP
of each family) x 10 endpoints of each family, the IPv4 and the IPv6 proxier. Prints one JSON
line: the first full sync, the median of three partial syncs after one endpoint change (a pod of
each family replaced in the dual case), a full resync, each with wall and CPU time (the process's
own: the kernel applies a netlink batch in the sending thread, so its commit is in it too) and
every family's render/apply split, peak RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nftables"))

from bench_iptables_dualstack_worker import finish
from nft_state import endpoints, name, state

from kproxy.backends.nftables import Nft
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.meta import MetaProxier
from kproxy.proxiers.nftables import NftablesProxier

PARTIALS = 3
PER = 10  # endpoints per Service and family


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def model(n: int, stack: str) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    services, eps = state(n, PER, node_ports=True)
    if stack == "dual":
        services6, eps6 = state(n, PER, node_ports=True, family="IPv6")
        for key, svc in services.items():
            services[key] = ServicePort(name=svc.name, type=svc.type, port=svc.port, protocol=svc.protocol,
                                        node_port=svc.node_port,
                                        cluster_ips=(*svc.cluster_ips, *services6[key].cluster_ips))
            eps[key] = (*eps[key], *eps6[key])
    return services, eps


def main(argv: list[str]) -> None:
    n, stack, netns = int(argv[0]), argv[1], argv[2]  # bench_iptables_sync.run_in_fresh_netns's order
    services, eps = model(n, stack)
    families: tuple[IPFamily, ...] = ("IPv4", "IPv6") if stack == "dual" else ("IPv4",)
    proxiers = {f: NftablesProxier(Nft(netns), cluster_cidr="10.0.0.0/8,fd00:10::/32",
                                   node_ips=("192.168.77.1", "fd00:77::1"), family=f) for f in families}
    meta = MetaProxier(proxiers)
    out: dict[str, object] = {"services": n, "stack": stack, "endpoints": sum(len(e) for e in eps.values()),
                              "load_avg_start": os.getloadavg()}

    def sync(request: SyncRequest) -> dict[str, object]:
        t, c = time.perf_counter(), _cpu()
        res = meta.sync(request)
        total, cpu = time.perf_counter() - t, _cpu() - c
        assert res.ok, res.error
        fams = {f: dict(p.last_stats) for f, p in proxiers.items()}
        assert all(s["way"] == 1.0 for s in fams.values()), "a transaction went through nft -f"
        own = sum(s["render_s"] + s["apply_s"] for s in fams.values())
        return {"total_s": total, "cpu_s": cpu, "view_s": total - own, "families": fams}

    out["first_full"] = sync(SyncRequest(services, eps))
    partials = []
    for k in range(PARTIALS):
        i = n - 1 - k * 7
        cur = eps[name(i)]
        new = cur[:PER - 1] + endpoints(i, 1, first=PER + k)
        if stack == "dual":
            new += cur[PER:2 * PER - 1] + endpoints(i, 1, first=PER + k, family="IPv6")
        eps[name(i)] = new
        partials.append(sync(SyncRequest(services, eps, changed=frozenset({name(i)}), full=False)))
    finish(out, partials, sync(SyncRequest(services, eps)), meta)


if __name__ == "__main__":
    main(sys.argv[1:])

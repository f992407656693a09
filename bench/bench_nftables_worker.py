"""One nftables sync measurement in a fresh process (its RSS is the proxier's own), run by
bench_nftables_sync.py: python bench_nftables_worker.py SERVICES NETNS [--pure] [--nft-f]
(--nft-f: every transaction through `nft -f`, not kproxy's netlink batches).
Prints one JSON line: first full sync, partial syncs after one endpoint change, a full resync,
the kernel interface's floor for the same input (`nft -f` of the first sync's script), the
process's peak RSS and its RSS after the syncs (steady)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nftables"))

from nft_state import endpoints, name, state

from kproxy.backends.nftables import Nft
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.nftables import NftablesProxier, load_renderer


def _cpu() -> float:
    """CPU seconds of this process and its finished children (nft, with the kernel's commit):
    on a loaded machine wall time mostly measures waiting for a core."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _run_queue_wait() -> float:
    """Seconds this process was runnable but waiting for a core (/proc/self/schedstat's second
    field): on a loaded machine the difference between wall and CPU time, told apart from
    waiting on the kernel (a netlink batch is processed in the sending thread, on its CPU time)."""
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


class RecordingNft(Nft):
    """Keeps the first transaction, written to a file after the timed syncs (for the floor below)."""

    def __init__(self, netns: str, netlink: bool) -> None:
        super().__init__(netns, netlink=netlink)
        self.first: str | Iterable[str] | None = None

    def apply(self, transaction: str | Iterable[str]) -> None:
        if self.first is None:
            self.first = transaction
        super().apply(transaction)


def main() -> None:
    n, ns = int(sys.argv[1]), sys.argv[2]
    pure = "--pure" in sys.argv
    netlink = "--nft-f" not in sys.argv
    services, eps = state(n, 10, node_ports=True)
    record = f"/tmp/kpnft-bench-{os.getpid()}.nft"
    nft = RecordingNft(ns, netlink)
    p = NftablesProxier(nft, cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",), renderer=load_renderer(pure))
    t, c, w = time.perf_counter(), _cpu(), _run_queue_wait()
    res = p.sync(SyncRequest(services, eps))
    first = time.perf_counter() - t
    first_cpu = _cpu() - c
    first_wait = _run_queue_wait() - w
    assert res.ok, res.error
    first_stats = dict(p.last_stats)
    with open(record, "w") as f:  # for the floor below, written outside the timed syncs
        f.writelines(nft.first or "")
    nft.first = None
    partials = []
    partial_cpu = []
    for k in range(5):
        i = n - 1 - k * 7
        eps[name(i)] = eps[name(i)][:9] + endpoints(i, 1, first=10 + k)
        t, c = time.perf_counter(), _cpu()
        res = p.sync(SyncRequest(services, eps, changed=frozenset({name(i)}), full=False))
        partials.append(time.perf_counter() - t)
        partial_cpu.append(_cpu() - c)
        assert res.ok, res.error
    partial_bytes = int(p.last_stats["bytes"])
    partial_way = "netlink" if p.last_stats.get("way") else "nft -f"
    t, c = time.perf_counter(), _cpu()
    assert p.sync(SyncRequest(services, eps)).ok
    resync, resync_cpu = time.perf_counter() - t, _cpu() - c
    with open("/proc/self/statm") as f:
        steady = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    # The floor: the same first-sync input through `nft -f` alone, no rendering.
    p.cleanup()
    t = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", record], check=True, timeout=600)
    floor = time.perf_counter() - t
    os.unlink(record)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "services": n, "pure": pure, "first_s": first, "render_s": first_stats["render_s"],
        "apply_s": first_stats["apply_s"], "bytes": first_stats["bytes"], "partials_s": partials, "first_cpu_s": first_cpu, "first_wait_s": first_wait, "partials_cpu_s": partial_cpu,
        "partial_bytes": partial_bytes, "resync_s": resync, "resync_cpu_s": resync_cpu, "rss_steady_mib": steady,
        "way": "netlink" if first_stats.get("way") else "nft -f", "partials_way": partial_way, "nft_floor_s": floor, "rss_mib": rss,
        "load": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()

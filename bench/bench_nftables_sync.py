"""nftables proxier syncs beside the iptables proxier (both back ends), in one run.

    .venv/bin/pytest bench/bench_nftables_sync.py --benchmark-enable -s [-k "1k"]

Each case runs its worker (bench_nftables_worker.py / bench_iptables_worker.py) as its own
process in a fresh namespace (kpnftB + random suffix, deleted after), with the same Services:
1,000 and 10,000 Services x 10 endpoints. Reported: the first full sync, a partial sync after one
endpoint change (wall and CPU seconds, the latter including nft's and the kernel's: on a loaded
machine wall time is mostly waiting for a core), a full resync, and the worker's peak RSS.
nftables cases: kproxy's netlink batches ("nftables"), the same transactions through `nft -f`
("nftables-nft-f": the kernel interface compared), and the code before the netlink batches
("nftables-before": NFT_BEFORE_TREE, a checkout of that commit with its extensions built, if
set; skipped otherwise).
The Go kube-proxy is not run: /work/shared/peers has build scripts but no built binary, and
building it is out of scope here.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

import plots  # bench/plots.py: pytest puts bench/ on sys.path
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS: list[str] = []


def run(worker: str, *args: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    ns = f"kpnftB{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        argv = [sys.executable, os.path.join(HERE, worker), *args, ns, *extra]
        env = dict(os.environ)
        if os.path.isabs(worker):  # another checkout's worker imports that checkout's kproxy
            env["PYTHONPATH"] = os.path.dirname(os.path.dirname(worker))
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False,
                              cwd=os.path.dirname(os.path.join(HERE, worker)), env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60, check=False)


@pytest.mark.timeout(7200)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("n", [1000, 10000], ids=["1k", "10k"])
@pytest.mark.parametrize("mode", ["nftables", "nftables-nft-f", "nftables-before", "iptables-legacy", "iptables-nft"])
def test_sync_side_by_side(benchmark: Any, mode: str, n: int) -> None:
    if mode.startswith("nftables"):
        worker, extra = "bench_nftables_worker.py", ("--nft-f",) if mode == "nftables-nft-f" else ()
        if mode == "nftables-before":
            before = os.environ.get("NFT_BEFORE_TREE", "")
            if not before:
                pytest.skip("NFT_BEFORE_TREE not set")
            worker = os.path.join(before, "bench", "bench_nftables_worker.py")
        r = benchmark.pedantic(run, args=(worker, str(n)), kwargs={"extra": extra}, rounds=1, iterations=1)
        line = (f"{mode:15} {n:>6}: full {r['first_s']:.2f} s (CPU {r['first_cpu_s']:.2f} s, waiting for a core "
                f"{r.get('first_wait_s', float('nan')):.2f} s; render "
                f"{r['render_s']:.2f} + apply {r['apply_s']:.2f}; bare nft -f of the same input {r['nft_floor_s']:.2f} s), "
                f"partial {min(r['partials_s']) * 1000:.0f}-{max(r['partials_s']) * 1000:.0f} ms "
                f"(CPU {min(r['partials_cpu_s']) * 1000:.0f}-{max(r['partials_cpu_s']) * 1000:.0f} ms, "
                f"{r['partial_bytes']} bytes), resync {r['resync_s']:.2f} s (CPU {r.get('resync_cpu_s', float('nan')):.2f} s), "
                f"RSS peak {r['rss_mib']:.0f} MiB steady {r.get('rss_steady_mib', float('nan')):.0f} MiB, "
                f"via {r.get('way', 'nft -f')}/{r.get('partials_way', 'nft -f')}, load {r['load']:.1f}")
        full, partials = r["first_s"], list(r["partials_s"])
        plots.record("nftables", "modes_cpu", mode, {str(n): r["first_cpu_s"]},
                     plots.stamp("bench_nftables_sync.py"), title="first full sync, CPU seconds (process + nft + kernel)",
                     kind="line", x_label="Services (x 10 endpoints, log)", y_label="CPU seconds (log)", log_x=True, log_y=True)
    else:
        backend = mode.split("-")[1]
        extra = ("--no-z-control",) if n <= 1000 else ()
        r = benchmark.pedantic(run, args=("bench_iptables_worker.py", backend, str(n)), kwargs={"extra": extra},
                               rounds=1, iterations=1)
        f, p = r["first_full"], r["partial"]
        line = (f"{mode:15} {n:>6}: full {f['total_s']:.2f} s, partial {p['total_s'] * 1000:.0f} ms, "
                f"resync {r['resync_full']['total_s']:.2f} s, RSS {r['rss_mib']:.0f} MiB, load {r['load_avg'][0]:.1f}")
        full, partials = f["total_s"], [x["total_s"] for x in r["partials"]]
    when, x = plots.stamp("bench_nftables_sync.py"), str(n)
    layout: dict[str, Any] = {"kind": "line", "x_label": "Services (x 10 endpoints, log)", "log_x": True, "log_y": True}
    plots.record("nftables", "modes_full_sync", mode, {x: full}, when,
                 title="nftables vs iptables mode (both back ends), one run: first full sync",
                 y_label="seconds (wall, log)", **layout)
    plots.record("nftables", "modes_partial_sync", mode, {x: [s * 1000 for s in partials]}, when,
                 title="nftables vs iptables mode, one run: partial sync after one endpoint change (median, min-max)",
                 y_label="ms (wall, log)", **layout)
    benchmark.extra_info.update({"line": line})
    RESULTS.append(line)
    print("\n" + "\n".join(RESULTS))

"""iptables proxier sync benchmarks, against the bare iptables-restore floor in the same run.

    .venv/bin/pytest bench/bench_iptables_sync.py --benchmark-enable -s [-k "nft and 1000"]

Each case runs bench_iptables_worker.py in a fresh namespace (kpt + random suffix, deleted
after) and reports, for 1,000 / 5,000 / 10,000 Services x 10 endpoints on both back ends:
render and restore time of the first full sync, the bare iptables-restore of the same bytes
(the floor) and the ratio, a partial sync after one endpoint change, a full resync, and RSS.
The Go kube-proxy 1.30.3 figures from issue 5 are printed next to ours for the ratio.
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
WORKER = os.path.join(HERE, "bench_iptables_worker.py")
# Go kube-proxy 1.30.3 on this kind of machine (issue 5): (first full sync s, partial sync s, RSS MiB).
GO = {
    ("nft", 1000): (5.7, 0.11, 89.0),
    ("nft", 5000): (869.0, 1.2, 260.0),
    ("legacy", 1000): (0.34, 0.16, 93.0),
    ("legacy", 5000): (5.7, 0.95, 221.0),
    ("legacy", 10000): (9.9, 1.73, 363.0),
}


def run_in_fresh_netns(worker: str, args: list[str], prefix: str = "kptB") -> dict[str, Any]:
    """Run `worker ARGS[0] ARGS[1] NETNS ARGS[2:]` in a namespace made for it (deleted after);
    its last stdout line is its JSON result."""
    ns = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        argv = [sys.executable, worker, *args[:2], ns, *args[2:]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=7200, check=False, cwd=HERE)
        assert proc.returncode == 0, proc.stderr[-2000:]
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def run_worker(backend: str, n: int) -> dict[str, Any]:
    return run_in_fresh_netns(WORKER, [backend, str(n)] + (["--no-z-control"] if n <= 1000 else []))


def report(r: dict[str, Any]) -> str:
    f, p, rs = r["first_full"], r["partial"], r["resync_full"]
    floor = min(r["bare_noflush_s"], r["bare_flush_s"])
    go = GO.get((r["backend"], r["services"]))
    partials = ", ".join(f"{x['total_s'] * 1000:.0f}" for x in r["partials"])
    floors = ", ".join(f"{x * 1000:.0f}" for x in r["partial_floor_s"])
    line = (
        f"{r['backend']:6} {r['services']:>6} svc: full {f['total_s']:.2f}s (render {f['render_s'] + f['assemble_s']:.2f}"
        f" + restore {f['restore_s']:.2f}), bare restore {r['bare_noflush_s']:.2f}s noflush / {r['bare_flush_s']:.2f}s"
        f" flush -> {f['total_s'] / floor:.2f}x floor; partial {p['total_s'] * 1000:.0f} ms"
        f" (all: {partials} ms; bare one-chain restore {floors} ms); resync {rs['total_s']:.2f}s;"
        f" RSS {r['rss_mib']:.0f} MiB"
    )
    if "plan_cpu_s" in f:
        cpu_full = f["plan_cpu_s"] + f["restore_cpu_s"]
        cpu_floor = min(r["bare_noflush_cpu_s"], r["bare_flush_cpu_s"])
        line += (
            f"; CPU: full {cpu_full:.2f}s (render {f['plan_cpu_s']:.2f} + restore {f['restore_cpu_s']:.2f}),"
            f" floor {cpu_floor:.2f}s -> {cpu_full / cpu_floor:.2f}x, partial {p['plan_cpu_s'] + p['restore_cpu_s']:.3f}s,"
            f" load {r['load_avg'][0]:.1f}"
        )
    if "bare_noflush_without_z_s" in r:
        line += f"; nft --noflush without -Z {r['bare_noflush_without_z_s']:.2f}s"
    if go:
        line += f" | Go: full {go[0]}s ({go[0] / f['total_s']:.1f}x), partial {go[1]}s ({go[1] / p['total_s']:.1f}x), RSS {go[2]} MiB"
    return line


@pytest.mark.timeout(7200)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("n", [1000, 5000, 10000], ids=["1k", "5k", "10k"])
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_iptables_full_and_partial_sync(benchmark: Any, backend: str, n: int) -> None:
    results: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: results.append(run_worker(backend, n)), rounds=1, iterations=1)
    r = results[0]
    benchmark.extra_info.update(r)
    print("\n" + report(r))
    print("RESULT " + json.dumps(r))
    when, b, x = plots.stamp("bench_iptables_sync.py"), r["backend"], str(n)
    plots.record("iptables", "iptables_full_sync", f"kproxy {b}", {x: r["first_full"]["total_s"]}, when)
    plots.record("iptables", "iptables_full_sync", f"bare restore {b} (--noflush)", {x: r["bare_noflush_s"]}, when)
    plots.record("iptables", "iptables_partial_sync", f"kproxy {b}",
                 {x: [p["total_s"] * 1000 for p in r["partials"]]}, when)
    plots.record("iptables", "iptables_partial_sync", f"floor {b} (one-chain restore)",
                 {x: [s * 1000 for s in r["partial_floor_s"]]}, when)
    # Sanity, not timing: the ruleset really is 10 endpoints per service (2 SEP rules + 1 SVC rule each).
    assert r["nat_rules"] >= n * 10 * 3

"""The cost of the second family in iptables mode: 10,000 Services single-stack (IPv4 proxier
alone) against the same 10,000 dual-stack (IPv4 + IPv6 proxier, kproxy.proxiers.meta), side by
side in one run, on each back end.

    .venv/bin/pytest bench/bench_iptables_dualstack.py --benchmark-enable -s [-k legacy]

Each case runs bench_iptables_dualstack_worker.py in a fresh namespace (kptD + random suffix,
deleted after): the first full sync, three partial syncs after one endpoint change (the dual
case replaces one endpoint of each family), a full resync, RSS; the dual/single ratio of each,
and what the metaproxier's family views cost on top of the two proxiers' own syncs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from bench_iptables_sync import run_in_fresh_netns

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "bench_iptables_dualstack_worker.py")
SERVICES = 10000


def run_worker(backend: str, n: int, stack: str) -> dict[str, Any]:
    return run_in_fresh_netns(WORKER, [backend, str(n), stack], prefix="kptD")


def _cpu(stats: dict[str, Any]) -> float:
    return sum(f["plan_cpu_s"] + f["restore_cpu_s"] for f in stats["families"].values())


def _own(family: dict[str, Any]) -> float:
    return float(family["total_s"])


def report(single: dict[str, Any], dual: dict[str, Any], label: str = "backend",
           cpu: Callable[[dict[str, Any]], float] = _cpu, own: Callable[[dict[str, Any]], float] = _own) -> str:
    """single against dual per sync, rows named by single[label]; cpu: a sync's CPU seconds,
    own: a family's share of a sync (also used by bench_nftables_dualstack.py)."""
    lines = []
    for what in ("first_full", "partial", "resync_full"):
        s, d = single[what], dual[what]
        per = ", ".join(f"{fam} {own(v):.3f}s" for fam, v in d["families"].items())
        lines.append(f"{single[label]:6} {what:11}: single {s['total_s']:.3f}s (CPU {cpu(s):.2f}s) | dual "
                     f"{d['total_s']:.3f}s (CPU {cpu(d):.2f}s; {per}; views {d['view_s'] * 1000:.1f} ms)"
                     f" -> {d['total_s'] / s['total_s']:.2f}x wall, {cpu(d) / max(cpu(s), 1e-9):.2f}x CPU")
    lines.append(f"{single[label]:6} RSS: single {single['rss_mib']:.0f} MiB | dual {dual['rss_mib']:.0f} MiB "
                 f"({dual['endpoints']} endpoints) ; load {single['load_avg'][0]:.1f} / {dual['load_avg'][0]:.1f}")
    return "\n".join(lines)


def side_by_side(benchmark: Any, run: Callable[[str], dict[str, Any]], services: int, **how: Any) -> None:
    """run("single") then run("dual") in one benchmark round; prints report(..., **how) and the
    JSON, and checks (sanity, not timing) that the dual case programmed both families."""
    results: list[dict[str, Any]] = []

    def both() -> None:
        results.append(run("single"))
        results.append(run("dual"))

    benchmark.pedantic(both, rounds=1, iterations=1)
    single, dual = results
    benchmark.extra_info.update({"single": single, "dual": dual})
    print("\n" + report(single, dual, **how))
    print("RESULT " + json.dumps({"single": single, "dual": dual}))
    assert set(dual["first_full"]["families"]) == {"IPv4", "IPv6"} and set(single["first_full"]["families"]) == {"IPv4"}
    assert dual["endpoints"] == 2 * single["endpoints"] == 2 * services * 10


@pytest.mark.timeout(7200)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_iptables_second_family_cost(benchmark: Any, backend: str) -> None:
    side_by_side(benchmark, lambda stack: run_worker(backend, SERVICES, stack), SERVICES)

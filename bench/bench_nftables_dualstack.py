"""The cost of the second family in nftables mode: N Services single-stack (the `ip kube-proxy`
proxier alone) against the same N dual-stack (the `ip` and the `ip6 kube-proxy` proxiers,
kproxy.proxiers.meta), side by side in one run, at 1,000 and 10,000 Services.

    .venv/bin/pytest bench/bench_nftables_dualstack.py --benchmark-enable -s -p no:cacheprovider [-k 10000]

Each case runs bench_nftables_dualstack_worker.py in a fresh namespace (kptN + random suffix,
deleted after): the first full sync, three partial syncs after one endpoint change (the dual
case replaces one endpoint of each family), a full resync, RSS; the dual/single ratio of each.
The iptables twin: bench_iptables_dualstack.py.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from bench_iptables_dualstack import side_by_side
from bench_iptables_sync import run_in_fresh_netns

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "bench_nftables_dualstack_worker.py")


def run_worker(n: int, stack: str) -> dict[str, Any]:
    return run_in_fresh_netns(WORKER, [str(n), stack], prefix="kptN")


def _cpu(stats: dict[str, Any]) -> float:
    return float(stats["cpu_s"])


def _own(family: dict[str, Any]) -> float:
    return float(family["render_s"] + family["apply_s"])


@pytest.mark.timeout(7200)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("services", [1000, 10000])
def test_nftables_second_family_cost(benchmark: Any, services: int) -> None:
    side_by_side(benchmark, lambda stack: run_worker(services, stack), services, label="services", cpu=_cpu, own=_own)

"""kproxy-apiserver on etcd with uvloop against the same server on asyncio's own loop
(KPROXY_APISERVER_LOOP=asyncio), in one run: the 50-watcher fan-out of bench_etcd_apiserver.py,
rounds alternating between the two servers (each with its own etcd, pinned as that bench pins),
so a change of the machine's speed during the run hits both alike.

Run: .venv/bin/pytest bench/bench_etcd_loop.py --benchmark-enable -s
"""
from __future__ import annotations

import contextlib
import os
import statistics
from typing import Any
from unittest import mock

import bench_etcd_apiserver as fan  # bench/: pytest puts it on sys.path
import pytest

from controlplane_stub.store.etcd_process import etcd_available

ROUNDS = int(os.environ.get("KPROXY_BENCH_FANOUT_ROUNDS", "9"))


def _server(stack: contextlib.ExitStack, loop: str) -> fan.Target:
    """A kproxy-apiserver on etcd whose process started with KPROXY_APISERVER_LOOP=loop."""
    with mock.patch.dict(os.environ, {"KPROXY_APISERVER_LOOP": loop}):
        t = stack.enter_context(fan._kproxy("etcd3"))
    with open(f"/proc/{t.pid}/maps") as f:
        mapped = "uvloop" in f.read()
    assert mapped == (loop == "uvloop"), f"the {loop} server has uvloop {'' if mapped else 'not '}loaded"
    return t


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (apt-get install etcd-server)")
def test_apiserver_event_loops_side_by_side(benchmark: Any) -> None:
    pytest.importorskip("uvloop")
    loops = ("asyncio", "uvloop")
    rounds: dict[str, list[fan.Round]] = {loop: [] for loop in loops}
    cpus = fan._cpus()

    def run() -> None:
        with contextlib.ExitStack() as stack:
            fan._pin_bench(stack, cpus)
            targets = {loop: _server(stack, loop) for loop in loops}
            for t in targets.values():
                if cpus:
                    fan._pin(t.pid, cpus[1])
                fan._fanout_round(t, 1000)  # warm: first connections, first imports
            for i in range(ROUNDS):
                for loop, t in targets.items():
                    rounds[loop].append(fan._fanout_round(t, i))

    benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"\n| loop | fan-out events/s, median (range) | server CPU s per round, median "
          f"| events per server CPU-second, all rounds | server busy, median |  ({ROUNDS} rounds each, alternating)")
    print("|---|---:|---:|---:|---:|")
    for loop, rs in rounds.items():
        rates = sorted(r.events_per_s for r in rs)
        print(f"| {loop} | {statistics.median(rates):,.0f} ({rates[0]:,.0f}-{rates[-1]:,.0f}) "
              f"| {statistics.median(r.server_cpu_s for r in rs):.2f} "
              f"| {fan.N_WATCHERS * fan.N_EVENTS * len(rs) / max(sum(r.server_cpu_s for r in rs), 0.01):,.0f} "
              f"| {statistics.median(r.server_cpu_s / r.wall_s for r in rs):.0%} |")
        benchmark.extra_info[f"{loop}_events_per_s"] = [round(x) for x in rates]
    for rs in rounds.values():
        assert all(r.events_per_s > 0 for r in rs)

"""The per-query answer path alone (no sockets): compiled kdns._wire against its pure twin on the
bench zone's query mix (10,000 Services; 80% A, 10% SRV, 5% NXDOMAIN, 5% PTR).

  .venv/bin/pytest bench/bench_dns_answer.py --benchmark-enable
The ratio pure/compiled is printed and stored in the benchmark's extra_info.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dns_servers import kube_objects, query_file
from kdns import _purewire, wire
from kdns.objects import load_objects
from kdns.records import ZoneIndex

try:
    from kdns import _wire as compiled
except ImportError:
    compiled = None  # type: ignore[assignment]

TYPES = {"A": wire.A, "SRV": wire.SRV, "PTR": wire.PTR}
_results: dict[str, float] = {}


@pytest.fixture(scope="module")
def zone() -> tuple[ZoneIndex, list[bytes]]:
    services, slices = load_objects(json.dumps(kube_objects()).encode())
    idx = ZoneIndex(table=_purewire.Table())
    idx.replace(services=services, slices=slices)
    idx.mark_synced()
    queries = []
    for i, line in enumerate(query_file(20_000).splitlines()):
        name, qtype = line.split()
        queries.append(wire.make_query(name, TYPES[qtype], mid=i & 0xFFFF, edns=wire.Edns(udp_size=1232)))
    return idx, queries


def _table(mod: ModuleType, idx: ZoneIndex) -> Any:
    t = mod.Table()
    t.update(idx.answers, idx.names, idx._zone_wire, idx._pod_wire, idx._soa_tail, True)
    return t


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_dns_answer_path(benchmark: Any, zone: tuple[ZoneIndex, list[bytes]], impl: str) -> None:
    if impl == "compiled" and compiled is None:
        pytest.skip("kdns._wire not built")
    mod: ModuleType = compiled if impl == "compiled" else _purewire  # type: ignore[assignment]
    idx, queries = zone
    table = _table(mod, idx)
    answer = mod.answer

    def run() -> int:
        n = 0
        for q in queries:
            n += answer(q, table, False) is not None
        return n

    answered = benchmark(run)
    assert answered == len(queries)  # the whole mix is answered on the hot path
    per_query = benchmark.stats.stats.mean / len(queries)
    _results[impl] = per_query
    benchmark.extra_info["us_per_query"] = per_query * 1e6
    if len(_results) == 2:
        ratio = _results["pure"] / _results["compiled"]
        benchmark.extra_info["pure_over_compiled"] = ratio
        print(f"\nanswer path: compiled {_results['compiled'] * 1e6:.2f} us/query, "
              f"pure {_results['pure'] * 1e6:.2f} us/query, compiled is {ratio:.1f}x faster")


# ---------------------------------------------------------------------------- AAAA against A
#
# The same 9,000 dual-stack ClusterIP Services asked for their A and their AAAA record, rounds
# alternating between the two query sets in one process so both see the same load (the machine
# is shared); compiled path, medians. An AAAA answer is 12 bytes longer, otherwise the same lookup.

def _v6(ip: str) -> str:
    return str(ipaddress.IPv6Address("fd00:10:96::") + int(ipaddress.IPv4Address(ip)) - int(ipaddress.IPv4Address("10.96.0.0")))


@pytest.fixture(scope="module")
def dual_zone() -> tuple[ZoneIndex, dict[str, list[bytes]]]:
    objects = kube_objects()
    names = []
    for item in objects["items"]:
        spec = item.get("spec") or {}
        if item["kind"] == "Service" and spec.get("clusterIP") != "None":
            spec["clusterIPs"] = [spec["clusterIP"], _v6(spec["clusterIP"])]
            names.append(f"{item['metadata']['name']}.{item['metadata']['namespace']}.svc.cluster.local")
    services, slices = load_objects(json.dumps(objects).encode())
    idx = ZoneIndex(table=_purewire.Table())
    idx.replace(services=services, slices=slices)
    idx.mark_synced()
    rnd = random.Random(11)
    picked = [rnd.choice(names) for _ in range(20_000)]
    queries = {qt: [wire.make_query(n, code, mid=i & 0xFFFF, edns=wire.Edns(udp_size=1232))
                    for i, n in enumerate(picked)]
               for qt, code in (("A", wire.A), ("AAAA", wire.AAAA))}
    return idx, queries


@pytest.mark.timeout(300)
def test_dns_answer_aaaa_vs_a(benchmark: Any, dual_zone: tuple[ZoneIndex, dict[str, list[bytes]]]) -> None:
    if compiled is None:
        pytest.skip("kdns._wire not built")
    idx, queries = dual_zone
    table = _table(compiled, idx)
    answer = compiled.answer
    times: dict[str, list[float]] = {"A": [], "AAAA": []}
    sizes = {qt: len(answer(qs[0], table, False) or b"") for qt, qs in queries.items()}

    def one(qt: str) -> int:
        t0 = time.perf_counter()
        n = sum(answer(q, table, False) is not None for q in queries[qt])
        times[qt].append((time.perf_counter() - t0) / len(queries[qt]))
        return n

    def rounds() -> int:
        n = 0
        for _ in range(5):
            for qt in ("A", "AAAA") if len(times["A"]) % 2 == 0 else ("AAAA", "A"):
                n += one(qt)
        return n

    answered = benchmark.pedantic(rounds, rounds=3, iterations=1)
    assert answered == 10 * len(queries["A"])  # every query of both sets answered on the hot path
    med = {qt: statistics.median(v) for qt, v in times.items()}
    ratio = med["AAAA"] / med["A"]
    benchmark.extra_info.update(a_us=med["A"] * 1e6, aaaa_us=med["AAAA"] * 1e6, aaaa_over_a=ratio,
                                a_bytes=sizes["A"], aaaa_bytes=sizes["AAAA"], load=os.getloadavg()[0])
    print(f"\nanswer path, compiled, median of {len(times['A'])} rounds: A {med['A'] * 1e6:.3f} us/query "
          f"({sizes['A']} B), AAAA {med['AAAA'] * 1e6:.3f} us/query ({sizes['AAAA']} B), "
          f"AAAA/A {ratio:.3f}, load average {os.getloadavg()[0]:.2f}")

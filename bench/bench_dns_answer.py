"""The per-query answer path alone (no sockets): compiled kdns._wire against its pure twin on the
bench zone's query mix (10,000 Services; 80% A, 10% SRV, 5% NXDOMAIN, 5% PTR).

  .venv/bin/pytest bench/bench_dns_answer.py --benchmark-enable
The ratio pure/compiled is printed and stored in the benchmark's extra_info.
"""
from __future__ import annotations

import json
import sys
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

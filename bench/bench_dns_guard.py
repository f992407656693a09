"""The cost of issue 13's checks on the DNS answer path, side by side with the code before them.

The baseline is dns/_wire.pyx as it was before the checks (git: the parent of BASE_OF), compiled
here with the same flags into a module of its own; "guarded" is today's kdns._wire with a
realistic access list: 8 IPv4 networks with the client's (loopback) last, so every query scans
them all, plus 2 IPv6 ones. Two paths:

  drain_udp  the real UDP hot path: 256 queries waiting on a loopback socket, answered by one call
             (recvmmsg, source check, answer, sendmmsg); only the call is timed, rounds alternate
             between the two modules so both see the same machine load
  answer     the answer function alone (no sockets): the UDP size cap is the only check in it

  .venv/bin/pytest bench/bench_dns_guard.py --benchmark-enable -s
"""
from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dns_answer import _table as _plain_table
from bench_dns_answer import zone  # noqa: F401  (the fixture: the bench zone and its query mix)
from kdns.acl import Acl
from kdns.records import ZoneIndex

try:
    from kdns import _wire as guarded
except ImportError:
    guarded = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
BASE_OF = "d370907"  # the commit that added the checks; the baseline is its parent
ROUNDS = 200
PER_ROUND = 256
ACL = Acl([ipaddress.ip_network(n) for n in (
    "10.244.0.0/16", "10.96.0.0/12", "192.168.0.0/16", "172.16.0.0/12", "100.64.0.0/10", "203.0.113.0/24",
    "198.51.100.0/24", "127.0.0.0/8", "fd00::/8", "::1/128")])


@pytest.fixture(scope="module")
def baseline() -> Iterator[ModuleType]:
    """dns/_wire.pyx before the checks, compiled as the module _wire_base."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASE_OF}~1:dns/_wire.pyx"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"no git history for the baseline ({exc})")
    with tempfile.TemporaryDirectory(prefix="kdns-base-") as tmp:
        Path(tmp, "_wire_base.pyx").write_text(src)
        Path(tmp, "build.py").write_text(
            "from Cython.Build import cythonize\nfrom setuptools import Extension, setup\n"
            "setup(name='kdns_base', ext_modules=cythonize([Extension('_wire_base', ['_wire_base.pyx'], "
            "extra_compile_args=['-O2'])], language_level=3, compiler_directives={'boundscheck': False, "
            "'wraparound': False, 'cdivision': True}), script_args=['-q', 'build_ext', '--inplace'])\n")
        subprocess.run([sys.executable, "build.py"], cwd=tmp, check=True, capture_output=True, timeout=600)
        so = next(Path(tmp).glob("_wire_base*.so"))
        spec = importlib.util.spec_from_file_location("_wire_base", so)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod


def _table(mod: ModuleType, idx: ZoneIndex, guard: bool) -> Any:
    t = _plain_table(mod, idx)
    if guard:
        t.guard(*ACL.packed(), 1232)
    return t


def _pct(a: float, b: float) -> float:
    return (a / b - 1) * 100


@pytest.mark.timeout(900)
def test_dns_guard_cost(benchmark: Any, baseline: ModuleType, zone: tuple[ZoneIndex, list[bytes]]) -> None:  # noqa: F811
    if guarded is None:
        pytest.skip("kdns._wire not built")
    idx, queries = zone
    mods = {"baseline": (baseline, _table(baseline, idx, False)), "guarded": (guarded, _table(guarded, idx, True))}
    assert guarded.allowed(("127.0.0.1", 1), mods["guarded"][1])  # the last rule admits the client
    # --- answer() alone, interleaved rounds over the whole 20,000-query mix
    answer_us: dict[str, list[float]] = {k: [] for k in mods}
    for r in range(10):
        for name in ("baseline", "guarded") if r % 2 else ("guarded", "baseline"):
            mod, table = mods[name]
            fn = mod.answer
            t0 = time.perf_counter()
            n = sum(fn(q, table, False) is not None for q in queries)
            answer_us[name].append((time.perf_counter() - t0) / len(queries) * 1e6)
            assert n == len(queries)
    # --- drain_udp over loopback, interleaved rounds of 256 queries
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    drain_us: dict[str, list[float]] = {k: [] for k in mods}
    try:
        for s in (server, client):
            try:
                s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE (root): no drops
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        addr = server.getsockname()
        stats = {k: m.Stats() for k, (m, _) in mods.items()}

        def one_round(name: str, start: int) -> float:
            mod, table = mods[name]
            for q in queries[start:start + PER_ROUND]:
                client.sendto(q, addr)
            time.sleep(0.001)
            t0 = time.perf_counter()
            misses = mod.drain_udp(server, table, stats[name], 16)
            dt = time.perf_counter() - t0
            assert misses == []
            got = 0
            while True:
                try:
                    client.recv(65535)
                    got += 1
                except BlockingIOError:
                    break
            assert got == PER_ROUND, f"{name}: {got} answers of {PER_ROUND}"
            return dt / PER_ROUND * 1e6

        for r in range(ROUNDS):
            start = (r * PER_ROUND) % (len(queries) - PER_ROUND)
            order = ("baseline", "guarded") if r % 2 else ("guarded", "baseline")
            for name in order:
                drain_us[name].append(one_round(name, start))
        benchmark.pedantic(lambda: one_round("guarded", 0), rounds=20)
        for mod, _ in mods.values():
            mod.forget_socket(server)
    finally:
        server.close()
        client.close()
    med = {k: statistics.median(v) for k, v in drain_us.items()}
    amed = {k: statistics.median(v) for k, v in answer_us.items()}
    info = {"drain_udp_us_per_query": med, "answer_us_per_query": amed,
            "drain_udp_cost_pct": _pct(med["guarded"], med["baseline"]),
            "answer_cost_pct": _pct(amed["guarded"], amed["baseline"]),
            "load_average": os.getloadavg()[0]}
    benchmark.extra_info.update(info)
    print(f"\nDNS answer path, median of interleaved rounds (load average {os.getloadavg()[0]:.2f}):\n"
          f"  drain_udp (256 queries per call, {ROUNDS} rounds each): baseline {med['baseline']:.3f} us/query, "
          f"guarded {med['guarded']:.3f} us/query, cost {info['drain_udp_cost_pct']:+.1f}%\n"
          f"  answer() (20,000-query mix, 10 rounds each): baseline {amed['baseline']:.3f} us/query, "
          f"guarded {amed['guarded']:.3f} us/query, cost {info['answer_cost_pct']:+.1f}%")
    assert info["drain_udp_cost_pct"] < 5, info

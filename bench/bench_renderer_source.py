"""The one iptables renderer source (kproxy/_purepath.py, compiled by Cython as kproxy._fastpath
with kproxy/_fastpath.pxd) against the hand-kept .pyx it replaced, and interpreted, in one process.

    .venv/bin/pytest bench/bench_renderer_source.py --benchmark-enable -s

Per-ServicePort CPU of render_service_port over 1,000 and 10,000 ServicePorts x 10 endpoints
(every fifth a NodePort, one local endpoint each), rounds alternating between the three so the
shared machine's load falls on all alike; medians and minima of process CPU time. The .pyx is
taken from KPROXY_BENCH_BEFORE (default: the parent of the commit that removed
kproxy/_fastpath.pyx) and compiled here; all three must render the same bytes.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from kproxy import _fastpath, _purepath
from kproxy.model import Endpoint, ServicePort, ServicePortName

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 7


@pytest.fixture(scope="module")
def pyx() -> Iterator[ModuleType]:
    rev = os.environ.get("KPROXY_BENCH_BEFORE", "")
    if not rev:
        git = ["git", "-C", REPO, "log", "-1", "--format=%H", "--diff-filter=D", "--", "kproxy/_fastpath.pyx"]
        removed = subprocess.run(git, capture_output=True, text=True, timeout=60).stdout.strip()
        if not removed:
            pytest.skip("no commit removing kproxy/_fastpath.pyx in this clone's history")
        rev = removed + "^"
    tmp = tempfile.mkdtemp(prefix="kpt-bench-pyx-")
    try:
        src = subprocess.run(["git", "-C", REPO, "show", f"{rev}:kproxy/_fastpath.pyx"], capture_output=True,
                             check=True, timeout=60).stdout
        path = os.path.join(tmp, "pyx_fastpath.pyx")
        with open(path, "wb") as f:
            f.write(src)
        cythonize = os.path.join(os.path.dirname(sys.executable), "cythonize")
        subprocess.run([cythonize, "-q", "-i", "-3", path], capture_output=True, check=True, timeout=600)
        so = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".so"))
        spec = importlib.util.spec_from_file_location("pyx_fastpath", so)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _services(n: int) -> list[tuple[ServicePort, tuple[Endpoint, ...]]]:
    out = []
    for i in range(n):
        name = ServicePortName("ns", f"svc{i}", "p80")
        eps = tuple(Endpoint(f"10.{i // 250 % 250}.{i % 250}.{j + 1}", 8080, is_local=(j == 0)) for j in range(10))
        nodeport = 30000 + i % 2000 if i % 5 == 0 else 0
        out.append((ServicePort(name=name, type="NodePort" if nodeport else "ClusterIP",
                                cluster_ips=(f"172.{16 + i // 62500}.{i // 250 % 250}.{i % 250}",), port=80,
                                protocol="TCP", node_port=nodeport), eps))
    return out


def _cpu(module: Any, svcs: list[tuple[ServicePort, tuple[Endpoint, ...]]]) -> float:
    render = module.render_service_port
    t = time.process_time()
    for sp, eps in svcs:
        render(sp, eps, False, "10.0.0.0/8", False, ("10.1.1.1",))
    return time.process_time() - t


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("n", [1000, 10000], ids=["1k", "10k"])
def test_one_source_against_pyx(benchmark: Any, pyx: ModuleType, n: int) -> None:
    assert str(_fastpath.__file__).endswith(".so"), "build the extensions first (./run setup)"
    svcs = _services(n)
    for sp, eps in svcs[:200]:
        args = (sp, eps, False, "10.0.0.0/8", False, ("10.1.1.1",))
        assert pyx.render_service_port(*args) == _fastpath.render_service_port(*args) == _purepath.render_service_port(*args)
    variants = {".pyx (before)": pyx, "one source, compiled": _fastpath, "one source, interpreted": _purepath}
    runs: dict[str, list[float]] = {k: [] for k in variants}

    def measure() -> None:
        for _ in range(ROUNDS):
            for label, module in variants.items():
                runs[label].append(_cpu(module, svcs))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    base = statistics.median(runs[".pyx (before)"])
    print(f"\n{n} ServicePorts x 10 endpoints, {ROUNDS} alternating rounds, load {os.getloadavg()[0]:.1f}")
    print("| renderer | median us/ServicePort | min us/ServicePort | median vs .pyx |")
    print("|---|---:|---:|---:|")
    for label, xs in runs.items():
        print(f"| {label} | {statistics.median(xs) * 1e6 / n:.1f} | {min(xs) * 1e6 / n:.1f} |"
              f" {statistics.median(xs) / base:.2f} |")
    benchmark.extra_info.update({k: statistics.median(v) for k, v in runs.items()})

"""iptables rendering with the shared semantics (kproxy.proxy) against the commit before it, in one run.

    .venv/bin/pytest bench/bench_semantics_sync.py --benchmark-enable -s

Issue 14 moved endpoint categorization out of the compiled renderer into kproxy.proxy (plain
Python, called once per ServicePort). This measures what that costs: full and partial syncs'
rendering (IptablesProxier.plan, the whole restore input) at 1,000 and 10,000 Services x 10
endpoints, for the tree before the change (KPROXY_BENCH_BEFORE, default: the parent of the
commit that made the switch, its _fastpath compiled here), today's tree compiled, and today's
tree interpreted (KPROXY_PURE=1). Runs alternate between the trees (the machine is shared) and
the table shows medians of wall and CPU seconds; the restore input must be byte-identical
between before and after (sha256), so the ruleset did not change, only who decided it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "bench_semantics_worker.py")
SWITCH = "iptables renderer (both twins): endpoints from kproxy.proxy"
ROUNDS_PER_WORKER = 5
INTERLEAVED = 2


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True, timeout=60).stdout.strip()


@pytest.fixture(scope="module")
def before_tree() -> Iterator[str]:
    rev = os.environ.get("KPROXY_BENCH_BEFORE", "")
    if not rev:
        switch = _git("log", "--format=%H", "-1", f"--grep={SWITCH}", "--fixed-strings")
        if not switch:
            pytest.skip("the commit that moved categorization is not in this clone's history")
        rev = switch + "^"
    tmp = tempfile.mkdtemp(prefix="kpt-bench-before-")
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", rev, "kproxy"], capture_output=True, check=True, timeout=120)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True, timeout=120)
        cythonize = os.path.join(os.path.dirname(sys.executable), "cythonize")
        source = os.path.join(tmp, "kproxy", "_fastpath.pyx")
        if not os.path.exists(source):
            # The one renderer source (kproxy/_purepath.py typed by _fastpath.pxd), compiled under
            # the compiled module's name as setup.py does.
            source = os.path.join(tmp, "kproxy", "_fastpath.py")
            shutil.copy(os.path.join(tmp, "kproxy", "_purepath.py"), source)
        subprocess.run([cythonize, "-q", "-i", "-3", source], capture_output=True, check=True, timeout=600)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_worker(tree: str, n: int, pure: bool) -> dict[str, Any]:
    ns = f"kptS{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    env = dict(os.environ, PYTHONPATH=tree, KPROXY_PURE="1" if pure else "0")
    try:
        proc = subprocess.run([sys.executable, WORKER, str(n), str(ROUNDS_PER_WORKER), ns], capture_output=True,
                              text=True, timeout=3600, check=False, env=env, cwd="/")
        assert proc.returncode == 0, proc.stderr[-2000:]
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


@pytest.mark.timeout(7200)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("n", [1000, 10000], ids=["1k", "10k"])
def test_render_before_and_after_semantics(benchmark: Any, before_tree: str, n: int) -> None:
    variants = {"before (compiled)": (before_tree, False), "after (compiled)": (REPO, False),
                "after (interpreted)": (REPO, True)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}

    def measure() -> None:
        for _ in range(INTERLEAVED):
            for label, (tree, pure) in variants.items():
                runs[label].append(run_worker(tree, n, pure))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    rows = {}
    for label, results in runs.items():
        assert all(r["tree"].startswith(variants[label][0]) for r in results), "worker imported the wrong tree"
        assert all(r["compiled"] is (not variants[label][1]) for r in results)
        rows[label] = {key: statistics.median(x for r in results for x in r[key])
                       for key in ("full_wall", "full_cpu", "partial_wall", "partial_cpu")}
        rows[label]["sha256"] = results[0]["sha256"]
        rows[label]["bytes"] = results[0]["bytes"]
    load = os.getloadavg()[0]
    base = rows["before (compiled)"]
    print(f"\n{n} Services x 10 endpoints, medians of {INTERLEAVED * ROUNDS_PER_WORKER} rounds each, load {load:.1f}")
    print("| renderer | full sync render wall s | CPU s | partial sync render wall ms | CPU ms | CPU vs before |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['full_wall']:.3f} | {r['full_cpu']:.3f} | {r['partial_wall'] * 1000:.2f} |"
              f" {r['partial_cpu'] * 1000:.2f} | full {r['full_cpu'] / base['full_cpu']:.2f}x,"
              f" partial {r['partial_cpu'] / base['partial_cpu']:.2f}x |")
    benchmark.extra_info.update({k: {kk: v for kk, v in r.items()} for k, r in rows.items()})
    # The same rules, only decided elsewhere.
    assert rows["after (compiled)"]["sha256"] == base["sha256"] == rows["after (interpreted)"]["sha256"]

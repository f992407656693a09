"""kproxy-apiserver per-client limits (issue 13) against the code before them, side by side in one run.

The baseline is the API server as it was before the limits (commit BASELINE, extracted with git
archive into a temp dir and run from there); both servers run at once, hold the same 10 MB of
ConfigMaps (100 x 100 kB) and get the same clients, interleaved:

- list: a whole 10 MB list by a reading client (aiohttp), 10 rounds each, best and median;
- half-open: RSS growth with 500 connections that never start TLS plus 500 with a partial header,
  then 10 s after they closed;
- slow clients: RSS growth with 10 watchers from resourceVersion 0 plus 10 lists whose clients
  never read, then 10 s after they closed.

Run: .venv/bin/pytest bench/bench_apiserver_limits.py --benchmark-enable -s
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests
import urllib3

from controlplane_stub.apiserver.testing import (
    APIServerProcess,
    HostileClients,
    raise_nofile,
    rss_bytes,
    running_apiserver,
)

BASELINE = "4bb7907^"  # the parent of the limits commit
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


@contextlib.contextmanager
def _baseline_tree() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="kproxy-bench-baseline-")
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", BASELINE, "controlplane_stub"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            pytest.skip(f"git archive {BASELINE}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _seed(api: APIServerProcess) -> None:
    s = requests.Session()
    s.verify, s.trust_env = False, False
    s.headers["Authorization"] = f"Bearer {api.token}"
    blob = "x" * 100_000
    for i in range(100):
        r = s.post(api.url + "/api/v1/namespaces/default/configmaps", timeout=30,
                   json={"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm{i}"}, "data": {"k": blob}})
        assert r.status_code == 201, r.text


async def _list_times(servers: dict[str, APIServerProcess], rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in servers}
    async with aiohttp.ClientSession() as c:
        for _ in range(rounds):
            for name, api in servers.items():
                ctx = ssl.create_default_context(cafile=api.ca_file)
                ctx.check_hostname = False
                t = time.perf_counter()
                async with c.get(api.url + "/api/v1/configmaps", ssl=ctx,
                                 headers={"Authorization": f"Bearer {api.token}"}) as r:
                    body = await r.read()
                out[name].append(time.perf_counter() - t)
                assert r.status == 200 and len(body) > 10_000_000
    return out


def _growth(servers: dict[str, APIServerProcess], load: Any) -> dict[str, tuple[float, float]]:
    """RSS growth (MiB) of each server under `load` (applied to both), and 10 s after it is closed."""
    before = {k: rss_bytes(a.pid) for k, a in servers.items()}
    hostile = {k: HostileClients(a) for k, a in servers.items()}
    try:
        for k, h in hostile.items():
            load(h, servers[k])
        time.sleep(2)
        during = {k: rss_bytes(a.pid) for k, a in servers.items()}
    finally:
        for h in hostile.values():
            h.close()
    time.sleep(10)
    after = {k: rss_bytes(a.pid) for k, a in servers.items()}
    return {k: ((during[k] - before[k]) / MiB, (after[k] - before[k]) / MiB) for k in servers}


def test_limits_against_baseline(benchmark: Any) -> None:
    # -P: the baseline's controlplane_stub from PYTHONPATH, not the working tree's (cwd) one.
    urllib3.disable_warnings()
    raise_nofile(8192)
    with _baseline_tree() as old_tree, \
            running_apiserver(extra_args=["-v", "0"], command=["env", f"PYTHONPATH={old_tree}", sys.executable, "-P", "-c",
                                                               ("import sys; from controlplane_stub.apiserver.main "
                                                                "import main; sys.exit(main())")]) as old, \
            running_apiserver(extra_args=["-v", "0"]) as new:
        servers = {"baseline": old, "limits": new}
        for api in servers.values():
            _seed(api)
        idle = {k: rss_bytes(a.pid) / MiB for k, a in servers.items()}
        times: dict[str, list[float]] = {}

        def lists() -> None:
            times.update(asyncio.run(_list_times(servers, 10)))

        benchmark.pedantic(lists, rounds=1, iterations=1)

        def slow(h: HostileClients, api: APIServerProcess) -> None:
            h.stalled(10, "/api/v1/configmaps?watch=true&resourceVersion=0", api.readonly_token)
            h.stalled(10, "/api/v1/configmaps", api.readonly_token)

        def half_open(h: HostileClients, api: APIServerProcess) -> None:
            h.silent(500)
            h.partial_headers(500)

        # Half-open first: after the baseline's slow clients its heap has room to spare for them.
        half_mib = _growth(servers, half_open)
        slow_mib = _growth(servers, slow)
    load = os.getloadavg()[0]
    rows = []
    for k in servers:
        best, med = min(times[k]) * 1000, statistics.median(times[k]) * 1000
        rows.append((k, idle[k], best, med, *slow_mib[k], *half_mib[k]))
        benchmark.extra_info[k] = {"idle_MiB": round(idle[k], 1), "list_best_ms": round(best, 1),
                                   "list_median_ms": round(med, 1), "slow_clients_MiB": round(slow_mib[k][0], 1),
                                   "slow_clients_after_close_MiB": round(slow_mib[k][1], 1),
                                   "half_open_MiB": round(half_mib[k][0], 1),
                                   "half_open_after_close_MiB": round(half_mib[k][1], 1)}
    print(f"\nload average {load:.1f}\n| server | idle RSS MiB | 10 MB list best / median ms | +MiB with 1,000 "
          f"half-open | +MiB 10 s after close | +MiB with 20 slow clients | +MiB 10 s after close |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} / {r[3]:.0f} | {r[6]:.0f} | {r[7]:.0f} | {r[4]:.0f} | {r[5]:.0f} |")

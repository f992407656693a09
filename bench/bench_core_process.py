"""core: the real `kproxy` process at 10,000 Services x 10 endpoints, fed by the real API server.

A no-op Proxier (tests/core/core_recorder.py, brief mode) isolates the core: list + decode +
track + checkout, from the kernel work a real mode adds. Reported: time from start to the first
(full) SyncRequest, the process RSS after it (limit: the issue's 100 MiB at 10,000 Services for the
whole process), and API write -> SyncRequest handed to the proxier for one endpoint change with
minSyncPeriod 0 (peer: Go kube-proxy's API write -> rule present at 10,000 Services, 2.18 s on the
legacy back end, from the issue; ours excludes iptables-restore, which the iptables bench adds).

Run: .venv/bin/pytest bench/bench_core_process.py --benchmark-enable -s
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

testing = pytest.importorskip("controlplane_stub.apiserver.testing")
ROOT = Path(__file__).resolve().parents[1]
N = int(os.environ.get("KPROXY_BENCH_SERVICES", "10000"))
EPS = 10
GO_WRITE_TO_RULE_10K = 2.18


async def _populate(url: str, token: str, ca: str | None) -> None:
    import ssl

    ctx = ssl.create_default_context(cafile=ca) if ca else False
    sem = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async def post(path: str, body: dict[str, Any]) -> None:
            async with sem, s.post(url + path, data=json.dumps(body)) as r:
                if r.status >= 300:
                    raise AssertionError(f"{path}: {r.status} {(await r.text())[:200]}")

        async def one(i: int) -> None:
            ns = "default"
            await post(f"/api/v1/namespaces/{ns}/services",
                       {"metadata": {"name": f"svc-{i}"}, "spec": {"ports": [{"name": "http", "port": 80}]}})
            await post(f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", _slice(i))

        await post("/api/v1/nodes", {"metadata": {"name": "n0"},
                                     "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.1"}]}})
        await asyncio.gather(*(one(i) for i in range(N)))


def _slice(i: int, gen: int = 0) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-abc", "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.{(i >> 8) & 255}.{i & 255}.{e + gen}"], "nodeName": f"n{e}",
                           "conditions": {"ready": True}} for e in range(EPS)]}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(900)
def test_core_process_10k(benchmark: Any, tmp_path: Path) -> None:
    with testing.running_apiserver(extra_args=["--watch-cache-size", "100000"]) as api:
        t0 = time.monotonic()
        asyncio.run(_populate(api.url, api.token, api.ca_file))
        populate_s = time.monotonic() - t0
        record = tmp_path / "syncs.jsonl"
        env = {**os.environ, "KPROXY_TEST_RECORD": str(record), "KPROXY_TEST_RECORD_BRIEF": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "core"), str(ROOT)])}
        code = "import sys; from kproxy.cli import main; sys.exit(main(modes={'recording': 'core_recorder'}))"
        log = (tmp_path / "kproxy.log").open("wb")
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", code, "--kubeconfig", api.kubeconfig, "--proxy-mode",
                                 "recording", "--hostname-override", "n0", "--healthz-bind-address=",
                                 "--metrics-bind-address=", "--iptables-min-sync-period=0s"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not _records(record):
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            first_s = time.monotonic() - start
            first = _records(record)[0]
            assert first["services"] == N and first["endpoints"] == N * EPS
            time.sleep(1.0)
            rss = _rss_mib(proc.pid)

            async def put(gen: int) -> float:
                import ssl

                ctx = ssl.create_default_context(cafile=api.ca_file)
                path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/svc-7-abc"
                h = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
                async with aiohttp.ClientSession(headers=h, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                    async with s.get(api.url + path) as r:
                        rv = (await r.json())["metadata"]["resourceVersion"]
                    body = _slice(7, gen)
                    body["metadata"]["resourceVersion"] = rv
                    n = len(_records(record))
                    t = time.time()
                    async with s.put(api.url + path, data=json.dumps(body)) as r:
                        assert r.status == 200
                    for _ in range(2000):
                        recs = _records(record)
                        if len(recs) > n and recs[-1]["changed"] == ["default/svc-7:http"]:
                            return float(recs[-1]["t"]) - t
                        await asyncio.sleep(0.005)
                raise AssertionError("no sync after the write")

            gens = iter(range(1, 1000))
            lat = benchmark.pedantic(lambda: asyncio.run(put(next(gens))), rounds=5, iterations=1)
            lats = sorted(asyncio.run(put(next(gens))) for _ in range(5))
            benchmark.extra_info.update(populate_s=populate_s, first_sync_s=first_s, rss_mib=rss,
                                        write_to_sync_median_s=lats[2], last=lat)
            print(f"\ncore process at {N} services x {EPS} endpoints: populate {populate_s:.1f} s; start -> first "
                  f"SyncRequest {first_s:.2f} s; RSS {rss:.1f} MiB (limit 100); API write -> SyncRequest "
                  f"median {lats[2] * 1e3:.0f} ms (min {lats[0] * 1e3:.0f}, max {lats[-1] * 1e3:.0f}); "
                  f"Go kube-proxy write -> rule {GO_WRITE_TO_RULE_10K} s: x{GO_WRITE_TO_RULE_10K / lats[2]:.0f}")
            assert rss < 100
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            log.close()

"""kproxy-apiserver benchmarks, each with its limit measured in the same run.

- create throughput: one client in a loop and 32 concurrent clients (group commit) against the raw
  SQLite rate on the same disk (one synchronous=FULL transaction per insert: the fsync bound);
- list of 10,000 Services: GET /api/v1/services against a bare aiohttp endpoint that returns the same
  bytes pre-encoded (the HTTP + TLS limit), plus the server's RSS;
- watch fan-out: events/s delivered to 50 watchers against the write rate that produced them
  (ideal: 50 x the write rate).

Run: .venv/bin/pytest bench/bench_apiserver_api.py --benchmark-enable -s
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

N_SERVICES = 10_000


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i:05d}", "labels": {"app": f"a{i % 100}"}},
            "spec": {"selector": {"app": f"a{i % 100}"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


class Api:
    def __init__(self, api: APIServerProcess) -> None:
        self.api = api
        assert api.ca_file
        self.ssl = ssl.create_default_context(cafile=api.ca_file)
        self.headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}

    async def create_many(self, path: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
        """Seconds to create all bodies with `concurrency` clients (each its own connection)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for b in bodies:
            queue.put_nowait(b)

        async def worker() -> None:
            async with aiohttp.ClientSession(headers=self.headers) as s:
                while not queue.empty():
                    body = queue.get_nowait()
                    async with s.post(self.api.url + path, data=json.dumps(body), ssl=self.ssl) as r:
                        assert r.status == 201, await r.text()
                        await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


@pytest.fixture(scope="module")
def server() -> Iterator[APIServerProcess]:
    with running_apiserver(extra_args=["-v", "0"]) as api:
        yield api


def _raw_sqlite_rate(n: int) -> float:
    """Inserts/s with one synchronous=FULL WAL transaction each: the disk's durable-commit limit."""
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(os.path.join(d, "raw.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
        payload = json.dumps(_service(0)).encode()
        started = time.perf_counter()
        for i in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?, ?)", (f"k{i}", payload))
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        db.close()
    return n / elapsed


def test_create_throughput(benchmark: Any, server: APIServerProcess) -> None:
    api = Api(server)
    n = 400
    path = "/api/v1/namespaces/default/configmaps"

    def bodies(tag: str) -> list[dict[str, Any]]:
        return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{tag}-{i}"}, "data": {"i": str(i)}}
                for i in range(n)]

    results: dict[str, float] = {}

    def run() -> None:
        tag = f"r{len(results)}"
        results["serial"] = n / asyncio.run(api.create_many(path, bodies(tag + "s"), 1))
        cpu = _cpu_s(server.pid)
        results["concurrent32"] = n / asyncio.run(api.create_many(path, bodies(tag + "c"), 32))
        results["cpu_per_create_ms"] = (_cpu_s(server.pid) - cpu) / n * 1000

    benchmark.pedantic(run, rounds=1, iterations=1)
    raw = _raw_sqlite_rate(n)
    benchmark.extra_info.update({"creates_per_s_1_client": round(results["serial"]),
                                 "creates_per_s_32_clients": round(results["concurrent32"]),
                                 "raw_sqlite_fsync_commits_per_s": round(raw),
                                 "server_cpu_ms_per_create": round(results["cpu_per_create_ms"], 2)})
    print(f"\ncreate throughput: 1 client {results['serial']:.0f}/s, 32 clients {results['concurrent32']:.0f}/s; "
          f"raw SQLite one-fsync-per-insert limit {raw:.0f}/s; 32-client/limit = {results['concurrent32'] / raw:.2f}; "
          f"server CPU {results['cpu_per_create_ms']:.2f} ms per create")
    assert results["concurrent32"] > 0


_BARE = """
import ssl, sys
from aiohttp import web
body = open(sys.argv[1], "rb").read()
async def handler(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/list", handler)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[4]), ssl_context=ctx, access_log=None, print=None)
"""


@contextlib.contextmanager
def _bare_server(body: bytes, certfile: str, keyfile: str) -> Iterator[int]:
    """A separate process serving `body` pre-encoded over the same TLS: the limit for a list."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-c", _BARE, f.name, certfile, keyfile, str(port)])
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                assert proc.poll() is None, "bare aiohttp server exited"
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


def test_list_10k_services(benchmark: Any, server: APIServerProcess) -> None:
    api = Api(server)
    rss_before = _rss_mib(server.pid)
    seed_s = asyncio.run(api.create_many("/api/v1/namespaces/default/services",
                                         [_service(i) for i in range(N_SERVICES)], 32))
    rss_after_seed = _rss_mib(server.pid)

    async def fetch(url: str, headers: dict[str, str], ctx: ssl.SSLContext, rounds: int) -> tuple[float, bytes]:
        async with aiohttp.ClientSession(headers=headers) as s:
            best, body = 1e9, b""
            for _ in range(rounds):
                t = time.perf_counter()
                async with s.get(url, ssl=ctx) as r:
                    body = await r.read()
                best = min(best, time.perf_counter() - t)
            return best, body

    url = server.url + "/api/v1/services"
    _, body = asyncio.run(fetch(url, api.headers, api.ssl, 1))
    assert len(json.loads(body)["items"]) >= N_SERVICES

    def one_list() -> None:
        asyncio.run(fetch(url, api.headers, api.ssl, 1))

    benchmark.pedantic(one_list, rounds=5, iterations=1)
    cpu = _cpu_s(server.pid)
    server_s, _ = asyncio.run(fetch(url, api.headers, api.ssl, 5))
    cpu_per_list_ms = (_cpu_s(server.pid) - cpu) / 5 * 1000
    rss_after_lists = _rss_mib(server.pid)

    pki = os.path.join(server.data_dir, "pki")
    with _bare_server(body, os.path.join(pki, "apiserver.crt"), os.path.join(pki, "apiserver.key")) as port:
        bare_s, bare_body = asyncio.run(fetch(f"https://127.0.0.1:{port}/list", {}, api.ssl, 5))
    assert bare_body == body
    benchmark.extra_info.update({
        "services": N_SERVICES, "body_MiB": round(len(body) / 2**20, 2), "list_ms": round(server_s * 1000, 1),
        "bare_aiohttp_same_bytes_ms": round(bare_s * 1000, 1), "ratio": round(server_s / bare_s, 2),
        "server_cpu_ms_per_list": round(cpu_per_list_ms, 1),
        "seed_creates_per_s_32_clients": round(N_SERVICES / seed_s),
        "rss_MiB_empty": round(rss_before, 1), "rss_MiB_10k": round(rss_after_seed, 1),
        "rss_MiB_after_lists": round(rss_after_lists, 1)})
    print(f"\nlist {N_SERVICES} services ({len(body) / 2**20:.1f} MiB): {server_s * 1000:.1f} ms; bare aiohttp same "
          f"bytes {bare_s * 1000:.1f} ms; ratio {server_s / bare_s:.2f}; server CPU {cpu_per_list_ms:.1f} ms/list; seeding {N_SERVICES / seed_s:.0f} creates/s; "
          f"RSS {rss_before:.0f} -> {rss_after_seed:.0f} -> {rss_after_lists:.0f} MiB")


def test_watch_fanout_50(benchmark: Any, server: APIServerProcess) -> None:
    api = Api(server)
    n_watchers, n_events = 50, 1000
    path = "/api/v1/namespaces/default/configmaps"
    results: dict[str, float] = {}

    async def scenario() -> None:
        async with aiohttp.ClientSession(headers=api.headers) as s:
            async with s.get(server.url + path, params={"limit": "1"}, ssl=api.ssl) as r:
                rv = (await r.json())["metadata"]["resourceVersion"]
        ready = asyncio.Event()
        connected = 0
        done_at: list[float] = []

        async def watcher() -> None:
            nonlocal connected
            seen = 0
            async with aiohttp.ClientSession(headers=api.headers) as s:
                async with s.get(server.url + path, ssl=api.ssl,
                                 params={"watch": "true", "resourceVersion": rv}) as r:
                    connected += 1
                    if connected == n_watchers:
                        ready.set()
                    async for _ in r.content:
                        seen += 1
                        if seen == n_events:
                            done_at.append(time.perf_counter())
                            return

        tasks = [asyncio.create_task(watcher()) for _ in range(n_watchers)]
        await asyncio.wait_for(ready.wait(), 30)
        tag = f"w{int(time.time() * 1000)}"
        bodies = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{tag}-{i}"}} for i in range(n_events)]
        started = time.perf_counter()
        cpu = _cpu_s(server.pid)
        write_s = await api.create_many(path, bodies, 32)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        total_s = max(done_at) - started
        results["cpu_s"] = _cpu_s(server.pid) - cpu
        results["write_rate"] = n_events / write_s
        results["delivered_rate"] = n_watchers * n_events / total_s

    benchmark.pedantic(lambda: asyncio.run(scenario()), rounds=1, iterations=1)
    ratio = results["delivered_rate"] / (n_watchers * results["write_rate"])
    benchmark.extra_info.update({"watchers": n_watchers, "events": n_events,
                                 "events_per_s_delivered_total": round(results["delivered_rate"]),
                                 "write_rate_per_s": round(results["write_rate"]),
                                 "delivered_vs_ideal_50x_write_rate": round(ratio, 2),
                                 "server_cpu_s": round(results["cpu_s"], 2)})
    print(f"\nwatch fan-out: {n_watchers} watchers x {n_events} events: {results['delivered_rate']:.0f} events/s "
          f"delivered; writes {results['write_rate']:.0f}/s; delivered / (50 x write rate) = {ratio:.2f}; server CPU "
          f"{results['cpu_s']:.2f} s for {n_events} writes + {n_watchers * n_events} deliveries")

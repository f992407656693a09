"""The HTTP layer under kproxy-apiserver, alone: server CPU per request of aiohttp's web.Application
(one middleware, the API server's 16 routes, as it served until 2026-12-07), of aiohttp's low-level
web.Server with one handler that routes itself (how it serves now: APIServer._route), and, as the
limit, a bare asyncio.Protocol on aiohttp's C HTTP parser that answers each request with one write.
Each server is a process of its own on uvloop, pinned to one core, the client on the other:
20,000 keep-alive POSTs (300-byte body, a 250-byte JSON answer) from 32 connections, plain TCP on
loopback (TLS costs every layer the same); servers alternate, KPROXY_BENCH_ROUNDS rounds each.

Run: .venv/bin/pytest bench/bench_apiserver_http.py --benchmark-enable -s
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import bench_etcd_apiserver as fan  # bench/: pytest puts it on sys.path; its pinning helpers
import pytest

from controlplane_stub.store.etcd_process import free_port

N_REQUESTS = 20_000
CONNECTIONS = 32
ROUNDS = int(os.environ.get("KPROXY_BENCH_ROUNDS", "3"))
LAYERS = ("application", "low-level", "bare protocol")

_SERVER = r'''
import asyncio, json, resource, sys
import uvloop
from aiohttp import web

layer, port = sys.argv[1], int(sys.argv[2])
BODY = json.dumps({"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x", "namespace": "default",
                   "resourceVersion": "123", "uid": "abc"}, "data": {"a": "b" * 100}}).encode()


async def answer(request):
    await request.read()
    return web.Response(body=BODY, status=201, content_type="application/json")


async def main():
    loop = asyncio.get_running_loop()
    if layer == "application":
        @web.middleware
        async def middleware(request, handler):
            request["user"] = "admin"
            if request.body_exists:
                await request.read()
            return await handler(request)

        app = web.Application(middlewares=[middleware])
        r = app.router
        for p in ("/healthz", "/livez", "/readyz"):
            r.add_get(p, answer)
            r.add_get(p + "/{check:.*}", answer)
        for p in ("/version", "/metrics", "/openapi/v2", "/openapi/v3"):
            r.add_get(p, answer)
        r.add_get("/openapi/v3/{gv:.*}", answer)
        for p in ("/api", "/apis", "/api/{tail:.*}", "/apis/{tail:.*}"):
            r.add_route("*", p, answer)
        runner = web.AppRunner(app, access_log=None)
    elif layer == "low-level":
        async def handle(request):
            request["user"] = "admin"
            if request.path.startswith(("/api/", "/apis/")):
                return await answer(request)
            raise web.HTTPNotFound()

        runner = web.ServerRunner(web.Server(handle, access_log=None))
    else:
        from aiohttp.http_parser import HttpRequestParser

        class Bare(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.parser = HttpRequestParser(self, loop, 2 ** 16, max_line_size=8190, max_field_size=8190)

            def pause_reading(self):
                pass

            def resume_reading(self, resume_parser=True):
                pass

            def data_received(self, data):
                for _message, payload in self.parser.feed_data(data)[0]:
                    loop.create_task(self.handle(payload))

            async def handle(self, payload):
                await payload.read()
                self.transport.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY))

        await loop.create_server(Bare, "127.0.0.1", port)
        runner = None
    if runner is not None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    for _ in range(2):  # CPU seconds so far, at the client's go and at its end
        await loop.run_in_executor(None, sys.stdin.readline)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(ru.ru_utime + ru.ru_stime, flush=True)


uvloop.run(main())
'''

_REQUEST = (b"POST /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer 0123456789abcdef\r\nContent-Type: application/json\r\n"
            b"Accept: application/json\r\nUser-Agent: kubectl/v1.32.0\r\nContent-Length: 300\r\n\r\n" + b"x" * 300)


async def _client(port: int, n: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            writer.write(_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 201"), head
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
    finally:
        writer.close()


def _round(layer: str, cpus: tuple[int, int] | None) -> tuple[float, float]:
    """(server CPU microseconds per request, requests/s) for one layer."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, layer, str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        if cpus:
            fan._pin(proc.pid, cpus[1])
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.stdin.write("\n")
        proc.stdin.flush()
        cpu0 = float(proc.stdout.readline())
        started = time.perf_counter()

        async def run() -> None:
            await asyncio.gather(*(_client(port, N_REQUESTS // CONNECTIONS) for _ in range(CONNECTIONS)))

        asyncio.run(run())
        wall = time.perf_counter() - started
        proc.stdin.write("\n")
        proc.stdin.flush()
        cpu = float(proc.stdout.readline()) - cpu0
        n = N_REQUESTS // CONNECTIONS * CONNECTIONS
        return cpu / n * 1e6, n / wall
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(600)
def test_http_layers_side_by_side(benchmark: Any) -> None:
    pytest.importorskip("uvloop")
    cpus = fan._cpus()
    results: dict[str, list[tuple[float, float]]] = {layer: [] for layer in LAYERS}

    def run() -> None:
        with contextlib.ExitStack() as stack:
            fan._pin_bench(stack, cpus)
            for _ in range(ROUNDS):
                for layer in LAYERS:
                    results[layer].append(_round(layer, cpus))

    benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"\n{N_REQUESTS:,} POSTs from {CONNECTIONS} keep-alive connections, {ROUNDS} rounds each, alternating, "
          f"load {os.getloadavg()[0]:.1f}, " + (f"server on cpu {cpus[1]}, client on cpu {cpus[0]}" if cpus
                                                   else "not pinned"))
    print("| server | CPU us per request, median (range) | requests/s, median |")
    print("|---|---:|---:|")
    for layer, rs in results.items():
        us = sorted(r[0] for r in rs)
        print(f"| {layer} | {statistics.median(us):.1f} ({us[0]:.1f}-{us[-1]:.1f}) "
              f"| {statistics.median(r[1] for r in rs):,.0f} |")
        benchmark.extra_info[f"{layer}_us_per_request"] = [round(x, 1) for x in us]
    for rs in results.values():
        assert all(r[0] > 0 and r[1] > 0 for r in rs)

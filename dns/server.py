"""Transports: UDP (batched hot path), TCP (RFC 7766 length-prefixed, pipelined, out-of-order),
and the HTTP side port with /health, /ready and Prometheus /metrics."""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kdns import wire
from kdns.resolver import Forward, Resolver

log = logging.getLogger("kdns.server")

TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent between queries
TCP_MAX_INFLIGHT = 32  # forwarded queries pending per TCP connection
MAX_FORWARDS = 1000  # forwarded queries pending in total (beyond: SERVFAIL, not unbounded memory)
UDP_BATCHES = 16  # recvmmsg batches per readiness callback, so TCP and watches get their turn


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class DNSServer:
    def __init__(self, resolver: Resolver, host: str = "0.0.0.0", port: int = 53) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self.udp: socket.socket | None = None
        self.tcp: asyncio.Server | None = None
        self.pending = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind UDP and TCP on the same port (port 0: a free one, retried if TCP's is taken)."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            udp = socket.socket(_family(self.host), socket.SOCK_DGRAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                udp.bind((self.host, self.port))
                udp.setblocking(False)
                port = udp.getsockname()[1]
                tcp_sock = socket.socket(_family(self.host), socket.SOCK_STREAM)
                tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp_sock.bind((self.host, port))
            except OSError:
                udp.close()
                if self.port != 0 or attempt == 19:
                    raise
                continue
            break
        tcp_sock.listen(512)
        tcp_sock.setblocking(False)
        self.port = port
        self.udp = udp
        self.tcp = await asyncio.start_server(self._on_tcp, sock=tcp_sock)
        loop.add_reader(udp.fileno(), self._on_udp)
        log.info("dns listening addr=%s port=%d compiled=%s", self.host, port, wire.COMPILED)

    async def stop(self) -> None:
        if self.udp is not None:
            asyncio.get_running_loop().remove_reader(self.udp.fileno())
            if wire.COMPILED:
                wire.impl.forget_socket(self.udp)
            self.udp.close()
            self.udp = None
        if self.tcp is not None:
            self.tcp.close()
            self.tcp = None
        for t in list(self.tasks):
            t.cancel()

    # ---------------------------------------------------------------------------- UDP

    def _on_udp(self) -> None:
        sock = self.udp
        if sock is None:
            return
        try:
            misses = wire.impl.drain_udp(sock, self.resolver.index.table, self.resolver.stats, UDP_BATCHES)
        except OSError as exc:  # e.g. ICMP errors surfacing on the socket: keep serving
            log.debug("udp receive error: %r", exc)
            return
        for data, addr in misses:
            out = self.resolver.local(data, False)
            if isinstance(out, Forward):
                self._spawn(self._udp_forward(out, addr))
            elif out is not None:
                self._udp_send(out, addr)

    def _udp_send(self, data: bytes, addr: Any) -> None:
        if self.udp is None:
            return
        try:
            self.udp.sendto(data, addr)
        except OSError:
            pass  # full buffer or unreachable client: a UDP answer may be lost; the client retries

    async def _udp_forward(self, fwd: Forward, addr: Any) -> None:
        self._udp_send(await self.resolver.forward(fwd), addr)

    def _spawn(self, coro: Any) -> None:
        if self.pending >= MAX_FORWARDS:
            coro.close()
            return
        self.pending += 1
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.pending -= 1
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("forward task failed: %r", task.exception())

    # ---------------------------------------------------------------------------- TCP

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        inflight = asyncio.Semaphore(TCP_MAX_INFLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def forward(fwd: Forward) -> None:
            try:
                out = await self.resolver.forward(fwd)
                if not writer.is_closing():
                    writer.write(struct.pack("!H", len(out)) + out)
            finally:
                inflight.release()

        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                (n,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE_TIMEOUT)
                out = self.resolver.local(data, True)
                if out is None:
                    break  # unreadable: close, as the stream can no longer be trusted
                if isinstance(out, Forward):
                    await inflight.acquire()
                    t = asyncio.ensure_future(forward(out))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    continue
                writer.write(struct.pack("!H", len(out)) + out)
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            if tasks:
                await asyncio.wait(tasks, timeout=self.resolver.timeout * 2)
            try:
                await writer.drain()
            except ConnectionError:
                pass
            writer.close()


class _Collector:
    """Reads the counters at scrape time (nothing is updated per query in Python)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        snap = self.resolver.stats.snapshot()
        req = CounterMetricFamily("kdns_dns_requests", "DNS requests by query type.", labels=["type"])
        for t, c in sorted(snap["types"].items()):
            req.add_metric([wire.TYPE_NAMES.get(t, "other" if t else "unknown")], c)
        yield req
        resp = CounterMetricFamily("kdns_dns_responses", "DNS responses by rcode.", labels=["rcode"])
        for r, c in sorted(snap["rcodes"].items()):
            resp.add_metric([wire.RCODE_NAMES.get(r, str(r))], c)
        yield resp
        hist = HistogramMetricFamily("kdns_dns_request_duration_seconds",
                                     "Time to answer a query, from receipt to send.")
        cum, buckets = 0, []
        for bound, c in zip([*wire.impl.BUCKETS, float("inf")], snap["buckets"]):
            cum += c
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        hist.add_metric([], buckets, snap["sum"])
        yield hist
        cache = self.resolver.cache
        yield CounterMetricFamily("kdns_cache_hits", "Forwarded queries answered from the cache.",
                                  value=cache.hits)
        yield CounterMetricFamily("kdns_cache_misses", "Forwarded queries sent upstream.", value=cache.misses)
        yield GaugeMetricFamily("kdns_cache_entries", "Entries in the forward cache.", value=len(cache.entries))
        yield CounterMetricFamily("kdns_forward_errors", "Forwarded queries that got no usable answer.",
                                  value=self.resolver.upstream_errors)
        yield CounterMetricFamily("kdns_internal_errors", "Queries whose handling raised (answered SERVFAIL).",
                                  value=self.resolver.internal_errors)
        yield GaugeMetricFamily("kdns_zone_answers", "Pre-encoded cluster answers.",
                                value=len(self.resolver.index.answers))


def http_app(resolver: Resolver) -> web.Application:
    registry = CollectorRegistry()
    registry.register(_Collector(resolver))

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def ready(_: web.Request) -> web.Response:
        if resolver.index.synced:
            return web.Response(text="OK")
        return web.Response(status=503, text="not synced: Services and EndpointSlices not listed yet")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app

"""Transports: UDP (batched hot path), TCP (RFC 7766 length-prefixed, pipelined, out-of-order),
and the HTTP side port with /health, /ready and Prometheus /metrics."""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from kdns import wire
from kdns.resolver import Forward, Resolver

log = logging.getLogger("kdns.server")

TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent between queries
TCP_MAX_INFLIGHT = 32  # forwarded queries pending per TCP connection
TCP_MAX_CONNECTIONS = 512  # beyond this new connections are closed at once (fds are finite)
MAX_FORWARDS = 1000  # forwarded queries pending in total (beyond: dropped, the client retries)
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>; in the socket module from 3.12
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
        self.tcp_connections = 0

    async def start(self) -> None:
        """Bind UDP and TCP on the same port (port 0: a free one, retried if TCP's is taken)."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            udp = socket.socket(_family(self.host), socket.SOCK_DGRAM)
            tcp_sock: socket.socket | None = None
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                udp.bind((self.host, self.port))
                if self.host in ("0.0.0.0", "::", ""):
                    # Replies must leave from the address each query was sent to (see drain_udp).
                    udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    if _family(self.host) == socket.AF_INET6:
                        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                udp.setblocking(False)
                port = udp.getsockname()[1]
                tcp_sock = socket.socket(_family(self.host), socket.SOCK_STREAM)
                tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp_sock.bind((self.host, port))
            except OSError:
                udp.close()
                if tcp_sock is not None:
                    tcp_sock.close()
                if self.port != 0 or attempt == 19:
                    raise
                continue
            break
        assert tcp_sock is not None
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
        for data, addr, anc in misses:
            out = self.resolver.local(data, False)
            if isinstance(out, Forward):
                self._spawn(self._udp_forward(out, addr, anc))
            elif out is not None:
                self._udp_send(out, addr, anc)

    def _udp_send(self, data: bytes, addr: Any, anc: list[tuple[int, int, bytes]]) -> None:
        if self.udp is None:
            return
        try:
            if anc:
                self.udp.sendmsg([data], anc, 0, addr)
            else:
                self.udp.sendto(data, addr)
        except OSError:
            pass  # full buffer or unreachable client: a UDP answer may be lost; the client retries

    async def _udp_forward(self, fwd: Forward, addr: Any, anc: list[tuple[int, int, bytes]]) -> None:
        self._udp_send(await self.resolver.forward(fwd), addr, anc)

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
        if self.tcp_connections >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        self.tcp_connections += 1
        try:
            await self._tcp_session(reader, writer)
        finally:
            self.tcp_connections -= 1

    async def _tcp_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if tasks:
                await asyncio.wait(tasks, timeout=self.resolver.timeout * 2)
            try:
                await writer.drain()
            except ConnectionError:
                pass
            writer.close()


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}" if kv else ""


def render_metrics(resolver: Resolver) -> str:
    """Prometheus text exposition (format 0.0.4), read from the counters at scrape time: nothing
    is updated per query in Python. Written by hand rather than with prometheus_client so the
    server stays small (the goal of issue 6: < 60 MiB at 10,000 Services)."""
    snap = resolver.stats.snapshot()
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[str, str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            out.append(f"{name}{suffix}{labels} {float(value)!r}")

    by_type: dict[str, int] = {}
    for t, c in snap["types"].items():  # rare types share "other": one series per label set
        label = wire.TYPE_NAMES.get(t, "other")
        by_type[label] = by_type.get(label, 0) + c
    family("kdns_dns_requests_total", "counter", "DNS requests by query type.",
           [("", _labels(type=t), c) for t, c in sorted(by_type.items())])
    family("kdns_dns_responses_total", "counter", "DNS responses by rcode.",
           [("", _labels(rcode=wire.RCODE_NAMES.get(r, str(r))), c) for r, c in sorted(snap["rcodes"].items())])
    cum = 0
    samples: list[tuple[str, str, float]] = []
    for bound, c in zip([*wire.impl.BUCKETS, float("inf")], snap["buckets"]):
        cum += c
        samples.append(("_bucket", _labels(le="+Inf" if bound == float("inf") else repr(bound)), cum))
    samples += [("_sum", "", snap["sum"]), ("_count", "", snap["count"])]
    family("kdns_dns_request_duration_seconds", "histogram",
           "Time to answer a query, from receipt to send (UDP: per recvmmsg batch).", samples)
    cache = resolver.cache
    family("kdns_cache_hits_total", "counter", "Forwarded queries answered from the cache.", [("", "", cache.hits)])
    family("kdns_cache_misses_total", "counter", "Forwarded queries sent upstream.", [("", "", cache.misses)])
    family("kdns_cache_entries", "gauge", "Entries in the forward cache.", [("", "", len(cache.entries))])
    family("kdns_forward_coalesced_total", "counter", "Forwarded queries that joined an identical one in flight.",
           [("", "", resolver.coalesced)])
    family("kdns_forward_errors_total", "counter", "Forwarded queries that got no usable answer.",
           [("", "", resolver.upstream_errors)])
    family("kdns_internal_errors_total", "counter", "Queries whose handling raised (answered SERVFAIL).",
           [("", "", resolver.internal_errors)])
    family("kdns_zone_answers", "gauge", "Pre-encoded cluster answers.", [("", "", len(resolver.index.answers))])
    family("kdns_ready", "gauge", "1 once Services and EndpointSlices are synced.",
           [("", "", 1 if resolver.index.synced else 0)])
    return "\n".join(out) + "\n"


class HealthServer:
    """/health, /ready and /metrics over a minimal HTTP/1.1 (one request per connection)."""

    def __init__(self, resolver: Resolver, host: str, port: int) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def respond(self, method: str, path: str) -> tuple[int, str, str]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", "method not allowed\n"
        if path in ("/health", "/healthz"):
            return 200, "text/plain", "OK"
        if path in ("/ready", "/readyz"):
            if self.resolver.index.synced:
                return 200, "text/plain", "OK"
            return 503, "text/plain", "not synced: Services and EndpointSlices not listed yet"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(self.resolver)
        return 404, "text/plain", "not found: try /health, /ready or /metrics\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reasons = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                return
            code, ctype, body = self.respond(parts[0], parts[1])
            data = body.encode()
            writer.write(f"HTTP/1.1 {code} {reasons[code]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                         + (data if parts[0] != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

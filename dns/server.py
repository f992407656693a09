"""Transports: UDP (batched hot path), TCP (RFC 7766 length-prefixed, pipelined, out-of-order),
and the HTTP side port with /health, /ready and Prometheus /metrics."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdns import wire
from kdns.resolver import Forward, Resolver

log = logging.getLogger("kdns.server")

MAX_FORWARDS = 1000  # forwarded queries pending in total (beyond: dropped, the client retries)
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>; in the socket module from 3.12
TCP_BURST = 8  # queries one TCP connection answers before the others (and UDP) get the loop
TCP_READ_BUFFER = 16 << 10  # queries read ahead per connection (StreamReader pauses past twice this)
UDP_BATCHES = 16  # recvmmsg batches per readiness callback, so TCP and watches get their turn


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _kernel_unsent(writer: asyncio.StreamWriter) -> int:
    """Bytes the kernel still holds for the peer (SIOCOUTQ): answers the client has not read."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", out)[0])


def _reset(transport: asyncio.WriteTransport) -> None:
    """Close with a reset (SO_LINGER 0): a plain close of a socket whose client does not read
    queues a FIN behind the unsent answers, which never leaves, so the kernel would keep the
    socket and its buffers as an orphan for minutes and the client would see it open."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed
    transport.abort()


@dataclass(frozen=True)
class TcpLimits:
    """What one TCP client may hold (RFC 7766 section 6.2). The timeouts are CoreDNS's server
    defaults (read 3 s, write 5 s, idle 10 s). Past a connection limit the oldest idle connection
    (global limit: of all; per-source limit: of that source) is closed to admit the new one, and
    the new one is refused only when none is idle (see DNSServer._admit for why)."""

    max_connections: int = 512  # in total (each is a file descriptor and two buffers)
    max_per_source: int = 64  # from one client address
    idle_timeout: float = 10.0  # between queries
    read_timeout: float = 3.0  # from a query's length prefix to its last byte
    write_timeout: float = 5.0  # for a client to take answers off a full send buffer
    max_inflight: int = 16  # pipelined queries of one connection waiting for an upstream
    write_buffer: int = 32 << 10  # unsent answer bytes before the server waits for the client


class _Conn:
    """One TCP client. `reading`: the session waits for the client (idle, or a query arriving
    slowly) with nothing being forwarded or unsent, so closing it loses no answer."""

    __slots__ = ("forwards", "reading", "source", "transport")

    def __init__(self, source: str, transport: asyncio.WriteTransport) -> None:
        self.source = source
        self.transport = transport
        self.reading = False
        self.forwards = 0

    def evictable(self) -> bool:
        return self.reading and not self.forwards and not self.transport.get_write_buffer_size()


class DNSServer:
    def __init__(self, resolver: Resolver, host: str = "0.0.0.0", port: int = 53,
                 tcp_limits: TcpLimits | None = None) -> None:
        self.resolver = resolver
        self.host = host
        self.port = port
        self.udp: socket.socket | None = None
        self.tcp: asyncio.Server | None = None
        self.pending = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.limits = tcp_limits or TcpLimits()
        # Open TCP connections, least recently active first (a completed query moves one to the end).
        self.conns: dict[_Conn, None] = {}
        self.per_source: dict[str, int] = {}
        self.tcp_refused = 0  # new connections closed at once: every slot busy
        self.tcp_evicted = 0  # idle connections closed to make room
        self.tcp_timeouts = 0  # connections closed for a read, write or idle timeout

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
        # Accepted sockets inherit fixed, small kernel buffers: DNS messages are at most 64 KiB,
        # and autotuning would let each client that sends without reading (or reads without
        # sending) pin megabytes; the event loop then reads at most that much per call.
        tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.write_buffer)
        tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TCP_READ_BUFFER)
        tcp_sock.listen(4096)  # capped by net.core.somaxconn; reconnecting slow clients must not crowd out new ones
        tcp_sock.setblocking(False)
        self.port = port
        self.udp = udp
        self.tcp = await asyncio.start_server(self._on_tcp, sock=tcp_sock, limit=TCP_READ_BUFFER)
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
            out = self.resolver.local(data, False, addr[0])
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

    def _admit(self, conn: _Conn) -> bool:
        """Make room for a new connection, or refuse it. Past a limit the least recently active
        idle connection goes (RFC 7766 6.2.3: a server may close idle connections to reclaim
        resources; clients reconnect). unbound instead stops accepting when its slots are full
        (and shortens idle timeouts past half full), so 500 slow clients delay every new TCP
        query until one times out; CoreDNS has no limit at all (a goroutine per connection).
        Evicting the oldest idle one keeps new queries answered at once while no client can hold
        more than the limits; only when every slot is busy with real work is the new one refused."""
        lim = self.limits
        if self.per_source.get(conn.source, 0) >= lim.max_per_source and not self._evict(conn.source):
            return False
        if len(self.conns) >= lim.max_connections and not self._evict(None):
            return False
        self.conns[conn] = None
        self.per_source[conn.source] = self.per_source.get(conn.source, 0) + 1
        return True

    def _evict(self, source: str | None) -> bool:
        for old in self.conns:
            if (source is None or old.source == source) and old.evictable():
                self._release(old)
                old.transport.abort()  # idle: nothing unsent, a plain close is a FIN
                self.tcp_evicted += 1
                return True
        return False

    def _release(self, conn: _Conn) -> None:
        if conn in self.conns:
            del self.conns[conn]
            left = self.per_source[conn.source] - 1
            if left:
                self.per_source[conn.source] = left
            else:
                del self.per_source[conn.source]

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        transport = writer.transport
        conn = _Conn(str(peer[0]) if peer else "", transport)
        if not self._admit(conn):
            self.tcp_refused += 1
            _reset(transport)
            return
        transport.set_write_buffer_limits(high=self.limits.write_buffer)
        try:
            await self._tcp_session(conn, reader, writer)
        finally:
            self._release(conn)

    async def _tcp_session(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lim = self.limits
        inflight = asyncio.Semaphore(lim.max_inflight)
        tasks: set[asyncio.Task[None]] = set()
        transport = writer.transport
        source = conn.source

        async def forward(fwd: Forward) -> None:
            try:
                out = await self.resolver.forward(fwd)
                if not transport.is_closing():
                    writer.write(struct.pack("!H", len(out)) + out)
                    if transport.get_write_buffer_size() > 2 * lim.write_buffer:
                        _reset(transport)  # a client that does not read its answers: closed
            finally:
                conn.forwards -= 1
                inflight.release()

        graceful = idle = False
        burst = 0
        try:
            while True:
                conn.reading = idle = True
                async with asyncio.timeout(lim.idle_timeout):
                    head = await reader.readexactly(2)
                idle = False
                (n,) = struct.unpack("!H", head)
                async with asyncio.timeout(lim.read_timeout):
                    data = await reader.readexactly(n)
                conn.reading = False
                if conn in self.conns:  # most recently active last: evicted last
                    del self.conns[conn]
                    self.conns[conn] = None
                out = self.resolver.local(data, True, source)
                if out is None:
                    break  # unreadable: close, as the stream can no longer be trusted
                burst += 1
                if burst >= TCP_BURST:
                    # Reads from a full buffer do not yield: a client pipelining thousands of
                    # queries would hold the loop while UDP, other connections and /metrics wait.
                    burst = 0
                    await asyncio.sleep(0)
                if isinstance(out, Forward):
                    conn.forwards += 1
                    async with asyncio.timeout(lim.write_timeout + self.resolver.timeout * 2):
                        await inflight.acquire()  # pipelined past max_inflight: stop reading until one ends
                    t = asyncio.ensure_future(forward(out))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    continue
                writer.write(struct.pack("!H", len(out)) + out)
                if transport.get_write_buffer_size() > lim.write_buffer:
                    async with asyncio.timeout(lim.write_timeout):
                        await writer.drain()  # a slow reader gets write_timeout, then is closed
        except asyncio.IncompleteReadError as exc:
            graceful = not exc.partial  # the client closed between queries
        except TimeoutError:
            self.tcp_timeouts += 1
            # Silent between queries with every answer taken: a normal close. Mid-query, or with
            # answers the client has not read for idle_timeout (in our buffer or the kernel's):
            # aborted. A FIN queued behind unread data would never leave, and the kernel would
            # keep the socket and its buffer as an orphan.
            graceful = idle and not transport.get_write_buffer_size() and not _kernel_unsent(writer)
        except ConnectionError:
            pass
        finally:
            conn.reading = False
            if tasks and graceful:
                await asyncio.wait(tasks, timeout=self.resolver.timeout * 2)
            for t in tasks:
                t.cancel()
            if graceful and not transport.is_closing():
                try:
                    async with asyncio.timeout(lim.write_timeout):
                        await writer.drain()
                        while _kernel_unsent(writer):  # the client is still reading its answers
                            await asyncio.sleep(0.05)
                    writer.close()
                except (TimeoutError, ConnectionError):
                    _reset(transport)
            else:
                _reset(transport)


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}" if kv else ""


def render_metrics(resolver: Resolver, server: DNSServer | None = None) -> str:
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
    _coredns_families(resolver, server, snap, by_type, family)
    family("kdns_refused_total", "counter", "Queries refused by the access lists (--allow-query, --allow-recursion).",
           [("", _labels(acl="query"), resolver.refused_query), ("", _labels(acl="recursion"), resolver.refused_recursion)])
    if server is not None:
        family("kdns_tcp_connections", "gauge", "Open TCP client connections.", [("", "", len(server.conns))])
        family("kdns_tcp_closed_total", "counter",
               "TCP connections the server closed: refused (every slot busy), evicted (idle, to make "
               "room), timeout (read, write or idle timeout).",
               [("", _labels(reason="refused"), server.tcp_refused), ("", _labels(reason="evicted"), server.tcp_evicted),
                ("", _labels(reason="timeout"), server.tcp_timeouts)])
    family("kdns_ready", "gauge", "1 once Services and EndpointSlices are synced.",
           [("", "", 1 if resolver.index.synced else 0)])
    return "\n".join(out) + "\n"


_Family = Callable[[str, str, str, list[tuple[str, str, float]]], None]


def _coredns_families(resolver: Resolver, server: DNSServer | None, snap: dict[str, Any], by_type: dict[str, int],
                      family: _Family) -> None:
    """The same counters under CoreDNS's metric names and labels (plugin/metrics, cache, forward),
    so dashboards made for CoreDNS work. zone is "." (the server block kube-dns uses), view and
    plugin are empty; the request duration histogram is not split by type (the hot path keeps one)."""
    host, port = (server.host, server.port) if server is not None else ("", 53)
    base = {"server": f"dns://{'' if host in ('0.0.0.0', '::') else host}:{port}", "zone": ".", "view": ""}
    fam = "2" if ":" in host else "1"  # the listening socket's family: every request comes over it
    tcp: dict[str, int] = {}
    for t, c in resolver.tcp_types.items():
        label = wire.TYPE_NAMES.get(t, "other")
        tcp[label] = tcp.get(label, 0) + c
    req: list[tuple[str, str, float]] = []
    for t, c in sorted(by_type.items()):
        req.append(("", _labels(**base, proto="udp", family=fam, type=t), c - tcp.get(t, 0)))
        if tcp.get(t):
            req.append(("", _labels(**base, proto="tcp", family=fam, type=t), tcp[t]))
    family("coredns_dns_requests_total", "counter", "Counter of DNS requests made per zone, protocol and family.", req)
    family("coredns_dns_responses_total", "counter", "Counter of response status codes.",
           [("", _labels(**base, rcode=wire.RCODE_NAMES.get(r, str(r)), plugin=""), c)
            for r, c in sorted(snap["rcodes"].items())])
    cum = 0
    samples: list[tuple[str, str, float]] = []
    for bound, c in zip([*wire.impl.BUCKETS, float("inf")], snap["buckets"]):
        cum += c
        samples.append(("_bucket", _labels(**base, le="+Inf" if bound == float("inf") else repr(bound)), cum))
    samples += [("_sum", _labels(**base), snap["sum"]), ("_count", _labels(**base), snap["count"])]
    family("coredns_dns_request_duration_seconds", "histogram", "Histogram of the time (in seconds) each request took.",
           samples)
    cache = resolver.cache
    cz = {"server": base["server"], "view": "", "zones": "."}
    denial_entries = sum(1 for e in cache.entries.values() if not e.msg.answers)
    family("coredns_cache_hits_total", "counter", "The count of cache hits.",
           [("", _labels(**cz, type="success"), cache.hits - cache.denial_hits),
            ("", _labels(**cz, type="denial"), cache.denial_hits)])
    family("coredns_cache_misses_total", "counter", "The count of cache misses.", [("", _labels(**cz), cache.misses)])
    family("coredns_cache_entries", "gauge", "The number of elements in the cache.",
           [("", _labels(**cz, type="success"), len(cache.entries) - denial_entries),
            ("", _labels(**cz, type="denial"), denial_entries)])
    family("coredns_forward_requests_total", "counter", "Counter of requests made per upstream.",
           [("", _labels(to=to), c) for to, c in sorted(resolver.fwd_requests.items())])
    family("coredns_forward_responses_total", "counter", "Counter of responses received per upstream.",
           [("", _labels(to=to, rcode=wire.RCODE_NAMES.get(r, str(r))), c)
            for (to, r), c in sorted(resolver.fwd_responses.items())])
    fwd: list[tuple[str, str, float]] = []
    for to, hist in sorted(resolver.fwd_durations.items()):
        cum = 0
        for bound, c in zip([*wire.impl.BUCKETS, float("inf")], hist[:-1]):
            cum += int(c)
            fwd.append(("_bucket", _labels(to=to, le="+Inf" if bound == float("inf") else repr(bound)), cum))
        fwd += [("_sum", _labels(to=to), hist[-1]), ("_count", _labels(to=to), cum)]
    family("coredns_forward_request_duration_seconds", "histogram", "Histogram of the time each request took.", fwd)


class HealthServer:
    """/health, /ready and /metrics over a minimal HTTP/1.1 (one request per connection)."""

    def __init__(self, resolver: Resolver, host: str, port: int, dns: DNSServer | None = None) -> None:
        self.resolver = resolver
        self.dns = dns
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
            return 200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(self.resolver, self.dns)
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

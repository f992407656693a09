"""What one client may make the API server hold: connections, requests in flight, response buffers.

kube-apiserver's behaviour, read from k8s.io/apiserver (server/secure_serving.go, server/filters,
storage/cacher's slow-watcher handling), rebuilt on aiohttp/asyncio:

- A connection has --request-header-timeout (32 s, upstream's ReadHeaderTimeout) from accept to
  the end of its first request's header, TLS handshake included; an idle keep-alive connection is
  closed after --idle-connection-timeout (90 s, upstream's IdleTimeout).
- Requests in flight are capped (--max-requests-inflight / --max-mutating-requests-inflight); beyond
  the cap: 429 with Retry-After: 1. Watches are long-running and not counted; system:masters is
  never refused (a super-admin or loopback client always gets an answer), both as upstream.
- A request body must arrive within --request-timeout (60 s, upstream's default), else 504.
- A response is written in pieces of at most SEND_PIECE bytes into a transport whose buffer is
  capped at SEND_HIGH_WATER; a client that does not take the next piece within --send-timeout is
  disconnected (a watcher that falls behind is closed and relists, as the watch cache does). So a
  client that never reads holds about one piece plus the capped buffer, never a whole response.
- glibc: large blocks always come from mmap (returned at free) and the heap is trimmed when
  connections go away, so memory comes back after a burst of clients.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import Iterable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import StatusError

log = logging.getLogger("kproxy.apiserver.limits")

SEND_PIECE = 32 * 1024
SEND_HIGH_WATER = 64 * 1024
# asyncio's TLS protocol allocates (and zero-fills) a read buffer of this size per connection at
# accept, before the handshake: 256 KiB upstream, i.e. 256 MiB per 1,000 connections that never
# start TLS. One TLS record is at most 16 KiB + overhead: a 17 KiB buffer reads one at a time
# (a 10 MB list was not slower, bench_apiserver_limits.py).
SSL_READ_BUFFER = 17 * 1024

# glibc's heap is trimmed when this many descriptors have been closed since the last peak.
TRIM_AFTER_CLOSED = 64
TRIM_DEFER = 30.0

DEFAULT_REQUEST_HEADER_TIMEOUT = 32.0
DEFAULT_IDLE_CONNECTION_TIMEOUT = 90.0
DEFAULT_SEND_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_REQUESTS_INFLIGHT = 400
DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT = 200

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


class SlowClient(Exception):
    """The client did not take the next piece of a response within the send timeout."""


# -- process-wide settings (the API server is its own process) ----------------------------------

def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


_LIBC = _libc()


def tune_process() -> None:
    """File descriptors up to the hard limit, glibc malloc that gives memory back, small TLS buffers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError) as e:
            log.warning("event=rlimit_nofile_unchanged soft=%d hard=%d error=%s", soft, hard, e)
    if _LIBC is not None:
        # A fixed mmap threshold turns off glibc's dynamic one, which after the first free of a big
        # block (a list body, a TLS buffer) serves every later big block from the heap, where a few
        # live small objects pin it: the server stayed at 2.6 GB after 40 slow clients had gone.
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024)
        # One event loop thread plus SQLite's writer: more arenas only fragment.
        _LIBC.mallopt(_M_ARENA_MAX, 2)
    from asyncio import sslproto

    sslproto.SSLProtocol.max_size = SSL_READ_BUFFER


def trim_memory() -> None:
    """Give free heap pages back to the kernel (glibc only; elsewhere a no-op)."""
    # Transports and protocols form reference cycles; an idle server allocates too little for the
    # cyclic collector to run on its own, so the memory of closed connections would stay in use.
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# -- connections --------------------------------------------------------------------------------

class ConnectionGuard:
    """Closes connections that have not sent a whole request header within the header timeout.

    aiohttp arms only its keep-alive timer (one value for "before the first request" and "between
    requests"); upstream separates the two (32 s vs 90 s). Connections are tracked from accept
    (the protocol factory) until their first request reaches the middleware; a sweep once a second
    closes the late ones. TLS handshakes get the same bound through ssl_handshake_timeout.
    """

    def __init__(self, header_timeout: float) -> None:
        self.header_timeout = header_timeout
        # id(handler) -> accept time, until its first request. Ids, not the handlers: a reference
        # would keep a connection's objects alive after it closed (RequestHandler has no weakref
        # slot). Connected handlers are found through the aiohttp Server; an entry whose connection
        # went away is dropped when its time is up (an id is reused only by a newer accept, which
        # overwrites the entry).
        self._pending: dict[int, float] = {}
        self._server: web.Server | None = None
        self.closed_total = 0
        self.requests = 0  # requests started so far: a trim waits for a second without any
        self._task: asyncio.Task[None] | None = None

    def accepted(self, handler: RequestHandler) -> None:
        self._pending[id(handler)] = time.monotonic()

    def request_started(self, handler: object) -> None:
        self.requests += 1
        self._pending.pop(id(handler), None)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def sweep(self, now: float) -> int:
        """Closes the connections past their header deadline; returns how many were open."""
        deadline = now - self.header_timeout
        closed = 0
        pending = self._pending
        if self._server is not None and pending:
            for h in self._server.connections:
                t = pending.get(id(h))
                if t is not None and t <= deadline:
                    del pending[id(h)]
                    # abort, not close: a TLS close waits (up to 30 s) for the peer's close_notify.
                    if h.transport is not None:
                        h.transport.abort()
                    h.force_close()
                    closed += 1
        for key in [k for k, t in pending.items() if t <= deadline]:
            del pending[key]  # closed before its first request, or its TLS handshake timed out
        self.closed_total += closed
        return closed

    def start(self, server: web.Server) -> None:
        self._server = server
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        high = low = _open_fds()
        again: list[float] = []  # follow-up trims: closed connections' objects are freed over seconds
        due = 0.0  # a trim is owed since then (0: none)
        first = False  # the owed trim is the first after connections closed: follow-ups come after it
        requests = self.requests
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            closed = self.sweep(now)
            if closed:
                log.info("event=request_header_timeout closed=%d", closed)
            # Give memory back once many connections have gone (a trim walks the whole heap, so not
            # on every sweep). Open descriptors count every connection, also one still in its TLS
            # handshake, which no aiohttp object knows about yet.
            fds = _open_fds()
            high = max(high, fds)
            if high - fds >= TRIM_AFTER_CLOSED and fds <= low + (high - low) // 2:
                log.info("event=malloc_trim open_fds=%d peak_fds=%d", fds, high)
                high = low = fds
                due, first, again = due or now, True, []
            elif again and now >= again[0]:
                again.pop(0)
                due = due or now
            low = min(low, fds)
            # The trim (a full gc and malloc_trim: tens of ms) waits for a second without requests,
            # so that it does not stall a busy server's clients (3.5% of a watch fan-out's profile,
            # bench/README.md etcd), but at most TRIM_DEFER seconds.
            busy, requests = self.requests != requests, self.requests
            if due and (not busy or now - due >= TRIM_DEFER):
                trim_memory()
                if first:
                    again = [now + 5.0, now + 15.0]
                due, first = 0.0, False


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


# One read buffer for every connection (BufferedRequestHandler): the event loop reads, or decrypts,
# into it and the bytes are copied out at once, before the next read can start.
_READ_BUFFER = bytearray(64 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)


class BufferedRequestHandler(asyncio.BufferedProtocol):
    """aiohttp's RequestHandler behind a buffered protocol. uvloop's TLS transport reads a plain
    protocol's data with SSLObject.read(256 KiB): each read allocates 256 KiB, above the fixed mmap
    threshold (tune_process), i.e. an mmap, an mremap and a munmap per request. A buffered protocol
    gets the decrypted bytes in its own buffer, here one 64 KiB buffer shared by every connection
    (no memory per connection), and the handler a copy of just the bytes read: 5.8% less server
    CPU in a 50-watcher fan-out (bench/README.md etcd, session 9)."""

    __slots__ = ("handler",)

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.handler.connection_lost(exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.handler.data_received(bytes(_READ_VIEW[:nbytes]))

    def eof_received(self) -> None:  # aiohttp's handler answers None: the transport closes itself
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class GuardedSite(web.TCPSite):
    """aiohttp's TCPSite plus a TLS handshake timeout and accept-time tracking of each connection."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True, backlog=1024)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> BufferedRequestHandler:
            handler = server()
            guard.accepted(handler)
            return BufferedRequestHandler(handler)

        self._server = await loop.create_server(
            factory, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address,
            ssl_handshake_timeout=guard.header_timeout if self._ssl_context is not None else None)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


# -- requests in flight -------------------------------------------------------------------------

class InflightLimiter:
    """Caps concurrent non-long-running requests, read-only and mutating apart (0 = no cap)."""

    def __init__(self, max_readonly: int, max_mutating: int) -> None:
        self.limits = (max_readonly, max_mutating)
        self.current = [0, 0]

    def acquire(self, mutating: bool) -> bool:
        i = int(mutating)
        cap = self.limits[i]
        if cap and self.current[i] >= cap:
            return False
        self.current[i] += 1
        return True

    def release(self, mutating: bool) -> None:
        self.current[int(mutating)] -= 1


def too_many_requests() -> StatusError:
    return StatusError(429, "TooManyRequests", "Too many requests, please try again later.", retry_after=1)


# -- bounded sending ----------------------------------------------------------------------------

def cap_send_buffer(request: web.BaseRequest) -> None:
    """Lower the transport's write high-water mark: asyncio's TLS default lets 512 KiB queue up."""
    transport = request.transport
    if transport is not None:
        transport.set_write_buffer_limits(high=SEND_HIGH_WATER)


def pieces(parts: Iterable[bytes], size: int = SEND_PIECE) -> Iterable[bytes]:
    """Joins consecutive small parts into pieces of about `size` bytes (a big part stays whole)."""
    batch: list[bytes] = []
    n = 0
    for p in parts:
        batch.append(p)
        n += len(p)
        if n >= size:
            yield b"".join(batch)
            batch, n = [], 0
    if batch:
        yield b"".join(batch)


async def send(resp: web.StreamResponse, data: bytes, timeout: float) -> None:
    """Writes data piece by piece; SlowClient when the client stops taking it for `timeout` seconds."""
    view = memoryview(data)
    for off in range(0, len(data), SEND_PIECE):
        try:
            async with asyncio.timeout(timeout):
                # write() drains once more than 64 KiB is queued: every second piece.
                await resp.write(view[off:off + SEND_PIECE])
        except TimeoutError:
            raise SlowClient from None


def disconnect(request: web.BaseRequest) -> None:
    """Drops the connection at once with whatever is still queued for it, also in the kernel.

    close() would wait to flush to a client that does not read; a reset (SO_LINGER 0) frees the
    socket's send queue too and tells the client at once.
    """
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()

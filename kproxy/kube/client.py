"""A small asynchronous Kubernetes REST client: every verb (GET, POST, PUT, PATCH, DELETE) and
streaming watch, HTTP/1.1 over asyncio streams.

Only documented API behaviour: JSON over HTTP(S), bearer/basic/client-certificate auth, Status
bodies for errors, newline-delimited watch events. This speaks just enough HTTP/1.1 for that
(Content-Length request bodies; Content-Length, chunked and read-to-close response bodies;
keep-alive) instead of importing aiohttp's client: that import alone is about 12 MiB of RSS, a
fifth of kproxy-dns's 60 MiB budget at 10,000 Services (bench/bench_dns_memory.py). The node
programs (kproxy, kdns) only GET and watch; the control plane's controllers and agents write too,
with a larger pool of kept-alive connections (max_idle, idle_seconds, max_connections).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from typing import Any, Self, TypeVar
from urllib.parse import urlencode, urlsplit

from kproxy import __version__
from kproxy.kube.kubeconfig import ClusterAccess
from kproxy.kube.types import Status, decode_status

USER_AGENT = f"kproxy/{__version__}"
# StreamReader's buffer limit: a header line longer than this is refused; bodies are read in
# pieces of up to this size, and the reader buffers about twice that per connection.
_READ_LIMIT = 64 * 1024
# Kept-alive connections carry the pages of a list; after it the next GET is a relist, minutes or
# hours away, so an idle connection (and its buffers: 256 KiB for TLS alone) is closed after a
# second.
_IDLE_MAX = 4
_IDLE_SECONDS = 1.0


class ApiError(Exception):
    """A non-2xx answer from the API server, with the decoded Status."""

    def __init__(self, status: Status, method: str = "GET", path: str = "") -> None:
        self.status = status
        super().__init__(f"{method} {path}: {status.code} {status.reason or ''} {status.message}".strip())

    @property
    def code(self) -> int:
        return self.status.code

    @property
    def reason(self) -> str:
        return self.status.reason


class ProtocolError(ConnectionError):
    """The connection ended early or the answer is not the HTTP/1.1 expected. A ConnectionError,
    so callers retry it as they retry a dropped connection."""


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_T = TypeVar("_T")


async def _within(seconds: float | None, aw: Awaitable[_T]) -> _T:
    """aw, failing with TimeoutError after `seconds` (None: no limit). asyncio.timeout rather than
    wait_for: on Python 3.11, wait_for drops a cancellation that arrives as the awaited read
    completes, and a cancelled watch then sits in its next read for minutes."""
    if seconds is None:
        return await aw
    async with asyncio.timeout(seconds):
        return await aw


class _Response:
    """Status, headers and the body reader of one response on one connection."""

    def __init__(self, conn: _Conn, status: int, headers: dict[str, str]) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        self.complete = False  # body read to its end: the connection may carry another request

    @property
    def reusable(self) -> bool:
        return (self.complete and self.headers.get("connection", "").lower() != "close"
                and ("content-length" in self.headers or self._chunked))

    @property
    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    async def pieces(self, read_timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; read_timeout bounds each wait for data (a stalled stream)."""
        reader = self.conn[0]

        async def timed(aw: Awaitable[_T]) -> _T:
            return await _within(read_timeout, aw)

        try:
            if self._chunked:
                while True:
                    size_line = await timed(reader.readline())
                    if not size_line:
                        raise ProtocolError("connection closed inside a chunked body")
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while (await timed(reader.readline())).strip():
                            pass  # trailers: none are used
                        break
                    while size:
                        piece = await timed(reader.read(min(size, _READ_LIMIT)))
                        if not piece:
                            raise ProtocolError("connection closed inside a chunk")
                        size -= len(piece)
                        yield piece
                    if (await timed(reader.readexactly(2))) != b"\r\n":
                        raise ProtocolError("chunk not followed by CRLF")
            elif "content-length" in self.headers:
                left = int(self.headers["content-length"])
                while left > 0:
                    piece = await timed(reader.read(min(left, _READ_LIMIT)))
                    if not piece:
                        raise ProtocolError(f"connection closed with {left} bytes of the body unread")
                    left -= len(piece)
                    yield piece
            else:
                while piece := await timed(reader.read(_READ_LIMIT)):
                    yield piece
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise ProtocolError(f"bad response body: {err}") from err
        self.complete = True

    async def read(self) -> bytes:
        return b"".join([p async for p in self.pieces()])


class ApiClient:
    """Connections are opened on demand inside a running event loop; close() ends the idle ones."""

    def __init__(self, access: ClusterAccess, *, connect_timeout: float = 10.0,
                 request_timeout: float = 60.0, user_agent: str = USER_AGENT,
                 max_idle: int = _IDLE_MAX, idle_seconds: float = _IDLE_SECONDS,
                 max_connections: int = 0) -> None:
        """max_idle/idle_seconds: kept-alive connections (a controller writing all the time keeps
        more, longer, than a node program that lists once); max_connections > 0 bounds the
        requests in flight at once (watches, each on a connection of its own, are not counted)."""
        self.access = access
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._user_agent = user_agent
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(max_connections) if max_connections > 0 else None
        url = urlsplit(access.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"API server URL {access.server!r}: expected http(s)://host[:port]")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._host_header = url.netloc.rpartition("@")[2]
        self._prefix = url.path.rstrip("/")  # a server URL may carry a path (API behind a proxy)
        self._ssl = access.ssl_context()
        self._idle: list[tuple[_Conn, float]] = []  # (connection, loop time it became idle)
        self._reaper: asyncio.TimerHandle | None = None

    @property
    def server(self) -> str:
        return self.access.server

    async def _connect(self) -> _Conn:
        kw: dict[str, Any] = {}
        if self._ssl is not None:
            kw["ssl"] = self._ssl
            # tls-server-name: SNI and the certificate check use it instead of the URL's host.
            kw["server_hostname"] = self.access.tls_server_name or self._host
            kw["ssl_handshake_timeout"] = self._connect_timeout
        return await _within(self._connect_timeout,
                             asyncio.open_connection(self._host, self._port, limit=_READ_LIMIT, **kw))

    def _head(self, method: str, path: str, params: Mapping[str, str], body: bytes | None,
              content_type: str) -> bytes:
        target = self._prefix + path
        if params:
            target += ("&" if "?" in path else "?") + urlencode(params)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}", "Accept: application/json",
                 f"User-Agent: {self._user_agent}"]
        auth = self.access.auth_header()
        if auth:
            lines.append(f"Authorization: {auth}")
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + body if body is not None else head

    async def _send(self, conn: _Conn, head: bytes, read_timeout: float | None) -> _Response:
        reader, writer = conn
        writer.write(head)
        await writer.drain()
        try:
            line = await _within(read_timeout, reader.readline())
            if not line:
                raise ProtocolError("connection closed before the response")
            version, _, rest = line.partition(b" ")
            if not version.startswith(b"HTTP/1."):
                raise ProtocolError(f"not an HTTP/1.x response: {line[:80]!r}")
            status = int(rest[:3])
            headers: dict[str, str] = {}
            while (line := await _within(read_timeout, reader.readline())).strip():
                name, sep, value = line.decode("latin-1").partition(":")
                if not sep:
                    raise ProtocolError(f"bad header line: {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            if not line:
                raise ProtocolError("connection closed inside the response headers")
        except (asyncio.LimitOverrunError, ValueError) as err:
            raise ProtocolError(f"bad response head: {err}") from err
        return _Response(conn, status, headers)

    async def _open(self, head: bytes, *, reuse: bool, read_timeout: float | None) -> _Response:
        """Send the request on a kept-alive connection if there is one (falling back to a fresh
        connection when the server had closed it meanwhile), else on a new one."""
        while reuse and self._idle:
            conn = self._idle.pop()[0]
            if conn[0].at_eof():
                _close(conn)
                continue
            try:
                return await self._send(conn, head, read_timeout)
            except (ConnectionError, OSError):
                # Closed by the server while idle, before any answer: the request was not
                # processed, so it is sent again (as Go's transport does for any method).
                _close(conn)
        conn = await self._connect()
        try:
            return await self._send(conn, head, read_timeout)
        except BaseException:
            _close(conn)
            raise

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """GET path and return the body; non-2xx raises ApiError with the server's Status."""
        return await self.request("GET", path, params)

    async def request(self, method: str, path: str, params: Mapping[str, str] | None = None,
                      body: bytes | None = None, content_type: str = "application/json") -> bytes:
        """One request; returns the response body, non-2xx raises ApiError with the server's
        Status."""
        head = self._head(method, path, params or {}, body, content_type)
        if self._slots is None:
            status, answer = await self._exchange(head)
        else:
            async with self._slots:
                status, answer = await self._exchange(head)
        if status >= 300:
            raise ApiError(decode_status(answer, status), method, path)
        return answer

    async def _exchange(self, head: bytes) -> tuple[int, bytes]:
        async with asyncio.timeout(self._request_timeout):
            resp = await self._open(head, reuse=True, read_timeout=None)
            try:
                answer = await resp.read()
            finally:
                if resp.reusable:
                    self._park(resp.conn)
                else:
                    _close(resp.conn)
        return resp.status, answer

    async def watch(self, path: str, params: Mapping[str, str], *,
                    read_timeout: float) -> AsyncIterator[bytes]:
        """Open a watch and yield one raw JSON event per line until the server ends the stream.

        A watch has a connection of its own, closed when the stream ends or the caller stops
        iterating. Lines are split by hand: a large EndpointSlice event can be longer than any
        sensible line limit."""
        query = dict(params)
        query["watch"] = "true"
        async with asyncio.timeout(self._connect_timeout + read_timeout):
            resp = await self._open(self._head("GET", path, query, None, ""), reuse=False,
                                    read_timeout=read_timeout)
        try:
            if resp.status >= 300:
                body = await _within(read_timeout, resp.read())
                raise ApiError(decode_status(body, resp.status), "WATCH", path)
            buf = bytearray()
            async with contextlib.aclosing(resp.pieces(read_timeout)) as pieces:
                async for chunk in pieces:
                    buf += chunk
                    start = 0
                    while True:
                        nl = buf.find(b"\n", start)
                        if nl < 0:
                            break
                        if nl > start:
                            yield bytes(buf[start:nl])
                        start = nl + 1
                    if start:
                        del buf[:start]
            if buf.strip():
                yield bytes(buf)
        finally:
            _close(resp.conn)

    def _park(self, conn: _Conn) -> None:
        if len(self._idle) >= self._max_idle:
            _close(conn)
            return
        loop = asyncio.get_running_loop()
        self._idle.append((conn, loop.time()))
        if self._reaper is None:
            self._reaper = loop.call_later(self._idle_seconds, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._idle_seconds
        for conn, since in self._idle:
            if since <= cutoff:
                _close(conn)
        self._idle = [(c, since) for c, since in self._idle if since > cutoff]
        if self._idle:
            self._reaper = loop.call_later(self._idle[0][1] - cutoff, self._reap)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            _close(conn)
        if idle:
            # Lets the transports finish closing (TLS close_notify) before the loop goes away.
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _close(conn: _Conn) -> None:
    writer = conn[1]
    if not writer.is_closing():
        writer.close()

"""The small HTTP/1.1 server of kproxy's own endpoints: /healthz and /livez (healthz bind
address), /metrics, /proxyMode and /healthz (metrics bind address). GET and HEAD only.

Why not aiohttp: importing aiohttp.web cost the node daemon ~12 MiB of RSS (measured:
28 MiB for kproxy's other imports, 40 MiB with it) for a handful of fixed routes, and RSS
at 10,000 Services is one of issue 15's goals. The peers are untrusted (anything that can reach
the port): a request head is read within HEAD_TIMEOUT and at most MAX_HEAD bytes (else 400 or
431, or the connection is dropped), at most MAX_CONNECTIONS are served at once (more are closed
at once), a body is never read, and every connection carries one request (Connection: close),
so nothing a client sends can grow or stay. Probes (kubelet, load balancers) and Prometheus
open a connection per request or handle a close.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # request line + headers; Go's net/http allows 1 MiB, probes send ~200 bytes
HEAD_TIMEOUT = 10.0  # seconds to send the whole head
WRITE_TIMEOUT = 10.0  # seconds for a client to take the answer
MAX_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())


Handler = Callable[[], Response]
NOT_FOUND = Response(404, b"404 page not found\n")  # Go's http.NotFound, as upstream answers


class HTTPServer:
    def __init__(self, routes: Mapping[str, Handler], head_timeout: float = HEAD_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.routes = dict(routes)
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._active = 0

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (port 0: the kernel picks); the first bound address as IP:port
        ([IP]:port for IPv6). OSError if it cannot."""
        self._server = await asyncio.start_server(self._serve, host or None, port, limit=MAX_HEAD,
                                                  reuse_address=True)
        ip, bound = self._server.sockets[0].getsockname()[:2]
        return f"[{ip}]:{bound}" if ":" in ip else f"{ip}:{bound}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self.max_connections:
            writer.transport.abort()
            return
        self._active += 1
        stuck = True  # unless the answer went out: abort, dropping what a client did not take
        try:
            answer = await self._answer(reader)
            if answer is not None:
                writer.write(answer)
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
            stuck = False
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._active -= 1
            if stuck:
                writer.transport.abort()
            else:
                writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
        except asyncio.LimitOverrunError:
            return _encode(Response(431, b"431 Request Header Fields Too Large\n"), head_only=False)
        except (asyncio.IncompleteReadError, TimeoutError):
            return None  # closed or too slow before a whole head: nothing to answer
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) != 3 or not line[2].startswith(b"HTTP/1."):
            return _encode(Response(400, b"400 Bad Request\n"), head_only=False)
        method, target = line[0], line[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _encode(Response(405, b"405 Method Not Allowed\n", headers=(("Allow", "GET, HEAD"),)),
                           head_only=False)
        handler = self.routes.get(target.decode("latin-1"))
        try:
            response = handler() if handler is not None else NOT_FOUND
        except Exception:  # a bug in one handler answers 500 and keeps the server
            log.exception("handler of %r failed", target)
            response = Response(500, b"500 Internal Server Error\n")
        return _encode(response, head_only=method == b"HEAD")


def _encode(r: Response, head_only: bool) -> bytes:
    reason = HTTPStatus(r.status).phrase
    lines = [f"HTTP/1.1 {r.status} {reason}", f"Content-Type: {r.content_type}",
             f"Content-Length: {len(r.body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in r.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + r.body

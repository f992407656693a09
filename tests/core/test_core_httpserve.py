"""kproxy's own HTTP endpoints (kproxy.httpserve) on real loopback sockets: routes, HEAD, the
errors a hostile or broken client gets, and the bounds it cannot push past (head size, time,
connections)."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from kproxy.httpserve import MAX_HEAD, HTTPServer, Response


def _routes() -> dict[str, object]:
    calls = {"n": 0}

    def ok() -> Response:
        calls["n"] += 1
        return Response(200, b'{"ok": true}', "application/json", (("X-Content-Type-Options", "nosniff"),))

    def broken() -> Response:
        raise RuntimeError("a bug")

    return {"/healthz": ok, "/broken": broken, "calls": calls}


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def _serve(coro_factory, **kw):  # type: ignore[no-untyped-def]
    routes = _routes()
    calls = routes.pop("calls")

    async def main() -> object:
        server = HTTPServer(routes, **kw)  # type: ignore[arg-type]
        bound = await server.start("127.0.0.1", 0)
        port = int(bound.rsplit(":", 1)[1])
        try:
            return await coro_factory(port)
        finally:
            await server.close()

    return asyncio.run(main()), calls


def test_get_head_404_405_and_a_handler_bug() -> None:
    async def run(port: int) -> list[bytes]:
        return [await _exchange(port, r) for r in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz?verbose=1 HTTP/1.0\r\n\r\n",
            b"HEAD /healthz HTTP/1.1\r\n\r\n",
            b"GET /nope HTTP/1.1\r\n\r\n",
            b"POST /healthz HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /broken HTTP/1.1\r\n\r\n",
            b"garbage\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",  # the server still answers after all of the above
        )]
    (get, query, head, missing, post, broken, garbage, after), calls = _serve(run)
    assert get.startswith(b"HTTP/1.1 200 OK\r\n") and get.endswith(b'\r\n\r\n{"ok": true}'), get
    assert b"Content-Type: application/json\r\n" in get and b"Content-Length: 12\r\n" in get
    assert b"X-Content-Type-Options: nosniff\r\n" in get and b"Connection: close\r\n" in get
    assert query.startswith(b"HTTP/1.1 200 OK")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n") and b"Content-Length: 12" in head
    assert missing.startswith(b"HTTP/1.1 404 Not Found") and missing.endswith(b"404 page not found\n")
    assert post.startswith(b"HTTP/1.1 405 Method Not Allowed") and b"Allow: GET, HEAD\r\n" in post
    assert broken.startswith(b"HTTP/1.1 500 Internal Server Error")
    assert garbage.startswith(b"HTTP/1.1 400 Bad Request")
    assert after.startswith(b"HTTP/1.1 200 OK")
    assert calls == {"n": 4}  # GET, GET with a query, HEAD, the last GET; POST never reached it


def test_an_oversized_head_gets_431_and_a_silent_client_is_dropped() -> None:
    async def run(port: int) -> tuple[bytes, bytes, float]:
        big = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
        too_big = await _exchange(port, big)
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # never finishes its head
        await writer.drain()
        silent = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return too_big, silent, time.monotonic() - t0
    (too_big, silent, waited), calls = _serve(run, head_timeout=0.5)
    assert too_big.startswith(b"HTTP/1.1 431 Request Header Fields Too Large"), too_big[:80]
    assert silent == b"" and 0.4 < waited < 4.5
    assert calls == {"n": 0}


def test_connections_beyond_the_limit_are_closed_and_the_server_recovers() -> None:
    async def run(port: int) -> tuple[list[bytes], bytes]:
        held = []
        for _ in range(3):  # three clients that connect and say nothing hold the three slots
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.1)
        refused = []
        for _ in range(3):
            try:
                refused.append(await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n"))
            except ConnectionResetError:
                refused.append(b"")
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        return refused, await _exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
    (refused, later), calls = _serve(run, max_connections=3, head_timeout=30)
    assert refused == [b"", b"", b""]
    assert later.startswith(b"HTTP/1.1 200 OK")
    assert calls == {"n": 1}


def test_a_busy_port_raises_oserror() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()

        async def main() -> None:
            with pytest.raises(OSError):
                await HTTPServer({}).start("127.0.0.1", busy.getsockname()[1])

        asyncio.run(main())

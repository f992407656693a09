"""kproxy.kube.client's HTTP/1.1 framing against a raw loopback server whose bytes the test
writes: the cases the real API server does not produce on demand (chunks split mid-line, a
read-to-close body, a kept-alive connection the server closed while it sat idle, a stalled watch).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from kproxy.kube.client import ApiClient, ApiError
from kproxy.kube.kubeconfig import ClusterAccess, TokenSource

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[bytes], list[int]]]:
    """handler(request_head, reader, writer) answers one request; True keeps the connection for
    another. Yields the URL, the request heads seen and one entry per accepted connection."""
    heads: list[bytes] = []
    conns: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(len(conns))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                heads.append(head)
                if not await handler(head, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads, conns
    finally:
        server.close()
        await server.wait_closed()


def _client(url: str, **kw: Any) -> ApiClient:
    return ApiClient(ClusterAccess(server=url, token=TokenSource("t0k")), **kw)


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.timeout(20)
def test_get_reuses_the_connection_and_reads_every_body_framing() -> None:
    bodies = [b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(b'{"b"', b":2}"),
              (b"HTTP/1.1 404 Not Found\r\nContent-Length: 49\r\n\r\n"
              b'{"kind":"Status","code":404,"reason":"NotFound"}\n')]

    async def handler(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(bodies.pop(0))
        await writer.drain()
        return True

    async def main() -> None:
        async with raw_server(handler) as (url, seen, conns), _client(url) as c:
            assert await c.get("/api/v1/things", {"labelSelector": "!a/b", "limit": "2"}) == b'{"a":1}'
            assert await c.get("/api/v1/things") == b'{"b":2}'
            with pytest.raises(ApiError) as err:
                await c.get("/api/v1/things/x")
            assert (err.value.code, err.value.status.reason) == (404, "NotFound")
            assert len(conns) == 1  # one kept-alive connection carried all three
            first = seen[0].decode()
            assert first.startswith("GET /api/v1/things?labelSelector=%21a%2Fb&limit=2 HTTP/1.1\r\n")
            assert "Authorization: Bearer t0k\r\n" in first and "Host: 127.0.0.1:" in first

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_a_pooled_connection_closed_by_the_server_is_replaced() -> None:
    async def handler(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # close after every answer, without saying Connection: close

    async def main() -> None:
        async with raw_server(handler) as (url, _, conns), _client(url) as c:
            for _ in range(3):
                assert await c.get("/x") == b"ok"
            assert len(conns) == 3

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_watch_splits_lines_across_chunks_and_reads_to_close() -> None:
    async def handler(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if b"watch=true" in head and b"chunked" not in head:
            # No framing at all: the body ends when the connection does.
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n{\"n\":1}\n{\"n\"")
            await writer.drain()
            writer.write(b":2}\n")
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(_chunked(b'{"n":1}\n{"n', b'":2}\n\n{"n":', b"3}"))
        return True

    async def main() -> None:
        async with raw_server(handler) as (url, _, _c), _client(url) as c:
            lines = [x async for x in c.watch("/w", {"chunked": "1"}, read_timeout=5)]
            assert lines == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
            lines = [x async for x in c.watch("/w", {}, read_timeout=5)]
            assert lines == [b'{"n":1}', b'{"n":2}']

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_a_stalled_watch_times_out_and_a_cut_one_is_a_connection_error() -> None:
    async def handler(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"8\r\n{\"n\":1}\n\r\n")
        await writer.drain()
        if b"cut" in head:
            writer.write(b"20\r\n{\"n\":")  # a chunk that never completes
            await writer.drain()
            return False
        await asyncio.sleep(5)
        return False

    async def main() -> None:
        async with raw_server(handler) as (url, _, _c), _client(url) as c:
            got: list[bytes] = []
            with pytest.raises(TimeoutError):
                async for line in c.watch("/w", {}, read_timeout=0.3):
                    got.append(line)
            assert got == [b'{"n":1}']
            with pytest.raises(ConnectionError):
                async for line in c.watch("/w", {"cut": "1"}, read_timeout=5):
                    pass

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_writes_send_their_body_and_the_in_flight_bound_holds() -> None:
    """POST/PUT/PATCH/DELETE (the control plane's writes): method, Content-Type and Content-Length
    on the wire, the body read back whole by the server; with max_connections=2, never more than
    two requests at the server at once, and the kept-alive connections carry the rest."""
    bodies: list[bytes] = []
    at_once = [0, 0]  # now, most

    async def handler(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        bodies.append(await reader.readexactly(length))
        at_once[0] += 1
        at_once[1] = max(at_once)
        await asyncio.sleep(0.02)
        at_once[0] -= 1
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        return True

    async def main() -> None:
        async with raw_server(handler) as (url, seen, conns), _client(url, max_connections=2, max_idle=2) as c:
            assert await c.request("POST", "/api/v1/namespaces/d/pods", body=b'{"kind":"Pod"}') == b"{}"
            await c.request("PATCH", "/p", body=b'{"a":1}', content_type="application/merge-patch+json")
            head = seen[1].decode()
            assert head.startswith("PATCH /p HTTP/1.1\r\n")
            assert "Content-Type: application/merge-patch+json\r\n" in head and "Content-Length: 7\r\n" in head
            await asyncio.gather(*(c.request("PUT", f"/x/{i}", body=b"%d" % i) for i in range(8)))
            await c.request("DELETE", "/x/0", body=b"{}")
            assert seen[-1].startswith(b"DELETE /x/0 HTTP/1.1\r\n")
            assert bodies[:2] == [b'{"kind":"Pod"}', b'{"a":1}'] and sorted(bodies[2:10]) == [b"%d" % i for i in range(8)]
            assert at_once[1] == 2
            assert len(conns) == 2  # kept alive: the two connections carried all eleven requests

    asyncio.run(main())

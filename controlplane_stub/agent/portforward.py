"""kubectl port-forward's protocol (portforward.k8s.io over SPDY), the kubelet's side.

For each local connection kubectl opens two SPDY streams with the headers streamType (error or
data), port and requestID: the data stream carries the connection's bytes both ways, the error
stream carries, from here, a message if the connection to the pod failed (then FIN). Connections
go from the node (its network namespace) to the pod IP and the port asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from controlplane_stub.agent import spdy

log = logging.getLogger("kpc.agent.portforward")
PROTOCOLS = ("SPDY/3.1+portforward.k8s.io",)
MAX_STREAMS = 256  # open streams per session: a client cannot make this side hold more sockets
ERROR_STREAM_WAIT = 5.0
INBOX_FRAMES = 16

Connect = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def parse_port(value: str) -> int | None:
    if not (value.isascii() and value.isdigit()) or len(value) > 5:
        return None
    port = int(value)
    return port if 0 < port < 65536 else None


@dataclass
class Request:
    """The two streams of one forwarded connection."""

    error_stream: int = 0
    data_stream: int = 0
    error_known: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    # What the client sent for the pod, None at its FIN. Bounded: a full inbox holds the session's
    # reading (and so the client) until the pod takes the data, as TCP would.
    inbox: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(INBOX_FRAMES))


class PortForwardSession:
    def __init__(self, ws: web.WebSocketResponse, connect: Connect, pod: str) -> None:
        self.ws = ws
        self.connect = connect
        self.pod = pod
        self.framer = spdy.Framer()
        self.requests: dict[str, Request] = {}
        self.by_stream: dict[int, Request] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(frame)

    async def reply(self, stream_id: int) -> None:
        # The reply's header block goes through the session's one deflate context: compress and
        # send under the lock, so the blocks reach the peer in the order they were compressed.
        async with self._send_lock:
            await self.ws.send_bytes(self.framer.syn_reply(stream_id, {}))

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != WSMsgType.BINARY:
                    continue
                for frame in self.framer.feed(msg.data):
                    await self.handle(frame)
        except spdy.SpdyError as e:
            log.info("pod=%s port-forward session ended: %s", self.pod, e)
            await self.send(self.framer.goaway(0, 1))
        finally:
            for r in self.requests.values():
                if r.task is not None:
                    r.task.cancel()
                if r.writer is not None:
                    r.writer.close()

    async def handle(self, f: spdy.Frame) -> None:
        if not f.control:
            r = self.by_stream.get(f.stream_id)
            if r is None or f.stream_id != r.data_stream:
                return  # the error stream's FIN, or data for a connection already gone
            if f.data:
                await r.inbox.put(f.data)
            if f.flags & spdy.FLAG_FIN:
                await r.inbox.put(None)
            return
        if f.type == spdy.PING:
            await self.send(self.framer.ping(f.value))
        elif f.type == spdy.RST_STREAM:
            r = self.by_stream.get(f.stream_id)
            if r is not None and r.task is not None:
                r.task.cancel()
        elif f.type == spdy.SYN_STREAM:
            await self.open(f)

    async def open(self, f: spdy.Frame) -> None:
        kind, rid = f.headers.get("streamtype", ""), f.headers.get("requestid", "")
        port = parse_port(f.headers.get("port", ""))
        if kind not in ("error", "data") or port is None or len(self.by_stream) >= MAX_STREAMS:
            await self.send(self.framer.rst(f.stream_id, spdy.RST_REFUSED_STREAM))
            return
        await self.reply(f.stream_id)
        r = self.requests.setdefault(rid, Request())
        self.by_stream[f.stream_id] = r
        if kind == "error":
            r.error_stream = f.stream_id
            r.error_known.set()
        else:
            r.data_stream = f.stream_id
            r.task = asyncio.create_task(self.forward(rid, r, port))

    @staticmethod
    async def _to_pod(r: Request) -> None:
        """The client's bytes to the pod (dropped when the connection could not be made)."""
        try:
            while (data := await r.inbox.get()) is not None:
                if r.writer is not None:
                    r.writer.write(data)
                    await r.writer.drain()
            if r.writer is not None and r.writer.can_write_eof():
                r.writer.write_eof()
        except OSError:
            pass  # the pod closed: the other direction ends the request

    async def forward(self, rid: str, r: Request, port: int) -> None:
        error = ""
        try:
            reader, r.writer = await asyncio.wait_for(self.connect(port), 10)
        except (OSError, TimeoutError) as e:
            error = f"error forwarding port {port} to pod {self.pod}: {e}"
        to_pod = asyncio.create_task(self._to_pod(r))
        try:
            if not error:
                while data := await reader.read(spdy.MAX_DATA):
                    await self.send(self.framer.data(r.data_stream, data))
            await self.send(self.framer.data(r.data_stream, b"", fin=True))
            try:
                await asyncio.wait_for(r.error_known.wait(), ERROR_STREAM_WAIT)
                await self.send(self.framer.data(r.error_stream, error.encode(), fin=True))
            except TimeoutError:
                pass
        except (ConnectionResetError, OSError):
            pass
        finally:
            to_pod.cancel()
            while not r.inbox.empty():  # a frame waiting for room goes in, and is dropped
                r.inbox.get_nowait()
            if r.writer is not None:
                r.writer.close()
            self.requests.pop(rid, None)
            for sid in (r.data_stream, r.error_stream):
                self.by_stream.pop(sid, None)

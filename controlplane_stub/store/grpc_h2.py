"""gRPC over HTTP/2 on the asyncio event loop: the etcd client's transport (etcd_client.py).

Why not grpc.aio: its calls are completed on gRPC's own threads (event engine, poller) and handed
to the event loop, so every etcd transaction of an API create waited for two thread hops and
cost ~26% of the server's event-loop time in profiles of the watch fan-out (bench/README.md etcd).
Here a call is one write of a HEADERS and a DATA frame and a few frames parsed in
data_received, on the loop that awaits it. Only what a gRPC client of etcd needs is implemented:

- requests: a header block built once per method (literal fields, never indexed, so the server's
  HPACK table is never touched by us), the message in DATA frames, honouring the server's
  connection and stream send windows (queued while they are exhausted);
- responses: frames parsed from the byte stream; header blocks decoded by the `hpack` package
  (the server's encoder uses its dynamic table, so every block must go through one decoder in
  order); length-prefixed messages, at most MAX_MESSAGE bytes each; receive windows replenished
  as data is consumed;
- SETTINGS, PING (answered; our own keep-alive ping while streams are open: a member that hangs
  is dropped within 2 x KEEPALIVE), GOAWAY (streams the server did not take fail as not sent,
  so the caller may send them again), RST_STREAM, CONTINUATION.

Everything read from the server is bounded (frame size, header list size, message size) before it
is buffered; a protocol violation closes the connection and fails its calls as UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import ssl
import struct
import time
import urllib.parse
from collections import deque
from typing import cast

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM = FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
_FRAME = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: the 9-byte frame header
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_MSG = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length

MAX_FRAME = 16384  # what we accept (the default; etcd's gRPC server sends no larger frames)
STREAM_WINDOW = 16 << 20  # our receive window per stream, and the connection's
CONN_WINDOW = 64 << 20
READ_AHEAD = 256  # messages a streaming call may hold unread before its window stops growing
MAX_MESSAGE = 256 << 20  # one response message (a range of a big prefix)
MAX_HEADER_LIST = 64 << 10
SEND_DEFER_TURNS = 4
KEEPALIVE = 6.0  # etcd's server strikes pings closer than 5 s apart

# gRPC status codes (the ones this module produces; others come from the server's trailers)
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = \
    0, 1, 2, 4, 8, 12, 13, 14
CODE_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
              5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
              9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL",
              14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}
_RST_REFUSED, _RST_CANCEL = 0x7, 0x8


class GrpcError(Exception):
    def __init__(self, code: int, message: str, *, sent: bool = True) -> None:
        super().__init__(f"{CODE_NAMES.get(code, str(code))}: {message}")
        self.code = code
        self.message = message
        # False: the server has not processed the request (refused, or never written): safe to send again.
        self.sent = sent

    @property
    def code_name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_str(s: bytes) -> bytes:
    return _hpack_int(len(s), 7, 0) + s


def request_headers(path: str, authority: str, tls: bool) -> bytes:
    """The header block of a gRPC request, without indexing (RFC 7541 6.2.2), names from the static table."""
    return b"".join([
        b"\x83",  # :method POST (static 3)
        b"\x87" if tls else b"\x86",  # :scheme https (7) / http (6)
        _hpack_int(4, 4, 0) + _hpack_str(path.encode()),  # :path (static name 4)
        _hpack_int(1, 4, 0) + _hpack_str(authority.encode()),  # :authority (1)
        _hpack_int(31, 4, 0) + _hpack_str(b"application/grpc"),  # content-type (31)
        b"\x00" + _hpack_str(b"te") + _hpack_str(b"trailers"),
        b"\x00" + _hpack_str(b"user-agent") + _hpack_str(b"kproxy-apiserver etcd client"),
    ])


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) << 8 | ftype, flags, sid) + payload


def _http_status_code(status: bytes) -> int:
    """gRPC's mapping of an HTTP status that is not 200 (doc/http-grpc-status-mapping.md)."""
    return {b"400": INTERNAL, b"401": 16, b"403": 7, b"404": UNIMPLEMENTED, b"429": UNAVAILABLE,
            b"502": UNAVAILABLE, b"503": UNAVAILABLE, b"504": UNAVAILABLE}.get(status, UNKNOWN)


class Stream:
    """One gRPC call on a connection: messages received so far, and how it ended."""

    __slots__ = (
        "buf",
        "conn",
        "done",
        "error",
        "got_headers",
        "local_closed",
        "messages",
        "out",
        "out_end",
        "recv_unacked",
        "send_window",
        "sid",
        "timer",
        "unary",
        "waiter",
    )

    def __init__(self, conn: Connection, sid: int, unary: bool, send_window: int) -> None:
        self.conn = conn
        self.sid = sid
        self.unary = unary
        self.buf = bytearray()
        self.messages: deque[bytes] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: GrpcError | None = None
        self.got_headers = False
        self.send_window = send_window
        self.out = bytearray()  # DATA waiting for flow-control window
        self.out_end = False
        self.local_closed = False
        self.recv_unacked = 0
        self.timer: asyncio.TimerHandle | None = None

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def send(self, message: bytes, end: bool = False) -> None:
        self.conn.send(self, message, end)

    def close_send(self) -> None:
        self.conn.end_stream(self)

    def cancel(self) -> None:
        self.conn.reset(self, _RST_CANCEL, GrpcError(CANCELLED, "cancelled by the client"))

    def expire_at(self, when: float) -> None:
        """Reset the call with DEADLINE_EXCEEDED at loop time `when` unless it ended before."""
        self.conn.expire_at(self, when)

    async def read(self) -> bytes | None:
        """The next message; None at a clean end (status OK); GrpcError when the call failed."""
        while not self.messages:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        if self.recv_unacked >= STREAM_WINDOW // 2 and len(self.messages) <= READ_AHEAD:
            self.conn.window_update(self)  # the reader caught up: the server may send on
        return self.messages.popleft()

    async def result(self) -> bytes:
        """A unary call's one response message."""
        if not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
        if self.error is not None:
            raise self.error
        if len(self.messages) != 1:
            raise GrpcError(INTERNAL, f"unary call got {len(self.messages)} messages")
        return self.messages[0]


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to one server; calls are streams on it (client side only)."""

    def __init__(self, authority: str, tls: bool) -> None:
        self.authority = authority
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False  # lost, or no new streams (GOAWAY, ids exhausted)
        self.error = ""
        self._buf = bytearray()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._decoded: dict[bytes, dict[bytes, bytes]] = {}
        self._streams: dict[int, Stream] = {}
        self._blocked: dict[int, Stream] = {}  # streams with DATA waiting for window, in order
        self._next_sid = 1
        self._send_window = 65535
        self._peer_initial_window = 65535
        self._peer_max_frame = 16384
        self._recv_unacked = 0
        self._cont: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self._blocks: dict[str, bytes] = {}
        self._last_recv = time.monotonic()
        self._ping_out = False
        self._keepalive: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._wbuf: list[bytes] = []
        self._deferred = 0
        # Deadlines in the order they fall (calls made with one timeout come in that order) and one
        # timer for the first: a TimerHandle per call (made, pushed on the loop's heap, cancelled)
        # was ~4% of the API server's CPU in the 50-watcher fan-out (bench/README.md etcd).
        self._deadlines: deque[tuple[float, Stream]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (0x2, 0),  # ENABLE_PUSH off
            (0x4, STREAM_WINDOW),  # INITIAL_WINDOW_SIZE
            (0x6, MAX_HEADER_LIST),  # MAX_HEADER_LIST_SIZE
        ))
        transport.write(PREFACE + _frame(SETTINGS, 0, 0, settings)
                        + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONN_WINDOW - 65535)))
        self._keepalive = self._loop.call_later(KEEPALIVE, self._tick)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.error:
            self.error = f"connection lost: {exc}" if exc else "connection closed"
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadlines.clear()  # the streams below all end now
        if not self.ready.done():
            self.ready.set_exception(GrpcError(UNAVAILABLE, self.error, sent=False))
            self.ready.exception()  # retrieved: whoever waits sees it, nobody waiting is fine too
        for st in list(self._streams.values()):
            self._finish(st, GrpcError(UNAVAILABLE, self.error))

    def data_received(self, data: bytes) -> None:
        self._last_recv = time.monotonic()
        buf = self._buf
        buf += data
        off, n = 0, len(buf)
        while n - off >= 9:
            lt, flags, sid = _FRAME.unpack_from(buf, off)
            length = lt >> 8
            if length > MAX_FRAME:
                self._fail(f"frame of {length} bytes (max {MAX_FRAME})")
                return
            end = off + 9 + length
            if end > n:
                break
            payload = bytes(buf[off + 9:end])
            off = end
            try:
                self._frame(lt & 0xFF, flags, sid & 0x7FFFFFFF, payload)
            except (hpack.HPACKError, struct.error, ValueError, UnicodeDecodeError) as e:
                self._fail(f"bad frame from the server: {e}")
                return
            if self.transport is None or self.transport.is_closing():
                return
        del buf[:off]

    # -- receiving -----------------------------------------------------------------------------

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._cont is not None and ftype != CONTINUATION:
            raise ValueError("header block interrupted")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            if flags & FLAG_PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & FLAG_PRIORITY:
                payload = payload[5:]
            if flags & FLAG_END_HEADERS:
                self._headers(sid, payload, flags & FLAG_END_STREAM)
            else:
                self._cont = (sid, flags, bytearray(payload))
        elif ftype == CONTINUATION:
            if self._cont is None or self._cont[0] != sid:
                raise ValueError("unexpected CONTINUATION")
            block = self._cont[2]
            block += payload
            if len(block) > MAX_HEADER_LIST:
                raise ValueError("header block too large")
            if flags & FLAG_END_HEADERS:
                first = self._cont[1]
                self._cont = None
                self._headers(sid, bytes(block), first & FLAG_END_STREAM)
        elif ftype == WINDOW_UPDATE:
            inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self._send_window += inc
            elif (st := self._streams.get(sid)) is not None:
                st.send_window += inc
            if self._blocked:
                self._flush()
        elif ftype == RST_STREAM:
            st = self._streams.get(sid)
            if st is not None:
                code = _U32.unpack(payload)[0]
                if code == _RST_REFUSED:
                    self._finish(st, GrpcError(UNAVAILABLE, "stream refused", sent=False))
                elif code == _RST_CANCEL:
                    self._finish(st, GrpcError(CANCELLED, "stream cancelled by the server"))
                else:
                    self._finish(st, GrpcError(INTERNAL, f"stream reset by the server (HTTP/2 error {code})"))
        elif ftype == SETTINGS:
            if flags & FLAG_ACK:
                return
            for i in range(0, len(payload) - len(payload) % 6, 6):
                key, value = _SETTING.unpack_from(payload, i)
                if key == 0x4:
                    delta = value - self._peer_initial_window
                    self._peer_initial_window = value
                    for st in self._streams.values():
                        st.send_window += delta
                elif key == 0x5:
                    self._peer_max_frame = value
            self._write(_frame(SETTINGS, FLAG_ACK, 0))
            if not self.ready.done():
                self.ready.set_result(None)
            if self._blocked:
                self._flush()
        elif ftype == PING:
            if flags & FLAG_ACK:
                self._ping_out = False
            else:
                self._write(_frame(PING, FLAG_ACK, 0, payload))
        elif ftype == GOAWAY:
            last = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
            code = _U32.unpack_from(payload, 4)[0]
            self.closed = True
            self.error = f"server going away (HTTP/2 error {code}: {payload[8:200].decode('utf-8', 'replace')})"
            for st in [s for s in self._streams.values() if s.sid > last]:
                self._finish(st, GrpcError(UNAVAILABLE, self.error, sent=False))
            self._close_if_idle()
        # PRIORITY, PUSH_PROMISE (disabled in our SETTINGS), unknown types: ignored

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        n = len(payload)
        self._recv_unacked += n
        if self._recv_unacked >= CONN_WINDOW // 2:
            self._write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked)))
            self._recv_unacked = 0
        st = self._streams.get(sid)
        if st is None:
            return  # a stream we reset: its late DATA only counts for the connection's window
        if flags & FLAG_PADDED:
            payload = payload[1:len(payload) - payload[0]]
        end = flags & FLAG_END_STREAM
        st.recv_unacked += n
        buf = st.buf
        if not buf and len(payload) >= 5:
            flag, mlen = _MSG.unpack_from(payload)
            if len(payload) == 5 + mlen and not flag:  # the usual case: one whole message in one frame
                self._message(st, payload[5:])
                payload = b""
        if payload:
            buf += payload
            while len(buf) >= 5:
                flag, mlen = _MSG.unpack_from(buf)
                if flag:
                    self.reset(st, _RST_CANCEL, GrpcError(INTERNAL, "compressed message (none was asked for)"))
                    return
                if mlen > MAX_MESSAGE:
                    self.reset(st, _RST_CANCEL, GrpcError(RESOURCE_EXHAUSTED, f"message of {mlen} bytes"))
                    return
                if len(buf) < 5 + mlen:
                    break
                self._message(st, bytes(buf[5:5 + mlen]))
                del buf[:5 + mlen]
        if end:
            if not st.done:
                self._finish(st, GrpcError(INTERNAL, "stream ended without a gRPC status"))
        elif st.unary or len(st.messages) < READ_AHEAD:
            self.window_update(st)

    def window_update(self, st: Stream) -> None:
        """Lets the server send more on a stream once half its window is used, but on a streaming
        call only while its reader keeps up (fewer than READ_AHEAD messages unread): what one
        stream holds unread stays below STREAM_WINDOW bytes plus those messages."""
        if st.recv_unacked >= STREAM_WINDOW // 2 and not st.done:
            self._write(_frame(WINDOW_UPDATE, 0, st.sid, _U32.pack(st.recv_unacked)))
            st.recv_unacked = 0

    def _message(self, st: Stream, message: bytes) -> None:
        st.messages.append(message)
        if not st.unary:
            st._wake()

    def _decode(self, block: bytes) -> dict[bytes, bytes]:
        """A header block's fields. Every block goes through the one decoder (the server's encoder
        indexes into a table both sides keep), except one seen before that consists of one-byte
        indexed fields only: it leaves the table as it is, so its fields are the same as last
        time until a block that may change the table (anything else) comes. After the first
        calls, etcd's response headers and trailers are such blocks (3 and 1 bytes)."""
        got = self._decoded.get(block)
        if got is not None:
            return got
        headers = dict(self._decoder.decode(block, raw=True))
        if 0xFF not in block and all(b & 0x80 for b in block):
            if len(self._decoded) < 64:
                self._decoded[block] = headers
        else:
            self._decoded.clear()
        return headers

    def _headers(self, sid: int, block: bytes, end_stream: int) -> None:
        headers = self._decode(block)
        st = self._streams.get(sid)
        if st is None:
            return
        if not st.got_headers:
            st.got_headers = True
            status = headers.get(b":status", b"")
            if status != b"200":
                err = GrpcError(_http_status_code(status), f"HTTP status {status.decode('ascii', 'replace')}")
                self.reset(st, _RST_CANCEL, err)
                return
        if not end_stream:
            return
        code = headers.get(b"grpc-status")
        if code is None:
            self._finish(st, GrpcError(INTERNAL, "response without grpc-status"))
            return
        status_code = int(code)
        if status_code == OK:
            self._finish(st, None)
        else:
            message = urllib.parse.unquote(headers.get(b"grpc-message", b"").decode("utf-8", "replace"))
            self._finish(st, GrpcError(status_code, message))

    def _finish(self, st: Stream, error: GrpcError | None) -> None:
        if st.done:
            return
        st.done = True
        st.error = error
        self._streams.pop(st.sid, None)
        self._blocked.pop(st.sid, None)
        if st.timer is not None:
            st.timer.cancel()
        st._wake()
        if self.closed:
            self._close_if_idle()

    def _fail(self, why: str) -> None:
        """A connection error: every call on it fails as UNAVAILABLE (connection_lost follows)."""
        self.closed = True
        self.error = why
        if self.transport is not None:
            self.transport.abort()

    def _close_if_idle(self) -> None:
        if not self._streams and self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _tick(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._ping_out:
            self._fail(f"no answer to a keep-alive ping in {KEEPALIVE:.0f} s")
            return
        if self._streams and time.monotonic() - self._last_recv >= KEEPALIVE:
            self._ping_out = True
            self._write(_frame(PING, 0, 0, b"kproxy\x00\x00"))
        self._keepalive = asyncio.get_running_loop().call_later(KEEPALIVE, self._tick)

    # -- sending -------------------------------------------------------------------------------

    def open(self, path: str, unary: bool, message: bytes | None = None) -> Stream:
        """A new call; with `message` its one request, sent with the headers in one write."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise GrpcError(UNAVAILABLE, self.error or "connection closing", sent=False)
        sid = self._next_sid
        if sid > 0x7FFFFFFF - 2:
            self.closed = True  # stream ids used up: the next call opens a new connection
            self.error = "stream ids used up"
        self._next_sid += 2
        st = Stream(self, sid, unary, self._peer_initial_window)
        self._streams[sid] = st
        block = self._blocks.get(path)
        if block is None:
            block = self._blocks[path] = request_headers(path, self.authority, self.tls)
        head = _frame(HEADERS, FLAG_END_HEADERS, sid, block)
        if message is not None:
            data = _MSG.pack(0, len(message)) + message
            n = len(data)
            if n <= self._send_window and n <= st.send_window and n <= self._peer_max_frame:
                self._send_window -= n
                st.send_window -= n
                st.local_closed = True
                self._write(head + _FRAME.pack(n << 8 | DATA, FLAG_END_STREAM, sid) + data)
                return st
            self._write(head)
            self.send(st, message, end=True)
            return st
        self._write(head)
        return st

    def send(self, st: Stream, message: bytes, end: bool = False) -> None:
        if st.done or st.local_closed or self.transport is None or self.transport.is_closing():
            return  # the call ended: its reader sees why
        st.out += _MSG.pack(0, len(message))
        st.out += message
        st.out_end = end
        self._blocked[st.sid] = st
        self._flush()

    def end_stream(self, st: Stream) -> None:
        if st.done or st.local_closed or self.transport is None or self.transport.is_closing():
            return
        if st.out:
            st.out_end = True
            return
        st.local_closed = True
        self._write(_frame(DATA, FLAG_END_STREAM, st.sid))

    def expire_at(self, st: Stream, when: float) -> None:
        queue = self._deadlines
        while queue and queue[0][1].done:  # calls end about in order: the queue stays short
            queue.popleft()
        if queue and when < queue[-1][0]:  # out of order (a shorter timeout): a timer of its own
            st.timer = self._loop.call_at(when, self._expire, st)
            return
        queue.append((when, st))
        if self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(queue[0][0], self._expire_due)

    def _expire(self, st: Stream) -> None:
        self.reset(st, _RST_CANCEL, GrpcError(DEADLINE_EXCEEDED, "deadline exceeded"))

    def _expire_due(self) -> None:
        self._deadline_timer = None
        queue, now = self._deadlines, self._loop.time()
        while queue and (queue[0][1].done or queue[0][0] <= now):
            st = queue.popleft()[1]
            if not st.done:
                self._expire(st)
        if queue:
            self._deadline_timer = self._loop.call_at(queue[0][0], self._expire_due)

    def reset(self, st: Stream, code: int, error: GrpcError) -> None:
        if st.done:
            return
        if self.transport is not None and not self.transport.is_closing():
            self._write(_frame(RST_STREAM, 0, st.sid, _U32.pack(code)))
        self._finish(st, error)

    def _write(self, data: bytes) -> None:
        """Frames written in one turn of the event loop go out in one send() at its end: concurrent
        API requests' transactions share a syscall (on loopback each send also runs the kernel's
        delivery to etcd: a quarter of the server's CPU in a profile of 32 concurrent creates)."""
        if not self._wbuf:
            self._loop.call_soon(self._send_out)
        self._wbuf.append(data)

    def _send_out(self) -> None:
        # While the loop has other callbacks ready (requests being handled that may add calls), the
        # send waits for them, a few turns at most: the busier the server, the more calls share a send.
        # CPython's asyncio loop; uvloop (kproxy-apiserver's loop) has no visible queue: there the
        # send goes at the end of this turn, after the callbacks that were ready before it.
        ready = getattr(self._loop, "_ready", None)
        if ready and self._deferred < SEND_DEFER_TURNS and len(self._wbuf) < 64:
            self._deferred += 1
            self._loop.call_soon(self._send_out)
            return
        self._deferred = 0
        data, self._wbuf = b"".join(self._wbuf), []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush(self) -> None:
        for sid, st in list(self._blocked.items()):
            out = st.out
            while out and self._send_window > 0 and st.send_window > 0:
                n = min(len(out), self._send_window, st.send_window, self._peer_max_frame)
                chunk = bytes(out[:n])
                del out[:n]
                self._send_window -= n
                st.send_window -= n
                last = not out and st.out_end
                if last:
                    st.local_closed = True
                self._write(_FRAME.pack(n << 8 | DATA, FLAG_END_STREAM if last else 0, sid) + chunk)
            if out:
                if self._send_window <= 0:
                    return
                continue
            del self._blocked[sid]


async def connect(host: str, port: int, *, ssl_context: ssl.SSLContext | None, server_hostname: str | None,
                  timeout: float) -> Connection:
    """A connection whose server has sent its SETTINGS (so it speaks HTTP/2)."""
    loop = asyncio.get_running_loop()
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    conn = Connection(authority, ssl_context is not None)
    async with asyncio.timeout(timeout):
        transport, _ = await loop.create_connection(lambda: conn, host, port, ssl=ssl_context,
                                                    server_hostname=server_hostname if ssl_context else None)
        try:
            if ssl_context is not None:
                sslobj = transport.get_extra_info("ssl_object")
                if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                    raise GrpcError(UNAVAILABLE, f"{authority}: the server did not agree to HTTP/2 (ALPN)", sent=False)
            await conn.ready
        except BaseException:
            transport.abort()
            raise
    return conn


class Channel:
    """Calls over one connection at a time to the first of `addresses` that answers (gRPC's
    pick_first): when it is lost, the next call connects again, starting after the address that
    failed. A call waits for a connection up to its deadline (gRPC's wait_for_ready) instead of
    failing while the servers restart."""

    def __init__(self, addresses: list[tuple[str, int]], *, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        if not addresses:
            raise ValueError("gRPC channel: no address")
        self.addresses = addresses
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self._conn: Connection | None = None
        self._index = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

    async def _connection(self, deadline: float) -> Connection:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # used from a new event loop: nothing of the old one is usable
            self._loop, self._conn, self._lock = loop, None, asyncio.Lock()
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        assert self._lock is not None
        try:
            async with asyncio.timeout_at(deadline):
                async with self._lock:
                    return await self._connect(deadline)
        except TimeoutError:
            raise GrpcError(UNAVAILABLE, self._last_error or "no server answered in time", sent=False) from None

    _last_error = ""

    async def _connect(self, deadline: float) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn  # another call connected while this one waited for the lock
        if conn is not None:
            self._index += 1  # start after the server we lost
            self._conn = None
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while True:
            for i in range(len(self.addresses)):
                idx = (self._index + i) % len(self.addresses)
                host, port = self.addresses[idx]
                try:
                    conn = await connect(host, port, ssl_context=self.ssl_context,
                                         server_hostname=self.server_hostname or host,
                                         timeout=max(0.05, min(3.0, deadline - loop.time())))
                except (OSError, TimeoutError, ssl.SSLError, GrpcError) as e:
                    self._last_error = f"{host}:{port}: {e or type(e).__name__}"
                    continue
                self._index = idx
                self._conn = conn
                return conn
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def unary(self, path: str, request: bytes, timeout: float) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._conn
        if conn is None or conn.closed or self._loop is not loop:
            conn = await self._connection(deadline)
        st = conn.open(path, True, request)
        st.expire_at(deadline)
        return await st.result()

    async def stream(self, path: str, connect_timeout: float, deadline: float | None = None) -> Stream:
        """A streaming call (no request sent yet); `deadline` (loop time) bounds the whole call."""
        loop = asyncio.get_running_loop()
        conn = await self._connection(loop.time() + connect_timeout)
        st = conn.open(path, False)
        if deadline is not None:
            st.expire_at(deadline)
        return st

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.closed = True
            conn.transport.abort()

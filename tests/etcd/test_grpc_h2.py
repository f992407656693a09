"""The etcd client's HTTP/2 transport (controlplane_stub/store/grpc_h2.py) against byte streams made
here: what a gRPC server sends, in any split, gives the same messages and status; flow control,
GOAWAY and the bounds. The real etcd behind it is tested by the other modules of tests/etcd."""
from __future__ import annotations

import asyncio
import struct

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.store import grpc_h2 as h2


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.writes = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream, payload) of a client's bytes after the preface."""
    out = []
    off = len(h2.PREFACE) if data.startswith(h2.PREFACE) else 0
    while off < len(data):
        lt, flags, sid = struct.unpack_from(">IBI", data, off)
        n = lt >> 8
        out.append((lt & 0xFF, flags, sid, bytes(data[off + 9:off + 9 + n])))
        off += 9 + n
    return out


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def response(sid: int, messages: list[bytes], enc: hpack.Encoder, *, split: int, pad: int = 0,
             status: int = 0, message: str = "") -> bytes:
    """What a gRPC server sends for one call: headers, the messages in DATA frames of `split`
    bytes (padded by `pad`), trailers."""
    body = b"".join(struct.pack(">BI", 0, len(m)) + m for m in messages)
    out = frame(h2.HEADERS, h2.FLAG_END_HEADERS, sid,
                enc.encode([(":status", "200"), ("content-type", "application/grpc")]))
    for i in range(0, len(body), split):
        chunk = body[i:i + split]
        if pad:
            out += frame(h2.DATA, h2.FLAG_PADDED, sid, bytes([pad]) + chunk + b"\0" * pad)
        else:
            out += frame(h2.DATA, 0, sid, chunk)
    trailers = [("grpc-status", str(status))] + ([("grpc-message", message)] if message else [])
    return out + frame(h2.HEADERS, h2.FLAG_END_HEADERS | h2.FLAG_END_STREAM, sid, enc.encode(trailers))


async def turns() -> None:
    """Lets the event loop run past the connection's deferred send (h2.SEND_DEFER_TURNS)."""
    for _ in range(h2.SEND_DEFER_TURNS + 2):
        await asyncio.sleep(0)


def connected() -> tuple[h2.Connection, FakeTransport]:
    conn = h2.Connection("127.0.0.1:2379", False)
    t = FakeTransport()
    conn.connection_made(t)
    conn.data_received(frame(h2.SETTINGS, 0, 0, b""))
    assert conn.ready.done()
    return conn, t


def test_request_headers_decode_as_grpc_wants() -> None:
    path = "/etcdserverpb.KV/" + "x" * 300  # lengths past the 7-bit prefix
    for tls in (False, True):
        got = hpack.Decoder().decode(h2.request_headers(path, "10.0.0.1:2379", tls))
        assert got[:5] == [(":method", "POST"), (":scheme", "https" if tls else "http"), (":path", path),
                           (":authority", "10.0.0.1:2379"), ("content-type", "application/grpc")]
        assert ("te", "trailers") in got


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.binary(max_size=3000), min_size=1, max_size=4),
       split=st.integers(1, 5000), chunk=st.integers(1, 700), pad=st.integers(0, 20))
def test_any_split_gives_the_same_messages(messages: list[bytes], split: int, chunk: int, pad: int) -> None:
    async def run() -> None:
        conn, t = connected()
        stream = conn.open("/etcdserverpb.Watch/Watch", False)
        data = response(stream.sid, messages, hpack.Encoder(), split=split, pad=pad)
        for i in range(0, len(data), chunk):
            conn.data_received(data[i:i + chunk])
        got = []
        while (m := await stream.read()) is not None:
            got.append(m)
        assert got == messages
        assert not t.closing
    asyncio.run(run())


def test_unary_call_and_error_status() -> None:
    async def run() -> None:
        conn, t = connected()
        enc = hpack.Encoder()  # one encoder for the connection: its dynamic table carries over
        a = conn.open("/etcdserverpb.KV/Range", True, b"req-a")
        b = conn.open("/etcdserverpb.KV/Txn", True, b"req-b")
        await turns()  # frames of one loop turn are sent at its end, in one write
        sent = frames(bytes(t.out))
        assert t.writes == 2  # the preface and settings; then both calls together
        assert [(f[0], f[2], f[3][5:]) for f in sent if f[0] == h2.DATA] == [(h2.DATA, a.sid, b"req-a"),
                                                                           (h2.DATA, b.sid, b"req-b")]
        conn.data_received(response(a.sid, [b"resp-a"], enc, split=3))
        conn.data_received(response(b.sid, [], enc, split=1, status=11,
                                    message="etcdserver: mvcc: required revision has been compacted"))
        assert await a.result() == b"resp-a"
        try:
            await b.result()
        except h2.GrpcError as e:
            assert e.code == 11 and "compacted" in e.message and e.sent
        else:
            raise AssertionError("no error")
    asyncio.run(run())


def test_flow_control_waits_for_window_updates() -> None:
    async def run() -> None:
        conn, t = connected()
        conn.data_received(frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 10)))  # stream window 10
        s = conn.open("/etcdserverpb.KV/Put", True, b"x" * 100)
        await turns()
        sent = sum(len(f[3]) for f in frames(bytes(t.out)) if f[0] == h2.DATA)
        assert sent == 10  # the stream's window
        conn.data_received(frame(h2.WINDOW_UPDATE, 0, s.sid, struct.pack(">I", 1000)))
        await turns()
        data = [f for f in frames(bytes(t.out)) if f[0] == h2.DATA]
        assert sum(len(f[3]) for f in data) == 105  # 5-byte prefix + 100
        assert data[-1][1] & h2.FLAG_END_STREAM and not any(f[1] & h2.FLAG_END_STREAM for f in data[:-1])
    asyncio.run(run())


def test_goaway_fails_unprocessed_calls_as_not_sent() -> None:
    async def run() -> None:
        conn, t = connected()
        a = conn.open("/etcdserverpb.KV/Range", True, b"a")
        b = conn.open("/etcdserverpb.KV/Range", True, b"b")
        conn.data_received(frame(h2.GOAWAY, 0, 0, struct.pack(">II", a.sid, 0)))
        try:
            await b.result()
        except h2.GrpcError as e:
            assert e.code == h2.UNAVAILABLE and not e.sent
        else:
            raise AssertionError("a refused call succeeded")
        assert not a.done and conn.closed
        try:
            conn.open("/etcdserverpb.KV/Range", True, b"c")
        except h2.GrpcError as e:
            assert not e.sent
        else:
            raise AssertionError("a closing connection took a new call")
        conn.data_received(response(a.sid, [b"ok"], hpack.Encoder(), split=10))
        assert await a.result() == b"ok"
        assert t.closing  # the last call ended: the connection closes
    asyncio.run(run())


def test_bounds() -> None:
    async def run() -> None:
        conn, t = connected()
        s = conn.open("/etcdserverpb.Watch/Watch", False)
        big = struct.pack(">BI", 0, h2.MAX_MESSAGE + 1)
        conn.data_received(frame(h2.HEADERS, h2.FLAG_END_HEADERS, s.sid,
                                 hpack.Encoder().encode([(":status", "200")])) + frame(h2.DATA, 0, s.sid, big))
        try:
            await s.read()
        except h2.GrpcError as e:
            assert e.code == h2.RESOURCE_EXHAUSTED
        else:
            raise AssertionError("an oversized message was accepted")
        assert not t.closing  # one stream's problem, not the connection's
        conn.data_received(struct.pack(">IBI", (h2.MAX_FRAME + 1) << 8 | h2.DATA, 0, 1))
        assert t.closing and conn.closed
        conn.connection_lost(None)
        try:
            await s.read()
        except h2.GrpcError as e:
            assert e.code == h2.RESOURCE_EXHAUSTED  # its own end stands
        try:
            conn.open("/etcdserverpb.KV/Range", True, b"c")
        except h2.GrpcError as e:
            assert e.code == h2.UNAVAILABLE and not e.sent
        else:
            raise AssertionError("a broken connection took a new call")
    asyncio.run(run())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from([(":status", "200"), (":status", "404"), ("content-type", "application/grpc"),
                                           ("grpc-status", "0"), ("grpc-status", "5"), ("grpc-message", "no"),
                                           ("x-a", "1"), ("x-b", "2")]), min_size=1, max_size=4),
                min_size=1, max_size=30))
def test_cached_header_blocks_decode_as_the_decoder_would(blocks: list[list[tuple[str, str]]]) -> None:
    async def run() -> None:
        conn, _ = connected()
        enc, dec = hpack.Encoder(), hpack.Decoder()
        for headers in blocks:
            block = enc.encode(headers)
            want = {k.encode(): v.encode() for k, v in dec.decode(block)}
            assert conn._decode(block) == want
    asyncio.run(run())


def test_an_unread_stream_stops_its_window() -> None:
    async def run() -> None:
        conn, t = connected()
        s = conn.open("/etcdserverpb.Watch/Watch", False)
        msg = b"e" * 20_000
        n = 500  # 10 MB: past half the stream window (8 MiB) only after READ_AHEAD messages
        body = (struct.pack(">BI", 0, len(msg)) + msg) * n
        conn.data_received(frame(h2.HEADERS, h2.FLAG_END_HEADERS, s.sid,
                                 hpack.Encoder().encode([(":status", "200")])))
        for i in range(0, len(body), h2.MAX_FRAME):
            conn.data_received(frame(h2.DATA, 0, s.sid, body[i:i + h2.MAX_FRAME]))
        await turns()

        def stream_updates() -> int:
            return sum(1 for f in frames(bytes(t.out)) if f[0] == h2.WINDOW_UPDATE and f[2] == s.sid)
        assert len(s.messages) == n and stream_updates() == 0  # nobody reads: etcd must wait
        for _ in range(n):
            assert await s.read() == msg
        await turns()
        assert stream_updates() == 1  # read: the window opens again
    asyncio.run(run())


def test_deadlines_expire_unanswered_calls_only_in_and_out_of_order() -> None:
    """One timer serves the calls' deadlines in order; a call answered in time is not reset, an
    unanswered one gets DEADLINE_EXCEEDED and a RST_STREAM, also one whose deadline comes before
    the queued ones (a timer of its own), and the queue does not keep ended calls."""
    async def run() -> None:
        conn, t = connected()
        loop = asyncio.get_running_loop()
        enc = hpack.Encoder()
        now = loop.time()
        answered = conn.open("/etcdserverpb.KV/Txn", True, b"a")
        answered.expire_at(now + 0.05)
        late = conn.open("/etcdserverpb.KV/Txn", True, b"b")
        late.expire_at(now + 0.10)
        early = conn.open("/etcdserverpb.KV/Txn", True, b"c")
        early.expire_at(now + 0.02)  # before the queued ones
        conn.data_received(response(answered.sid, [b"ok"], enc, split=10))
        assert await answered.result() == b"ok"
        for st in (early, late):
            try:
                await asyncio.wait_for(st.result(), 2)
            except h2.GrpcError as e:
                assert e.code == h2.DEADLINE_EXCEEDED
            else:
                raise AssertionError("an unanswered call did not expire")
        assert loop.time() - now >= 0.10
        await turns()
        resets = {f[2] for f in frames(bytes(t.out)) if f[0] == h2.RST_STREAM}
        assert resets == {late.sid, early.sid}
        for i in range(100):  # answered at once: each new call drops the ended ones before it
            st = conn.open("/etcdserverpb.KV/Range", True, b"x")
            st.expire_at(loop.time() + 5)
            conn.data_received(response(st.sid, [b"r"], enc, split=10))
            assert await st.result() == b"r"
        assert len(conn._deadlines) <= 1
        conn.connection_lost(None)
        assert conn._deadline_timer is None and not conn._deadlines
    asyncio.run(run())

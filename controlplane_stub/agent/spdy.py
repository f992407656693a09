"""SPDY/3.1 framing, the server's side, as much as kubectl's port-forward needs.

kubectl 1.32 forwards ports over SPDY (tunnelled in a WebSocket whose subprotocol is
SPDY/3.1+portforward.k8s.io: the messages carry the SPDY byte stream as is). Written from the
SPDY/3 draft: 8-byte frame headers (control frames: version, type, flags, length; data frames:
stream id, flags, length), name/value header blocks compressed with zlib and a fixed dictionary,
one compression context per direction for the whole session. Flow control is not used by
kubectl's SPDY library, and not here either (no WINDOW_UPDATE is needed or sent).

Every length is checked before anything is allocated: a frame above MAX_FRAME, a header block
that inflates beyond MAX_HEADER_BLOCK or holds more than MAX_HEADERS pairs is a SpdyError, and the
caller ends the session.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
RST_PROTOCOL_ERROR, RST_REFUSED_STREAM, RST_CANCEL = 1, 3, 5
MAX_FRAME = 1 << 20
MAX_HEADER_BLOCK = 64 * 1024
MAX_HEADERS = 64
MAX_DATA = 32 * 1024  # the payload of one DATA frame this side sends

# The SPDY/3 header compression dictionary (the draft's section 2.6.10.1): 65 length-prefixed
# header words, then a run of status codes, phrases and common values.
_WORDS = [
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length", "content-location",
    "content-md5", "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
    "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization",
    "range", "referer", "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade",
    "user-agent", "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"
]
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()
# Its zlib dictionary id, as the peer's compressed blocks name it: a typo above fails here.
assert len(DICTIONARY) == 1423 and zlib.adler32(DICTIONARY) == 0xE3C6A7C2


class SpdyError(Exception):
    """The peer sent something this side cannot take: the session ends."""


@dataclass
class Frame:
    control: bool
    type: int  # a control frame's type; 0 for data
    flags: int
    stream_id: int
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    value: int = 0  # RST_STREAM and GOAWAY status, PING id


def encode_headers(headers: dict[str, str]) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for k, v in headers.items():
        kb, vb = k.lower().encode(), v.encode()
        out += [struct.pack(">I", len(kb)), kb, struct.pack(">I", len(vb)), vb]
    return b"".join(out)


def decode_headers(block: bytes) -> dict[str, str]:
    def take(pos: int) -> tuple[bytes, int]:
        if pos + 4 > len(block):
            raise SpdyError("truncated header block")
        (n,) = struct.unpack_from(">I", block, pos)
        if pos + 4 + n > len(block):
            raise SpdyError("truncated header block")
        return block[pos + 4:pos + 4 + n], pos + 4 + n

    if len(block) < 4:
        raise SpdyError("truncated header block")
    (count,) = struct.unpack_from(">I", block, 0)
    if count > MAX_HEADERS:
        raise SpdyError(f"{count} headers in one block; at most {MAX_HEADERS}")
    out: dict[str, str] = {}
    pos = 4
    for _ in range(count):
        name, pos = take(pos)
        value, pos = take(pos)
        # Several values of one name are NUL-separated; port-forward's headers have one each.
        out[name.decode("latin-1").lower()] = value.decode("latin-1").split("\x00")[0]
    return out


class Framer:
    """Frames from a byte stream, and frames to send; one per session (the zlib contexts)."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zdict=DICTIONARY)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= 8:
            w0, w1 = struct.unpack_from(">II", self._buf, 0)
            flags, length = w1 >> 24, w1 & 0xFFFFFF
            if length > MAX_FRAME:
                raise SpdyError(f"frame of {length} bytes; at most {MAX_FRAME}")
            if len(self._buf) < 8 + length:
                break
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            if w0 & 0x80000000:
                frame = self._control((w0 >> 16) & 0x7FFF, w0 & 0xFFFF, flags, payload)
                if frame is not None:
                    frames.append(frame)
            else:
                frames.append(Frame(False, 0, flags, w0 & 0x7FFFFFFF, payload))
        return frames

    def _control(self, version: int, type_: int, flags: int, p: bytes) -> Frame | None:
        if version != VERSION:
            raise SpdyError(f"SPDY version {version}; this side speaks {VERSION}")
        need = {SYN_STREAM: 10, SYN_REPLY: 4, RST_STREAM: 8, PING: 4, GOAWAY: 8, HEADERS: 4, WINDOW_UPDATE: 8}
        if len(p) < need.get(type_, 0):
            raise SpdyError(f"control frame {type_} of {len(p)} bytes is too short")
        if type_ == SYN_STREAM:
            sid = struct.unpack_from(">I", p, 0)[0] & 0x7FFFFFFF
            return Frame(True, type_, flags, sid, headers=self._headers(p[10:]))
        if type_ in (SYN_REPLY, HEADERS):
            sid = struct.unpack_from(">I", p, 0)[0] & 0x7FFFFFFF
            return Frame(True, type_, flags, sid, headers=self._headers(p[4:]))
        if type_ == RST_STREAM:
            sid, status = struct.unpack_from(">II", p, 0)
            return Frame(True, type_, flags, sid & 0x7FFFFFFF, value=status)
        if type_ == PING:
            return Frame(True, type_, flags, 0, value=struct.unpack_from(">I", p, 0)[0])
        if type_ == GOAWAY:
            sid, status = struct.unpack_from(">II", p, 0)
            return Frame(True, type_, flags, sid & 0x7FFFFFFF, value=status)
        return None  # SETTINGS, WINDOW_UPDATE and unknown types: nothing to do

    def _headers(self, block: bytes) -> dict[str, str]:
        # Every block goes through the one inflate context, in order, or later ones are garbage.
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise SpdyError(f"header block: {e}") from None
        if self._inflate.unconsumed_tail:
            raise SpdyError(f"header block inflates beyond {MAX_HEADER_BLOCK} bytes")
        return decode_headers(raw)

    @staticmethod
    def _control_frame(type_: int, flags: int, payload: bytes) -> bytes:
        return struct.pack(">HHI", 0x8000 | VERSION, type_, (flags << 24) | len(payload)) + payload

    def syn_reply(self, stream_id: int, headers: dict[str, str], fin: bool = False) -> bytes:
        block = self._deflate.compress(encode_headers(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        return self._control_frame(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + block)

    def syn_stream(self, stream_id: int, headers: dict[str, str], fin: bool = False) -> bytes:
        """(For tests: what a client sends to open a stream.)"""
        block = self._deflate.compress(encode_headers(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        return self._control_frame(SYN_STREAM, FLAG_FIN if fin else 0,
                                   struct.pack(">IIBB", stream_id, 0, 0, 0) + block)

    @staticmethod
    def data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
        return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(payload)) + payload

    def rst(self, stream_id: int, status: int) -> bytes:
        return self._control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def ping(self, ping_id: int) -> bytes:
        return self._control_frame(PING, 0, struct.pack(">I", ping_id))

    def goaway(self, last_stream_id: int, status: int = 0) -> bytes:
        return self._control_frame(GOAWAY, 0, struct.pack(">II", last_stream_id, status))

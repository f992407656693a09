"""Sans-I/O DNS message parse and encode (RFC 1035, EDNS0 per RFC 6891).

The general codec lives here in Python: it builds the pre-encoded answers when cluster data
changes and parses upstream replies for the cache, neither of which is per-query work. The
per-query hot path (question parse, table lookup, ID/flags/case patching) is `impl`, the compiled
kdns._wire or its pure twin kdns._purewire (KDNS_PURE=1 forces the twin); both produce identical
bytes and are tested side by side.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import struct
from types import ModuleType
from typing import Any, cast

import msgspec

# RR types and classes
A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 255
CLASS_IN = 1
TYPE_NAMES = {A: "A", NS: "NS", CNAME: "CNAME", SOA: "SOA", PTR: "PTR", MX: "MX", TXT: "TXT",
              AAAA: "AAAA", SRV: "SRV", OPT: "OPT", ANY: "ANY"}

# rcodes (the low 4 bits; BADVERS needs the EDNS extended rcode)
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
               NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

# header flag bits
QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010

MAX_NAME = 255  # wire length, RFC 1035 3.1
MAX_LABEL = 63
MAX_POINTER_HOPS = 64  # far above any real message; stops pointer chains that never end
SERVER_UDP_SIZE = 1232  # what we advertise (DNS flag day 2020)

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_SRV = struct.Struct("!HHH")
_SOA_NUMS = struct.Struct("!IIIII")


class WireError(ValueError):
    """A message that cannot be parsed; the text says where."""


class Question(msgspec.Struct, frozen=True, gc=False):
    name: str  # presentation form without the trailing dot, case as received
    qtype: int
    qclass: int = CLASS_IN


class RR(msgspec.Struct, frozen=True, gc=False):
    """One resource record. `data` by type: A/AAAA an address string, CNAME/NS/PTR a name,
    SRV (priority, weight, port, target), MX (preference, exchange), SOA (mname, rname, serial, refresh, retry, expire,
    minimum), TXT a tuple of strings; any other type its raw rdata bytes."""

    name: str
    rtype: int
    ttl: int
    data: object
    rclass: int = CLASS_IN


class Edns(msgspec.Struct, frozen=True, gc=False):
    udp_size: int = SERVER_UDP_SIZE
    ext_rcode: int = 0
    version: int = 0
    do: bool = False
    options: bytes = b""


class Message(msgspec.Struct, gc=False):
    id: int = 0
    flags: int = 0
    questions: list[Question] = []
    answers: list[RR] = []
    authority: list[RR] = []
    additional: list[RR] = []
    edns: Edns | None = None

    @property
    def rcode(self) -> int:
        ext = (self.edns.ext_rcode << 4) if self.edns is not None else 0
        return ext | (self.flags & 0xF)


# ---------------------------------------------------------------------------------------- names

def label_text(raw: bytes) -> str:
    """A label in presentation format (RFC 1035 5.1): a dot or backslash inside it and bytes
    outside printable ASCII are escaped, so the text splits back into the very same labels and
    a question is echoed byte for byte (a label "a.b" is not two labels)."""
    if raw.isascii():
        text = raw.decode("ascii")
        if text.isprintable() and " " not in text and "." not in text and "\\" not in text:
            return text
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else ("\\" + chr(b) if b in (0x2E, 0x5C) else f"\\{b:03d}")
        for b in raw
    )


def text_labels(name: str) -> list[bytes]:
    """Raw labels of a presentation name, undoing label_text's escapes."""
    if "\\" not in name:
        return [label.encode("ascii") for label in name.split(".")]
    labels: list[bytes] = []
    cur = bytearray()
    i, n = 0, len(name)
    while i < n:
        c = name[i]
        if c == "\\":
            if name[i + 1:i + 4].isdigit() and len(name[i + 1:i + 4]) == 3:
                value = int(name[i + 1:i + 4])
                if value > 255:
                    raise WireError(f"escape \\{name[i + 1:i + 4]} in {name!r} is not a byte")
                cur.append(value)
                i += 4
                continue
            if i + 1 >= n:
                raise WireError(f"name {name!r} ends in a lone backslash")
            cur += name[i + 1].encode("ascii")
            i += 2
            continue
        if c == ".":
            labels.append(bytes(cur))
            cur = bytearray()
        else:
            cur += c.encode("ascii")
        i += 1
    labels.append(bytes(cur))
    return labels


@functools.lru_cache(maxsize=256)
def name_to_wire(name: str) -> bytes:
    """Uncompressed wire form of a presentation name ("" or "." is the root). Cached: while a
    Service is encoded the same owners come back several times. Only that many: a 10,000-Service
    zone build has the same hit rate with 256 entries as with 4,096, which kept 1.4 MiB alive."""
    out = bytearray()
    name = _strip_root(name)
    if name:
        for raw in text_labels(name):
            if not 0 < len(raw) <= MAX_LABEL:
                raise WireError(f"label {raw!r} in {name!r}: length must be 1..63")
            out.append(len(raw))
            out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise WireError(f"name {name!r} is longer than 255 octets")
    return bytes(out)


def wire_to_name(wire: bytes) -> str:
    labels, pos = [], 0
    while wire[pos]:
        n = wire[pos]
        labels.append(label_text(wire[pos + 1:pos + 1 + n]))
        pos += n + 1
    return ".".join(labels)


def _strip_root(name: str) -> str:
    """The name without its root dot(s); an escaped dot at the end ("a\\.") is part of a label."""
    while name.endswith(".") and not (name.endswith("\\.") and not name.endswith("\\\\.")):
        name = name[:-1]
    return name


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """Decode a possibly compressed name; returns (name, offset after it in the original run).

    Pointers must point strictly backwards from the label that holds them, which makes loops
    impossible; the hop count and the 255-octet limit are belt and braces."""
    labels: list[str] = []
    length = 1
    pos = offset
    end: int | None = None
    hops = 0
    limit = len(data)
    while True:
        if pos >= limit:
            raise WireError(f"name at offset {offset} runs past the end of the message")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= limit:
                raise WireError(f"truncated compression pointer at offset {pos}")
            target = ((n & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise WireError(f"compression pointer at offset {pos} does not point backwards")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise WireError(f"too many compression pointers in name at offset {offset}")
            if end is None:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise WireError(f"unsupported label type 0x{n:02x} at offset {pos}")
        if n == 0:
            if end is None:
                end = pos + 1
            return ".".join(labels), end
        if pos + 1 + n > limit:
            raise WireError(f"label at offset {pos} runs past the end of the message")
        length += n + 1
        if length > MAX_NAME:
            raise WireError(f"name at offset {offset} is longer than 255 octets")
        labels.append(label_text(data[pos + 1:pos + 1 + n]))
        pos += n + 1


class _Writer:
    """Message builder with RFC 1035 4.1.4 name compression (suffix -> first offset)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.names: dict[str, int] = {}

    def name(self, name: str, compress: bool = True) -> None:
        # The hot loop of pre-encoding a zone: locals only, one len() per label.
        buf = self.buf
        names = self.names
        if "\\" in name:
            # Escaped labels (only in odd questions): written whole, never a compression target.
            buf += name_to_wire(name)
            return
        name = name.rstrip(".")
        if name:
            lower = name.lower()
            pos = 0
            off = len(buf)
            for label in name.split("."):
                suffix = lower[pos:]
                if compress:
                    ptr = names.get(suffix)
                    if ptr is not None:
                        buf.append(0xC0 | (ptr >> 8))
                        buf.append(ptr & 0xFF)
                        return
                if off < 0x3FFF:
                    names.setdefault(suffix, off)
                raw = label.encode("ascii")
                n = len(raw)
                if not 0 < n <= MAX_LABEL:
                    raise WireError(f"label {label!r} in {name!r}: length must be 1..63")
                buf.append(n)
                buf += raw
                off += n + 1
                pos += n + 1
        buf.append(0)

    def rr(self, rr: RR) -> None:
        self.name(rr.name)
        start = len(self.buf)
        self.buf += _RR_FIXED.pack(rr.rtype, rr.rclass, rr.ttl & 0xFFFFFFFF, 0)
        data_start = len(self.buf)
        t, d = rr.rtype, rr.data
        if t == A:
            self.buf += ipaddress.IPv4Address(str(d)).packed
        elif t == AAAA:
            self.buf += ipaddress.IPv6Address(str(d)).packed
        elif t in (CNAME, NS, PTR):
            self.name(str(d))
        elif t == SRV:
            srv = cast(tuple[int, int, int, str], d)
            self.buf += _SRV.pack(srv[0], srv[1], srv[2])
            self.name(srv[3], compress=False)  # RFC 2782: no compression of the target
        elif t == MX:
            mx = cast(tuple[int, str], d)
            self.buf += struct.pack("!H", mx[0])
            self.name(mx[1])
        elif t == SOA:
            soa = cast(tuple[Any, ...], d)
            self.name(str(soa[0]))
            self.name(str(soa[1]))
            self.buf += _SOA_NUMS.pack(*soa[2:7])
        elif t == TXT:
            for s in d:  # type: ignore[attr-defined]
                raw = s.encode() if isinstance(s, str) else bytes(s)
                self.buf.append(len(raw))
                self.buf += raw
        else:
            self.buf += bytes(d)  # type: ignore[call-overload]
        rdlen = len(self.buf) - data_start
        struct.pack_into("!H", self.buf, start + 8, rdlen)


def encode_message(msg: Message) -> bytes:
    """Wire form with name compression; an OPT record is appended when msg.edns is set."""
    w = _Writer()
    ar = len(msg.additional) + (1 if msg.edns is not None else 0)
    w.buf += _HEADER.pack(msg.id, msg.flags, len(msg.questions), len(msg.answers), len(msg.authority), ar)
    for q in msg.questions:
        w.name(q.name)
        w.buf += struct.pack("!HH", q.qtype, q.qclass)
    for section in (msg.answers, msg.authority, msg.additional):
        for rr in section:
            w.rr(rr)
    if msg.edns is not None:
        e = msg.edns
        w.buf += b"\x00" + struct.pack("!HHBBHH", OPT, e.udp_size, e.ext_rcode, e.version,
                                       0x8000 if e.do else 0, len(e.options)) + e.options
    return bytes(w.buf)


# ------------------------------------------------------------------------------------- parsing

def _read_rdata(data: bytes, rtype: int, start: int, rdlen: int) -> object:
    end = start + rdlen
    if rtype == A:
        if rdlen != 4:
            raise WireError(f"A record rdata at offset {start} has length {rdlen}, not 4")
        return str(ipaddress.IPv4Address(data[start:end]))
    if rtype == AAAA:
        if rdlen != 16:
            raise WireError(f"AAAA record rdata at offset {start} has length {rdlen}, not 16")
        return str(ipaddress.IPv6Address(data[start:end]))
    if rtype in (CNAME, NS, PTR):
        name, after = read_name(data, start)
        if after != end:
            raise WireError(f"name rdata at offset {start} does not fill its rdlength")
        return name
    if rtype == SRV:
        if rdlen < 7:
            raise WireError(f"SRV rdata at offset {start} is too short")
        prio, weight, port = _SRV.unpack_from(data, start)
        target, after = read_name(data, start + 6)
        if after != end:
            raise WireError(f"SRV rdata at offset {start} does not fill its rdlength")
        return (prio, weight, port, target)
    if rtype == MX:
        if rdlen < 3:
            raise WireError(f"MX rdata at offset {start} is too short")
        exchange, after = read_name(data, start + 2)
        if after != end:
            raise WireError(f"MX rdata at offset {start} does not fill its rdlength")
        return (struct.unpack_from("!H", data, start)[0], exchange)
    if rtype == SOA:
        mname, pos = read_name(data, start)
        rname, pos = read_name(data, pos)
        if pos + 20 != end:
            raise WireError(f"SOA rdata at offset {start} has the wrong length")
        return (mname, rname, *_SOA_NUMS.unpack_from(data, pos))
    if rtype == TXT:
        strings, pos = [], start
        while pos < end:
            n = data[pos]
            if pos + 1 + n > end:
                raise WireError(f"TXT string at offset {pos} runs past its rdata")
            strings.append(data[pos + 1:pos + 1 + n].decode("utf-8", "backslashreplace"))
            pos += 1 + n
        return tuple(strings)
    return data[start:end]


def parse_message(data: bytes) -> Message:
    """Full parse; raises WireError on anything malformed (never another exception type)."""
    if len(data) < 12:
        raise WireError(f"message of {len(data)} octets is shorter than the 12-octet header")
    mid, flags, qd, an, ns, ar = _HEADER.unpack_from(data, 0)
    pos = 12
    msg = Message(id=mid, flags=flags, questions=[], answers=[], authority=[], additional=[])
    try:
        for _ in range(qd):
            name, pos = read_name(data, pos)
            if pos + 4 > len(data):
                raise WireError(f"question at offset {pos} is truncated")
            qtype, qclass = struct.unpack_from("!HH", data, pos)
            pos += 4
            msg.questions.append(Question(name, qtype, qclass))
        for count, section in ((an, msg.answers), (ns, msg.authority), (ar, msg.additional)):
            for _ in range(count):
                name, pos = read_name(data, pos)
                if pos + 10 > len(data):
                    raise WireError(f"resource record at offset {pos} is truncated")
                rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
                pos += 10
                if pos + rdlen > len(data):
                    raise WireError(f"rdata at offset {pos} runs past the end of the message")
                if rtype == OPT:
                    if section is not msg.additional or msg.edns is not None or name != "":
                        raise WireError(f"misplaced or duplicate OPT record at offset {pos - 10}")
                    msg.edns = Edns(udp_size=rclass, ext_rcode=ttl >> 24, version=(ttl >> 16) & 0xFF,
                                    do=bool(ttl & 0x8000), options=data[pos:pos + rdlen])
                else:
                    section.append(RR(name, rtype, ttl, _read_rdata(data, rtype, pos, rdlen), rclass))
                pos += rdlen
    except (IndexError, struct.error, ipaddress.AddressValueError, UnicodeError) as exc:
        raise WireError(f"malformed message: {exc}") from None
    if pos != len(data):
        raise WireError(f"{len(data) - pos} trailing octets after the last record")
    return msg


def make_query(name: str, qtype: int, *, mid: int = 0, rd: bool = True, edns: Edns | None = None) -> bytes:
    return encode_message(Message(id=mid, flags=RD if rd else 0, questions=[Question(name, qtype)],
                                  answers=[], authority=[], additional=[], edns=edns))


def _load() -> ModuleType:
    if os.environ.get("KDNS_PURE") != "1":
        try:
            from kdns import _wire

            return cast(ModuleType, _wire)
        except ImportError:
            pass
    from kdns import _purewire

    return cast(ModuleType, _purewire)


impl: ModuleType = _load()
COMPILED: bool = impl.__name__.endswith("._wire")

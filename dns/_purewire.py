"""Pure-Python twin of kdns/_wire.pyx: the per-query hot path.

Both modules expose the same API and must produce identical bytes (tests/dns/test_dns_wire_twins.py):
  Table                 the pre-encoded answers of the cluster zone (records.py fills it), and the
                        guards: the sources allowed to query, the largest UDP answer
  answer(q, table, tcp) response bytes for a query the table can answer, else None (slow path)
  Stats                 request/response counters and a latency histogram
  drain_udp(sock, ...)  answer every datagram waiting on a non-blocking UDP socket; return misses

`answer` only handles the common shape: one IN question with an uncompressed name, no answer or
authority records, at most an EDNS0 version-0 OPT. Anything else goes to the slow path
(resolver.py), which does the full parse and answers FORMERR/NOTIMP/... as appropriate.
"""
from __future__ import annotations

import socket
import struct
import time
from collections.abc import Container
from typing import Any

UDP_SIZE = 1232  # default largest UDP answer (and what the OPT advertises): DNS flag day 2020
UDP_SIZE_MAX = 4096  # the most an operator may configure (query buffers are that large)
# Loopback only, until the server sets its --allow-query networks: (network, mask) pairs.
LOOPBACK4 = bytes((127, 0, 0, 0, 255, 0, 0, 0))
LOOPBACK6 = bytes(15) + b"\x01" + b"\xff" * 16
BUCKETS = tuple(0.00025 * 2**i for i in range(16))  # CoreDNS's request duration buckets
BATCH = 64
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)  # <linux/in.h>; in the socket module from 3.12
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


class Table:
    """Pre-encoded responses keyed by lowercase wire qname + 2-octet qtype.

    answers: key -> full response with ID 0, flags QR|AA|RA|rcode, the question in lowercase.
    names:   lowercase wire names that exist in the zone (with empty non-terminals): a miss on
             one of them is NODATA, a miss on any other name under `zone` is NXDOMAIN.
    zone:    lowercase wire form of the cluster zone; `pod_zone` of pod.ZONE (synthesized by
             the slow path); soa_tail: the apex SOA record after its owner name.
    allow4, allow6: sources drain_udp answers (packed network+mask pairs, kdns.acl.Acl.packed);
             a datagram from any other source goes to the slow path, which refuses it.
    udp_size: the largest UDP answer, also advertised in the OPT record (RFC 6891 6.2.5).
    """

    def __init__(self) -> None:
        self.answers: dict[bytes, bytes] = {}
        self.names: Container[bytes] = frozenset()
        self.zone = b"\x00"
        self.pod_zone = b"\x00"
        self.soa_tail = b""
        self.synced = False
        self.allow4 = LOOPBACK4
        self.allow6 = LOOPBACK6
        self.udp_size = UDP_SIZE
        self.opt_rr = _opt_rr(UDP_SIZE)

    def update(self, answers: dict[bytes, bytes], names: Container[bytes], zone: bytes,
               pod_zone: bytes, soa_tail: bytes, synced: bool) -> None:
        self.answers = answers
        self.names = names
        self.zone = zone
        self.pod_zone = pod_zone
        self.soa_tail = soa_tail
        self.synced = synced

    def guard(self, allow4: bytes, allow6: bytes, udp_size: int) -> None:
        if len(allow4) % 8 or len(allow6) % 32 or not 512 <= udp_size <= UDP_SIZE_MAX:
            raise ValueError("allow4/allow6 must be 8/32-byte rules and udp_size 512..4096")
        self.allow4 = allow4
        self.allow6 = allow6
        self.udp_size = udp_size
        self.opt_rr = _opt_rr(udp_size)


def _opt_rr(udp_size: int) -> bytes:
    """Root owner, type OPT, our UDP size as its class, version 0, no flags, no options."""
    return b"\x00\x00\x29" + struct.pack("!H", udp_size) + b"\x00\x00\x00\x00\x00\x00"


def _match(src: bytes, rules: bytes) -> bool:
    n = len(src)
    for r in range(0, len(rules), 2 * n):
        if all(src[k] & rules[r + n + k] == rules[r + k] for k in range(n)):
            return True
    return False


def allowed(addr: Any, table: Table) -> bool:
    """Whether a source address (as recvmsg returns it) is in the table's allowed networks."""
    host = addr[0].split("%", 1)[0]
    if ":" not in host:
        return _match(socket.inet_pton(socket.AF_INET, host), table.allow4)
    raw = socket.inet_pton(socket.AF_INET6, host)
    if raw[:12] == b"\x00" * 10 + b"\xff\xff":  # IPv4-mapped: a v4 client on a dual-stack socket
        return _match(raw[12:], table.allow4)
    return _match(raw, table.allow6)


def _under(lname: bytes, zone: bytes) -> int:
    """Offset in lname where the suffix `zone` starts on a label boundary, or -1."""
    pos = 0
    zl = len(zone)
    while True:
        if len(lname) - pos == zl and lname[pos:] == zone:
            return pos
        if len(lname) - pos < zl or lname[pos] == 0:
            return -1
        pos += lname[pos] + 1


def _answer(q: bytes, table: Table, tcp: bool) -> tuple[bytes | None, int]:
    n = len(q)
    if n < 12 or q[2] & 0xF8:  # QR set or opcode != QUERY
        return None, -1
    if q[4:12] != b"\x00\x01\x00\x00\x00\x00" + q[10:12] or q[10] != 0 or q[11] > 1:
        return None, -1
    ar = q[11]
    pos = 12
    while True:
        if pos >= n:
            return None, -1
        ll = q[pos]
        if ll == 0:
            break
        if ll & 0xC0:
            return None, -1
        pos += ll + 1
        if pos - 12 > 254:
            return None, -1
    qend = pos + 1
    if qend + 4 > n:
        return None, -1
    qtype = (q[qend] << 8) | q[qend + 1]
    if q[qend + 2] != 0 or q[qend + 3] != 1:
        return None, qtype
    pos = qend + 4
    edns = -1
    if ar:
        if pos + 11 > n or q[pos] != 0 or q[pos + 1] != 0 or q[pos + 2] != 41:
            return None, qtype
        if q[pos + 6] != 0:  # EDNS version > 0: BADVERS from the slow path
            return None, qtype
        rdlen = (q[pos + 9] << 8) | q[pos + 10]
        if pos + 11 + rdlen != n:
            return None, qtype
        edns = max(512, (q[pos + 3] << 8) | q[pos + 4])
    elif pos != n:
        return None, qtype
    if not table.synced:  # CoreDNS: SERVFAIL for the zone until the first sync (slow path)
        return None, qtype
    qname = q[12:qend]
    lname = qname.translate(_LOWER)
    limit = 65535 if tcp else (min(edns, table.udp_size) if edns >= 0 else 512)
    flags2 = q[2] & 0x01  # RD echoed
    flags3 = q[3] & 0x10  # CD echoed
    resp = table.answers.get(lname + q[qend:qend + 2])
    if resp is not None:
        out = bytearray(resp)
        out[0:2] = q[0:2]
        out[2] |= flags2
        out[3] |= flags3
        out[12:qend] = qname
    else:
        zpos = _under(lname, table.zone)
        if zpos < 0 or _under(lname, table.pod_zone) >= 0:
            return None, qtype
        rcode = 0 if lname in table.names else 3
        out = bytearray(q[0:2])
        out += bytes((0x84 | flags2, 0x80 | flags3 | rcode, 0, 1, 0, 0, 0, 1, 0, 0))
        out += q[12:qend + 4]
        ptr = 0xC000 | (12 + zpos)
        out += bytes((ptr >> 8, ptr & 0xFF))
        out += table.soa_tail
    if edns >= 0:
        out[11] += 1
        out += table.opt_rr
    if len(out) > limit:
        out = bytearray(q[0:2]) + bytes((out[2] | 0x02, out[3], 0, 1, 0, 0, 0, 0, 0, 1 if edns >= 0 else 0))
        out += q[12:qend + 4]
        if edns >= 0:
            out += table.opt_rr
    return bytes(out), qtype


def answer(query: bytes, table: Table, tcp: bool) -> bytes | None:
    return _answer(query, table, tcp)[0]


class Stats:
    """Counters the /metrics endpoint exports: requests by qtype, responses by rcode, a latency
    histogram (seconds, CoreDNS buckets, last slot +Inf)."""

    def __init__(self) -> None:
        self.types = [0] * 65536
        self.rcodes = [0] * 16
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def record(self, qtype: int, rcode: int, seconds: float) -> None:
        self.types[qtype & 0xFFFF] += 1
        self.rcodes[rcode & 0xF] += 1
        i = 0
        while i < len(BUCKETS) and seconds > BUCKETS[i]:
            i += 1
        self.buckets[i] += 1
        self.total += seconds
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "types": {t: c for t, c in enumerate(self.types) if c},
            "rcodes": {r: c for r, c in enumerate(self.rcodes) if c},
            "buckets": list(self.buckets),
            "sum": self.total,
            "count": self.count,
        }


def reply_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The control message to send a reply with, from the query's IP_PKTINFO/IPV6_PKTINFO: the
    reply must leave from the address the query was sent to (a socket bound to 0.0.0.0 on a host
    with several addresses would otherwise answer from another one, which clients drop)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            _, _, dst = struct.unpack_from("=i4s4s", data)
            return [(level, kind, struct.pack("=i4s4s", 0, dst, dst))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            return [(level, kind, data)]
    return []


def drain_udp(sock: socket.socket, table: Table, stats: Stats,
              max_batches: int) -> list[tuple[bytes, Any, list[tuple[int, int, bytes]]]]:
    """Answer datagrams until the socket is empty or max_batches*64 were read; the ones the table
    cannot answer, or whose source it does not allow, are returned as (query, address, reply ancillary data) for the slow path."""
    misses: list[tuple[bytes, Any, list[tuple[int, int, bytes]]]] = []
    for _ in range(max_batches * BATCH):
        try:
            data, ancdata, flags, addr = sock.recvmsg(4096, 64)
        except (BlockingIOError, InterruptedError):
            break
        if flags & socket.MSG_TRUNC:
            continue  # over 4096 octets: no DNS client sends such a query (as the compiled twin)
        t0 = time.perf_counter()
        anc = reply_ancillary(ancdata)
        resp, qtype = _answer(data, table, False) if allowed(addr, table) else (None, -1)
        if resp is None:
            misses.append((data, addr, anc))
            continue
        try:
            if anc:
                sock.sendmsg([resp], anc, 0, addr)
            else:
                sock.sendto(resp, addr)
        except OSError:
            pass  # full socket buffer or unreachable client: UDP drops, the client retries
        stats.record(qtype, resp[3] & 0xF, time.perf_counter() - t0)
    return misses


def forget_socket(sock: socket.socket) -> None:
    """Twin of the compiled module's buffer release; the pure loop keeps no per-socket state."""

"""What to answer: the cluster zone authoritatively, everything else forwarded (with a cache).

`Resolver.local` is synchronous and answers all it can without I/O: the pre-encoded table (the
hot path), then the full parse for the unusual cases (FORMERR, NOTIMP, BADVERS, pod names,
SERVFAIL before the first sync). Only names outside the zone come back as a `Forward`, which
`Resolver.forward` resolves through the cache or the upstream servers.
"""
from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from collections import OrderedDict
from typing import Any

from kdns import wire
from kdns.acl import LOOPBACK, Acl
from kdns.records import ZoneIndex
from kdns.wire import Edns, Message, Question, WireError

log = logging.getLogger("kdns.resolver")

MAX_POSITIVE_TTL = 3600  # CoreDNS cache defaults
MAX_NEGATIVE_TTL = 1800


class LogLimit:
    """At most one line per `every` seconds per kind, then a count of what was left out: a client
    sending bad packets (or names whose upstream fails) must not get a log line, and disk, each."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.last: dict[str, float] = {}
        self.skipped: dict[str, int] = {}

    def __call__(self, kind: str) -> int | None:
        """None to stay quiet, else the number of lines left out since the last one."""
        now = time.monotonic()
        if now - self.last.get(kind, -1e9) < self.every:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            return None
        self.last[kind] = now
        return self.skipped.pop(kind, 0)


class Forward:
    """A query for a name outside the cluster zone, already parsed."""

    __slots__ = ("msg", "started", "tcp")

    def __init__(self, msg: Message, tcp: bool, started: float) -> None:
        self.msg = msg
        self.tcp = tcp
        self.started = started


class _Entry:
    __slots__ = ("expires", "msg", "stored")

    def __init__(self, expires: float, stored: float, msg: Message) -> None:
        self.expires = expires
        self.stored = stored
        self.msg = msg


class Cache:
    """Bounded LRU of upstream answers keyed by (lowercase name, qtype, qclass). Positive entries
    live for the smallest TTL of the answer, negative ones (NXDOMAIN, NODATA) for the SOA's
    negative TTL (RFC 2308), both capped; SERVFAIL and anything without an SOA is not cached."""

    def __init__(self, size: int = 10000) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[str, int, int], _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.denial_hits = 0  # of the hits: NXDOMAIN/NODATA (CoreDNS's cache type="denial")

    def get(self, key: tuple[str, int, int], now: float) -> tuple[Message, int] | None:
        e = self.entries.get(key)
        if e is None or e.expires <= now:
            if e is not None:
                del self.entries[key]
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        if not e.msg.answers:
            self.denial_hits += 1
        return e.msg, int(now - e.stored)

    def put(self, key: tuple[str, int, int], msg: Message, now: float) -> None:
        if self.size <= 0:
            return
        rcode = msg.rcode
        if rcode == wire.NOERROR and msg.answers:
            ttl = min(min(rr.ttl for rr in msg.answers), MAX_POSITIVE_TTL)
        elif rcode in (wire.NOERROR, wire.NXDOMAIN):
            soas = [rr for rr in msg.authority if rr.rtype == wire.SOA]
            if not soas:
                return
            data: Any = soas[0].data
            ttl = min(soas[0].ttl, int(data[6]), MAX_NEGATIVE_TTL)
        else:
            return
        if ttl <= 0:
            return
        self.entries[key] = _Entry(now + ttl, now, msg)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def _age(rrs: list[wire.RR], age: int) -> list[wire.RR]:
    if not age:
        return rrs
    return [wire.RR(r.name, r.rtype, max(0, r.ttl - age), r.data, r.rclass) for r in rrs]


def _limit(msg: Message, tcp: bool, udp_size: int) -> int:
    """RFC 6891 6.2.5 / RFC 7766: over UDP the smaller of the requester's size (512 without EDNS)
    and ours, whatever the requester advertises; TCP takes a whole message."""
    if tcp:
        return 65535
    if msg.edns is None:
        return 512
    return int(min(max(512, msg.edns.udp_size), udp_size))


class Resolver:
    """allow_query: sources that get answers at all (others: REFUSED); allow_recursion: sources
    whose names outside the zone are forwarded (others: REFUSED). A query with no source (None)
    comes from inside the process and is trusted. udp_size: the largest UDP answer, advertised."""

    def __init__(self, index: ZoneIndex, upstreams: list[tuple[str, int]], stats: Any,
                 cache_size: int = 10000, timeout: float = 2.0, *, allow_query: Acl | None = None,
                 allow_recursion: Acl | None = None, udp_size: int = wire.SERVER_UDP_SIZE) -> None:
        self.index = index
        self.allow_query = allow_query or Acl(LOOPBACK)
        self.allow_recursion = allow_recursion or Acl(LOOPBACK)
        self.udp_size = udp_size
        self.refused_query = 0  # queries from sources outside allow_query
        self.refused_recursion = 0  # names outside the zone asked by sources outside allow_recursion
        self.refresh_guard()
        self.upstreams = upstreams
        self.stats = stats
        self.cache = Cache(cache_size)
        self.timeout = timeout
        self.upstream_errors = 0
        self.internal_errors = 0  # bugs caught by the last line of defence; tests assert 0
        # Upstream queries in flight by cache key: identical questions arriving meanwhile (many
        # pods resolving the same external name) wait for the one exchange instead of repeating it.
        self.inflight: dict[tuple[str, int, int], asyncio.Future[Message]] = {}
        self.coalesced = 0
        self.log_limit = LogLimit()
        # Python-side counters for CoreDNS's metric labels the hot path does not split: requests
        # over TCP by qtype (UDP = all - TCP), and per upstream "host:port": queries sent,
        # answers by rcode, and exchange durations (histogram counts over wire.impl.BUCKETS).
        self.tcp_types: dict[int, int] = {}
        self.fwd_requests: dict[str, int] = {}
        self.fwd_responses: dict[tuple[str, int], int] = {}
        self.fwd_durations: dict[str, list[float]] = {}

    def refresh_guard(self) -> None:
        """The hot path answers from the table without asking Python: it gets the same rules
        (again after allow_query changed)."""
        self.index.table.guard(*self.allow_query.packed(), self.udp_size)

    # ------------------------------------------------------------------------- local

    def local(self, data: bytes, tcp: bool, source: str | None = None) -> bytes | Forward | None:
        """Response bytes, a Forward to resolve, or None to drop the packet. Never raises for
        any input: a malformed query gets FORMERR when its header is readable. `source` is the
        client's address, checked against allow_query and (for forwarding) allow_recursion."""
        t0 = time.perf_counter()
        try:
            out: bytes | Forward | None
            if source is not None and not self.allow_query.allows(source):
                self.refused_query += 1
                out = self._refuse(data, tcp)
            else:
                out = wire.impl.answer(data, self.index.table, tcp)
                if out is None:
                    out = self._slow(data, tcp, t0)
                if isinstance(out, Forward) and source is not None and not self.allow_recursion.allows(source):
                    self.refused_recursion += 1
                    out = self._reply(out.msg, wire.REFUSED, aa=False, tcp=tcp)
        except Exception:  # the last line of defence: one bad packet, not the whole server
            self.internal_errors += 1
            skipped = self.log_limit("internal")
            if skipped is not None:
                log.exception("query handling failed len=%d (%d more not logged)", len(data), skipped)
            out = self._error(data, wire.SERVFAIL) if len(data) >= 12 else None
        if isinstance(out, bytes):
            self._record(data, out, t0, tcp)
        return out

    def _record(self, query: bytes, resp: bytes, t0: float, tcp: bool) -> None:
        qtype = 0
        try:
            _, pos = wire.read_name(query, 12)
            qtype = struct.unpack_from("!H", query, pos)[0]
        except (WireError, struct.error, IndexError):
            pass
        self.stats.record(qtype, resp[3] & 0xF, time.perf_counter() - t0)
        if tcp:
            self._count_tcp(qtype)

    def _refuse(self, data: bytes, tcp: bool) -> bytes | None:
        """REFUSED for a source outside allow_query (unbound's `refuse`, CoreDNS acl's `block`):
        with the question when it parses, header-only when not; responses are never answered."""
        if len(data) < 12 or data[2] & 0x80:
            return None
        try:
            msg = wire.parse_message(data)
        except WireError:
            return self._error(data, wire.REFUSED)
        return self._reply(msg, wire.REFUSED, aa=False, tcp=tcp)

    @staticmethod
    def _error(data: bytes, rcode: int) -> bytes:
        """Header-only error response for a query we could not parse."""
        mid, flags = struct.unpack_from("!HH", data, 0)
        return bytes(struct.pack("!HHHHHH", mid, wire.QR | (flags & (wire.RD | 0x7800)) | rcode, 0, 0, 0, 0))

    def _reply(self, msg: Message, rcode: int, answers: list[wire.RR] | None = None,
               authority: list[wire.RR] | None = None, additional: list[wire.RR] | None = None,
               aa: bool = True, tcp: bool = False) -> bytes:
        flags = wire.QR | wire.RA | (msg.flags & (wire.RD | wire.CD)) | (wire.AA if aa else 0) | (rcode & 0xF)
        edns = Edns(udp_size=self.udp_size, ext_rcode=rcode >> 4) if msg.edns is not None else None
        out = Message(id=msg.id, flags=flags, questions=msg.questions, answers=answers or [],
                      authority=authority or [], additional=additional or [], edns=edns)
        body: bytes = wire.encode_message(out)
        if len(body) > _limit(msg, tcp, self.udp_size):
            out.flags |= wire.TC
            out.answers, out.authority, out.additional = [], [], []
            body = wire.encode_message(out)
        return body

    def _slow(self, data: bytes, tcp: bool, t0: float) -> bytes | Forward | None:
        if len(data) < 12:
            return None
        try:
            msg = wire.parse_message(data)
        except WireError as exc:
            skipped = self.log_limit("malformed")
            if skipped is not None:
                log.debug("malformed query: %s (%d more not logged)", exc, skipped)
            if data[2] & 0x80:
                return None  # a response sent to us: never answer it (reflection loops)
            return self._error(data, wire.FORMERR)
        if msg.flags & wire.QR:
            return None
        if (msg.flags >> 11) & 0xF != 0:
            return self._reply(msg, wire.NOTIMP, aa=False, tcp=tcp)
        if len(msg.questions) != 1:
            return self._reply(msg, wire.FORMERR, aa=False, tcp=tcp)
        if msg.edns is not None and msg.edns.version != 0:
            return self._reply(msg, wire.BADVERS, aa=False, tcp=tcp)
        q = msg.questions[0]
        idx = self.index
        if idx.in_zone(q.name):
            if not idx.synced:
                return self._reply(msg, wire.SERVFAIL, aa=False, tcp=tcp)
            if q.qclass != wire.CLASS_IN:
                return self._reply(msg, wire.REFUSED, aa=False, tcp=tcp)
            pod = idx.pod_answer(q.name, q.qtype)
            if pod is not None:
                rcode, rrs = pod
                rrs = [wire.RR(q.name, r.rtype, r.ttl, r.data) for r in rrs]  # echo the case
                return self._reply(msg, rcode, answers=rrs, authority=[] if rrs else [idx.soa_rr()], tcp=tcp)
        if q.qclass == wire.CLASS_IN and idx.synced:
            # The same table as the hot path, fed a canonical query (e.g. the question had a
            # compression pointer, or extra OPT options layout the hot path does not take).
            canon = Message(id=msg.id, flags=msg.flags & (wire.RD | wire.CD), questions=[q],
                            answers=[], authority=[], additional=[],
                            edns=Edns(udp_size=msg.edns.udp_size) if msg.edns is not None else None)
            out = wire.impl.answer(wire.encode_message(canon), idx.table, tcp)
            if out is not None:
                return bytes(out)
        if idx.in_zone(q.name):
            return self._reply(msg, wire.REFUSED, aa=False, tcp=tcp)
        if not self.upstreams:
            return self._reply(msg, wire.REFUSED, aa=False, tcp=tcp)
        return Forward(msg, tcp, t0)

    # ------------------------------------------------------------------------ forward

    async def forward(self, fwd: Forward) -> bytes:
        msg = fwd.msg
        q = msg.questions[0]
        key = (q.name.lower(), q.qtype, q.qclass)
        now = time.monotonic()
        cached = self.cache.get(key, now)
        if cached is not None:
            up, age = cached
        else:
            try:
                up = await self._shared_exchange(key, q)
            except (TimeoutError, OSError, WireError) as exc:
                self.upstream_errors += 1
                skipped = self.log_limit("upstream")
                if skipped is not None:
                    log.warning("upstream failed name=%s type=%d err=%r (%d more not logged)", q.name, q.qtype, exc,
                                skipped)
                out = self._reply(msg, wire.SERVFAIL, aa=False, tcp=fwd.tcp)
                self.stats.record(q.qtype, wire.SERVFAIL, time.perf_counter() - fwd.started)
                if fwd.tcp:
                    self._count_tcp(q.qtype)
                return out
            age = 0
        answers = [wire.RR(q.name if r.name.lower() == key[0] else r.name, r.rtype, r.ttl, r.data, r.rclass)
                   for r in _age(up.answers, age)]
        out = self._reply(msg, up.rcode, answers=answers, authority=_age(up.authority, age),
                          additional=_age(up.additional, age), aa=False, tcp=fwd.tcp)
        self.stats.record(q.qtype, up.rcode & 0xF, time.perf_counter() - fwd.started)
        if fwd.tcp:
            self._count_tcp(q.qtype)
        return out

    def _count_tcp(self, qtype: int) -> None:
        key = qtype if qtype in wire.TYPE_NAMES else -1  # rare types share one key: a bounded dict
        self.tcp_types[key] = self.tcp_types.get(key, 0) + 1

    def _forwarded(self, to: str, rcode: int, seconds: float) -> None:
        self.fwd_responses[(to, rcode)] = self.fwd_responses.get((to, rcode), 0) + 1
        hist = self.fwd_durations.get(to)
        if hist is None:
            hist = self.fwd_durations[to] = [0.0] * (len(wire.impl.BUCKETS) + 2)  # buckets, +Inf, sum
        i = 0
        while i < len(wire.impl.BUCKETS) and seconds > wire.impl.BUCKETS[i]:
            i += 1
        hist[i] += 1
        hist[-1] += seconds

    async def _shared_exchange(self, key: tuple[str, int, int], q: Question) -> Message:
        pending = self.inflight.get(key)
        if pending is not None:
            self.coalesced += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            up = await self._exchange(q)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it; nobody waiting is not an error
            raise
        else:
            fut.set_result(up)
            self.cache.put(key, up, time.monotonic())
            return up
        finally:
            del self.inflight[key]

    async def _exchange(self, q: Question) -> Message:
        last: Exception = OSError("no upstream configured")
        for host, port in self.upstreams:
            mid = random.getrandbits(16)
            query = wire.make_query(q.name, q.qtype, mid=mid, edns=Edns(udp_size=wire.SERVER_UDP_SIZE))
            to = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
            self.fwd_requests[to] = self.fwd_requests.get(to, 0) + 1
            t0 = time.perf_counter()
            try:
                data = await _udp_exchange(host, port, query, self.timeout)
                resp = wire.parse_message(data)
                if resp.flags & wire.TC:
                    resp = wire.parse_message(await _tcp_exchange(host, port, query, self.timeout))
                self._forwarded(to, resp.rcode, time.perf_counter() - t0)
                if resp.id != mid or not resp.questions or resp.questions[0].name.lower() != q.name.lower():
                    raise WireError(f"upstream {host}:{port} answered a different question")
                if resp.rcode in (wire.SERVFAIL, wire.REFUSED, wire.NOTIMP):
                    raise OSError(f"upstream {host}:{port} answered rcode {resp.rcode}")
                return resp
            except (TimeoutError, OSError, WireError) as exc:
                last = exc
        raise last


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future[bytes], mid: bytes) -> None:
        self.fut = fut
        self.mid = mid

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.fut.done() and data[:2] == self.mid:
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


async def _udp_exchange(host: str, port: int, query: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Reply(fut, query[:2]), remote_addr=(host, port))
    try:
        transport.sendto(query)
        return await asyncio.wait_for(fut, timeout)
    finally:
        transport.close()


async def _tcp_exchange(host: str, port: int, query: bytes, timeout: float) -> bytes:
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            return await reader.readexactly(n)
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.IncompleteReadError as exc:
        raise OSError(f"upstream {host}:{port} closed the TCP connection early") from exc


def parse_upstream(text: str) -> tuple[str, int]:
    """host, host:port, [v6]:port or a bare v6 address."""
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host.rstrip("]"), int(port or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def resolv_conf_upstreams(path: str) -> list[tuple[str, int]]:
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append((parts[1].split("%")[0], 53))
    except FileNotFoundError:
        pass
    return out

"""kdns._wire (Cython) and kdns._purewire must produce identical bytes for the same packets and
tables; the general codec (wire.py) must agree with dnspython."""
from __future__ import annotations

import ipaddress
import random
import socket
import time
from types import ModuleType
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from dns_mutator import seeds
from hypothesis import given, settings
from hypothesis import strategies as st
from kdns import _purewire, wire
from kdns.acl import LOOPBACK, Acl
from kdns.objects import (
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    ObjectMeta,
    Service,
    ServicePort,
    ServiceSpec,
)
from kdns.records import ZoneIndex

_wire: ModuleType | None
try:
    from kdns import _wire
except ImportError:  # not built: the twin comparison cannot run
    _wire = None

needs_compiled = pytest.mark.skipif(_wire is None, reason="kdns._wire not built (setup.py build_ext --inplace)")
ZONE = "cluster.local"


def _index() -> ZoneIndex:
    idx = ZoneIndex(zone=ZONE, ttl=5, table=_purewire.Table())
    meta = ObjectMeta
    idx.set_service(Service(meta(name="web", namespace="default"),
                            ServiceSpec(cluster_ip="10.96.0.10", cluster_ips=["10.96.0.10", "fd00::10"],
                                        ports=[ServicePort("http", 80, "TCP")])))
    idx.set_service(Service(meta(name="db", namespace="prod"), ServiceSpec(cluster_ip="None")))
    idx.set_slice(EndpointSlice(
        meta(name="db-1", namespace="prod", labels={"kubernetes.io/service-name": "db"}),
        endpoints=[Endpoint([f"10.1.0.{i}"], EndpointConditions(True), hostname=f"db-{i}" if i % 2 else None)
                   for i in range(1, 40)],
        ports=[EndpointPort("pg", 5432, "TCP")]))
    idx.set_service(Service(meta(name="ext", namespace="default"),
                            ServiceSpec(type="ExternalName", external_name="example.com")))
    idx.mark_synced()
    return idx


def _tables(idx: ZoneIndex) -> list[Any]:
    tables: list[Any] = []
    for mod in [m for m in (_wire, _purewire) if m is not None]:
        t = mod.Table()
        t.update(idx.answers, idx.names, idx._zone_wire, idx._pod_wire, idx._soa_tail, True)
        tables.append((mod, t))
    return tables


NAMES = [f"web.default.svc.{ZONE}", f"WEB.Default.svc.{ZONE}", f"db.prod.svc.{ZONE}", f"_pg._tcp.db.prod.svc.{ZONE}",
         f"db-1.db.prod.svc.{ZONE}", f"10-1-0-2.db.prod.svc.{ZONE}", f"nope.prod.svc.{ZONE}", f"prod.svc.{ZONE}",
         ZONE, f"dns-version.{ZONE}", f"1-2-3-4.ns.pod.{ZONE}", "10.0.96.10.in-addr.arpa", "example.org",
         f"ext.default.svc.{ZONE}", "xcluster.local", f"a.b.c.d.e.f.g.{ZONE}"]
TYPES = ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "CNAME", "MX", "ANY"]


def corpus(n_mutations: int = 3000, seed: int = 1) -> list[bytes]:
    """Real queries in many shapes, then byte-level mutations of them."""
    rnd = random.Random(seed)
    base = seeds(seed, NAMES, list(TYPES), (None, 512, 1232, 4096, 100))
    out = list(base)
    for _ in range(n_mutations):
        p = bytearray(rnd.choice(base))
        op = rnd.randrange(4)
        if op == 0:
            p[rnd.randrange(len(p))] = rnd.randrange(256)
        elif op == 1:
            del p[rnd.randrange(len(p)):]
        elif op == 2:
            p.insert(rnd.randrange(len(p)), rnd.randrange(256))
        else:
            for _ in range(rnd.randrange(1, 6)):
                p[rnd.randrange(len(p))] ^= 1 << rnd.randrange(8)
        out.append(bytes(p))
    return out


@needs_compiled
@pytest.mark.timeout(60)
def test_dns_twins_answer_identical_bytes() -> None:
    idx = _index()
    (cmod, ct), (pmod, pt) = _tables(idx)
    answered = 0
    for packet in corpus():
        for tcp in (False, True):
            c = cmod.answer(packet, ct, tcp)
            p = pmod.answer(packet, pt, tcp)
            assert c == p, f"twins differ on {packet.hex()} tcp={tcp}"
            answered += c is not None
    assert answered > 500  # the corpus really exercises the answer path, not only the rejects


@needs_compiled
@pytest.mark.timeout(60)
def test_dns_twins_not_synced_and_empty_tables() -> None:
    for mod in (_wire, _purewire):
        t = mod.Table()  # type: ignore[union-attr]
        q = dns.message.make_query(f"web.default.svc.{ZONE}", "A").to_wire()
        assert mod.answer(q, t, False) is None  # type: ignore[union-attr]


@needs_compiled
@pytest.mark.timeout(60)
def test_dns_twins_drain_udp_and_stats() -> None:
    """The batched socket loops answer the same datagrams with the same bytes and hand the same
    misses back, and count the same requests and rcodes."""
    idx = _index()
    queries = [q for q in corpus(n_mutations=200, seed=3)][:400]
    results: list[tuple[list[bytes], list[bytes], dict[str, Any]]] = []
    for mod, table in _tables(idx):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            server.bind(("127.0.0.1", 0))
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            server.setblocking(False)
            client.bind(("127.0.0.1", 0))
            client.settimeout(1.0)
            stats = mod.Stats()
            replies: list[bytes] = []
            misses: list[bytes] = []
            for i in range(0, len(queries), 50):  # in chunks so no datagram is dropped by the kernel
                chunk = queries[i:i + 50]
                for q in chunk:
                    client.sendto(q, server.getsockname())
                answered0, misses0 = stats.snapshot()["count"], len(misses)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    for data, addr, anc in mod.drain_udp(server, table, stats, 4):
                        assert addr == client.getsockname() and anc == []  # no PKTINFO asked for
                        misses.append(data)
                    done = stats.snapshot()["count"] - answered0 + len(misses) - misses0
                    if done >= len(chunk):
                        break
                    time.sleep(0.005)
                for _ in range(stats.snapshot()["count"] - answered0):
                    replies.append(client.recvfrom(65535)[0])
            results.append((replies, misses, stats.snapshot()))
            if hasattr(mod, "forget_socket"):
                mod.forget_socket(server)
        finally:
            server.close()
            client.close()
    (cr, cm, cs), (pr, pm, ps) = results
    assert cr == pr and cm == pm
    assert cs["types"] == ps["types"] and cs["rcodes"] == ps["rcodes"] and cs["count"] == ps["count"]
    assert len(cr) + len(cm) == len(queries)
    assert cs["count"] == len(cr) > 100


def _dnspython_equal(ours: bytes, theirs: dns.message.Message) -> None:
    parsed = dns.message.from_wire(ours)
    assert parsed.question == theirs.question
    assert parsed.answer == theirs.answer
    assert parsed.authority == theirs.authority
    assert parsed.additional == theirs.additional


@pytest.mark.timeout(60)
def test_dns_codec_matches_dnspython() -> None:
    idx = _index()
    for key, resp in list(idx.answers.items())[:200]:
        m = dns.message.from_wire(resp)  # every pre-encoded answer is valid wire format
        ours = wire.parse_message(resp)
        assert ours.id == 0 and ours.flags & wire.AA and ours.questions[0].qtype == m.question[0].rdtype
        assert len(ours.answers) == sum(len(r) for r in m.answer)
        assert len(ours.additional) == sum(len(r) for r in m.additional)
        # re-encoding what we parsed gives what dnspython parses the same way
        _dnspython_equal(wire.encode_message(ours), m)


@pytest.mark.timeout(60)
def test_dns_parse_dnspython_compressed_messages() -> None:
    r = dns.message.make_response(dns.message.make_query("a.example.org", "MX"))
    r.answer.append(dns.rrset.from_text("a.example.org.", 30, "IN", "MX", "10 mail.example.org."))
    r.answer.append(dns.rrset.from_text("a.example.org.", 30, "IN", "CNAME", "b.example.org."))
    r.authority.append(dns.rrset.from_text("example.org.", 60, "IN", "SOA", "ns.example.org. h.example.org. 1 2 3 4 5"))
    r.additional.append(dns.rrset.from_text("mail.example.org.", 30, "IN", "AAAA", "2001:db8::1"))
    r.additional.append(dns.rrset.from_text("x.example.org.", 30, "IN", "TXT", '"a b" "c"'))
    data = r.to_wire()
    assert b"\xc0" in data  # dnspython compressed it
    msg = wire.parse_message(data)
    assert msg.answers[0].data == (10, "mail.example.org")
    assert msg.answers[1].data == "b.example.org"
    assert msg.authority[0].data == ("ns.example.org", "h.example.org", 1, 2, 3, 4, 5)
    assert msg.additional[0].data == "2001:db8::1" and msg.additional[1].data == ("a b", "c")
    assert (msg.edns is None) == (r.edns < 0)


@pytest.mark.timeout(30)
def test_dns_name_limits() -> None:
    with pytest.raises(wire.WireError):
        wire.name_to_wire("a" * 64 + ".example")
    with pytest.raises(wire.WireError):
        wire.name_to_wire(".".join(["abcdefghi"] * 30))
    # a pointer chain that only goes backwards still cannot exceed 255 octets
    data = bytearray(12)
    data += b"\x3f" + b"a" * 63 + b"\x00"
    for _ in range(6):
        start = len(data)
        data += b"\x3f" + b"b" * 63 + bytes([0xC0 | ((start - 66) >> 8), (start - 66) & 0xFF])
    with pytest.raises(wire.WireError):
        wire.read_name(bytes(data), len(data) - 66)


_rules = st.lists(st.tuples(st.binary(min_size=4, max_size=4), st.integers(0, 32)), max_size=4)
_rules6 = st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 128)), max_size=4)


def _packed(rules: list[tuple[bytes, int]], v6: bool) -> bytes:
    nets = [ipaddress.ip_network((ipaddress.ip_address(raw), plen), strict=False) for raw, plen in rules]
    return Acl(nets).packed()[1 if v6 else 0]


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(_rules, _rules6, st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16),
       st.sampled_from(["v4", "v6", "mapped"]))
def test_dns_twins_and_acl_agree_on_sources(r4: list[tuple[bytes, int]], r6: list[tuple[bytes, int]],
                                            a4: bytes, a6: bytes, kind: str) -> None:
    """The hot path's byte-wise source check (both twins) says what kdns.acl.Acl says."""
    acl = Acl([ipaddress.ip_network((ipaddress.ip_address(raw), plen), strict=False) for raw, plen in r4 + r6])
    host = {"v4": str(ipaddress.IPv4Address(a4)), "v6": str(ipaddress.IPv6Address(a6)),
            "mapped": "::ffff:" + str(ipaddress.IPv4Address(a4))}[kind]
    verdicts = set()
    for mod in (_wire, _purewire):
        t = mod.Table()  # type: ignore[union-attr]
        t.guard(_packed(r4, False), _packed(r6, True), 1232)
        verdicts.add(mod.allowed((host, 53), t))  # type: ignore[union-attr]
    assert verdicts == {acl.allows(host)}


@needs_compiled
@pytest.mark.timeout(60)
@pytest.mark.parametrize("udp_size", [512, 700, 1232, 4096])
def test_dns_twins_identical_under_every_udp_size(udp_size: int) -> None:
    idx = _index()
    pairs = _tables(idx)
    for _, t in pairs:
        t.guard(*Acl(LOOPBACK).packed(), udp_size)
    (cmod, ct), (pmod, pt) = pairs
    truncated = 0
    for packet in corpus(n_mutations=500, seed=udp_size):
        c = cmod.answer(packet, ct, False)
        assert c == pmod.answer(packet, pt, False), f"twins differ on {packet.hex()} udp_size={udp_size}"
        if c is not None:
            assert len(c) <= max(512, udp_size)
            m = dns.message.from_wire(c)
            truncated += bool(m.flags & dns.flags.TC)
            if m.edns >= 0:
                assert m.payload == udp_size  # what we advertise is what we keep to
    assert udp_size > 1232 or truncated  # the corpus has answers over the smaller sizes


@needs_compiled
@pytest.mark.timeout(60)
def test_dns_twins_drain_udp_refuses_to_answer_other_sources() -> None:
    """A datagram from a source outside the table's networks is never answered by the hot path:
    it is handed back (the slow path answers REFUSED)."""
    idx = _index()
    q = dns.message.make_query(f"web.default.svc.{ZONE}", "A").to_wire()
    for mod, table in _tables(idx):
        table.guard(Acl([ipaddress.ip_network("10.0.0.0/8")]).packed()[0], b"", 1232)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            server.bind(("127.0.0.1", 0))
            server.setblocking(False)
            client.sendto(q, server.getsockname())
            time.sleep(0.05)
            misses = mod.drain_udp(server, table, mod.Stats(), 1)
            assert [m[0] for m in misses] == [q]
            table.guard(*Acl(LOOPBACK).packed(), 1232)
            client.sendto(q, server.getsockname())
            time.sleep(0.05)
            assert mod.drain_udp(server, table, mod.Stats(), 1) == []
            client.settimeout(2)
            assert client.recvfrom(2048)[0][:2] == q[:2]
            if hasattr(mod, "forget_socket"):
                mod.forget_socket(server)

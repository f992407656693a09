"""Transport behaviour of a running kproxy-dns: TCP pipelining, truncation, EDNS, malformed
packets, /health /ready /metrics, SERVFAIL until the first sync."""
from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dns_helpers import ZONE, KdnsProcess, endpoint_slice, service, start_kdns

BIG = 60  # endpoints of the headless "big" service: ~1 KiB of A records


@pytest.fixture(scope="module")
def srv() -> Iterator[KdnsProcess]:
    objects = [
        service("web", ip="10.96.0.10", ports=[("http", 80, "TCP")]),
        service("big", headless=True, ports=[("http", 80, "TCP")]),
        endpoint_slice("big-a", "big", [(f"10.2.{i // 250}.{i % 250 + 1}", None, True) for i in range(BIG)],
                       ports=[("http", 8080, "TCP")]),
    ]
    p = start_kdns(objects, ["--upstream", "127.0.0.1:9", "--upstream-timeout", "0.3"])
    yield p
    p.stop()


def _tcp_exchange_many(port: int, queries: list[bytes], timeout: float = 5.0) -> list[bytes]:
    """Send all queries on one connection before reading anything (pipelining)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"".join(struct.pack("!H", len(q)) + q for q in queries))
        out = []
        buf = b""
        deadline = time.monotonic() + timeout
        while len(out) < len(queries) and time.monotonic() < deadline:
            chunk = s.recv(65535)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                n = struct.unpack("!H", buf[:2])[0]
                out.append(buf[2:2 + n])
                buf = buf[2 + n:]
        return out


@pytest.mark.timeout(30)
def test_dns_tcp_pipelined(srv: KdnsProcess) -> None:
    names = [f"web.default.svc.{ZONE}", f"nope.default.svc.{ZONE}", f"_http._tcp.big.default.svc.{ZONE}",
             f"10-1-2-3.default.pod.{ZONE}"]
    types = ["A", "A", "SRV", "A"]
    qs = [dns.message.make_query(n, t) for n, t in zip(names, types)]
    replies = [dns.message.from_wire(r) for r in _tcp_exchange_many(srv.port, [q.to_wire() for q in qs])]
    assert len(replies) == 4
    by_id = {r.id: r for r in replies}
    assert [by_id[q.id].rcode() for q in qs] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.NOERROR,
                                                 dns.rcode.NOERROR]
    assert len(by_id[qs[2].id].answer[0]) == BIG  # 60 SRV records: far over 512 octets, fine on TCP


@pytest.mark.timeout(30)
def test_dns_truncation_then_tcp(srv: KdnsProcess) -> None:
    name = f"big.default.svc.{ZONE}"
    small = srv.query(name, "A", payload=None)  # no EDNS: 512 octets
    assert small.flags & dns.flags.TC and not small.answer
    assert small.question[0].name.to_text() == name + "."
    edns_small = srv.query(name, "A", payload=600)
    assert edns_small.flags & dns.flags.TC and edns_small.edns == 0
    big_enough = srv.query(name, "A", payload=4096)
    assert not big_enough.flags & dns.flags.TC and len(big_enough.answer[0]) == BIG
    full = srv.query(name, "A", tcp=True, payload=None)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == BIG
    # dig retries over TCP by itself on TC
    out = srv.dig(name, "+noedns")
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 60" in out


@pytest.mark.timeout(30)
def test_dns_malformed_never_kills_the_server(srv: KdnsProcess) -> None:
    good = dns.message.make_query(f"web.default.svc.{ZONE}", "A").to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        # header readable, body garbage: FORMERR with the same ID
        s.sendto(good[:12] + b"\x05abc", ("127.0.0.1", srv.port))
        r, _ = s.recvfrom(4096)
        assert r[:2] == good[:2] and r[3] & 0xF == dns.rcode.FORMERR and r[2] & 0x80
        # a compression loop in the question: FORMERR, not a hang
        loop = good[:12] + b"\xc0\x0c\x00\x01\x00\x01"
        s.sendto(loop, ("127.0.0.1", srv.port))
        r, _ = s.recvfrom(4096)
        assert r[3] & 0xF == dns.rcode.FORMERR
        # shorter than a header: dropped; a response (QR=1): dropped (no reflection)
        s.sendto(b"\x01\x02\x03", ("127.0.0.1", srv.port))
        s.sendto(bytes([good[0], good[1], good[2] | 0x80]) + good[3:], ("127.0.0.1", srv.port))
        with pytest.raises(socket.timeout):
            s.settimeout(0.5)
            s.recvfrom(4096)
        # opcode STATUS: NOTIMP; two questions: FORMERR; EDNS version 1: BADVERS
        s.settimeout(2)
        s.sendto(bytes([good[0], good[1], (good[2] & 0x87) | (2 << 3)]) + good[3:], ("127.0.0.1", srv.port))
        r, _ = s.recvfrom(4096)
        assert r[3] & 0xF == dns.rcode.NOTIMP
        q2 = dns.message.make_query(f"web.default.svc.{ZONE}", "A")
        q2.question.append(q2.question[0])
        s.sendto(q2.to_wire(), ("127.0.0.1", srv.port))
        r, _ = s.recvfrom(4096)
        assert r[3] & 0xF == dns.rcode.FORMERR
        q3 = dns.message.make_query(f"web.default.svc.{ZONE}", "A", use_edns=1)
        s.sendto(q3.to_wire(), ("127.0.0.1", srv.port))
        assert dns.message.from_wire(s.recvfrom(4096)[0]).rcode() == dns.rcode.BADVERS
    # a TCP length prefix promising more than is sent, then a hang-up
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as t:
        t.sendall(b"\x00\x40" + good[:10])
    assert srv.alive()
    assert srv.query(f"web.default.svc.{ZONE}", "A").answer[0][0].to_text() == "10.96.0.10"


@pytest.mark.timeout(30)
def test_dns_health_ready_metrics(srv: KdnsProcess) -> None:
    assert srv.http("/health") == (200, "OK")
    assert srv.http("/ready") == (200, "OK")
    before = srv.http("/metrics")[1]
    for _ in range(3):
        srv.query(f"web.default.svc.{ZONE}", "A")
        srv.query(f"nope.default.svc.{ZONE}", "A")
    srv.query(f"_http._tcp.web.default.svc.{ZONE}", "SRV", tcp=True)
    status, text = srv.http("/metrics")
    assert status == 200

    def metric(body: str, line_prefix: str) -> float:
        for line in body.splitlines():
            if line.startswith(line_prefix + " "):
                return float(line.split()[-1])
        return 0.0

    assert metric(text, 'kdns_dns_requests_total{type="A"}') - metric(before, 'kdns_dns_requests_total{type="A"}') == 6
    assert metric(text, 'kdns_dns_requests_total{type="SRV"}') >= 1
    assert metric(text, 'kdns_dns_responses_total{rcode="NXDOMAIN"}') - \
        metric(before, 'kdns_dns_responses_total{rcode="NXDOMAIN"}') == 3
    assert metric(text, "kdns_dns_request_duration_seconds_count") >= 7
    assert 'kdns_dns_request_duration_seconds_bucket{le="+Inf"}' in text
    assert "kdns_cache_hits_total" in text and "kdns_cache_misses_total" in text
    # two rare query types are one "other" series, not two lines with the same labels
    srv.query(f"web.default.svc.{ZONE}", 99)
    srv.query(f"web.default.svc.{ZONE}", 100)
    series = [ln.rsplit(" ", 1)[0] for ln in srv.http("/metrics")[1].splitlines() if not ln.startswith("#")]
    assert len(series) == len(set(series))
    assert 'kdns_dns_requests_total{type="other"}' in series


@pytest.mark.timeout(40)
def test_dns_servfail_until_first_sync(kdns_factory: object, fake_upstream: object,
                                       dead_port: int) -> None:
    # An API server address where nothing listens: the reflectors never sync.
    up = fake_upstream({("outside.example", "A"): (60, ["192.0.2.1"])})  # type: ignore[operator]
    import os
    import tempfile

    dead = dead_port
    fd, kc = tempfile.mkstemp(suffix=".kubeconfig")
    with os.fdopen(fd, "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{dead}"}}}}]
users: [{{name: u, user: {{token: x}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    try:
        p = kdns_factory(None, ["--kubeconfig", kc, "--upstream", f"127.0.0.1:{up.port}"])  # type: ignore[operator]
        assert p.http("/ready")[0] == 503
        for qtype in ("A", "SRV", "SOA"):
            m = p.query(f"web.default.svc.{ZONE}" if qtype != "SOA" else ZONE, qtype)
            assert m.rcode() == dns.rcode.SERVFAIL
        # names outside the zone are still forwarded
        assert p.query("outside.example", "A").answer[0][0].to_text() == "192.0.2.1"
        assert p.http("/health")[0] == 200
    finally:
        os.unlink(kc)


@pytest.mark.timeout(30)
def test_dns_ipv6_listener(kdns_factory: object) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
            s6.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) in this environment")
    p = kdns_factory([service("web", ip=["10.96.0.10", "fd00:10:96::10"])],  # type: ignore[operator]
                     ["--dns-bind-address", "::1", "--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"])
    q = dns.message.make_query(f"web.default.svc.{ZONE}", "A")
    assert dns.query.udp(q, "::1", port=p.port, timeout=3).answer[0][0].to_text() == "10.96.0.10"
    assert dns.query.tcp(q, "::1", port=p.port, timeout=3).answer[0][0].to_text() == "10.96.0.10"
    # dig over the IPv6 listener, UDP and TCP, for the IPv6 ClusterIP of the dual-stack Service
    for transport in ("+notcp", "+tcp"):
        out = p.dig(f"web.default.svc.{ZONE}", "AAAA", transport, "+short", server="::1")  # type: ignore[attr-defined]
        assert out.strip() == "fd00:10:96::10", out
    # the slow path (pod names) answers IPv6 clients too: the miss carries a 4-tuple address
    pod = dns.message.make_query(f"10-0-0-1.default.pod.{ZONE}", "A")
    assert dns.query.udp(pod, "::1", port=p.port, timeout=3).answer[0][0].to_text() == "10.0.0.1"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_dns_wildcard_bind_replies_from_the_queried_address(kdns_factory: object, impl: str) -> None:
    """Bound to 0.0.0.0, a query to 127.0.0.2 must be answered from 127.0.0.2 (IP_PKTINFO), not
    from the route's preferred source 127.0.0.1: dnspython and dig drop such replies. Loopback
    owns all of 127/8, which makes this a multi-address host without touching any interface."""
    env = {"KDNS_PURE": "1"} if impl == "pure" else {}
    p = kdns_factory([service("web", ip="10.96.0.10")],  # type: ignore[operator]
                     ["--dns-bind-address", "0.0.0.0", "--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"],
                     env)
    for dst in ("127.0.0.2", "127.0.0.1"):
        fast = dns.message.make_query(f"web.default.svc.{ZONE}", "A")  # hot path
        assert dns.query.udp(fast, dst, port=p.port, timeout=3).answer[0][0].to_text() == "10.96.0.10"
        slow = dns.message.make_query(f"10-0-0-9.default.pod.{ZONE}", "A")  # slow path (pod record)
        assert dns.query.udp(slow, dst, port=p.port, timeout=3).answer[0][0].to_text() == "10.0.0.9"


@pytest.mark.timeout(60)
def test_dns_huge_headless_service_fits_one_message(kdns_factory: object) -> None:
    """3,000 endpoints: the SRV answer with its glue would exceed 64 KiB; it is cut to fit, and
    the A answer (48 KiB) is whole over TCP and truncated over UDP."""
    n = 3000
    p = kdns_factory([service("huge", headless=True, ports=[("http", 80, "TCP")]),  # type: ignore[operator]
                      endpoint_slice("huge-a", "huge", [(f"10.{8 + i // 60000}.{i // 250 % 240}.{i % 250 + 1}", None, True)
                                                        for i in range(n)], ports=[("http", 80, "TCP")])],
                     ["--upstream", "127.0.0.1:9"])
    a = p.query(f"huge.default.svc.{ZONE}", "A", tcp=True)
    assert len(a.answer[0]) == n
    srv = p.query(f"_http._tcp.huge.default.svc.{ZONE}", "SRV", tcp=True)
    assert 0 < len(srv.answer[0]) <= n and len(srv.to_wire()) <= 65535
    assert p.query(f"huge.default.svc.{ZONE}", "A", payload=4096).flags & dns.flags.TC
    assert p.alive()

"""Forwarding of non-cluster names to a fake upstream DNS server on loopback: answers, the
positive and negative cache with TTLs, TCP retry on truncation, SERVFAIL when upstream fails."""
from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.rcode
import pytest
from dns_helpers import ZONE, service


@pytest.mark.timeout(40)
def test_dns_forward_and_cache(kdns_factory: object, fake_upstream: object) -> None:
    up = fake_upstream({  # type: ignore[operator]
        ("www.example.org", "A"): (60, ["192.0.2.10"]),
        ("short.example.org", "A"): (1, ["192.0.2.11"]),
        ("www.example.org", "AAAA"): (60, ["2001:db8::10"]),
    }, neg_ttl=30)
    p = kdns_factory([service("web", ip="10.96.0.10")], ["--upstream", f"127.0.0.1:{up.port}"])  # type: ignore[operator]
    m = p.query("www.example.org", "A")
    assert m.rcode() == dns.rcode.NOERROR and not m.flags & dns.flags.AA and m.flags & dns.flags.RA
    assert m.answer[0][0].to_text() == "192.0.2.10"
    # cached: the upstream sees one query, the TTL counts down
    time.sleep(1.1)
    again = p.query("WWW.example.org", "A")
    assert again.answer[0][0].to_text() == "192.0.2.10" and again.answer[0].ttl <= 59
    assert again.question[0].name.to_text() == "WWW.example.org."
    assert up.count("www.example.org", "A") == 1
    # a 1 s TTL expires
    assert p.query("short.example.org", "A").answer[0][0].to_text() == "192.0.2.11"
    time.sleep(1.2)
    p.query("short.example.org", "A")
    assert up.count("short.example.org", "A") == 2
    # negative answers are cached too (NXDOMAIN and NODATA)
    assert p.query("missing.example.org", "A").rcode() == dns.rcode.NXDOMAIN
    assert p.query("missing.example.org", "A").rcode() == dns.rcode.NXDOMAIN
    assert up.count("missing.example.org", "A") == 1
    nodata = p.query("short.example.org", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    p.query("short.example.org", "MX")
    assert up.count("short.example.org", "MX") == 1
    # the cluster zone is never forwarded
    assert p.query(f"nope.default.svc.{ZONE}", "A").rcode() == dns.rcode.NXDOMAIN
    assert all(ZONE not in name for _, name, _ in up.log)
    # over TCP from the client too
    assert p.query("www.example.org", "AAAA", tcp=True).answer[0][0].to_text() == "2001:db8::10"
    metrics = p.http("/metrics")[1]
    hits = [ln for ln in metrics.splitlines() if ln.startswith("kdns_cache_hits_total ")]
    assert hits and float(hits[0].split()[1]) >= 3


@pytest.mark.timeout(40)
def test_dns_forward_tcp_retry_on_truncation(kdns_factory: object, fake_upstream: object) -> None:
    many = [f"192.0.2.{i}" for i in range(1, 101)]
    up = fake_upstream({("many.example.org", "A"): (60, many)}, truncate={"many.example.org"})  # type: ignore[operator]
    p = kdns_factory([], ["--upstream", f"127.0.0.1:{up.port}"])  # type: ignore[operator]
    m = p.query("many.example.org", "A", tcp=True)
    assert sorted(r.to_text() for r in m.answer[0]) == sorted(many)
    assert [t for t, n, _ in up.log if n == "many.example.org"] == ["udp", "tcp"]
    # to a UDP client with a small buffer it is truncated in turn (from the cache)
    small = p.query("many.example.org", "A", payload=None)
    assert small.flags & dns.flags.TC


@pytest.mark.timeout(40)
def test_dns_forward_upstream_down_servfail(kdns_factory: object, fake_upstream: object,
                                            dead_port: int) -> None:
    dead = dead_port  # nothing answers there: ICMP port unreachable on loopback
    up = fake_upstream({("ok.example.org", "A"): (60, ["192.0.2.7"])})  # type: ignore[operator]
    p = kdns_factory([], ["--upstream", f"127.0.0.1:{dead}", "--upstream-timeout", "0.5"])  # type: ignore[operator]
    t0 = time.monotonic()
    assert p.query("ok.example.org", "A").rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - t0 < 3
    # a second upstream is tried after the first fails
    p2 = kdns_factory([], ["--upstream", f"127.0.0.1:{dead}", "--upstream", f"127.0.0.1:{up.port}",  # type: ignore[operator]
                           "--upstream-timeout", "0.5"])
    assert p2.query("ok.example.org", "A").answer[0][0].to_text() == "192.0.2.7"
    assert p.alive() and p2.alive()


@pytest.mark.timeout(40)
def test_dns_forward_coalesces_identical_queries(kdns_factory: object, fake_upstream: object) -> None:
    up = fake_upstream({("slow.example.org", "A"): (60, ["192.0.2.99"])}, delay=0.5)  # type: ignore[operator]
    p = kdns_factory([], ["--upstream", f"127.0.0.1:{up.port}", "--upstream-timeout", "2"])  # type: ignore[operator]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        ids = list(range(1000, 1020))
        for i in ids:  # 20 pods asking at once, before the upstream has answered the first
            q = dns.message.make_query("slow.example.org", "A")
            q.id = i
            s.sendto(q.to_wire(), ("127.0.0.1", p.port))
        got = {}
        for _ in ids:
            r = dns.message.from_wire(s.recvfrom(4096)[0])
            got[r.id] = r.answer[0][0].to_text()
    assert got == {i: "192.0.2.99" for i in ids}
    assert up.count("slow.example.org", "A") == 1
    text = p.http("/metrics")[1]
    assert "kdns_forward_coalesced_total 19.0" in text

"""Every record of the Kubernetes DNS specification, asked of a running kproxy-dns with dnspython
and dig (the zone comes from a file of Services and EndpointSlices; test_dns_apiserver.py feeds
the same server from the API server)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dns_helpers import ZONE, KdnsProcess, endpoint_slice, service, start_kdns

OBJECTS = [
    service("web", ip="10.96.0.10", ports=[("http", 80, "TCP"), ("", 8080, "TCP")]),
    service("dual", ip=["10.96.0.11", "fd00::11"], ports=[("dns", 53, "UDP")]),
    service("v6", ip=["fd00::12"]),
    service("db", headless=True, ports=[("pg", 5432, "TCP")]),
    service("pend", headless=True, publish_not_ready=True),
    service("empty", headless=True),
    service("ext", external="www.example.com."),
    service("kube-dns", ns="kube-system", ip="10.96.0.53"),
    endpoint_slice("db-a", "db", [("10.1.0.1", "db-0", True), ("10.1.0.2", None, True), ("10.1.0.3", "db-2", False)],
                   ports=[("pg", 5432, "TCP")]),
    endpoint_slice("db-b", "db", [("10.1.1.4", None, True)], ports=[("pg", 5432, "TCP")]),
    endpoint_slice("pend-a", "pend", [("10.1.2.1", None, False), ("10.1.2.2", None, True)]),
    # dual-stack headless: one slice per family (as the EndpointSlice controller writes them), the
    # same pods in both; dh-0 has a hostname, the other pod does not
    service("dh", headless=True, ports=[("pg", 5432, "TCP")]),
    endpoint_slice("dh-v4", "dh", [("10.1.3.1", "dh-0", True), ("10.1.3.2", None, True)], ports=[("pg", 5432, "TCP")]),
    endpoint_slice("dh-v6", "dh", [("fd00:10:244::31", "dh-0", True), ("fd00:10:244::32", None, True)],
                   ports=[("pg", 5432, "TCP")], address_type="IPv6"),
    service("h6", headless=True, ports=[("web", 80, "TCP")]),
    endpoint_slice("h6-a", "h6", [("fd00:10:244::41", None, True), ("fd00:10:244::42", "h6-1", False)],
                   ports=[("web", 80, "TCP")], address_type="IPv6"),
    # untrusted input: addresses that do not parse, or of the other family than the slice's, get
    # no record; the rest of each object is served
    service("bad", ip=["10.96.0.13", "fd00::zz"]),
    service("bh", headless=True),
    endpoint_slice("bh-a", "bh", [("10.1.4.1", None, True), ("fd00:10:244::51", None, True), ("1.2.3", None, True)]),
]


@pytest.fixture(scope="module", params=["compiled", "pure"])
def srv(request: pytest.FixtureRequest) -> Iterator[KdnsProcess]:
    env = {"KDNS_PURE": "1"} if request.param == "pure" else {}
    p = start_kdns(OBJECTS, ["--upstream", "127.0.0.1:9", "--upstream-timeout", "0.3"], env)
    yield p
    p.stop()


def fq(name: str) -> str:
    return f"{name}.{ZONE}"


def rdatas(msg: dns.message.Message, rdtype: str, section: str = "answer") -> list[str]:
    out = []
    for rrset in getattr(msg, section):
        if rrset.rdtype == dns.rdatatype.from_text(rdtype):
            out += [r.to_text() for r in rrset]
    return sorted(out)


def assert_nodata(msg: dns.message.Message) -> None:
    assert msg.rcode() == dns.rcode.NOERROR
    assert not msg.answer
    assert rdatas(msg, "SOA", "authority"), "NODATA carries the zone SOA in authority"
    assert msg.authority[0].name.to_text() == f"{ZONE}."


def assert_nxdomain(msg: dns.message.Message) -> None:
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert not msg.answer
    assert rdatas(msg, "SOA", "authority")


@pytest.mark.timeout(90)  # the first test of each parameter: its time includes starting the server
def test_dns_cluster_ip_a_and_aaaa(srv: KdnsProcess) -> None:
    m = srv.query(fq("web.default.svc"), "A")
    assert m.flags & dns.flags.AA and m.rcode() == dns.rcode.NOERROR
    assert rdatas(m, "A") == ["10.96.0.10"]
    assert m.answer[0].ttl == 5
    assert rdatas(srv.query(fq("dual.default.svc"), "A"), "A") == ["10.96.0.11"]
    assert rdatas(srv.query(fq("dual.default.svc"), "AAAA"), "AAAA") == ["fd00::11"]
    assert rdatas(srv.query(fq("v6.default.svc"), "AAAA"), "AAAA") == ["fd00::12"]
    assert_nodata(srv.query(fq("v6.default.svc"), "A"))
    assert_nodata(srv.query(fq("web.default.svc"), "AAAA"))
    assert_nodata(srv.query(fq("web.default.svc"), "TXT"))


@pytest.mark.timeout(30)
def test_dns_nxdomain_vs_nodata(srv: KdnsProcess) -> None:
    assert_nxdomain(srv.query(fq("nope.default.svc"), "A"))
    assert_nxdomain(srv.query(fq("web.nons.svc"), "A"))
    assert_nxdomain(srv.query(fq("x.web.default.svc"), "A"))
    # Empty non-terminals exist: NODATA, not NXDOMAIN (RFC 8020).
    assert_nodata(srv.query(fq("default.svc"), "A"))
    assert_nodata(srv.query(fq("svc"), "A"))
    assert_nodata(srv.query(fq("_tcp.web.default.svc"), "SRV"))
    # The SOA's owner is a compression pointer into the question: check what dig prints too.
    out = srv.dig(fq("nope.default.svc"), "A")
    assert "status: NXDOMAIN" in out and f"{ZONE}. 5 IN SOA ns.dns.{ZONE}." in " ".join(out.split())


@pytest.mark.timeout(30)
def test_dns_case_insensitive_and_echoed(srv: KdnsProcess) -> None:
    m = srv.query("WeB.DeFault.SVC.Cluster.Local", "A")
    assert rdatas(m, "A") == ["10.96.0.10"]
    assert m.question[0].name.to_text() == "WeB.DeFault.SVC.Cluster.Local."
    assert m.answer[0].name.to_text() == "WeB.DeFault.SVC.Cluster.Local."  # compressed to the question
    n = srv.query("NoPe.Default.Svc.Cluster.Local", "A")
    assert n.rcode() == dns.rcode.NXDOMAIN and n.question[0].name.to_text() == "NoPe.Default.Svc.Cluster.Local."


@pytest.mark.timeout(30)
def test_dns_srv_cluster_ip(srv: KdnsProcess) -> None:
    m = srv.query(fq("_http._tcp.web.default.svc"), "SRV")
    assert rdatas(m, "SRV") == [f"0 100 80 web.default.svc.{ZONE}."]
    assert rdatas(m, "A", "additional") == ["10.96.0.10"]
    dual = srv.query(fq("_dns._udp.dual.default.svc"), "SRV")
    assert rdatas(dual, "SRV") == [f"0 100 53 dual.default.svc.{ZONE}."]
    # a dual-stack target: its address of each family as glue
    assert rdatas(dual, "A", "additional") == ["10.96.0.11"] and rdatas(dual, "AAAA", "additional") == ["fd00::11"]
    # Unnamed ports have no SRV record; a wrong protocol is another name.
    assert_nxdomain(srv.query(fq("_http._udp.web.default.svc"), "SRV"))


@pytest.mark.timeout(30)
def test_dns_headless(srv: KdnsProcess) -> None:
    # Ready endpoints only, from both slices; db-2 is not ready.
    assert rdatas(srv.query(fq("db.default.svc"), "A"), "A") == ["10.1.0.1", "10.1.0.2", "10.1.1.4"]
    assert rdatas(srv.query(fq("db-0.db.default.svc"), "A"), "A") == ["10.1.0.1"]
    assert rdatas(srv.query(fq("10-1-0-2.db.default.svc"), "A"), "A") == ["10.1.0.2"]
    assert_nxdomain(srv.query(fq("db-2.db.default.svc"), "A"))
    srv_msg = srv.query(fq("_pg._tcp.db.default.svc"), "SRV")
    assert rdatas(srv_msg, "SRV") == sorted(f"0 33 5432 {h}.db.default.svc.{ZONE}."
                                            for h in ("db-0", "10-1-0-2", "10-1-1-4"))
    assert rdatas(srv_msg, "A", "additional") == ["10.1.0.1", "10.1.0.2", "10.1.1.4"]
    # publishNotReadyAddresses: not-ready endpoints are published too.
    assert rdatas(srv.query(fq("pend.default.svc"), "A"), "A") == ["10.1.2.1", "10.1.2.2"]
    # A headless service without endpoints exists: NODATA.
    assert_nodata(srv.query(fq("empty.default.svc"), "A"))


@pytest.mark.timeout(30)
def test_dns_ptr(srv: KdnsProcess) -> None:
    assert rdatas(srv.query("10.0.96.10.in-addr.arpa", "PTR"), "PTR") == [f"web.default.svc.{ZONE}."]
    assert rdatas(srv.query("1.0.1.10.in-addr.arpa", "PTR"), "PTR") == [f"db-0.db.default.svc.{ZONE}."]
    assert rdatas(srv.query("2.0.1.10.in-addr.arpa", "PTR"), "PTR") == [f"10-1-0-2.db.default.svc.{ZONE}."]
    v6 = "1.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa"
    assert rdatas(srv.query(v6, "PTR"), "PTR") == [f"dual.default.svc.{ZONE}."]
    assert srv.dig("-x", "10.96.0.10", "+short").strip() == f"web.default.svc.{ZONE}."


@pytest.mark.timeout(30)
def test_dns_external_name(srv: KdnsProcess) -> None:
    for qtype in ("A", "AAAA", "CNAME"):
        m = srv.query(fq("ext.default.svc"), qtype)
        assert m.rcode() == dns.rcode.NOERROR
        assert rdatas(m, "CNAME") == ["www.example.com."]


@pytest.mark.timeout(30)
def test_dns_pods_apex_and_version(srv: KdnsProcess) -> None:
    assert rdatas(srv.query(fq("10-244-1-7.default.pod"), "A"), "A") == ["10.244.1.7"]
    assert rdatas(srv.query(fq("fd00--7.any-ns.pod"), "AAAA"), "AAAA") == ["fd00::7"]
    assert_nodata(srv.query(fq("fd00--7.any-ns.pod"), "A"))
    assert_nodata(srv.query(fq("10-244-1-7.default.pod"), "AAAA"))
    # CoreDNS's rule: three dashes and no "--" is IPv4, the rest IPv6 ("-" for ":"); a zone index
    # or a dotted tail is no pod name
    assert_nxdomain(srv.query(fq("fd00-0-0-7.default.pod"), "AAAA"))  # read as IPv4: not one
    assert rdatas(srv.query(fq("fd00-10-244-1-0-0-0-7.default.pod"), "AAAA"), "AAAA") == ["fd00:10:244:1::7"]
    assert_nxdomain(srv.query(fq("fe80--1%25eth0.default.pod"), "AAAA"))
    assert_nxdomain(srv.query(fq("1-2-3.default.pod"), "A"))
    assert_nxdomain(srv.query(fq("not-an-ip.default.pod"), "A"))
    assert rdatas(srv.query(fq("dns-version"), "TXT"), "TXT") == ['"1.1.0"']
    soa = srv.query(ZONE, "SOA")
    assert len(rdatas(soa, "SOA")) == 1 and rdatas(soa, "SOA")[0].startswith(f"ns.dns.{ZONE}. hostmaster.{ZONE}.")
    ns = srv.query(ZONE, "NS")
    assert rdatas(ns, "NS") == [f"ns.dns.{ZONE}."]
    assert rdatas(ns, "A", "additional") == ["10.96.0.53"]  # the kube-dns Service's ClusterIP


@pytest.mark.timeout(30)
def test_dns_dig_answers(srv: KdnsProcess) -> None:
    out = srv.dig(fq("_pg._tcp.db.default.svc"), "SRV")
    assert "status: NOERROR" in out and "flags: qr aa rd ra" in out
    assert f"IN SRV 0 33 5432 db-0.db.default.svc.{ZONE}." in " ".join(out.split())
    assert srv.dig(fq("web.default.svc"), "+short").strip() == "10.96.0.10"
    assert srv.dig(fq("web.default.svc"), "+tcp", "+short").strip() == "10.96.0.10"
    assert srv.dig(fq("web.default.svc"), "+noedns", "+short").strip() == "10.96.0.10"


@pytest.mark.timeout(30)
def test_dns_no_edns_and_rd_echo(srv: KdnsProcess) -> None:
    q: Any = dns.message.make_query(fq("web.default.svc"), "A", use_edns=False)
    q.flags &= ~dns.flags.RD
    r = dns.query.udp(q, "127.0.0.1", port=srv.port, timeout=3)
    assert r.edns == -1 and not r.flags & dns.flags.RD and r.flags & dns.flags.AA
    assert r.id == q.id


@pytest.mark.timeout(30)
def test_dns_dual_stack_headless(srv: KdnsProcess) -> None:
    """A dual-stack headless Service: A from the IPv4 slice, AAAA from the IPv6 slice; a hostname
    names both addresses of its pod (one SRV target), a pod without one has a dashed name per
    family (fd00-10-244--32, as CoreDNS); SRV glue carries both families."""
    assert rdatas(srv.query(fq("dh.default.svc"), "A"), "A") == ["10.1.3.1", "10.1.3.2"]
    assert rdatas(srv.query(fq("dh.default.svc"), "AAAA"), "AAAA") == ["fd00:10:244::31", "fd00:10:244::32"]
    assert rdatas(srv.query(fq("dh-0.dh.default.svc"), "A"), "A") == ["10.1.3.1"]
    assert rdatas(srv.query(fq("dh-0.dh.default.svc"), "AAAA"), "AAAA") == ["fd00:10:244::31"]
    assert rdatas(srv.query(fq("fd00-10-244--32.dh.default.svc"), "AAAA"), "AAAA") == ["fd00:10:244::32"]
    assert_nodata(srv.query(fq("fd00-10-244--32.dh.default.svc"), "A"))
    assert rdatas(srv.query(fq("10-1-3-2.dh.default.svc"), "A"), "A") == ["10.1.3.2"]
    m = srv.query(fq("_pg._tcp.dh.default.svc"), "SRV")
    # three distinct targets (dh-0 once, not once per family), weights over those three
    assert rdatas(m, "SRV") == sorted(f"0 33 5432 {h}.dh.default.svc.{ZONE}."
                                      for h in ("dh-0", "10-1-3-2", "fd00-10-244--32"))
    assert rdatas(m, "A", "additional") == ["10.1.3.1", "10.1.3.2"]
    assert rdatas(m, "AAAA", "additional") == ["fd00:10:244::31", "fd00:10:244::32"]
    # an IPv6-only headless Service: ready endpoints only
    assert rdatas(srv.query(fq("h6.default.svc"), "AAAA"), "AAAA") == ["fd00:10:244::41"]
    assert_nodata(srv.query(fq("h6.default.svc"), "A"))
    assert_nxdomain(srv.query(fq("h6-1.h6.default.svc"), "AAAA"))
    assert rdatas(srv.query(fq("_web._tcp.h6.default.svc"), "SRV"), "SRV") == [
        f"0 100 80 fd00-10-244--41.h6.default.svc.{ZONE}."]


@pytest.mark.timeout(30)
def test_dns_ip6_arpa_ptr(srv: KdnsProcess) -> None:
    """ip6.arpa PTR records in the spec's nibble format for IPv6 ClusterIPs and endpoints, asked
    with dig -x as a client does."""
    assert srv.dig("-x", "fd00::11", "+short").strip() == f"dual.default.svc.{ZONE}."
    assert srv.dig("-x", "fd00::12", "+short").strip() == f"v6.default.svc.{ZONE}."
    assert srv.dig("-x", "fd00:10:244::31", "+short").strip() == f"dh-0.dh.default.svc.{ZONE}."
    assert srv.dig("-x", "fd00:10:244::32", "+short").strip() == f"fd00-10-244--32.dh.default.svc.{ZONE}."
    # the nibble name written out: 32 nibbles, least significant first
    name = ".".join(reversed("fd000010024400000000000000000031")) + ".ip6.arpa"
    assert rdatas(srv.query(name, "PTR"), "PTR") == [f"dh-0.dh.default.svc.{ZONE}."]
    out = srv.dig(name, "PTR")
    assert "status: NOERROR" in out and "flags: qr aa rd ra" in out
    # a not-ready endpoint has no PTR: the name is not the cluster's, so it is forwarded (to a
    # closed port here) and gets no answer
    out = srv.dig("-x", "fd00:10:244::42")
    assert "ANSWER: 0" in out and "status: NOERROR" not in out, out


@pytest.mark.timeout(30)
def test_dns_dig_aaaa(srv: KdnsProcess) -> None:
    assert srv.dig(fq("dual.default.svc"), "AAAA", "+short").strip() == "fd00::11"
    assert srv.dig(fq("dual.default.svc"), "AAAA", "+tcp", "+short").strip() == "fd00::11"
    assert sorted(srv.dig(fq("dh.default.svc"), "AAAA", "+short").split()) == ["fd00:10:244::31", "fd00:10:244::32"]
    out = " ".join(srv.dig(fq("v6.default.svc"), "AAAA").split())
    assert "status: NOERROR" in out and f"v6.default.svc.{ZONE}. 5 IN AAAA fd00::12" in out
    assert srv.dig(fq("fd00-10-244--7.any-ns.pod"), "AAAA", "+short").strip() == "fd00:10:244::7"


@pytest.mark.timeout(30)
def test_dns_bad_addresses_skipped(srv: KdnsProcess) -> None:
    """What does not parse as an address of the right family gets no record; the same objects'
    good addresses and every other Service are served, and the server is alive."""
    assert rdatas(srv.query(fq("bad.default.svc"), "A"), "A") == ["10.96.0.13"]
    assert_nodata(srv.query(fq("bad.default.svc"), "AAAA"))
    # the IPv6 address in an IPv4 slice and "1.2.3" are not published
    assert rdatas(srv.query(fq("bh.default.svc"), "A"), "A") == ["10.1.4.1"]
    assert_nodata(srv.query(fq("bh.default.svc"), "AAAA"))
    assert_nxdomain(srv.query(fq("fd00-10-244--51.bh.default.svc"), "AAAA"))
    assert rdatas(srv.query(fq("web.default.svc"), "A"), "A") == ["10.96.0.10"]
    assert srv.alive()

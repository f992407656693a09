"""IPVS mode per IP family, the parts that need no IPVS kernel (run on the host): the IPv6
proxier's set names and entries, its ip6tables rules, and the AF_INET6 generic netlink messages,
cross-checked with pyroute2's IPVS parser (an independent decoder of the same ABI). The real
IPv6 and dual-stack packets are tests/vm/inside/test_ipvs_conformance.py's, in the VM."""
from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.generic.ipvs import ipvsmsg

from kproxy.backends import ipset as ipset_backend
from kproxy.backends import ipvs as nl
from kproxy.config import KProxyConfig
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.ipvs import (
    KUBE_CLUSTER_IP,
    KUBE_LOAD_BALANCER_SOURCE_CIDR,
    KUBE_LOOP_BACK,
    KUBE_NODE_PORT_TCP,
    SET_SPECS,
    IPVSOptions,
    build_fragment,
    options_from_config,
    render_iptables,
    set_names,
    set_specs,
)

NAME = ServicePortName("ns", "web", "http", "TCP")


class _MessagesOnly(nl.IPVS):
    """Message building only: no socket to the (absent) IPVS family."""

    def __init__(self) -> None:
        self._nl = nl._Socket(socket.NETLINK_ROUTE)
        self.family_id = 0x20


def _decode(raw: bytes) -> ipvsmsg:
    msg = ipvsmsg(raw)
    msg.decode()
    return msg


def test_ipv6_sets_have_upstreams_names_and_family() -> None:
    six = set_specs("IPv6")
    assert set_specs("IPv4") == SET_SPECS
    names = [s.name for s in six]
    assert all(n.startswith("KUBE-6-") and len(n) <= 31 for n in names)
    assert len(set(names) | {s.name for s in SET_SPECS}) == 2 * len(SET_SPECS)  # both families side by side
    # Upstream cuts the one name longer than ipset's 31 characters.
    assert set_names("IPv6")[KUBE_LOAD_BALANCER_SOURCE_CIDR] == "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    assert set_names("IPv6")[KUBE_CLUSTER_IP] == "KUBE-6-CLUSTER-IP"
    assert set_names("IPv4")[KUBE_CLUSTER_IP] == "KUBE-CLUSTER-IP"
    by_name = {s.name: s for s in six}
    assert by_name["KUBE-6-CLUSTER-IP"].create_line() == (
        "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 1048576")
    # bitmap:port has no family: the same line as IPv4's but the name.
    assert by_name["KUBE-6-NODE-PORT-TCP"].create_line() == "create KUBE-6-NODE-PORT-TCP bitmap:port range 0-65535"
    with pytest.raises(ValueError):
        SET_SPECS[0].for_family("inet5")


def test_ipv6_set_entries_encode_as_ipv6_attributes() -> None:
    data = ipset_backend.encode_entry("hash:ip,port,net", "fd02:98::a,tcp:80,fd00:50::/64")
    attrs = nl._attrs(data)
    ip = nl._attrs(attrs[ipset_backend.IPSET_ATTR_IP])
    assert ip == {ipset_backend.IPSET_ATTR_IPADDR_IPV6: socket.inet_pton(socket.AF_INET6, "fd02:98::a")}
    assert attrs[ipset_backend.IPSET_ATTR_PORT] == struct.pack("!H", 80)
    assert nl._attrs(attrs[ipset_backend.IPSET_ATTR_IP2]) == {
        ipset_backend.IPSET_ATTR_IPADDR_IPV6: socket.inet_pton(socket.AF_INET6, "fd00:50::")}
    assert attrs[ipset_backend.IPSET_ATTR_CIDR2] == bytes([64])
    # A bare IPv6 source is a /128 (an IPv4 one a /32).
    bare = nl._attrs(ipset_backend.encode_entry("hash:ip,port,net", "fd02:98::a,udp:53,fd00::1"))
    assert bare[ipset_backend.IPSET_ATTR_CIDR2] == bytes([128]) and bare[ipset_backend.IPSET_ATTR_PROTO] == b"\x11"
    loop = nl._attrs(ipset_backend.encode_entry("hash:ip,port,ip", "fd01:1::2,tcp:8080,fd01:1::2"))
    assert nl._attrs(loop[ipset_backend.IPSET_ATTR_IP2])[ipset_backend.IPSET_ATTR_IPADDR_IPV6] == \
        socket.inet_pton(socket.AF_INET6, "fd01:1::2")
    # The messages of an inet6 set say NFPROTO_IPV6 in their nfgenmsg (the kernel checks it).
    spec = set_specs("IPv6")[0]
    msgs = ipset_backend.encode_messages(spec, ipset_backend.IPSET_CMD_ADD, ["fd02:96::a,tcp:80"],
                                         lambda kind, flags, body: body)
    assert len(msgs) == 1 and msgs[0][0] == 10
    assert ipset_backend.encode_messages(SET_SPECS[0], ipset_backend.IPSET_CMD_ADD, ["10.96.0.1,tcp:80"],
                                         lambda kind, flags, body: body)[0][0] == 2


def test_ipv6_service_and_dest_messages_decode_with_pyroute2() -> None:
    ipvs = _MessagesOnly()
    try:
        vs = nl.VirtualServer("fd02:96::a", 443, "TCP", "rr", nl.IP_VS_SVC_F_PERSISTENT, 600)
        raw = ipvs.add_service(vs)
        svc = _decode(raw).get("IPVS_CMD_ATTR_SERVICE")
        assert svc.get("IPVS_SVC_ATTR_AF") == socket.AF_INET6
        assert svc.get("IPVS_SVC_ATTR_ADDR") == "fd02:96::a"
        assert svc.get("IPVS_SVC_ATTR_PORT") == 443
        # The kernel reads an IPv6 netmask as a prefix length (ip_vs_genl_parse_service).
        svc_attrs = nl._attrs(nl._attrs(raw, 16 + 4)[nl.CMD_ATTR_SERVICE])
        assert svc_attrs[nl.SVC_NETMASK] == struct.pack("=I", 128)
        assert nl.parse_service(nl._attrs(raw, 16 + 4)[nl.CMD_ATTR_SERVICE]) == vs
        dest = _decode(ipvs.add_dests(vs, [("fd01:1::2", 8080)])[0]).get("IPVS_CMD_ATTR_DEST")
        assert dest.get("IPVS_DEST_ATTR_ADDR") == "fd01:1::2"
        assert dest.get("IPVS_DEST_ATTR_ADDR_FAMILY") == socket.AF_INET6
        assert dest.get("IPVS_DEST_ATTR_FWD_METHOD") == nl.FWD_MASQ
    finally:
        ipvs.close()


@settings(max_examples=200, deadline=None)
@given(addr=st.ip_addresses(v=6), port=st.integers(1, 65535), proto=st.sampled_from(("TCP", "UDP", "SCTP")),
       rs_addr=st.ip_addresses(v=6), rs_port=st.integers(1, 65535), weight=st.integers(0, 1))
def test_ipv6_attributes_round_trip(addr: ipaddress.IPv6Address, port: int, proto: str,
                                    rs_addr: ipaddress.IPv6Address, rs_port: int, weight: int) -> None:
    vs = nl.VirtualServer(str(addr), port, proto)
    assert nl.parse_service(nl.service_attrs(vs)) == vs
    rs, method = nl.parse_dest(nl.dest_attrs(nl.RealServer(str(rs_addr), rs_port, weight)), socket.AF_INET)
    # The dest's own family attribute wins over the service's (an IPv6 dest is never read as IPv4).
    assert (rs.address, rs.port, rs.weight, method) == (str(rs_addr), rs_port, weight, nl.FWD_MASQ)


def test_ipv6_fragment_keeps_to_its_family() -> None:
    svc = ServicePort(name=NAME, type="LoadBalancer", cluster_ips=("fd02:96::a",), port=80, protocol="TCP",
                      node_port=30080, load_balancer_ips=("fd02:98::a", "10.98.0.1"),
                      load_balancer_source_ranges=("fd00:50::/64",))
    eps = [Endpoint(ip="fd01:1::2", port=8080, is_local=True), Endpoint(ip="10.1.0.2", port=8080, is_local=True)]  # type: ignore[arg-type]
    frag = build_fragment(svc, eps, ["fd00:50::1", "192.168.50.1"], IPVSOptions(family="IPv6"))
    assert set(frag.servers) == {("fd02:96::a", 80, "TCP"), ("fd02:98::a", 80, "TCP"), ("fd00:50::1", 30080, "TCP")}
    assert {rs for _vs, rss in frag.servers.values() for rs in rss} == {("fd01:1::2", 8080)}
    assert frag.addresses == ("fd02:96::a", "fd02:98::a")
    assert frag.set_entries(KUBE_CLUSTER_IP) == {"fd02:96::a,tcp:80"}
    assert frag.set_entries(KUBE_LOAD_BALANCER_SOURCE_CIDR) == {"fd02:98::a,tcp:80,fd00:50::/64"}
    assert frag.set_entries(KUBE_LOOP_BACK) == {"fd01:1::2,tcp:8080,fd01:1::2"}
    assert frag.set_entries(KUBE_NODE_PORT_TCP) == {"30080"}


def test_ip6tables_rules_match_the_ipv6_sets_and_cidr() -> None:
    six = render_iptables(IPVSOptions(cluster_cidr="10.244.0.0/16,fd00:10:244::/56", family="IPv6"), []).decode()
    four = render_iptables(IPVSOptions(cluster_cidr="10.244.0.0/16,fd00:10:244::/56"), []).decode()
    assert "-A KUBE-SERVICES -m set --match-set KUBE-6-CLUSTER-IP dst,dst ! -s fd00:10:244::/56 -j KUBE-MARK-MASQ" in six
    assert "10.244.0.0/16" not in six and "fd00:10:244::/56" not in four
    assert "! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in four
    def matched_sets(rules: str) -> set[str]:
        words = rules.split()
        return {words[i + 1] for i, w in enumerate(words) if w == "--match-set"}

    assert matched_sets(six) == {set_names("IPv6")[n] for n in matched_sets(four)}
    assert all(n.startswith("KUBE-6-") for n in matched_sets(six)) and len(matched_sets(six)) >= 10
    # The same chains in both families (upstream's layout), only the sets' names differ.
    assert [ln.split()[:2] for ln in six.splitlines()] == [ln.split()[:2] for ln in four.splitlines()]


def test_ipvs_options_per_family() -> None:
    cfg = KProxyConfig(nodeport_addresses=("10.5.0.0/16", "fd00:5::/64"), cluster_cidr="10.244.0.0/16,fd00:10:244::/56")
    assert options_from_config(cfg).nodeport_addresses == ("10.5.0.0/16",)
    six = options_from_config(cfg, "IPv6")
    assert six.nodeport_addresses == ("fd00:5::/64",) and six.family == "IPv6"

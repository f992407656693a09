"""IPVS mode logic that needs no IPVS kernel: runs on the host. The message bytes are checked
against pyroute2's own IPVS message parser (an independent decoder of the same ABI)."""
from __future__ import annotations

import errno
import socket
import struct

import pytest
from pyroute2.netlink.generic.ipvs import ipvsmsg

from kproxy.backends import ipset as ipset_backend
from kproxy.backends import ipvs as nl
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.ipvs import (
    KUBE_CLUSTER_IP,
    KUBE_EXTERNAL_IP_LOCAL,
    KUBE_IPVS_IPS,
    KUBE_LOAD_BALANCER_SOURCE_CIDR,
    KUBE_LOOP_BACK,
    KUBE_NODE_PORT_LOCAL_TCP,
    IPVSOptions,
    build_fragment,
    render_iptables,
)

NAME = ServicePortName("ns", "web", "http", "TCP")


def sp(**kw: object) -> ServicePort:
    base: dict[str, object] = {"name": NAME, "type": "ClusterIP", "cluster_ips": ("10.96.0.10",), "port": 80, "protocol": "TCP"}
    base.update(kw)
    return ServicePort(**base)  # type: ignore[arg-type]


def ep(ip: str, **kw: object) -> Endpoint:
    return Endpoint(ip=ip, port=8080, **kw)  # type: ignore[arg-type]


class _FakeIPVS(nl.IPVS):
    """Message building only: no socket to the (absent) IPVS family."""

    def __init__(self) -> None:
        self._nl = nl._Socket(socket.NETLINK_ROUTE)
        self.family_id = 0x20


@pytest.fixture
def ipvs() -> _FakeIPVS:
    return _FakeIPVS()


def _decode(raw: bytes) -> ipvsmsg:
    msg = ipvsmsg(raw)
    msg.decode()
    return msg


@pytest.mark.timeout(30)
def test_ipvs_dest_message_decodes_as_masquerade_with_pyroute2(ipvs: _FakeIPVS) -> None:
    vs = nl.VirtualServer("10.96.0.10", 80, "TCP", "rr", nl.IP_VS_SVC_F_PERSISTENT, 10800)
    msg = _decode(ipvs.add_dest(vs, nl.RealServer("10.244.1.5", 8080, 1)))
    assert msg["cmd"] == nl.CMD_NEW_DEST
    dest = msg.get("IPVS_CMD_ATTR_DEST")
    assert dest.get("IPVS_DEST_ATTR_ADDR") == "10.244.1.5"
    assert dest.get("IPVS_DEST_ATTR_PORT") == 8080
    assert dest.get("IPVS_DEST_ATTR_FWD_METHOD") == 0  # masquerade, not pyroute2's default 3
    assert dest.get("IPVS_DEST_ATTR_WEIGHT") == 1
    svc = msg.get("IPVS_CMD_ATTR_SERVICE")
    assert (svc.get("IPVS_SVC_ATTR_ADDR"), svc.get("IPVS_SVC_ATTR_PORT"), svc.get("IPVS_SVC_ATTR_PROTOCOL")) == (
        "10.96.0.10", 80, socket.IPPROTO_TCP)
    # The bulk builder of a full sync encodes the same message as the one-by-one path.
    bulk = ipvs.add_dests(vs, [("10.244.1.5", 8080), ("fd00::5", 53)])
    assert _decode(bulk[0]).get("IPVS_CMD_ATTR_DEST") == dest
    single = ipvs.add_dest(vs, nl.RealServer("10.244.1.5", 8080, 1))
    assert (bulk[0][:8], bulk[0][16:]) == (single[:8], single[16:])  # all but sequence number and pid
    assert _decode(bulk[1]).get("IPVS_CMD_ATTR_DEST").get("IPVS_DEST_ATTR_ADDR") == "fd00::5"
    v6 = _decode(ipvs.delete_dest(nl.VirtualServer("fd00::a", 80, "UDP"), nl.RealServer("fd00::5", 53)))
    assert v6.get("IPVS_CMD_ATTR_DEST").get("IPVS_DEST_ATTR_ADDR") == "fd00::5"
    assert v6.get("IPVS_CMD_ATTR_DEST").get("IPVS_DEST_ATTR_FWD_METHOD") is None  # key only


@pytest.mark.timeout(30)
def test_ipvs_service_message_round_trips_through_both_parsers(ipvs: _FakeIPVS) -> None:
    vs = nl.VirtualServer("10.96.0.10", 443, "TCP", "sh", nl.IP_VS_SVC_F_PERSISTENT, 600)
    raw = ipvs.add_service(vs)
    svc = _decode(raw).get("IPVS_CMD_ATTR_SERVICE")
    assert svc.get("IPVS_SVC_ATTR_SCHED_NAME") == "sh"
    assert svc.get("IPVS_SVC_ATTR_TIMEOUT") == 600
    assert svc.get("IPVS_SVC_ATTR_FLAGS")["flags"] == nl.IP_VS_SVC_F_PERSISTENT
    # kproxy's reader parses the same attribute payload back to the same VirtualServer.
    attrs = nl._attrs(raw, 16 + 4)
    assert nl.parse_service(attrs[nl.CMD_ATTR_SERVICE]) == vs


@pytest.mark.timeout(30)
def test_ipvs_fragment_clusterip_nodeport_lb_local_policy() -> None:
    eps = [ep("10.244.0.5", is_local=True), ep("10.244.1.5"), ep("10.244.2.5", ready=False)]
    frag = build_fragment(
        sp(type="LoadBalancer", node_port=30080, load_balancer_ips=("192.0.2.1",), external_ips=("198.51.100.1",),
           external_policy_local=True, load_balancer_source_ranges=("203.0.113.0/24",), session_affinity_timeout=60),
        eps, ["10.0.0.1"], IPVSOptions(scheduler="lc"))
    servers = {k: (vs.scheduler, vs.flags, vs.timeout, sorted(rs)) for k, (vs, rs) in frag.servers.items()}
    both = sorted([("10.244.0.5", 8080), ("10.244.1.5", 8080)])
    local = [("10.244.0.5", 8080)]
    assert servers == {
        ("10.96.0.10", 80, "TCP"): ("lc", 1, 60, both),  # internal traffic: every ready endpoint
        ("198.51.100.1", 80, "TCP"): ("lc", 1, 60, local),
        ("192.0.2.1", 80, "TCP"): ("lc", 1, 60, local),
        ("10.0.0.1", 30080, "TCP"): ("lc", 1, 60, local),
    }
    assert frag.addresses == ("10.96.0.10", "192.0.2.1", "198.51.100.1")
    assert frag.set_entries(KUBE_CLUSTER_IP) == {"10.96.0.10,tcp:80"}
    assert frag.set_entries(KUBE_EXTERNAL_IP_LOCAL) == {"198.51.100.1,tcp:80"}
    assert frag.set_entries(KUBE_NODE_PORT_LOCAL_TCP) == {"30080"}
    assert frag.set_entries(KUBE_LOAD_BALANCER_SOURCE_CIDR) == {"192.0.2.1,tcp:80,203.0.113.0/24"}
    assert frag.set_entries(KUBE_LOOP_BACK) == {"10.244.0.5,tcp:8080,10.244.0.5"}
    assert frag.set_entries(KUBE_IPVS_IPS) == set(frag.addresses)
    assert len(set(frag.entries)) == len(frag.entries)  # distinct: the sync's diff relies on it


@pytest.mark.timeout(30)
def test_ipvs_fragment_internal_local_headless_and_terminating_fallback() -> None:
    frag = build_fragment(sp(internal_policy_local=True), [ep("10.244.0.5"), ep("10.244.1.5", is_local=True)], [],
                          IPVSOptions())
    assert frag.servers[("10.96.0.10", 80, "TCP")][1] == (("10.244.1.5", 8080),)
    # The same endpoint listed twice (two EndpointSlices) is one real server.
    dup = build_fragment(sp(), [ep("10.244.0.5"), ep("10.244.0.5")], [], IPVSOptions())
    assert dup.servers[("10.96.0.10", 80, "TCP")][1] == (("10.244.0.5", 8080),)
    assert build_fragment(sp(cluster_ips=()), [ep("10.244.0.5")], [], IPVSOptions()).servers == {}
    # No ready endpoint: serving+terminating ones keep the service up (upstream's fallback).
    eps = [ep("10.244.0.5", ready=False, serving=True, terminating=True), ep("10.244.0.6", ready=False, serving=False)]
    frag = build_fragment(sp(), eps, [], IPVSOptions())
    assert frag.servers[("10.96.0.10", 80, "TCP")][1] == (("10.244.0.5", 8080),)
    # internalTrafficPolicy Local with only a local serving+terminating endpoint and a remote
    # ready one: the local terminating endpoint serves (upstream's CategorizeEndpoints), not none.
    eps = [ep("10.244.1.5", ready=False, serving=True, terminating=True, is_local=True), ep("10.244.0.5")]
    frag = build_fragment(sp(internal_policy_local=True), eps, [], IPVSOptions())
    assert frag.servers[("10.96.0.10", 80, "TCP")][1] == (("10.244.1.5", 8080),)


@pytest.mark.timeout(30)
def test_ipvs_iptables_rules_masquerade_choices() -> None:
    jumps = [("nat", "PREROUTING", "KUBE-SERVICES", "")]
    with_cidr = render_iptables(IPVSOptions(cluster_cidr="10.244.0.0/16"), jumps).decode()
    assert "-I PREROUTING 1 -j KUBE-SERVICES" in with_cidr
    assert "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ" in with_cidr
    assert with_cidr.count("COMMIT") == 2
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000" in with_cidr
    all_masq = render_iptables(IPVSOptions(masquerade_all=True, masquerade_bit=5), []).decode()
    assert "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in all_masq
    assert "--or-mark 0x20" in all_masq and "-I " not in all_masq


@pytest.mark.timeout(30)
def test_ipvs_ipset_entries_encode_to_kernel_layout() -> None:
    data = ipset_backend.encode_entry("hash:ip,port,net", "192.0.2.1,tcp:80,203.0.113.0/24")
    attrs = nl._attrs(data)
    ip = nl._attrs(attrs[ipset_backend.IPSET_ATTR_IP])
    assert ip[ipset_backend.IPSET_ATTR_IPADDR_IPV4] == socket.inet_aton("192.0.2.1")
    assert attrs[ipset_backend.IPSET_ATTR_PORT] == struct.pack("!H", 80)
    assert attrs[ipset_backend.IPSET_ATTR_PROTO] == b"\x06"
    assert nl._attrs(attrs[ipset_backend.IPSET_ATTR_IP2])[1] == socket.inet_aton("203.0.113.0")
    assert attrs[ipset_backend.IPSET_ATTR_CIDR2] == b"\x18"
    # Flags the kernel insists on: nested IP containers, network byte order for address/port.
    _, kind = struct.unpack_from("=HH", data)
    assert kind & ipset_backend.NLA_F_NESTED
    assert ipset_backend.encode_entry("bitmap:port", "30080") == struct.pack("=HH", 6, 4 | 0x4000) + struct.pack("!H", 30080) + b"\0\0"


@pytest.mark.timeout(30)
def test_ipvs_options_come_from_the_typed_config() -> None:
    from kproxy.config import KProxyConfig
    from kproxy.proxiers.ipvs import options_from_config

    opts = options_from_config(KProxyConfig(ipvs_exclude_cidrs=("10.99.0.0/16", "fd00:99::/64")))
    assert opts.exclude_cidrs == ("10.99.0.0/16", "fd00:99::/64")
    # Values validation accepts mean what they mean in iptables mode: masqueradeBit 0 is bit 0,
    # nodePortAddresses "primary" is the node's own IPs (not every address).
    opts = options_from_config(KProxyConfig(masquerade_bit=0, nodeport_addresses=("primary", "10.5.0.0/16"),
                                            node_ips=("192.0.2.10", "fd00::10"), node_zone="zone-a"))
    assert opts.masquerade_bit == 0 and opts.node_zone == "zone-a"
    assert opts.nodeport_addresses == ("10.5.0.0/16", "192.0.2.10/32")


@pytest.mark.timeout(30)
def test_netlink_batch_maps_each_error_to_its_message_through_the_reused_buffer() -> None:
    # Read-only requests to the host's rtnetlink: RTM_GETLINK of absent interfaces fails with
    # ENODEV, one of loopback (index 1) answers data, which the batch must skip.
    rtm_getlink = 18
    sock = nl._Socket(socket.NETLINK_ROUTE)
    try:
        def getlink(index: int) -> bytes:
            return sock.message(rtm_getlink, nl.NLM_F_REQUEST, struct.pack("=BxHiII", 0, 0, index, 0, 0))[1]

        absent = [getlink(2_000_000 + i) for i in range(10_000)]
        msgs = absent[:5000] + [getlink(1)] + absent[5000:]
        failed = sock.batch(iter(msgs))  # lazily consumed, as the proxier's generator is
        assert [m for m, _ in failed] == absent
        assert {e for _, e in failed} == {errno.ENODEV}
        assert sock.sends == 3  # 320 KB of requests in 128 KiB chunks, one ACK per chunk
        assert sock.batch([]) == [] and sock.sends == 3
    finally:
        sock.close()

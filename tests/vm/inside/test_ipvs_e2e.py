"""IPVS mode end to end inside the VM: real packets from a client netns through the node's IPVS
virtual servers to backend netns, driven by SyncRequests; kernel state checked with ipvsadm,
ip and ipset (tools allowed in tests, never used by kproxy at run time)."""
from __future__ import annotations

import socket
import struct
import time
from collections import Counter

import pytest
from ipvs_helpers import (
    CLIENT_IP,
    NODE_CLIENT_IP,
    NODE_POD_IP,
    State,
    Topology,
    endpoints,
    service,
    sh,
    wait_for,
)

from kproxy.proxiers.ipvs import IPVSProxier

B0, B1, B2 = "10.244.0.10", "10.244.0.11", "10.244.0.12"


def ipvsadm() -> str:
    return sh("ipvsadm", "-Ln")


def names(topo: Topology, ip: str, port: int, n: int) -> Counter[str]:
    return Counter(topo.greet(ip, port)[0] for _ in range(n))


@pytest.mark.timeout(60)
def test_ipvs_clusterip_round_robin_over_ready_endpoints(topo: Topology, state: State) -> None:
    state.set(service("web", "10.96.0.10"), endpoints(B0, B1, B2) + endpoints("10.244.0.99", ready=False))
    state.sync()
    assert names(topo, "10.96.0.10", 80, 6) == Counter({"b0": 2, "b1": 2, "b2": 2})
    table = ipvsadm()
    assert "TCP  10.96.0.10:80 rr" in table
    assert table.count("Masq") == 3 and "10.244.0.99" not in table
    assert "10.96.0.10/32" in sh("ip", "addr", "show", "dev", "kube-ipvs0")
    assert "10.96.0.10,tcp:80" in sh("ipset", "list", "KUBE-CLUSTER-IP")


@pytest.mark.timeout(60)
def test_ipvs_refuses_without_endpoints(topo: Topology, state: State) -> None:
    state.set(service("empty", "10.96.0.11"))
    state.sync()
    assert "TCP  10.96.0.11:80 rr" in ipvsadm()
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        topo.connect("10.96.0.11", 80, timeout=3)
    assert time.monotonic() - t0 < 1.0  # refused at once (ICMP from IPVS), not a timeout
    # A port that is no service on a service IP is rejected too (KUBE-IPVS-FILTER).
    with pytest.raises(ConnectionRefusedError):
        topo.connect("10.96.0.11", 81, timeout=3)


@pytest.mark.timeout(60)
def test_ipvs_nodeport_masquerades_and_local_policy_keeps_client_ip(topo: Topology, state: State) -> None:
    state.set(service("np", "10.96.0.12", node_port=30080), endpoints(B0, B1))
    state.set(service("nplocal", "10.96.0.13", node_port=30081, external_policy_local=True),
              endpoints(B0, local=True) + endpoints(B1, local=False))
    state.sync()
    name, peer = topo.greet(NODE_CLIENT_IP, 30080)
    assert name in ("b0", "b1") and peer == NODE_POD_IP  # SNAT to the node
    seen = Counter(topo.greet(NODE_CLIENT_IP, 30081) for _ in range(4))
    assert seen == Counter({("b0", CLIENT_IP): 4})  # only the local endpoint, client IP kept
    assert "30080" in sh("ipset", "list", "KUBE-NODE-PORT-TCP")
    assert "30081" in sh("ipset", "list", "KUBE-NODE-PORT-LOCAL-TCP")


@pytest.mark.timeout(60)
def test_ipvs_loadbalancer_and_external_ips(topo: Topology, state: State) -> None:
    state.set(service("lb", "10.96.0.14", type="LoadBalancer", load_balancer_ips=("192.0.2.10",),
                      external_ips=("198.51.100.7",)), endpoints(B2))
    state.sync()
    assert topo.greet("192.0.2.10", 80)[0] == "b2"
    assert topo.greet("198.51.100.7", 80)[0] == "b2"
    addrs = sh("ip", "addr", "show", "dev", "kube-ipvs0")
    assert "192.0.2.10/32" in addrs and "198.51.100.7/32" in addrs
    assert "192.0.2.10,tcp:80" in sh("ipset", "list", "KUBE-LOAD-BALANCER")


@pytest.mark.timeout(60)
def test_ipvs_client_ip_affinity_is_persistence(topo: Topology, state: State) -> None:
    state.set(service("sticky", "10.96.0.15", session_affinity_timeout=600), endpoints(B0, B1, B2))
    state.sync()
    assert len(names(topo, "10.96.0.15", 80, 6)) == 1
    assert "TCP  10.96.0.15:80 rr persistent 600" in ipvsadm()


@pytest.mark.timeout(60)
def test_ipvs_endpoint_change_moves_new_connections(topo: Topology, state: State) -> None:
    name = state.set(service("move", "10.96.0.16"), endpoints(B0))
    state.sync()
    assert names(topo, "10.96.0.16", 80, 3) == Counter({"b0": 3})
    state.set(service("move", "10.96.0.16"), endpoints(B1))
    state.sync({name})
    assert names(topo, "10.96.0.16", 80, 3) == Counter({"b1": 3})


@pytest.mark.timeout(90)
def test_ipvs_graceful_termination_lets_established_finish(topo: Topology, state: State, proxier: IPVSProxier) -> None:
    name = state.set(service("grace", "10.96.0.17"), endpoints(B0))
    state.sync()
    conn = topo.connect("10.96.0.17", 80)
    f = conn.makefile("rwb", buffering=0)
    assert f.readline().split()[0] == b"b0"
    state.set(service("grace", "10.96.0.17"), endpoints(B1))
    state.sync({name})
    table = ipvsadm()
    assert "10.244.0.10:8080" in table  # still there, weight 0
    line = next(x for x in table.splitlines() if "10.244.0.10:8080" in x)
    assert line.split()[3] == "0" and line.split()[4] == "1"  # Weight 0, ActiveConn 1
    assert topo.greet("10.96.0.17", 80)[0] == "b1"  # new connections avoid it
    f.write(b"still-there\n")
    assert f.readline() == b"b0:still-there\n"  # the established one keeps working
    state.sync({name})
    assert "10.244.0.10:8080" in ipvsadm()  # not reaped while in use
    assert proxier.terminating()
    # Reset the connection: its IPVS entry goes to CLOSE (10 s) instead of TIME_WAIT (2 min);
    # once it expires, a sync deletes the drained real server.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    f.close()  # the file object holds the socket open until it is closed too
    conn.close()

    def reaped() -> bool:
        state.sync({name})
        return "10.244.0.10:8080" not in ipvsadm()

    assert wait_for(reaped, timeout=25, step=1.0), ipvsadm()
    assert proxier.terminating() == []
    assert "10.244.0.11:8080" in ipvsadm()


@pytest.mark.timeout(60)
def test_ipvs_loadbalancer_source_ranges(topo: Topology, state: State) -> None:
    name = state.set(service("fw", "10.96.0.18", type="LoadBalancer", load_balancer_ips=("192.0.2.20",),
                             load_balancer_source_ranges=(f"{CLIENT_IP.rsplit('.', 1)[0]}.0/24",)), endpoints(B0))
    state.sync()
    assert topo.greet("192.0.2.20", 80)[0] == "b0"  # the client's range is allowed
    state.set(service("fw", "10.96.0.18", type="LoadBalancer", load_balancer_ips=("192.0.2.20",),
                      load_balancer_source_ranges=("203.0.113.0/24",)), endpoints(B0))
    state.sync({name})
    with pytest.raises(TimeoutError):  # dropped by KUBE-PROXY-FIREWALL, not refused
        topo.connect("192.0.2.20", 80, timeout=1.5)
    assert topo.greet("10.96.0.18", 80)[0] == "b0"  # the ClusterIP is not firewalled

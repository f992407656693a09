"""`--proxy-mode userspace` end to end: the proxier programs the node namespace (listeners and
REDIRECT/DNAT rules) and clients in another namespace reach the backends through it."""
from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from userspace_helpers import (
    BACKEND_IPS,
    BACKEND_PORT,
    DEAD_PORT,
    NODE_CLIENT_IP,
    Backends,
    Topology,
    congestion_of,
    expect_refused_at_once,
    non_default_congestion,
    request,
)

from kproxy.config import KProxyConfig
from kproxy.model import Endpoint, EndpointsMap, ServicePort, ServicePortMap, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.meta import MetaProxier
from kproxy.proxiers.userspace import Portal, UserspaceProxier, new_family_proxier, new_proxier, render_rules
from kproxy.proxy import service_endpoints
from kproxy.relay import socket_in_netns

pytestmark = pytest.mark.e2e

WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "dns", "dns", "UDP")
EMPTY = ServicePortName("default", "empty", "")
STICKY = ServicePortName("default", "sticky", "")


def _eps(*ips: str, port: int = BACKEND_PORT) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip, port) for ip in ips)


def _state() -> tuple[ServicePortMap, EndpointsMap]:
    services = {
        WEB: ServicePort(WEB, "LoadBalancer", ("10.96.0.10",), 80, "TCP", node_port=30080,
                         external_ips=("10.99.0.5",), load_balancer_ips=("10.98.0.7",)),
        DNS: ServicePort(DNS, "ClusterIP", ("10.96.0.53",), 53, "UDP"),
        EMPTY: ServicePort(EMPTY, "NodePort", ("10.96.0.11",), 80, "TCP", node_port=30081),
        STICKY: ServicePort(STICKY, "ClusterIP", ("10.96.0.12",), 80, "TCP", session_affinity_timeout=60),
    }
    endpoints = {
        WEB: _eps(*BACKEND_IPS) + (Endpoint("10.77.0.9", BACKEND_PORT, ready=False),),
        DNS: _eps(BACKEND_IPS[0]),
        STICKY: _eps(*BACKEND_IPS),
    }
    return services, endpoints


@pytest.fixture
def proxier(impl: str, topo: Topology, backends: Backends) -> Iterator[UserspaceProxier]:
    config = KProxyConfig(mode="userspace", netns=topo.node, bind_address=NODE_CLIENT_IP, udp_idle_timeout=1.0)
    p = new_family_proxier(config, "IPv4", impl)  # type: ignore[arg-type]  # one family's proxier
    assert isinstance(p, UserspaceProxier)
    try:
        yield p
    finally:
        p.close()
        assert p.cleanup()


def _nat(topo: Topology) -> str:
    out = subprocess.run(["ip", "netns", "exec", topo.node, "iptables-save", "-t", "nat"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return "".join(ln + "\n" for ln in out.splitlines() if not ln.startswith("#"))  # no timestamps


def _names(topo: Topology, ns: str, addr: tuple[str, int], n: int) -> list[str]:
    out = []
    for _ in range(n):
        with topo.tcp(ns, addr, timeout=5) as s:
            out.append(request(s)[0])
    return out


@pytest.mark.timeout(60)
def test_clusterip_nodeport_external_and_lb_reach_every_backend(proxier: UserspaceProxier, topo: Topology) -> None:
    services, endpoints = _state()
    assert proxier.iptables is not None
    restores = proxier.iptables.restores
    res = proxier.sync(SyncRequest(services, endpoints))
    assert res.ok, res.error
    assert proxier.iptables.restores == restores + 1  # the whole ruleset in one restore
    for addr in [("10.96.0.10", 80), (NODE_CLIENT_IP, 30080), ("10.99.0.5", 80), ("10.98.0.7", 80)]:
        # From another namespace (PREROUTING: REDIRECT): round robin over the ready endpoints only.
        assert sorted(_names(topo, topo.client, addr, 3)) == sorted(BACKEND_IPS), addr
    # From the node itself (OUTPUT: DNAT to the node IP).
    assert sorted(_names(topo, topo.node, ("10.96.0.10", 80), 3)) == sorted(BACKEND_IPS)
    assert sorted(_names(topo, topo.node, ("127.0.0.1", 30080), 3)) == sorted(BACKEND_IPS)
    nat = _nat(topo)
    assert "-A PREROUTING -m comment" in nat and "-j KUBE-PORTALS-CONTAINER" in nat
    port = proxier._served[WEB].ports["internal"]
    assert re.search(rf"-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp .*--dport 80 -j REDIRECT --to-ports {port}\n", nat)
    assert re.search(rf"-A KUBE-NODEPORT-HOST -p tcp .*--dport 30080 -j DNAT --to-destination {NODE_CLIENT_IP}:{port}\n", nat)


@pytest.mark.timeout(60)
def test_affinity_udp_and_no_endpoints(proxier: UserspaceProxier, topo: Topology) -> None:
    services, endpoints = _state()
    assert proxier.sync(SyncRequest(services, endpoints)).ok
    assert len(set(_names(topo, topo.client, ("10.96.0.12", 80), 4))) == 1
    c = socket_in_netns(topo.client, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.settimeout(3)
        c.sendto(b"q", ("10.96.0.53", 53))
        data, src = c.recvfrom(512)
        # The reply comes back from the service address: conntrack undoes the REDIRECT.
        assert (data, src) == (BACKEND_IPS[0].encode() + b":q", ("10.96.0.53", 53))
    finally:
        c.close()
    assert expect_refused_at_once(topo, topo.client, (NODE_CLIENT_IP, 30081)) < 1.0


@pytest.mark.timeout(60)
def test_endpoint_changes_and_service_removal(proxier: UserspaceProxier, topo: Topology) -> None:
    services, endpoints = _state()
    assert proxier.sync(SyncRequest(services, endpoints)).ok
    old = topo.tcp(topo.client, ("10.96.0.10", 80))
    old.sendall(b"abc")
    first = request(topo.tcp(topo.client, ("10.96.0.10", 80)))[0]
    # Only one endpoint left, plus one that refuses: new connections skip the dead one.
    endpoints = dict(endpoints)
    endpoints[WEB] = _eps(BACKEND_IPS[2]) + _eps(BACKEND_IPS[1], port=DEAD_PORT)
    assert proxier.iptables is not None
    restores = proxier.iptables.restores
    assert proxier.sync(SyncRequest(services, endpoints, changed=frozenset({WEB}), full=False)).ok
    assert proxier.iptables.restores == restores  # endpoints live in the relay: no rule rewrite
    assert set(_names(topo, topo.client, ("10.96.0.10", 80), 4)) == {BACKEND_IPS[2]}
    with old:  # the connection opened before the change still reaches its endpoint
        name, n, _ = request(old, b"def")
    assert n == 6 and name in BACKEND_IPS and first in BACKEND_IPS
    services = {k: v for k, v in services.items() if k != WEB}
    assert proxier.sync(SyncRequest(services, endpoints, changed=frozenset({WEB}), full=False)).ok
    assert "10.96.0.10" not in _nat(topo)
    with pytest.raises(OSError):
        topo.tcp(topo.client, ("10.96.0.10", 80), timeout=1).close()


@pytest.mark.timeout(60)
def test_localhost_only_serves_nodeports_without_rules(impl: str, topo: Topology, backends: Backends) -> None:
    nat_before = _nat(topo)
    cc = non_default_congestion()
    p = new_proxier(KProxyConfig(netns=topo.node, userspace_localhost_only=True,  # type: ignore[arg-type]
                                 userspace_tcp_congestion=cc), impl)
    try:
        services, endpoints = _state()
        assert p.sync(SyncRequest(services, endpoints)).ok
        assert sorted(_names(topo, topo.node, ("127.0.0.1", 30080), 3)) == sorted(BACKEND_IPS)
        with topo.tcp(topo.node, ("127.0.0.1", 30080)) as held:  # --userspace-tcp-congestion on both legs
            held.sendall(b"x")
            deadline = time.monotonic() + 10
            while congestion_of(topo.node, BACKEND_PORT) != {cc} and time.monotonic() < deadline:
                time.sleep(0.05)
            assert congestion_of(topo.node, BACKEND_PORT) == {cc}
        assert _names(topo, topo.node, ("127.0.0.1", 80), 1)[0] in BACKEND_IPS  # LoadBalancer: its port too
        with pytest.raises(OSError):  # ClusterIPs need rules: not served in this variant
            topo.tcp(topo.node, ("10.96.0.12", 80), timeout=1).close()
        assert _nat(topo) == nat_before
    finally:
        p.close()


def test_render_rules_shape() -> None:
    services, endpoints = _state()
    portals = [Portal(services[n], port, port, port, service_endpoints(services[n], endpoints.get(n, ())))
               for n, port in ((WEB, 40000), (DNS, 40001), (EMPTY, 40002))]
    data = render_rules(portals, "192.0.2.1").decode()
    lines = data.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT" and "*filter" in lines
    assert ('-A KUBE-PORTALS-CONTAINER -m comment --comment "kube-system/dns:dns" -d 10.96.0.53/32 '
            "-p udp -m udp --dport 53 -j REDIRECT --to-ports 40001") in lines
    assert ('-A KUBE-NODEPORT-HOST -m comment --comment "default/web:http" -p tcp -m tcp --dport 30080 '
            "-j DNAT --to-destination 192.0.2.1:40000") in lines
    # ClusterIP, externalIP and LB ingress IP: a REDIRECT and a DNAT each; the nodePort: two more.
    assert sum(1 for ln in lines if "--to-ports 40000" in ln or "192.0.2.1:40000" in ln) == 8
    # No endpoints: refused by the kernel, the relay never sees it.
    assert not any("40002" in ln for ln in lines)
    assert ('-A KUBE-USERSPACE-FIREWALL -m comment --comment "default/empty: has no endpoints" '
            "-d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j REJECT") in lines


@pytest.mark.timeout(60)
def test_localhost_only_in_the_root_namespace(impl: str) -> None:
    """The rule-free variant where Docker Desktop users meet it: the root namespace, 127.0.0.1 only."""
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    name = ServicePortName("default", "desk", "")
    eps: EndpointsMap = {name: (Endpoint("127.0.0.1", backend.getsockname()[1]),)}
    p = new_proxier(KProxyConfig(userspace_localhost_only=True), impl)  # type: ignore[arg-type]
    try:
        # One family (127.0.0.1), no health-check server and no firewall access at all.
        assert isinstance(p, MetaProxier) and p.families == ("IPv4",) and p.health_server is None
        inner = p.proxiers["IPv4"]
        assert isinstance(inner, UserspaceProxier) and inner.iptables is None
        # The "nodePort": a port free a moment ago, on the root namespace's loopback that other
        # processes share, so one may take it before the relay listens: only that is retried.
        for _ in range(5):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            node_port = probe.getsockname()[1]
            probe.close()
            svc = ServicePort(name, "NodePort", ("10.96.0.99",), 80, "TCP", node_port=node_port)
            res = p.sync(SyncRequest({name: svc}, eps))
            if res.ok:
                break
            assert res.error and "Address already in use" in res.error, res
        assert res.ok, res
        with socket.create_connection(("127.0.0.1", node_port), timeout=5) as c:
            conn, _ = backend.accept()
            with conn:
                c.sendall(b"desktop")
                assert conn.recv(100) == b"desktop"
                conn.sendall(b"hello")
                assert c.recv(100) == b"hello"
    finally:
        p.close()
        backend.close()

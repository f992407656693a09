"""Health-check node ports (externalTrafficPolicy: Local) answered by real HTTP listeners on loopback."""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import urllib.error
import urllib.request

import pytest
from iptables_helpers import ep, request, spn, svc

from kproxy.backends.iptables import IPTables
from kproxy.healthcheck import NamespacedName, ServiceHealthServer
from kproxy.proxiers.iptables import IptablesProxier
from kproxy.relay import socket_in_netns

pytestmark = pytest.mark.timeout(30)
IN_USE = os.strerror(errno.EADDRINUSE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen_on_a_free_port(hs: ServiceHealthServer, ports: dict[NamespacedName, int],
                          nsn: NamespacedName) -> int:
    """Sync `ports` plus `nsn` on a port that was free a moment ago. A health-check node port is a
    fixed number (it cannot be 0): another process on the shared loopback may take it between
    free_port() and the bind; only that error is retried, a bounded number of times."""
    for _ in range(5):
        port = free_port()
        errors = hs.sync_services({**ports, nsn: port})
        if not errors:
            return port
        assert len(errors) == 1 and IN_USE in errors[0], errors
    raise AssertionError("5 free ports in a row were taken before the health server bound them")


def get(port: int, netns: str | None = None) -> tuple[int, dict[str, object], str]:
    """GET / on 127.0.0.1:port, from inside `netns` when given (a socket made in it)."""
    if netns is not None:
        sock = socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError as e:
            sock.close()
            raise urllib.error.URLError(e) from e
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.sock = sock
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            return r.status, json.loads(r.read()), r.headers["Content-Type"]
        finally:
            conn.close()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            return r.status, json.loads(r.read()), r.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers["Content-Type"]


def test_health_server_counts_local_endpoints() -> None:
    healthy = [True]
    hs = ServiceHealthServer("127.0.0.1", proxy_healthy=lambda: healthy[0])
    nsn = NamespacedName("ns1", "web")
    try:
        port = listen_on_a_free_port(hs, {}, nsn)
        code, body, ctype = get(port)
        assert (code, ctype) == (503, "application/json")
        assert body == {
            "service": {"namespace": "ns1", "name": "web"},
            "localEndpoints": 0,
            "serviceProxyHealthy": True,
        }
        hs.sync_endpoints({nsn: 2})
        code, body, _ = get(port)
        assert code == 200 and body["localEndpoints"] == 2
        healthy[0] = False  # kube-proxy itself unhealthy: 503 even with endpoints, as upstream
        code, body, _ = get(port)
        assert code == 503 and body["serviceProxyHealthy"] is False
        # Moving the service to another port closes the old listener.
        new_port = listen_on_a_free_port(hs, {}, nsn)
        with pytest.raises(urllib.error.URLError):
            get(port)
        assert get(new_port)[0] == 503
        # A port that cannot be bound is reported, not raised.
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            busy = int(blocker.getsockname()[1])
            errors = hs.sync_services({nsn: new_port, NamespacedName("ns1", "other"): busy})
            assert len(errors) == 1 and str(busy) in errors[0]
    finally:
        hs.close()


@pytest.mark.e2e
def test_proxier_serves_health_check_node_ports(rules_netns: str) -> None:
    # The listeners live in the test's own namespace (as kproxy's do on a node): no other process
    # can hold a port there, so a fixed one is safe.
    hs = ServiceHealthServer("127.0.0.1", netns=rules_netns)
    px = IptablesProxier(IPTables(backend="nft", netns=rules_netns), health_server=hs)
    port = 30200
    s = svc(
        spn("lb"),
        "172.30.0.9",
        type="LoadBalancer",
        node_port=30100,
        external_policy_local=True,
        health_check_node_port=port,
    )
    try:
        assert px.sync(request([s], {s.name: (ep("10.1.0.2", is_local=True), ep("10.2.0.2"))})).ok
        code, body, _ = get(port, rules_netns)
        assert code == 200 and body["localEndpoints"] == 1
        # The filter table lets probes in (upstream's KUBE-NODEPORTS health check rule).
        assert f"--dport {port} -j ACCEPT" in px.iptables.save("filter")
        assert px.sync(request([s], {s.name: (ep("10.2.0.2"),)}, changed={s.name})).ok
        assert get(port, rules_netns)[0] == 503
        assert px.sync(request([], {}, changed={s.name})).ok
        with pytest.raises(urllib.error.URLError):
            get(port, rules_netns)
    finally:
        px.close()
        assert px.cleanup()


def test_health_listeners_never_ask_dns_for_their_address(monkeypatch: pytest.MonkeyPatch) -> None:
    # http.server names the bound address with socket.getfqdn (a reverse DNS query): where no
    # resolver answers that blocked each listener's sync for the resolver's timeout (10 s per
    # "::" listener in the IPVS VM). Both listener kinds (IPv4 and the dual-stack one) must bind without it.
    def no_dns(name: str = "") -> str:
        raise AssertionError(f"getfqdn({name!r}) called")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    for address in ("127.0.0.1", ""):
        hs = ServiceHealthServer(address)
        nsn = NamespacedName("ns1", "web")
        port = free_port()
        try:
            assert hs.sync_services({nsn: port}) == []
            hs.sync_endpoints({nsn: 1})
            status, body, _ = get(port)
            assert status == 200 and body["localEndpoints"] == 1
        finally:
            hs.close()


def test_idle_connections_are_bounded_in_number_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects and says nothing holds a thread only REQUEST_TIMEOUT; beyond
    max_connections at once, a new connection is closed at once; the listener then answers again."""
    import time

    import kproxy.healthcheck as hc

    monkeypatch.setattr(hc, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(hc._HTTPServer, "max_connections", 2)
    hs = ServiceHealthServer("127.0.0.1")
    nsn = NamespacedName("ns1", "idle")
    idle: list[socket.socket] = []
    try:
        port = listen_on_a_free_port(hs, {}, nsn)
        for _ in range(2):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.3)  # both accepted and holding their threads
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            third.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert third.recv(100) == b""  # closed without an answer: every slot is taken
        t0 = time.monotonic()
        for s in idle:
            assert s.recv(100) == b""  # the silent clients are dropped after the timeout
        assert 0.5 < time.monotonic() - t0 < 4.5
        code, body, _ = get(port)
        assert code == 503 and body["localEndpoints"] == 0
    finally:
        for s in idle:
            s.close()
        hs.close()

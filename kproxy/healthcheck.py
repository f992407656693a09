"""Per-service health-check node ports for externalTrafficPolicy: Local (upstream servicehealth).

A cloud load balancer probes spec.healthCheckNodePort on every node and only sends traffic to
nodes that answer 200, i.e. nodes with at least one local ready endpoint. One HTTP listener per
port; the body names the service and its local endpoint count, as upstream's handler does.

Listeners run on plain threads (http.server) so the proxier, which is synchronous, can open and
close them from sync() without an event loop.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kproxy.relay import socket_in_netns

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NamespacedName:
    namespace: str
    name: str


@functools.cache
def _ipv6_available() -> bool:
    """Whether this kernel has IPv6 sockets at all (booted with ipv6.disable=1 it has not)."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


# The listeners answer whoever reaches a node port (load balancers' probes, but anyone on the
# network): each connection has a thread, so both how many and how long are bounded. A probe is
# one short request per connection (HTTP/1.0, as http.server answers).
MAX_CONNECTIONS = 32  # per listener; more are closed at once
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request (then its thread ends)


class _HTTPServer(http.server.ThreadingHTTPServer):
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active = 0
        self._active_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
        if full:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread was started: give the slot back
            with self._active_lock:
                self._active -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1

    def server_bind(self) -> None:
        # http.server's own server_bind asks for the bound address' name (socket.getfqdn): a
        # reverse DNS query per listener, which blocks the sync for the resolver's whole
        # timeout where none answers (10 s per "::" listener in the test VM). Nothing uses it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _DualStackHTTPServer(_HTTPServer):
    address_family = socket.AF_INET6


class _Listener:
    def __init__(self, owner: ServiceHealthServer, nsn: NamespacedName, port: int, address: str,
                 netns: str | None = None) -> None:
        self.nsn = nsn
        self.port = port
        handler = _make_handler(owner, nsn)
        # No address: every address of both families, as upstream's Go listener on ":port"
        # (one IPv6 socket that also takes IPv4) where the node has IPv6 at all.
        dual = address in ("", "::") and _ipv6_available()
        server_class = _DualStackHTTPServer if dual else _HTTPServer
        self.server = server_class(("::" if dual else address, port), handler, bind_and_activate=False)
        if netns is not None:
            # The listening socket must belong to the node's namespace (tests run the proxier
            # for a namespace they made); accepted sockets inherit it.
            self.server.socket.close()
            self.server.socket = socket_in_netns(netns, self.server.address_family, socket.SOCK_STREAM)
        if dual:
            self.server.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.server.server_bind()
            self.server.server_activate()
        except OSError:
            self.server.server_close()
            raise
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            name=f"healthcheck-{port}",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _make_handler(
    owner: ServiceHealthServer, nsn: NamespacedName
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT  # the connection's socket timeout: a silent client is dropped

        def do_GET(self) -> None:
            count = owner.local_endpoints(nsn)
            healthy = owner.proxy_healthy()
            body = json.dumps(
                {
                    "service": {"namespace": nsn.namespace, "name": nsn.name},
                    "localEndpoints": count,
                    "serviceProxyHealthy": healthy,
                },
                indent=1,
            ).encode()
            # Upstream: 503 when there is no local endpoint or kube-proxy itself is unhealthy.
            self.send_response(200 if count > 0 and healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


class ServiceHealthServer:
    """Owns one listener per health-check node port; SyncServices/SyncEndpoints as upstream."""

    def __init__(self, bind_address: str = "", proxy_healthy: Callable[[], bool] | None = None,
                 netns: str | None = None) -> None:
        self._address = bind_address
        self._netns = netns
        self._proxy_healthy = proxy_healthy or (lambda: True)
        self._lock = threading.Lock()
        self._listeners: dict[NamespacedName, _Listener] = {}
        self._endpoints: dict[NamespacedName, int] = {}

    def proxy_healthy(self) -> bool:
        return self._proxy_healthy()

    def local_endpoints(self, nsn: NamespacedName) -> int:
        with self._lock:
            return self._endpoints.get(nsn, 0)

    def sync_services(self, ports: dict[NamespacedName, int]) -> list[str]:
        """Open listeners for new (service, port) pairs, close removed or moved ones.

        Returns errors (a port that cannot be bound is logged and retried on the next sync, as
        upstream does) instead of raising, so one bad port never blocks rule programming.
        """
        errors: list[str] = []
        with self._lock:
            for nsn, listener in list(self._listeners.items()):
                if ports.get(nsn) != listener.port:
                    listener.close()
                    del self._listeners[nsn]
            for nsn, port in ports.items():
                if nsn in self._listeners or port <= 0:
                    continue
                try:
                    self._listeners[nsn] = _Listener(self, nsn, port, self._address, self._netns)
                except OSError as e:
                    msg = f"health check node port {port} for {nsn.namespace}/{nsn.name}: {e}"
                    log.error("healthcheck listen failed %s", msg)
                    errors.append(msg)
            for nsn in list(self._endpoints):
                if nsn not in ports:
                    del self._endpoints[nsn]
        return errors

    def sync_endpoints(self, counts: dict[NamespacedName, int]) -> None:
        with self._lock:
            for nsn in self._listeners:
                self._endpoints[nsn] = counts.get(nsn, 0)

    def ports(self) -> dict[NamespacedName, int]:
        with self._lock:
            return {nsn: lst.port for nsn, lst in self._listeners.items()}

    def close(self) -> None:
        with self._lock:
            for listener in self._listeners.values():
                listener.close()
            self._listeners.clear()

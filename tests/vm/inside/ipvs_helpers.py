"""Helpers for the IPVS suite that runs INSIDE the User-Mode Linux VM (tests/vm/run).

The VM's root namespace is the "node" (its own kernel, nothing shared with the host): kproxy
programs IPVS, kube-ipvs0, ipsets and iptables-legacy there. Clients and backends live in network
namespaces the fixtures create: a client on its own link (10.250.0.2, gateway 10.250.0.1 = the
node) so replies from backends must come back through the node's IPVS, and backends on a bridge
(10.244.0.0/24, gateway 10.244.0.1). Sockets are made inside a namespace by a thread that setns()
into it, so servers and clients are threads of this process (process starts are slow in UML).
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kproxy.backends.conntrack import Conntrack
from kproxy.backends.ipset import IPSets
from kproxy.backends.iptables import IPTables
from kproxy.healthcheck import ServiceHealthServer
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.ipvs import SET_SPECS, IPVSOptions, IPVSProxier

NODE_CLIENT_IP = "10.250.0.1"
CLIENT_IP = "10.250.0.2"
NODE_POD_IP = "10.244.0.1"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """Runs fn in a fresh thread switched into netns `ns` (setns affects only that thread);
    sockets it creates stay in that namespace for their whole life."""
    box: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]
    return box.get("value")


@dataclass
class Backend:
    """A TCP (and UDP) server in its own netns: greets with 'NAME PEER_IP', then echoes lines."""

    name: str
    ns: str
    ip: str
    port: int = 8080
    close_after_greeting: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _sock: socket.socket | None = None

    def start(self) -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", self.port))
            s.listen(128)
            s.settimeout(0.2)
            return s

        self._sock = in_netns(self.ns, make)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn, peer[0]), daemon=True).start()

    def _handle(self, conn: socket.socket, peer: str) -> None:
        with conn:
            conn.settimeout(30)
            try:
                conn.sendall(f"{self.name} {peer}\n".encode())
                if self.close_after_greeting:
                    return
                while not self._stop.is_set():
                    data = conn.recv(4096)
                    if not data:
                        return
                    conn.sendall(f"{self.name}:".encode() + data)
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()


@dataclass
class Topology:
    client_ns: str
    backends: list[Backend]
    suffix: str

    def connect(self, ip: str, port: int, timeout: float = 3.0, src_port: int = 0) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if src_port:
                s.bind((CLIENT_IP, src_port))
            s.settimeout(timeout)
            try:
                s.connect((ip, port))
            except BaseException:
                s.close()
                raise
            return s

        sock: socket.socket = in_netns(self.client_ns, make)
        return sock

    def greet(self, ip: str, port: int, timeout: float = 3.0) -> tuple[str, str]:
        """(backend name, client address the backend saw) of one new connection."""
        with self.connect(ip, port, timeout) as s:
            line = s.makefile().readline().split()
        return line[0], line[1]


def ip_batch(lines: list[str], netns: str = "") -> None:
    """Many `ip` commands in one process (process starts are slow under UML)."""
    cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def setup_topology(suffix: str, n_backends: int) -> Topology:
    client = f"kptc{suffix}"
    bridge = f"kptbr{suffix}"
    spaces = [(f"kptb{i}{suffix}", f"kptbv{i}{suffix}", f"10.244.0.{10 + i}") for i in range(n_backends)]
    root = [f"netns add {client}", f"link add kptcv{suffix} type veth peer name eth0 netns {client}",
            f"addr add {NODE_CLIENT_IP}/24 dev kptcv{suffix}", f"link set kptcv{suffix} up",
            f"link add {bridge} type bridge", f"addr add {NODE_POD_IP}/24 dev {bridge}", f"link set {bridge} up"]
    for ns, veth, _ip in spaces:
        root += [f"netns add {ns}", f"link add {veth} type veth peer name eth0 netns {ns}",
                 f"link set {veth} master {bridge} up"]
    ip_batch(root)
    ip_batch([f"addr add {CLIENT_IP}/24 dev eth0", "link set eth0 up", "link set lo up",
              f"route add default via {NODE_CLIENT_IP}"], client)
    backends = []
    for i, (ns, _veth, ip) in enumerate(spaces):
        ip_batch([f"addr add {ip}/24 dev eth0", "link set eth0 up", "link set lo up",
                  f"route add default via {NODE_POD_IP}"], ns)
        b = Backend(f"b{i}", ns, ip)
        b.start()
        backends.append(b)
    return Topology(client, backends, suffix)


def teardown_topology(suffix: str, n_backends: int) -> None:
    for i in range(n_backends):
        sh("ip", "netns", "del", f"kptb{i}{suffix}", check=False)
    sh("ip", "netns", "del", f"kptc{suffix}", check=False)
    sh("ip", "link", "del", f"kptbr{suffix}", check=False)
    sh("ip", "link", "del", f"kptcv{suffix}", check=False)


def make_proxier(conntrack: Conntrack | None = None, health_server: ServiceHealthServer | None = None,
                 **opts: Any) -> IPVSProxier:
    return IPVSProxier(IPVSOptions(**opts), IPTables(backend="legacy"), IPSets(SET_SPECS),
                       node_ips=lambda: [NODE_CLIENT_IP], conntrack=conntrack, health_server=health_server)


def spn(name: str, port: str = "http", protocol: str = "TCP") -> ServicePortName:
    return ServicePortName("default", name, port, protocol)  # type: ignore[arg-type]


def service(name: str, cluster_ip: str, port: int = 80, **kw: Any) -> ServicePort:
    protocol = kw.pop("protocol", "TCP")
    kw.setdefault("type", "NodePort" if kw.get("node_port") else "ClusterIP")
    return ServicePort(name=spn(name, protocol=protocol), cluster_ips=(cluster_ip,), port=port,
                       protocol=protocol, **kw)


def endpoints(*ips: str, port: int = 8080, local: bool = True, **kw: Any) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip=ip, port=port, is_local=local, **kw) for ip in ips)


class State:
    """The services/endpoints a test declares; sync() turns them into SyncRequests."""

    def __init__(self, proxier: IPVSProxier) -> None:
        self.proxier = proxier
        self.services: dict[ServicePortName, ServicePort] = {}
        self.endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}

    def set(self, sp: ServicePort, eps: tuple[Endpoint, ...] = ()) -> ServicePortName:
        self.services[sp.name] = sp
        self.endpoints[sp.name] = eps
        return sp.name

    def sync(self, changed: Iterable[ServicePortName] | None = None) -> None:
        req = SyncRequest(dict(self.services), dict(self.endpoints),
                          changed=frozenset(changed or ()), full=changed is None)
        result = self.proxier.sync(req)
        assert result.ok, result.error


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()

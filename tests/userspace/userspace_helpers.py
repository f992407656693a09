"""Topology and traffic helpers for the userspace-mode tests (real namespaces, real sockets).

    client ns  c0 10.77.1.2/24 ──veth── n0 10.77.1.1/24  node ns  n1 10.77.0.1/24 ──veth── b0  backend ns
               default via 10.77.1.1                      (relay, rules)          10.77.0.2,.3,.4/24
                                                          default via 10.77.0.254 (silent)
                                                                                  default via 10.77.0.1

Backends in the backend ns (asyncio, one thread): TCP port 7000 reads to EOF, then answers
"NAME NBYTES CRC32\\n" and closes (so half-close and byte counts are checked on every request);
UDP port 7000 answers "NAME:" + datagram.
"""
from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self

from kproxy.relay import enter_netns, socket_in_netns

NODE_CLIENT_IP = "10.77.1.1"
CLIENT_IP = "10.77.1.2"
NODE_BACKEND_IP = "10.77.0.1"
BACKEND_IPS = ("10.77.0.2", "10.77.0.3", "10.77.0.4")
BACKEND_PORT = 7000
DEAD_PORT = 7999  # nothing listens there: connects are refused


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@dataclass
class Topology:
    client: str
    node: str
    backend: str

    def tcp(self, ns: str, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
        s = socket_in_netns(ns, socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr)
        return s


@contextmanager
def topology() -> Iterator[Topology]:
    sfx = secrets.token_hex(3)
    topo = Topology(client=f"kptuc{sfx}", node=f"kptun{sfx}", backend=f"kptub{sfx}")
    made: list[str] = []
    try:
        for ns in (topo.client, topo.node, topo.backend):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", topo.client, "link", "add", "c0", "type", "veth", "peer", "name", "n0", "netns", topo.node)
        sh("ip", "-n", topo.node, "link", "add", "n1", "type", "veth", "peer", "name", "b0", "netns", topo.backend)
        sh("ip", "-n", topo.client, "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
        sh("ip", "-n", topo.node, "addr", "add", f"{NODE_CLIENT_IP}/24", "dev", "n0")
        sh("ip", "-n", topo.node, "addr", "add", f"{NODE_BACKEND_IP}/24", "dev", "n1")
        for ip in BACKEND_IPS:
            sh("ip", "-n", topo.backend, "addr", "add", f"{ip}/24", "dev", "b0")
        for ns, dev in ((topo.client, "c0"), (topo.node, "n0"), (topo.node, "n1"), (topo.backend, "b0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", topo.client, "route", "add", "default", "via", NODE_CLIENT_IP)
        sh("ip", "-n", topo.backend, "route", "add", "default", "via", NODE_BACKEND_IP)
        # A node has a default route; service IPs are routed by it until OUTPUT's DNAT applies.
        # (to a gateway nobody answers for: traffic no rule catches goes nowhere)
        sh("ip", "-n", topo.node, "route", "add", "default", "via", "10.77.0.254")
        sh("ip", "netns", "exec", topo.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        yield topo
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


class Backends:
    """Asyncio servers inside the backend ns, in one thread."""

    def __init__(self, netns: str, ips: tuple[str, ...] = BACKEND_IPS, port: int = BACKEND_PORT) -> None:
        self.netns, self.ips, self.port = netns, ips, port
        self.loop = asyncio.new_event_loop()
        self.hits: dict[str, int] = {ip: 0 for ip in ips}
        self.peers: dict[str, set[str]] = {ip: set() for ip in ips}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="kpt-backends")

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("backends did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        enter_netns(self.netns)
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        servers = []
        for ip in self.ips:
            servers.append(await asyncio.start_server(self._handler(ip), ip, self.port, backlog=8192))
            await self.loop.create_datagram_endpoint(functools.partial(_UdpEcho, ip), local_addr=(ip, self.port))
        self._ready.set()
        await self._stop.wait()
        for s in servers:
            s.close()

    def _handler(self, name: str):  # type: ignore[no-untyped-def]
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.hits[name] += 1
            self.peers[name].add(w.get_extra_info("peername")[0])
            n, crc = 0, 0
            try:
                while chunk := await r.read(1 << 18):
                    n += len(chunk)
                    crc = zlib.crc32(chunk, crc)
                w.write(f"{name} {n} {crc}\n".encode())
                await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        return handle


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name.encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # a DatagramTransport in practice, not by class

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.name + b":" + data, addr)


def request(s: socket.socket, payload: bytes = b"hello") -> tuple[str, int, int]:
    """Send, half-close, read the backend's "NAME NBYTES CRC" answer."""
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    buf = b""
    deadline = time.monotonic() + 10
    while not buf.endswith(b"\n") and time.monotonic() < deadline:
        chunk = s.recv(256)
        if not chunk:
            break
        buf += chunk
    name, n, crc = buf.decode().split()
    return name, int(n), int(crc)


def expect_refused_at_once(topo: Topology, ns: str, addr: tuple[str, int]) -> float:
    """Connect, send, read: some step must fail with a reset or refusal. Returns the seconds it took."""
    t0 = time.monotonic()
    try:
        with topo.tcp(ns, addr, timeout=5) as s:
            s.sendall(b"x")
            data = s.recv(10)
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
        return time.monotonic() - t0
    raise AssertionError(f"{addr}: expected a reset or refusal, got {data!r}")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def pattern_chunks(total: int, chunk: int = 4 << 20) -> Iterator[memoryview]:
    """A deterministic, non-repeating-per-chunk stream: a random block rotated differently each time,
    so a dropped, duplicated or reordered chunk changes the checksum."""
    base = os.urandom(chunk)
    doubled = memoryview(base + base)
    sent, k = 0, 0
    while sent < total:
        n = min(chunk, total - sent)
        off = (k * 7919) % chunk
        yield doubled[off : off + n]
        sent += n
        k += 1


def congestion_of(ns: str, port: int) -> set[str]:
    """The congestion control `ss` reports for the established TCP sockets in ns with port at either end."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htin", "state", "established",
                          f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    known = {"reno", "cubic", "bbr", "dctcp", "htcp", "vegas", "westwood", "bic"}
    return {w for w in out.split() if w in known}


def non_default_congestion() -> str:
    """A congestion control a new socket does not get by default here, so that setting it shows."""
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        return "cubic" if f.read().strip() == "reno" else "reno"

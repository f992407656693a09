"""Helpers for the cluster DNS tests (imported by name; conftest.py holds only the fixtures): a real
kproxy-dns process on a free loopback port, object builders, a query helper (dnspython) and a fake
upstream DNS server on loopback.

Never `import dns` from a module whose cwd is the repo root with the repo on sys.path first:
pytest's rootdir insertion is avoided by the absence of __init__.py, and dnspython is imported
before anything could shadow it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset

ROOT = Path(__file__).resolve().parents[2]
KDNS = Path(sys.executable).parent / "kproxy-dns"
ZONE = "cluster.local"


def bind_udp_tcp() -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to one port of 127.0.0.1 (DNS needs both), kept bound: a port
    released and bound again later could be taken by another process in between."""
    for _ in range(100):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = int(u.getsockname()[1])
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
        except OSError:
            u.close()
            t.close()
            continue
        return u, t, port
    raise RuntimeError("no free port on 127.0.0.1")


class DeadPort:
    """A loopback port nothing answers on (UDP: ICMP port unreachable; TCP: refused), held until
    close(): a port found free and released could be bound by another process, or handed by the
    kernel to a server this test starts on port 0, while the test relies on it being dead."""

    def __init__(self) -> None:
        self._udp, self._tcp, self.port = bind_udp_tcp()
        # A connected UDP socket matches only datagrams from its peer (the discard port, which
        # sends nothing): any other sender finds no socket and gets ICMP port unreachable. The TCP
        # socket is bound but never listens: a SYN gets a reset.
        self._udp.connect(("127.0.0.1", 9))

    def close(self) -> None:
        self._udp.close()
        self._tcp.close()


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 a moment ago; for a server started as another
    process, which must retry on "address already in use" (start_kdns does)."""
    u, t, port = bind_udp_tcp()
    u.close()
    t.close()
    return port


# ------------------------------------------------------------------------------- objects

def service(name: str, ns: str = "default", ip: str | list[str] | None = None, *, ports: list[Any] | None = None,
            headless: bool = False, external: str = "", publish_not_ready: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in (ports or [])]}
    if external:
        spec = {"type": "ExternalName", "externalName": external}
    elif headless:
        spec["clusterIP"] = "None"
        spec["clusterIPs"] = ["None"]
    else:
        ips = [ip] if isinstance(ip, str) else list(ip or [])
        spec["clusterIP"] = ips[0]
        spec["clusterIPs"] = ips
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def endpoint_slice(name: str, service_name: str, endpoints: list[tuple[str, str | None, bool]], *,
                   ns: str = "default", ports: list[Any] | None = None,
                   address_type: str = "IPv4") -> dict[str, Any]:
    """endpoints: (address, hostname or None, ready)."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": address_type,
        "endpoints": [{"addresses": [a], **({"hostname": h} if h else {}), "conditions": {"ready": r}}
                      for a, h, r in endpoints],
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in (ports or [])],
    }


# ------------------------------------------------------------------------------- process

class KdnsProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="kdns-test-"))
        self.health_port = free_port()
        port_file = self.workdir / "port"
        self.log = self.workdir / "kdns.log"
        cmd = [*(prefix or []), str(KDNS), "--dns-bind-address", "127.0.0.1", "--dns-port", "0",
               "--health-bind-address", "127.0.0.1", "--health-port", str(self.health_port),
               "--port-file", str(port_file), "--v", "debug", *args]
        with open(self.log, "wb") as log:  # Popen keeps its own copy of the fd
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                         env={**os.environ, **(env or {})}, cwd=self.workdir)
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log.read_text()[-3000:]
                self.stop()
                raise RuntimeError(f"kproxy-dns did not start: {text}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        """VmRSS of the server process (`ip netns exec` execs it, so the pid is the server's)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float:
        """One sample of /metrics by its full name with labels (0 when absent)."""
        for line in self.http("/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def query(self, name: str, rdtype: str | int = "A", *, tcp: bool = False, payload: int | None = 1232,
              timeout: float = 3.0, want_dnssec: bool = False) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, use_edns=0 if payload else False, payload=payload or 512,
                                   want_dnssec=want_dnssec)
        if tcp:
            return dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=timeout)
        return dns.query.udp(q, "127.0.0.1", port=self.port, timeout=timeout, ignore_trailing=False)

    def dig(self, *args: str, server: str = "127.0.0.1") -> str:
        r = subprocess.run(["dig", f"@{server}", "-p", str(self.port), "+tries=1", "+time=3", *args],
                           capture_output=True, text=True, timeout=20, check=False)
        return r.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_kdns(objects: list[dict[str, Any]] | None, extra: list[str] | None = None,
               env: dict[str, str] | None = None, prefix: list[str] | None = None) -> KdnsProcess:
    args = list(extra or [])
    tmp = None
    if objects is not None:
        fd, tmp = tempfile.mkstemp(prefix="kdns-objects-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"kind": "List", "apiVersion": "v1", "items": objects}, f)
        args = ["--objects", tmp, *args]
    try:
        # The health port is picked by the test and released before the server starts, while the
        # DNS port is the kernel's choice (port 0): the two can collide. Such a start is retried,
        # a bounded number of times; any other start failure is raised at once.
        for attempt in range(3):
            try:
                return KdnsProcess(args, env, prefix)
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
        raise AssertionError("unreachable")
    finally:
        if tmp:
            os.unlink(tmp)


# ------------------------------------------------------------------------------- upstream

class FakeUpstream:
    """A tiny authoritative DNS server on 127.0.0.1 (UDP and TCP) for forwarding tests.

    records: {(name, type): (ttl, [rdata text])}; a name in `truncate` gets an empty TC answer over
    UDP and the full one over TCP; names absent get NXDOMAIN with an SOA (negative TTL `neg_ttl`).
    Every query is logged in `log` as (transport, name, type)."""

    def __init__(self, records: dict[tuple[str, str], tuple[int, list[str]]], *, truncate: set[str] | None = None,
                 neg_ttl: int = 30, delay: float = 0.0) -> None:
        self.records = records
        self.delay = delay  # seconds before each UDP answer (lets identical queries pile up)
        self.truncate = truncate or set()
        self.neg_ttl = neg_ttl
        self.log: list[tuple[str, str, str]] = []
        self.udp, self.tcp, self.port = bind_udp_tcp()
        self.tcp.listen(16)
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._serve_udp, daemon=True),
                        threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self.threads:
            t.start()

    def _answer(self, data: bytes, transport: str) -> bytes:
        q = dns.message.from_wire(data)
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.log.append((transport, name, rdtype))
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        if transport == "udp" and name in self.truncate:
            r.flags |= dns.flags.TC
            return r.to_wire()
        size = 65535 if transport == "tcp" else 4096
        rec = self.records.get((name, rdtype))
        if rec is not None:
            ttl, rdatas = rec
            r.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, rdatas))
        else:
            if not any(k[0] == name for k in self.records):
                r.set_rcode(dns.rcode.NXDOMAIN)
            r.authority.append(dns.rrset.from_text(
                "example.", self.neg_ttl, "IN", "SOA", f"ns.example. host.example. 1 7200 900 86400 {self.neg_ttl}"))
        return r.to_wire(max_size=size)

    def _serve_udp(self) -> None:
        for _ in range(100_000):
            if self.stopping.is_set():
                return
            try:
                data, addr = self.udp.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            if self.delay:
                time.sleep(self.delay)
            self.udp.sendto(self._answer(data, "udp"), addr)

    def _serve_tcp(self) -> None:
        for _ in range(100_000):
            if self.stopping.is_set():
                return
            try:
                conn, _ = self.tcp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    n = struct.unpack("!H", conn.recv(2))[0]
                    data = b""
                    while len(data) < n:
                        chunk = conn.recv(n - len(data))
                        if not chunk:
                            break
                        data += chunk
                    out = self._answer(data, "tcp")
                    conn.sendall(struct.pack("!H", len(out)) + out)
                except (OSError, struct.error):
                    pass

    def count(self, name: str, rdtype: str = "A") -> int:
        return sum(1 for _, n, t in self.log if n == name and t == rdtype)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(2)
        self.udp.close()
        self.tcp.close()

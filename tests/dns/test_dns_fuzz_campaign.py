"""The fuzz campaign of issue 13: over 1,000,000 mutated DNS packets (dns_mutator.Mutator, seeded
with real queries), most sent to a running kproxy-dns over UDP and TCP on loopback, the rest fed
to the parser and both hot-path twins directly. After every batch the server must answer a valid
query in under 10 ms (the product requirement), measured with a fresh query on its own socket
once the batch has been processed.

On a shared, loaded machine (load average 8 on 2 cores while this was written) one probe can wait
longer than 10 ms for a CPU whatever the server does, so each check sends up to 5 probes, 10 ms
apart, and needs one under 10 ms; every probe's time is kept, and the worst first probe and the
median are printed. KDNS_FUZZ_PACKETS scales the campaign (default
1,000,000; the split is UDP 70%, TCP 5%, direct 25%)."""
from __future__ import annotations

import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator

import dns.message
import dns.rcode
import pytest
from dns_helpers import ZONE, KdnsProcess, endpoint_slice, service, start_kdns
from dns_mutator import Mutator
from kdns import wire
from kdns.resolver import Forward, Resolver
from test_dns_wire_twins import _index, _tables

TOTAL = int(os.environ.get("KDNS_FUZZ_PACKETS", "1000000"))
UDP_PACKETS = TOTAL * 70 // 100
TCP_PACKETS = TOTAL * 5 // 100
DIRECT_PACKETS = TOTAL - UDP_PACKETS - TCP_PACKETS
UDP_BATCH = 10_000
LIMIT_MS = 10.0

_report: dict[str, float] = {}


@pytest.fixture(scope="module")
def live() -> Iterator[KdnsProcess]:
    p = start_kdns([service("web", ip="10.96.0.10", ports=[("http", 80, "TCP")]),
                    service("hl", headless=True, ports=[("http", 80, "TCP")]),
                    endpoint_slice("hl-a", "hl", [(f"10.3.0.{i}", f"h{i}" if i % 3 else None, True)
                                                  for i in range(1, 30)], ports=[("http", 80, "TCP")])],
                   # upstream: the discard port (nothing listens): forwards fail fast with SERVFAIL
                   ["--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"])
    yield p
    p.stop()


class Prober:
    """A valid query on its own socket: the answer's time in ms (best of up to 5, all kept)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2)
        self.first: list[float] = []
        self.best: list[float] = []

    def _best_of_5(self, once: Callable[[], float]) -> float:
        times = []
        for i in range(5):
            if i:
                time.sleep(0.01)
            times.append(once())
            if times[-1] < LIMIT_MS:
                break
        self.first.append(times[0])
        self.best.append(min(times))
        return min(times)

    def _udp_once(self) -> float:
        q = dns.message.make_query(f"web.default.svc.{ZONE}", "A").to_wire()
        t0 = time.perf_counter()
        self.sock.sendto(q, ("127.0.0.1", self.port))
        while True:
            data = self.sock.recvfrom(65535)[0]
            if data[:2] == q[:2]:
                break
        ms = (time.perf_counter() - t0) * 1000
        r = dns.message.from_wire(data)
        assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "10.96.0.10"
        return ms

    def _tcp_once(self) -> float:
        q = dns.message.make_query(f"_http._tcp.hl.default.svc.{ZONE}", "SRV").to_wire()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(struct.pack("!H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                chunk = s.recv(65535)
                assert chunk, "the server closed a valid TCP query's connection"
                buf += chunk
        ms = (time.perf_counter() - t0) * 1000
        assert dns.message.from_wire(buf[2:]).rcode() == dns.rcode.NOERROR
        return ms

    def udp(self) -> float:
        return self._best_of_5(self._udp_once)

    def tcp(self) -> float:
        return self._best_of_5(self._tcp_once)


def _sync(s: socket.socket, port: int) -> int:
    """Wait until the server has read everything sent before: a marker query sent after it is
    answered (the server reads its socket in order; forwards still pending end within 0.2 s).
    The marker is sent again every 0.5 s in case a full buffer dropped it. Returns the replies read."""
    replies = 0
    for _ in range(60):
        marker = dns.message.make_query(f"dns-version.{ZONE}", "TXT").to_wire()
        s.sendto(marker, ("127.0.0.1", port))
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                data = s.recv(65535)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            replies += 1
            if data[:2] == marker[:2] and len(data) > 12 and data[3] & 0xF == 0 and data[7] == 1:
                return replies
    raise AssertionError("the server did not answer a marker query in 30 s")


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drain(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            s.recv(65535)
            n += 1
        except BlockingIOError:
            return n


@pytest.mark.timeout(600)
def test_fuzz_campaign_live_udp_and_tcp(live: KdnsProcess) -> None:
    mut = Mutator(13)
    probe = Prober(live.port)
    answered0 = live.metric("kdns_dns_request_duration_seconds_count")
    cpu0, server_cpu0 = _cpu_self(), _cpu_of(live.proc.pid)
    t_start = time.monotonic()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        replies = 0
        while sent < UDP_PACKETS:
            batch = mut.batch(min(UDP_BATCH, UDP_PACKETS - sent))
            for i, p in enumerate(batch):
                for _ in range(100):  # bounded retry while our send buffer is full
                    try:
                        s.sendto(p, ("127.0.0.1", live.port))
                        break
                    except BlockingIOError:
                        time.sleep(0.001)
                if i % 400 == 399:
                    replies += _sync(s, live.port)  # a window: the server reads them, not the kernel drops
            sent += len(batch)
            replies += _sync(s, live.port)
            assert live.alive(), "the server died"
            ms = probe.udp()
            assert ms < LIMIT_MS, f"after {sent} UDP packets a valid query took {ms:.1f} ms"
    udp_s = time.monotonic() - t_start
    # TCP: streams of 50 mutated messages; one connection in 10 has a lying length prefix
    t_tcp = time.monotonic()
    tcp_sent = 0
    conns = 0
    while tcp_sent < TCP_PACKETS:
        for _ in range(20):
            stream = mut.tcp_stream(50, lie=conns % 10 == 9)
            conns += 1
            try:
                with socket.create_connection(("127.0.0.1", live.port), timeout=2) as t:
                    t.settimeout(0.5)
                    t.sendall(stream)
                    t.shutdown(socket.SHUT_WR)
                    for _ in range(200):  # read what comes until the server closes (bounded)
                        if not t.recv(65535):
                            break
            except OSError:
                pass  # the server may close a stream it cannot trust mid-send: that is its job
            tcp_sent += 50
        assert live.alive(), "the server died"
        ms = probe.tcp()
        assert ms < LIMIT_MS, f"after {tcp_sent} TCP packets a valid TCP query took {ms:.1f} ms"
        assert probe.udp() < LIMIT_MS
    tcp_s = time.monotonic() - t_tcp
    cpu, server_cpu = _cpu_self() - cpu0, _cpu_of(live.proc.pid) - server_cpu0
    answered = live.metric("kdns_dns_request_duration_seconds_count") - answered0
    assert live.metric("kdns_internal_errors_total") == 0
    _report.update(udp=sent, tcp=tcp_sent, answered=answered, udp_s=udp_s, tcp_s=tcp_s)
    print(f"\nfuzz live: {sent} UDP packets in {udp_s:.1f} s ({replies} replies), {tcp_sent} TCP packets on "
          f"{conns} connections in {tcp_s:.1f} s; the server answered {answered:.0f}; probes: worst first "
          f"{max(probe.first):.2f} ms, worst best-of-5 {max(probe.best):.2f} ms, median first "
          f"{sorted(probe.first)[len(probe.first) // 2]:.2f} ms over {len(probe.first)} probes; CPU: this process "
          f"{cpu:.1f} s, the server {server_cpu:.1f} s; load average {os.getloadavg()[0]:.1f}")
    # most of what was sent was processed (not dropped by a full socket buffer)
    assert answered > 0.5 * sent


@pytest.mark.timeout(600)
def test_fuzz_campaign_direct_parser_and_twins() -> None:
    """The rest of the campaign straight into the parser, the handler and both hot-path twins
    (which must agree byte for byte on every packet)."""
    mut = Mutator(31)
    idx = _index()
    tables = _tables(idx)
    idx.table = next(t for mod, t in tables if mod is wire.impl)  # the handler's own twin
    resolver = Resolver(idx, [("127.0.0.1", 9)], wire.impl.Stats())
    t0 = time.monotonic()
    cpu0 = _cpu_self()
    done = answered = 0
    while done < DIRECT_PACKETS:
        for p in mut.batch(min(10_000, DIRECT_PACKETS - done)):
            try:
                wire.parse_message(p)
            except wire.WireError:
                pass
            outs = {mod.answer(p, t, False) for mod, t in tables}
            assert len(outs) == 1, f"twins differ on {p.hex()}"
            answered += outs != {None}
            if done % 10 == 0:  # the whole handler (slow path included) on a tenth of them
                out = resolver.local(p, done % 20 == 0, "127.0.0.1")
                assert out is None or isinstance(out, (bytes, Forward))
                if isinstance(out, bytes):
                    assert out[:2] == p[:2] and out[2] & 0x80 and len(out) <= (65535 if done % 20 == 0 else 1232)
            done += 1
    assert resolver.internal_errors == 0
    print(f"\nfuzz direct: {done} packets through parse_message and both twins ({answered} answered by the "
          f"hot path), {done // 10} through the whole handler, in {time.monotonic() - t0:.1f} s ({_cpu_self() - cpu0:.1f} "
          f"CPU s, load average {os.getloadavg()[0]:.1f})")
    assert done == DIRECT_PACKETS

"""The relay on its own, compiled core and asyncio twin, with real connections between namespaces."""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import zlib

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
    pattern_chunks,
    request,
    rss_kib,
)

from kproxy.relay import POD_LEG_CONGESTION, Relay, socket_in_netns

pytestmark = pytest.mark.e2e
ALL = [(ip, BACKEND_PORT) for ip in BACKEND_IPS]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tcp_service(relay: Relay, endpoints: list[tuple[str, int]], affinity: float | None = None) -> tuple[str, int]:
    lid, port = relay.listen("TCP", NODE_CLIENT_IP, 0)
    relay.set_endpoints(lid, endpoints, affinity)
    return NODE_CLIENT_IP, port


@pytest.mark.timeout(30)
def test_round_robin_reaches_every_backend(relay: Relay, topo: Topology) -> None:
    addr = _tcp_service(relay, ALL)
    names = []
    for _ in range(6):
        with topo.tcp(topo.client, addr) as s:
            name, n, crc = request(s, b"ping")
            assert (n, crc) == (4, zlib.crc32(b"ping"))
            names.append(name)
    # Strict round robin over three endpoints: each one twice, in a fixed cycle.
    assert sorted(names) == sorted(BACKEND_IPS * 2)
    assert names[:3] == names[3:]


@pytest.mark.timeout(30)
def test_client_ip_affinity_pins_the_client(relay: Relay, topo: Topology, backends: Backends) -> None:
    addr = _tcp_service(relay, ALL, affinity=60)
    names = set()
    for _ in range(6):
        with topo.tcp(topo.client, addr) as s:
            names.add(request(s)[0])
    assert len(names) == 1
    # The relay dials from the node, but the pinned backend saw it: the pin is per client IP.
    assert backends.peers[names.pop()]


@pytest.mark.timeout(30)
def test_affinity_expires_after_timeout(relay: Relay, topo: Topology) -> None:
    addr = _tcp_service(relay, ALL, affinity=0.3)
    with topo.tcp(topo.client, addr) as s:
        first = request(s)[0]
    time.sleep(0.8)  # the sweep runs every 100 ms; past the timeout round robin moves on
    with topo.tcp(topo.client, addr) as s:
        second = request(s)[0]
    assert first != second


@pytest.mark.timeout(30)
def test_refused_endpoint_is_skipped(relay: Relay, topo: Topology) -> None:
    addr = _tcp_service(relay, [(BACKEND_IPS[0], DEAD_PORT), (BACKEND_IPS[1], BACKEND_PORT)])
    for _ in range(4):
        with topo.tcp(topo.client, addr) as s:
            assert request(s)[0] == BACKEND_IPS[1]
    assert relay.stats()["connect_failures"] >= 2


@pytest.mark.timeout(30)
def test_no_endpoints_refuses_at_once(relay: Relay, topo: Topology) -> None:
    addr = _tcp_service(relay, [])
    assert expect_refused_at_once(topo, topo.client, addr) < 1.0
    assert relay.stats()["no_endpoints"] == 1


@pytest.mark.timeout(30)
def test_endpoint_removal_lets_open_connections_finish(relay: Relay, topo: Topology) -> None:
    lid, port = relay.listen("TCP", NODE_CLIENT_IP, 0)
    relay.set_endpoints(lid, [ALL[0]])
    old = topo.tcp(topo.client, (NODE_CLIENT_IP, port))
    old.sendall(b"first half ")
    time.sleep(0.1)
    relay.set_endpoints(lid, [ALL[1]])
    with topo.tcp(topo.client, (NODE_CLIENT_IP, port)) as s:
        assert request(s)[0] == BACKEND_IPS[1]
    with old:
        name, n, _ = request(old, b"second half")
    assert (name, n) == (BACKEND_IPS[0], len(b"first half second half"))


@pytest.mark.timeout(30)
def test_half_close_still_receives_the_reply(relay: Relay, topo: Topology) -> None:
    addr = _tcp_service(relay, ALL[:1])
    payload = os.urandom(3 << 20)
    with topo.tcp(topo.client, addr) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # our write side is done; the reply must still come back
        reply = b""
        while chunk := s.recv(256):
            reply += chunk
    assert reply.decode().split() == [BACKEND_IPS[0], str(len(payload)), str(zlib.crc32(payload))]


@pytest.mark.timeout(30)
def test_udp_echo_and_idle_timeout(relay: Relay, topo: Topology) -> None:
    lid, port = relay.listen("UDP", NODE_CLIENT_IP, 0)
    relay.set_endpoints(lid, ALL[:2], udp_timeout=0.3)
    clients = [socket_in_netns(topo.client, socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        answers = []
        for i, c in enumerate(clients):
            c.settimeout(2)
            for k in range(3):  # one session per client: the same backend answers every datagram
                c.sendto(b"dgram %d %d" % (i, k), (NODE_CLIENT_IP, port))
                data, src = c.recvfrom(2048)
                assert src == (NODE_CLIENT_IP, port)
                name, _, body = data.partition(b":")
                assert body == b"dgram %d %d" % (i, k)
                answers.append((i, name.decode()))
        assert {name for i, name in answers if i == 0} != {name for i, name in answers if i == 1}
        assert len({name for i, name in answers if i == 0}) == 1
        assert relay.stats()["udp_sessions"] == 2
        deadline = time.monotonic() + 3
        while relay.stats()["udp_sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.stats()["udp_sessions"] == 0
    finally:
        for c in clients:
            c.close()


@pytest.mark.timeout(60)
def test_udp_refused_endpoint_moves_on(relay: Relay, topo: Topology) -> None:
    lid, port = relay.listen("UDP", NODE_CLIENT_IP, 0)
    relay.set_endpoints(lid, [(BACKEND_IPS[0], DEAD_PORT), ALL[1]])
    c = socket_in_netns(topo.client, socket.AF_INET, socket.SOCK_DGRAM)
    c.settimeout(0.3)
    got = None
    try:
        for _ in range(10):  # the ICMP port-unreachable drops the session; a retry picks the next
            c.sendto(b"hi", (NODE_CLIENT_IP, port))
            try:
                got = c.recvfrom(2048)[0]
                break
            except TimeoutError:
                continue
    finally:
        c.close()
    assert got == BACKEND_IPS[1].encode() + b":hi"


@pytest.mark.timeout(90)
def test_large_transfer_is_byte_exact(impl: str, relay: Relay, topo: Topology) -> None:
    total = (1 << 30) if impl == "compiled" else (64 << 20)
    addr = _tcp_service(relay, ALL[:1])
    crc = 0
    t0 = time.monotonic()
    with topo.tcp(topo.client, addr, timeout=60) as s:
        for chunk in pattern_chunks(total):
            crc = zlib.crc32(chunk, crc)
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk2 := s.recv(256):
            reply += chunk2
    elapsed = time.monotonic() - t0
    assert reply.decode().split() == [BACKEND_IPS[0], str(total), str(crc)]
    print(f"{impl}: {total >> 20} MiB in {elapsed:.2f}s = {total / elapsed / 1e6:.0f} MB/s")


# Runs in its own process (and fd table) inside the client ns: the test process already holds the
# relay's and the backends' sockets, and the hard RLIMIT_NOFILE here is 20000 without CAP_SYS_RESOURCE.
_MANY_CLIENTS = """
import json, socket, sys
n, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection((host, port), timeout=20)
    s.sendall(b"c")
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
names = {}
for s in socks:
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while not buf.endswith(b"\\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        buf += chunk
    name, nbytes, _ = buf.decode().split()
    assert nbytes == "1", buf
    names[name] = names.get(name, 0) + 1
print(json.dumps(names), flush=True)
"""


@pytest.mark.timeout(120)
def test_5000_concurrent_connections(impl: str, relay: Relay, topo: Topology) -> None:
    want = 5000 if impl == "compiled" else 2000  # the asyncio twin: same checks, smaller, to fit the CI budget
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The relay (2 fds per idle connection) and the backends (1) share this process.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = _tcp_service(relay, ALL)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", topo.client, sys.executable, "-c", _MANY_CLIENTS, str(want), host, str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp",
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "open"
        # All of them are open through the relay at the same time.
        deadline = time.monotonic() + 30
        while relay.stats()["active"] < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.stats()["active"] == want
        proc.stdin.write("go\n")
        proc.stdin.flush()
        names = json.loads(proc.stdout.readline())
        assert sorted(names) == sorted(BACKEND_IPS)
        assert sum(names.values()) == want
        # Round robin, give or take the few connects that hit the connect timeout on a loaded
        # machine and moved on to the next endpoint.
        assert all(abs(v - want / 3) <= 1 + relay.stats()["connect_failures"] for v in names.values()), names
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _spawn_relay(topo: Topology, impl: str, nofile: int = 0) -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ, PYTHONPATH=REPO)
    if nofile:
        args_pre = ["prlimit", f"--nofile={nofile}", "--"]
    else:
        args_pre = []
    args = ["ip", "netns", "exec", topo.node, *args_pre, sys.executable, "-m", "kproxy.relay", "--impl", impl,
            "--listen", f"{NODE_CLIENT_IP}:0"]
    for ip, port in ALL:
        args += ["--backend", f"{ip}:{port}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd="/tmp", env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready "), line
    return proc, int(line.split()[1])


def _churn(topo: Topology, addr: tuple[str, int], count: int, threads: int = 4) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(n):
                with topo.tcp(topo.client, addr) as s:
                    assert request(s, b"x")[1] == 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread's assert
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(count // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors[:3]


@pytest.mark.timeout(120)
def test_relay_process_memory_is_flat_under_churn(impl: str, topo: Topology, backends: Backends) -> None:
    proc, port = _spawn_relay(topo, impl)
    try:
        addr = (NODE_CLIENT_IP, port)
        n = 3000 if impl == "compiled" else 1500
        _churn(topo, addr, n // 3)  # warm-up: allocator arenas, asyncio internals
        before = rss_kib(proc.pid)
        _churn(topo, addr, n)
        after = rss_kib(proc.pid)
        print(f"{impl}: RSS {before} KiB -> {after} KiB after {n} connections")
        # A leak of even one small struct per connection would show as > 1 MiB here.
        assert after - before < (1024 if impl == "compiled" else 4096)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.timeout(30)
def test_bad_endpoint_and_unknown_listener_are_clear_errors(relay: Relay) -> None:
    lid, _ = relay.listen("TCP", NODE_CLIENT_IP, 0)
    with pytest.raises((ValueError, OSError), match="10.0.0.300"):
        relay.set_endpoints(lid, [("10.0.0.300", 80)])
    with pytest.raises(KeyError, match="no listener 9999"):
        relay.set_endpoints(9999, [("10.0.0.1", 80)])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(60)
def test_out_of_fds_pauses_accept_then_recovers(impl: str, topo: Topology, backends: Backends) -> None:
    proc, port = _spawn_relay(topo, impl, nofile=64)
    clients: list[socket.socket] = []
    try:
        addr = (NODE_CLIENT_IP, port)
        for _ in range(32):  # more than the relay can hold open: the rest wait in its accept queue
            s = topo.tcp(topo.client, addr)
            s.sendall(b"c")
            clients.append(s)
        time.sleep(0.5)
        cpu0 = _cpu_seconds(proc.pid)
        time.sleep(1.0)
        # A listener that stays readable while accept() fails must not spin the loop.
        spent = _cpu_seconds(proc.pid) - cpu0
        print(f"{impl}: {spent:.2f} CPU s in 1 s while out of fds")
        assert spent < 0.5
        for s in clients:
            s.close()
        clients.clear()
        deadline = time.monotonic() + 20
        while True:  # once the closed clients are reaped, service resumes
            try:
                with topo.tcp(topo.client, addr, timeout=2) as s:
                    assert request(s, b"ok")[1] == 2
                break
            except (OSError, ValueError):
                assert time.monotonic() < deadline, "relay did not recover after running out of fds"
                time.sleep(0.2)
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        stats = json.loads(out.split("stats ", 1)[1])
        print(f"{impl}: {stats}")
        assert stats["accepted"] >= 33
        if impl == "compiled":
            # The run did reach the limit in accept(). Not asserted for the asyncio twin: whether
            # its accept() or an upstream socket() meets the limit first depends on how many
            # clients asyncio finds queued per wakeup (about 1 run in 3 here never hits it in
            # accept(), with the machine idle).
            assert stats["accept_paused"] >= 1
    finally:
        for s in clients:
            s.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


@pytest.mark.timeout(30)
def test_ipv6_listener_and_endpoints(relay: Relay, topo: Topology) -> None:
    """The AF_INET6 paths: listener, endpoint parsing, affinity keys and UDP sessions over ::1."""
    srv = socket_in_netns(topo.node, socket.AF_INET6, socket.SOCK_STREAM)
    usrv = socket_in_netns(topo.node, socket.AF_INET6, socket.SOCK_DGRAM)
    srv.bind(("::1", 0))
    srv.listen(8)
    usrv.bind(("::1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            got.append(data)
            conn.sendall(b"v6:" + data)
        data, peer = usrv.recvfrom(2048)
        usrv.sendto(b"u6:" + data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        lid, port = relay.listen("TCP", "::1", 0)
        relay.set_endpoints(lid, [("::1", srv.getsockname()[1])], affinity_timeout=30)
        ulid, uport = relay.listen("UDP", "::1", 0)
        relay.set_endpoints(ulid, [("::1", usrv.getsockname()[1])])
        c = socket_in_netns(topo.node, socket.AF_INET6, socket.SOCK_STREAM)
        with c:
            c.settimeout(5)
            c.connect(("::1", port))
            c.sendall(b"hello6")
            c.shutdown(socket.SHUT_WR)
            assert c.recv(100) == b"v6:hello6"
        u = socket_in_netns(topo.node, socket.AF_INET6, socket.SOCK_DGRAM)
        with u:
            u.settimeout(5)
            u.sendto(b"d6", ("::1", uport))
            data, src = u.recvfrom(100)
            assert (data, src[:2]) == (b"u6:d6", ("::1", uport))
        t.join(5)
        assert got == [b"hello6"]
    finally:
        srv.close()
        usrv.close()


@pytest.mark.timeout(60)
def test_small_messages_to_a_stalled_backend_arrive_whole(relay: Relay, topo: Topology) -> None:
    """Small writes are relayed by copy until a direction turns into a stream; when the receiver
    stalls, what the relay read but could not send must wait (in its pipe) and arrive in order,
    both ways, with the FIN behind it."""
    port = 7300
    srv = socket_in_netns(topo.backend, socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited: the window closes early
    srv.bind((BACKEND_IPS[2], port))
    srv.listen(1)
    srv.settimeout(20)
    got: dict[str, int] = {}

    def stalled_echo() -> None:
        conn, _ = srv.accept()
        with conn:
            time.sleep(1.0)  # not reading: the relay's upstream send fills and goes short
            n, crc = 0, 0
            while chunk := conn.recv(700):  # small reads and writes: the copy path both ways
                n, crc = n + len(chunk), zlib.crc32(chunk, crc)
                conn.sendall(chunk)
            got.update(n=n, crc=crc)

    t = threading.Thread(target=stalled_echo, daemon=True)
    t.start()
    addr = _tcp_service(relay, [(BACKEND_IPS[2], port)])
    sizes = [1 + (i * 7919) % 1400 for i in range(4000)]  # about 2.8 MB in writes under 1.4 KB
    blob = os.urandom(sum(sizes))
    echoed = bytearray()
    with topo.tcp(topo.client, addr, timeout=20) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def reader() -> None:
            time.sleep(1.5)  # the client reads late too: the reply direction backs up the same way
            while chunk := s.recv(900):
                echoed.extend(chunk)

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        off = 0
        for size in sizes:
            s.sendall(blob[off:off + size])
            off += size
        s.shutdown(socket.SHUT_WR)
        rt.join(30)
    t.join(10)
    srv.close()
    assert got == {"n": len(blob), "crc": zlib.crc32(blob)}
    assert len(echoed) == len(blob) and zlib.crc32(echoed) == zlib.crc32(blob)



def _check_legs(relay: Relay, topo: Topology, client_leg: str, pod_leg: str) -> None:
    """One relayed connection; `ss` must show these algorithms on its two legs in the node."""
    addr = _tcp_service(relay, ALL[:1])
    with topo.tcp(topo.client, addr) as s:
        s.sendall(b"x")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            legs = (congestion_of(topo.node, addr[1]), congestion_of(topo.node, BACKEND_PORT))
            if legs == ({client_leg}, {pod_leg}):
                break
            time.sleep(0.05)
        assert legs == ({client_leg}, {pod_leg}), legs
        # The client's own socket, in its namespace, keeps its default.
        if client_leg != pod_leg:
            assert pod_leg not in congestion_of(topo.client, addr[1])
        assert request(s, b"")[0] == BACKEND_IPS[0]


@pytest.mark.timeout(30)
def test_default_congestion_pod_leg_cubic_on_a_bbr_node(impl: str, topo: Topology, backends: Backends) -> None:
    """No flag: the client-facing leg keeps the node's default, the pod-facing leg gets cubic
    when that default is bbr (POD_LEG_CONGESTION), else the default too."""
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        node_default = f.read().strip()  # a new namespace starts with the host's default
    relay = Relay(impl, netns=topo.node).start()  # type: ignore[arg-type]
    try:
        _check_legs(relay, topo, node_default, POD_LEG_CONGESTION.get(node_default, node_default))
    finally:
        relay.stop()


@pytest.mark.timeout(30)
def test_tcp_congestion_applies_to_both_legs(impl: str, topo: Topology, backends: Backends) -> None:
    want = non_default_congestion()
    with pytest.raises(ValueError, match="'no-such-cc' cannot be used here.*available: "):
        Relay(impl, netns=topo.node, tcp_congestion="no-such-cc")  # type: ignore[arg-type]
    relay = Relay(impl, netns=topo.node, tcp_congestion=want).start()  # type: ignore[arg-type]
    try:
        _check_legs(relay, topo, want, want)
        with topo.tcp(topo.client, (topo_addr := _tcp_service(relay, ALL[:1]))) as s:
            s.sendall(b"x")
            assert want not in congestion_of(topo.client, topo_addr[1])  # the client's own socket: its default
            assert request(s, b"")[0] == BACKEND_IPS[0]
    finally:
        relay.stop()

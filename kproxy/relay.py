"""The userspace relay: a Python API over the compiled core (kproxy._relay) and its asyncio twin.

Both cores have the same small interface (`RelayCoreAPI`): `run()` is the forwarding loop and
blocks its thread; everything else is thread-safe control. The compiled core forwards TCP with
splice(2) and UDP with recvmmsg/sendmmsg in a loop that never holds the GIL; `AsyncioRelayCore`
does the same with asyncio protocols so the same tests can run against both.

Listener sockets are created here (optionally inside a network namespace) and handed to the core,
which owns them from then on. The core's own outgoing sockets live in the namespace of the thread
that runs the loop, so `Relay(netns=...)` moves that thread into the namespace first.

Standalone: `python -m kproxy.relay --listen 0.0.0.0:8080 --backend 10.0.0.2:80 ...` (used by the
benchmarks and the memory test, which need the relay in a process of its own).
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal, Protocol, Self

Impl = Literal["compiled", "pure"]
Proto = Literal["TCP", "UDP"]
EndpointAddr = tuple[str, int]

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class RelayCoreAPI(Protocol):
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def add_listener(self, fd: int, udp: bool) -> int: ...
    def remove_listener(self, lid: int) -> None: ...
    def set_endpoints(
        self, lid: int, endpoints: list[EndpointAddr], affinity_timeout: float = 0.0, udp_timeout: float = 30.0
    ) -> None: ...
    def stats(self) -> dict[str, int]: ...


def netns_path(netns: str) -> str:
    """A netns name as `ip netns` knows it, or a path such as /proc/PID/ns/net."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def enter_netns(netns: str) -> None:
    """Move the calling thread (only it: namespaces are per task) into a network namespace."""
    path = netns_path(netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def socket_in_netns(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket that belongs to `netns`; a socket keeps its namespace for life, so a short-lived
    thread that enters the namespace can make it for us."""
    if netns is None:
        return socket.socket(family, kind, proto)
    box: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            enter_netns(netns)
            box.append(socket.socket(family, kind, proto))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box.append(exc)

    t = threading.Thread(target=make, name="kproxy-netns-socket")
    t.start()
    t.join()
    got = box[0]
    if isinstance(got, BaseException):
        raise got
    return got


def bind_listener(netns: str | None, proto: Proto, host: str, port: int, backlog: int = 4096) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in_netns(netns, family, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if proto == "TCP":
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"relay: cannot listen on {proto} {host}:{port}: {exc.strerror}") from exc
    return sock


def check_tcp_congestion(name: str) -> None:
    """Raise ValueError unless this kernel lets the relay's sockets use congestion control `name`."""
    if not name:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
        except OSError as exc:
            try:
                with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
                    avail = f.read().strip()
            except OSError:
                avail = "unknown"
            raise ValueError(f"TCP congestion control {name!r} cannot be used here ({exc.strerror}); "
                             f"available: {avail}") from exc


# The pod-facing leg's congestion control when the operator chose none, by the node's default.
# bbr paces every flow; without the fq qdisc it paces in TCP itself, and a relayed stream then
# crosses two paced senders in a row (the client's and the relay's upstream leg), which cost a
# quarter of the throughput here (bench/README.md, userspace). That leg never leaves the node's
# cluster network, where a loss-based controller is what kube-proxy's kernel paths meet anyway;
# the client-facing leg keeps the node's choice (it may cross a WAN, where bbr is the point).
POD_LEG_CONGESTION = {"bbr": "cubic"}


def pod_leg_congestion(netns: str | None = None) -> str:
    """The default congestion control of the relay's pod-facing (upstream) TCP leg in `netns`:
    cubic on a bbr node (when the kernel has cubic), else "" (the node's own default)."""
    with socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM) as probe:
        default = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0].decode()
        choice = POD_LEG_CONGESTION.get(default, "")
        if not choice:
            return ""
        try:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, choice.encode())
        except OSError:
            return ""  # not built into this kernel: keep the node's
    return choice


def new_core(impl: Impl, connect_timeout: float = 1.0, tcp_congestion: str = "") -> RelayCoreAPI:
    check_tcp_congestion(tcp_congestion)
    if impl == "compiled":
        from kproxy import _relay

        core: RelayCoreAPI = _relay.RelayCore(connect_timeout, tcp_congestion.encode())
        return core
    return AsyncioRelayCore(connect_timeout, tcp_congestion)


def compiled_available() -> bool:
    try:
        from kproxy import _relay  # noqa: F401
    except ImportError:
        return False
    return True


class Relay:
    """A relay core running in its own thread, plus the listener sockets it serves."""

    def __init__(self, impl: Impl | Literal["auto"] = "auto", netns: str | None = None,
                 connect_timeout: float = 1.0, tcp_congestion: str = "") -> None:
        """tcp_congestion: the congestion control of both legs of every relayed TCP connection.
        "" (the default): the client-facing leg keeps the node's default and the pod-facing leg
        gets pod_leg_congestion() (cubic on a bbr node): a second pacing controller (bbr without
        the fq qdisc) in the relay costs throughput (bench/README.md, userspace)."""
        if impl == "auto":
            impl = "compiled" if compiled_available() and os.environ.get("KPROXY_PURE") != "1" else "pure"
        self.impl: Impl = impl
        self.netns = netns
        self.tcp_congestion = tcp_congestion  # the client-facing leg's (set on the listeners)
        self.upstream_congestion = tcp_congestion or pod_leg_congestion(netns)
        self.core = new_core(impl, connect_timeout, self.upstream_congestion)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> Self:
        started = threading.Event()

        def loop() -> None:
            try:
                if self.netns is not None:
                    enter_netns(self.netns)
            except BaseException as exc:  # noqa: BLE001 - re-raised by start() in the caller's thread
                self._error = exc
                started.set()
                return
            started.set()
            self.core.run()

        self._thread = threading.Thread(target=loop, name=f"kproxy-relay-{self.impl}", daemon=True)
        self._thread.start()
        started.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.core.stop()
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def listen(self, proto: Proto, host: str, port: int = 0) -> tuple[int, int]:
        """Open a listener; returns (listener id, bound port)."""
        sock = bind_listener(self.netns, proto, host, port)
        if proto == "TCP" and self.tcp_congestion:
            # Accepted sockets inherit it: the client-facing leg.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.tcp_congestion.encode())
        bound = int(sock.getsockname()[1])
        lid = self.core.add_listener(sock.detach(), proto == "UDP")
        return lid, bound

    def set_endpoints(self, lid: int, endpoints: list[EndpointAddr], affinity_timeout: float | None = None,
                      udp_timeout: float = 30.0) -> None:
        self.core.set_endpoints(lid, list(endpoints), float(affinity_timeout or 0.0), float(udp_timeout))

    def remove(self, lid: int) -> None:
        self.core.remove_listener(lid)

    def stats(self) -> dict[str, int]:
        return self.core.stats()


# --------------------------------------------------------------------------- the asyncio twin


@dataclass(eq=False)
class _Session:
    sock: socket.socket
    client: tuple[str, int]
    last: float


@dataclass(eq=False)
class _Listener:
    id: int
    sock: socket.socket
    udp: bool
    backends: list[EndpointAddr] = field(default_factory=list)
    rr: int = 0
    affinity_timeout: float = 0.0
    udp_timeout: float = 30.0
    affinity: dict[str, tuple[EndpointAddr, float]] = field(default_factory=dict)
    sessions: dict[tuple[str, int], _Session] = field(default_factory=dict)
    server: asyncio.AbstractServer | None = None
    dead: bool = False

    def pick(self, client_ip: str) -> int:
        """Same policy as the compiled core: pinned endpoint under ClientIP affinity, else RR."""
        if not self.backends:
            return -1
        now = time.monotonic()
        if self.affinity_timeout > 0:
            pinned = self.affinity.get(client_ip)
            if pinned is not None and pinned[1] > now and pinned[0] in self.backends:
                self.affinity[client_ip] = (pinned[0], now + self.affinity_timeout)
                return self.backends.index(pinned[0])
        i = self.rr % len(self.backends)
        self.rr += 1
        return i

    def pin(self, client_ip: str, idx: int) -> None:
        if self.affinity_timeout > 0:
            self.affinity[client_ip] = (self.backends[idx], time.monotonic() + self.affinity_timeout)


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()


class _Half(asyncio.Protocol):
    """One side of a relayed TCP connection; `peer` is the other side."""

    def __init__(self, core: AsyncioRelayCore) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.core.n_bytes += len(data)
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write_eof()  # half-close: the other direction stays open
            if peer.eof:
                peer.transport.close()
                if self.transport is not None:
                    self.transport.close()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is not None:
                _reset(peer.transport)
            else:
                peer.transport.close()
        if not getattr(self, "_counted", False) and isinstance(self, _ClientHalf):
            self._counted = True
            self.core.n_active -= 1


class _ClientHalf(_Half):
    def __init__(self, core: AsyncioRelayCore, listener: _Listener) -> None:
        super().__init__(core)
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.core.n_accepted += 1
        self.core.n_active += 1
        if not self.listener.backends:
            self.core.n_no_endpoints += 1
            _reset(self.transport)
            return
        self.transport.pause_reading()  # hold client bytes until the endpoint answers
        self.core.spawn(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        lst = self.listener
        peer = self.transport.get_extra_info("peername")
        client_ip = str(peer[0]) if peer else ""
        idx = lst.pick(client_ip)
        for _ in range(len(lst.backends)):
            if self.transport.is_closing() or not lst.backends:
                break
            idx %= len(lst.backends)
            addr = lst.backends[idx]
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                break  # out of fds: reset this client, as the compiled core does
            sock.setblocking(False)
            if self.core.tcp_congestion:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self.core.tcp_congestion.encode())
            try:
                await asyncio.wait_for(loop.sock_connect(sock, addr), self.core.connect_timeout)
            except (TimeoutError, OSError):
                sock.close()
                self.core.n_connect_fail += 1
                idx += 1
                continue
            lst.pin(client_ip, idx)
            up = _Half(self.core)
            up.peer, self.peer = self, up
            await loop.create_connection(lambda up=up: up, sock=sock)  # type: ignore[misc]
            self.transport.resume_reading()
            return
        _reset(self.transport)


class AsyncioRelayCore:
    """The pure-Python twin of kproxy._relay.RelayCore, on an asyncio loop in `run()`'s thread."""

    def __init__(self, connect_timeout: float = 1.0, tcp_congestion: str = "") -> None:
        self.connect_timeout = connect_timeout
        self.tcp_congestion = tcp_congestion
        self.loop = asyncio.new_event_loop()
        self.listeners: dict[int, _Listener] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self._stopped: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.n_accepted = self.n_active = self.n_connect_fail = self.n_no_endpoints = 0
        self.n_bytes = self.n_udp_in = self.n_udp_out = self.n_accept_paused = 0
        self._last_emfile_log = 0.0
        self.loop.set_exception_handler(self._on_loop_error)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        # CPython 3.11's accept loop reports EMFILE once per backlog slot (thousands of tracebacks)
        # before it pauses accepting for a second: count them, log one per second.
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            self.n_accept_paused += 1
            now = time.monotonic()
            if now - self._last_emfile_log < 1.0:
                return
            self._last_emfile_log = now
            logging.getLogger(__name__).error("relay: accept() out of fds; accepting paused for 1s")
            return
        loop.default_exception_handler(context)

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            for lst in list(self.listeners.values()):
                self._drop(lst)
            self.loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        while not self._stopped.is_set():
            try:
                await asyncio.wait_for(self._stopped.wait(), 0.1)
            except TimeoutError:
                self._sweep(time.monotonic())

    def _call(self, fn: object, *args: object) -> object:
        """Run fn(*args) on the loop thread and wait for its result."""

        async def wrapped() -> object:
            res = fn(*args)  # type: ignore[operator]
            if asyncio.iscoroutine(res):
                res = await res
            return res

        self._wait_running()
        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(10)

    def _wait_running(self) -> None:
        deadline = time.monotonic() + 10
        while self._stopped is None:  # run() has not reached its loop yet
            if time.monotonic() > deadline:
                raise RuntimeError("relay: the asyncio core is not running (call run() in a thread first)")
            time.sleep(0.001)

    def stop(self) -> None:
        self._wait_running()
        if self._stopped is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopped.set)

    def add_listener(self, fd: int, udp: bool) -> int:
        sock = socket.socket(fileno=fd)
        with self._lock:
            lid = self._next_id
            self._next_id += 1
        lst = _Listener(lid, sock, udp)
        self._call(self._start_listener, lst)
        return lid

    async def _start_listener(self, lst: _Listener) -> None:
        self.listeners[lst.id] = lst
        if lst.udp:
            self.loop.add_reader(lst.sock.fileno(), self._udp_from_clients, lst)
        else:
            lst.server = await self.loop.create_server(lambda: _ClientHalf(self, lst), sock=lst.sock, backlog=4096)

    def remove_listener(self, lid: int) -> None:
        lst = self.listeners.get(lid)
        if lst is not None:
            self._call(self._drop, lst)

    def _drop(self, lst: _Listener) -> None:
        if lst.dead:
            return
        lst.dead = True
        self.listeners.pop(lst.id, None)
        if lst.udp:
            self.loop.remove_reader(lst.sock.fileno())
            for s in list(lst.sessions.values()):
                self._drop_session(lst, s)
            lst.sock.close()
        elif lst.server is not None:
            lst.server.close()  # stops accepting; open connections run to their end

    def set_endpoints(self, lid: int, endpoints: list[EndpointAddr], affinity_timeout: float = 0.0,
                      udp_timeout: float = 30.0) -> None:
        eps = [(str(ip), int(port)) for ip, port in endpoints]
        for ip, _ in eps:
            family = "IPv6" if ":" in ip else "IPv4"
            try:
                socket.inet_pton(socket.AF_INET6 if family == "IPv6" else socket.AF_INET, ip)
            except OSError:
                raise ValueError(f"endpoint {ip!r}: not an {family} address") from None
        lst = self.listeners.get(lid)
        if lst is None:
            raise KeyError(f"relay: no listener {lid}")

        def apply() -> None:
            lst.backends = eps
            lst.affinity_timeout = affinity_timeout
            lst.udp_timeout = udp_timeout

        self._call(apply)

    def stats(self) -> dict[str, int]:
        return {
            "accepted": self.n_accepted, "active": self.n_active, "connect_failures": self.n_connect_fail,
            "no_endpoints": self.n_no_endpoints, "bytes": self.n_bytes,
            "udp_sessions": sum(len(lst.sessions) for lst in list(self.listeners.values())),
            "udp_in": self.n_udp_in, "udp_out": self.n_udp_out,
            "accept_paused": self.n_accept_paused,
        }

    # ---- UDP: readers on raw non-blocking sockets, one connected socket per client session

    def _udp_from_clients(self, lst: _Listener) -> None:
        now = time.monotonic()
        for _ in range(32):
            try:
                data, client = lst.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.n_udp_in += 1
            key = (str(client[0]), int(client[1]))
            sess = lst.sessions.get(key)
            if sess is None:
                idx = lst.pick(key[0])
                if idx < 0:
                    continue  # no endpoints: drop, as a closed UDP port would
                addr = lst.backends[idx]
                up = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
                up.setblocking(False)
                try:
                    up.connect(addr)
                except OSError:
                    up.close()
                    continue
                lst.pin(key[0], idx)
                sess = _Session(up, client, now)
                lst.sessions[key] = sess
                self.loop.add_reader(up.fileno(), self._udp_from_backend, lst, key, sess)
            sess.last = now
            try:
                sess.sock.send(data)
            except OSError:
                pass

    def _udp_from_backend(self, lst: _Listener, key: tuple[str, int], sess: _Session) -> None:
        for _ in range(32):
            try:
                data = sess.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self._drop_session(lst, sess)  # next datagram picks another endpoint
                return
            except OSError:
                return
            sess.last = time.monotonic()
            try:
                lst.sock.sendto(data, sess.client)
                self.n_udp_out += 1
            except OSError:
                pass

    def _drop_session(self, lst: _Listener, sess: _Session) -> None:
        key = (str(sess.client[0]), int(sess.client[1]))
        if lst.sessions.get(key) is sess:
            del lst.sessions[key]
        self.loop.remove_reader(sess.sock.fileno())
        sess.sock.close()

    def _sweep(self, now: float) -> None:
        for lst in list(self.listeners.values()):
            for sess in [s for s in lst.sessions.values() if s.last + lst.udp_timeout < now]:
                self._drop_session(lst, sess)
            for ip in [ip for ip, (_, exp) in lst.affinity.items() if exp < now]:
                del lst.affinity[ip]


# --------------------------------------------------------------------------- standalone relay


def _hostport(text: str) -> EndpointAddr:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kproxy.relay", description="kproxy's relay on its own")
    ap.add_argument("--impl", choices=["compiled", "pure"], default="compiled")
    ap.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to listen on")
    ap.add_argument("--udp", action="store_true", help="relay UDP instead of TCP")
    ap.add_argument("--backend", type=_hostport, action="append", default=[], help="endpoint IP:PORT (repeat)")
    ap.add_argument("--affinity", type=float, default=0.0, help="ClientIP affinity timeout in seconds")
    ap.add_argument("--tcp-congestion", default="", help="congestion control of the relayed TCP legs "
                    "(default: the node's)")
    args = ap.parse_args(argv)
    try:
        relay = Relay(args.impl, tcp_congestion=args.tcp_congestion).start()
    except ValueError as exc:
        ap.error(str(exc))
    lid, port = relay.listen("UDP" if args.udp else "TCP", *args.listen)
    relay.set_endpoints(lid, args.backend, args.affinity)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"ready {port}", flush=True)
    while not done.wait(0.5):
        pass
    print(f"stats {json.dumps(relay.stats())}", flush=True)
    relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

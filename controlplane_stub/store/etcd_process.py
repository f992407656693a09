"""Start a real etcd cluster (Debian's etcd-server: /usr/bin/etcd) on loopback, for tests, bench and the cluster tool.

    with running_etcd(members=3) as etcd:
        etcd.urls                     # client URLs, one per member
        etcd.kill(1); etcd.start(1)   # kill -9 one member, then bring it back with its data

Ports are taken free from the kernel (bind to port 0) and the data lives under a temp dir (tmpfs
when /dev/shm exists, as the bench's "same medium" rule wants); everything is removed on exit, even
when the body raises.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

ETCD = os.environ.get("KPROXY_ETCD_BINARY", "/usr/bin/etcd")


def etcd_available() -> bool:
    return os.access(ETCD, os.X_OK)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    data_dir: str
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass
class EtcdCluster:
    base: str
    members: list[EtcdMember] = field(default_factory=list)
    token: str = ""
    # TLS on the client URLs with client-certificate auth: (CA, server cert, server key); the same
    # cert/key pair (serverAuth + clientAuth) is this runner's client identity for /health.
    tls: tuple[str, str, str] | None = None

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def endpoints(self) -> str:
        return ",".join(self.urls)

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def command(self, i: int, state: str = "new") -> list[str]:
        """Member i's command line (a restart with the same data dir rejoins, whatever state says)."""
        m = self.members[i]
        return [ETCD, "--name", m.name, "--data-dir", m.data_dir,
               "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
               "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
               "--initial-cluster", self._initial_cluster(), "--initial-cluster-state", state,
               "--initial-cluster-token", self.token,
               # Small heartbeats: a killed member's leadership moves in about a second.
               "--heartbeat-interval", "100", "--election-timeout", "1000",
               "--quota-backend-bytes", str(2 << 30), "--logger", "zap", "--log-level", "warn",
               *(["--trusted-ca-file", self.tls[0], "--cert-file", self.tls[1], "--key-file", self.tls[2],
                  "--client-cert-auth"] if self.tls else [])]

    def start(self, i: int, state: str = "new") -> None:
        m = self.members[i]
        os.makedirs(m.data_dir, exist_ok=True)
        m.log_path = os.path.join(self.base, f"{m.name}.log")
        cmd = self.command(i, state)
        with open(m.log_path, "ab") as log:
            m.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      start_new_session=True)

    def kill(self, i: int) -> None:
        """kill -9 member i (its data stays)."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait(10)

    def stop(self, i: int) -> None:
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.terminate()
            try:
                m.proc.wait(10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(10)

    def wait_healthy(self, timeout: float = 30.0, members: list[int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for i in members if members is not None else range(len(self.members)):
            m = self.members[i]
            while True:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}: {self.tail(i)}")
                ctx = None
                if self.tls:
                    ctx = ssl.create_default_context(cafile=self.tls[0])
                    ctx.load_cert_chain(self.tls[1], self.tls[2])
                try:
                    with urllib.request.urlopen(m.url + "/health", timeout=2, context=ctx) as r:
                        if b'"true"' in r.read():
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} not healthy after {timeout}s: {self.tail(i)}")
                time.sleep(0.1)

    def tail(self, i: int) -> str:
        try:
            with open(self.members[i].log_path, "rb") as f:
                return f.read()[-1500:].decode(errors="replace")
        except OSError:
            return ""

    def rss_kib(self) -> int:
        """Resident memory of every running member, added up (KiB)."""
        total = 0
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            try:
                with open(f"/proc/{m.proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total


def _tmp_base() -> str:
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="kproxy-etcd-", dir=root)


def new_cluster(base: str, members: int, tls: tuple[str, str, str] | None = None) -> EtcdCluster:
    """A cluster's layout: members m0.. with data under base, each on two free loopback ports."""
    cluster = EtcdCluster(base, token=f"kproxy-{os.getpid()}-{time.monotonic_ns()}", tls=tls)
    for i in range(members):
        cluster.members.append(EtcdMember(f"m{i}", os.path.join(base, f"m{i}"), free_port(), free_port(),
                                          scheme="https" if tls else "http"))
    return cluster


@contextmanager
def running_etcd(members: int = 1, *, base: str | None = None, timeout: float = 30.0,
                 tls: tuple[str, str, str] | None = None) -> Iterator[EtcdCluster]:
    if not etcd_available():
        raise RuntimeError(f"etcd not found at {ETCD} (apt-get install etcd-server; ./run setup does it)")
    own = base is None
    path = base or _tmp_base()
    with ExitStack() as stack:
        if own:
            stack.callback(shutil.rmtree, path, ignore_errors=True)
        # The ports are found free and released before etcd binds them (etcd cannot say which port
        # it got for port 0), so another process on this loopback may take one in between. Only
        # that failure is retried, on new ports and a fresh data dir, a bounded number of times.
        for attempt in range(3):
            cluster = new_cluster(path, members, tls)
            try:
                for i in range(members):
                    cluster.start(i)
                cluster.wait_healthy(timeout)
                break
            except (RuntimeError, TimeoutError):
                for i in range(members):
                    cluster.stop(i)
                if attempt == 2 or not any(_lost_a_port(cluster, i) for i in range(members)):
                    raise
                for m in cluster.members:  # the logs too: they are appended to
                    shutil.rmtree(m.data_dir, ignore_errors=True)
                    if m.log_path:
                        os.unlink(m.log_path)
        for i in range(members):
            stack.callback(cluster.stop, i)
        yield cluster


def _lost_a_port(cluster: EtcdCluster, i: int) -> bool:
    return "address already in use" in cluster.tail(i)


_shared: EtcdCluster | None = None
_shared_stack = ExitStack()


def shared_etcd() -> EtcdCluster:
    """One etcd member for the whole process (tests): started on first use, removed at exit.

    Each API server that uses it gets its own --etcd-prefix (shared_prefix), so servers do not see
    each other's objects and a server restarted on the same data dir finds its own again."""
    global _shared
    if _shared is None:
        import atexit

        _shared = _shared_stack.enter_context(running_etcd(1))
        atexit.register(_shared_stack.close)
    return _shared


def shared_prefix(data_dir: str) -> str:
    import hashlib

    return "/registry-" + hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:16]

"""Start a real kproxy-apiserver process for tests and tools.

    from controlplane_stub.apiserver.testing import running_apiserver

    with running_apiserver() as api:          # HTTPS on a free loopback port, temp data dir
        api.url, api.token, api.kubeconfig    # admin credentials (api.readonly_token: get/list/watch)
        api.ca_file                           # CA of the serving certificate (None with https=False)
        api.restart()                         # same data dir and port; api.kill() is kill -9

KPROXY_TEST_STORAGE=etcd3 (or storage="etcd3") runs the server on etcd: one etcd member shared by
the test process, a key prefix per data dir (controlplane_stub/store/etcd_process.py).

The process is stopped (and the temp dir removed) on exit, even when the body raises.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Self

from .pki import load_tokens, token_for


def _command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "kproxy-apiserver")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from controlplane_stub.apiserver.main import main; sys.exit(main())"]


@dataclass
class APIServerProcess:
    data_dir: str
    https: bool
    extra_args: list[str]
    port: int = 0
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""
    readonly_token: str = ""
    log_path: str = ""
    command: list[str] = field(default_factory=list)  # empty: the installed kproxy-apiserver
    _log_files: list[object] = field(default_factory=list)

    @property
    def kubeconfig(self) -> str:
        return os.path.join(self.data_dir, "admin.kubeconfig")

    @property
    def readonly_kubeconfig(self) -> str:
        return os.path.join(self.data_dir, "readonly.kubeconfig")

    @property
    def ca_file(self) -> str | None:
        return os.path.join(self.data_dir, "pki", "ca.crt") if self.https else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        port_flag = "--secure-port" if self.https else "--insecure-port"
        cmd = [*(self.command or _command()), "--data-dir", self.data_dir, port_flag, str(self.port), *self.extra_args]
        self.log_path = os.path.join(self.data_dir, "apiserver.log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_files.append(log)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kproxy-apiserver exited with {self.proc.returncode}: {self._tail()}")
            chunk = self.proc.stdout.read() or b""
            buf += chunk
            if b"\n" in buf and b" ready url=" in buf:
                line = buf.split(b"\n", 1)[0].decode()
                self.url = line.split("url=", 1)[1].split()[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                users = load_tokens(os.path.join(self.data_dir, "tokens.csv"))
                self.token = token_for(users, admin=True)
                self.readonly_token = token_for(users, admin=False)
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"kproxy-apiserver not ready after {timeout}s: {self._tail()}")

    def _tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (watch streams end cleanly), then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._close()

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        for f in self._log_files:
            f.close()  # type: ignore[attr-defined]
        self._log_files.clear()


@contextmanager
def running_apiserver(*, https: bool = True, data_dir: str | None = None, port: int = 0,
                      extra_args: Sequence[str] = (), timeout: float = 30.0,
                      storage: str | None = None, command: Sequence[str] = ()) -> Iterator[APIServerProcess]:
    """A kproxy-apiserver subprocess on 127.0.0.1 (see module doc); `command` runs another build of it
    (e.g. an older commit, for benchmarks), by default the installed one."""
    own_dir = data_dir is None
    path = data_dir or tempfile.mkdtemp(prefix="kproxy-apiserver-")
    if (storage or os.environ.get("KPROXY_TEST_STORAGE", "sqlite")) == "etcd3" and \
            not any(a.startswith("--storage-backend") for a in extra_args):
        from ..store.etcd_process import shared_etcd, shared_prefix

        extra_args = ["--storage-backend", "etcd3", "--etcd-servers", shared_etcd().endpoints,
                      "--etcd-prefix", shared_prefix(path), *extra_args]
    api = APIServerProcess(path, https, list(extra_args), port, command=list(command))
    try:
        api.start(timeout)
        yield api
    finally:
        api.stop()
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)


# -- hostile clients (tests/apiload, tests/apiserver/test_apiserver_limits.py) -------------------

def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


def raise_nofile(want: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to `want` (bounded by the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_TCP_ESTABLISHED = 1


def _tcp_state(s: socket.socket) -> int:
    """tcpi_state, the first byte of struct tcp_info (Linux)."""
    try:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return 0


class HostileClients:
    """Connections to one API server that never finish what they start; all closed by close().

    - silent(n): TCP connections that never send a byte (an HTTPS server waits for a ClientHello)
    - partial_headers(n): a request line and one header, never the blank line that ends them
    - stalled(n, path, token): a whole GET (a list or a watch) whose response is never read; the
      receive buffer is shrunk before connect so the kernel does not absorb the response for us
    """

    def __init__(self, api: APIServerProcess, connect_timeout: float = 10.0) -> None:
        self.api = api
        self.host, self.port = "127.0.0.1", api.port
        self.timeout = connect_timeout
        self.socks: list[socket.socket] = []
        self._ctx: ssl.SSLContext | None = None
        if api.https:
            self._ctx = ssl.create_default_context(cafile=api.ca_file)
            self._ctx.check_hostname = False

    def _connect(self, rcvbuf: int = 0) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socks.append(s)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(self.timeout)
        s.connect((self.host, self.port))
        return s

    def _tls(self, rcvbuf: int = 0) -> socket.socket:
        raw = self._connect(rcvbuf)
        if self._ctx is None:
            return raw
        self.socks.remove(raw)
        s = self._ctx.wrap_socket(raw, server_hostname="localhost")
        self.socks.append(s)
        return s

    def silent(self, n: int) -> None:
        for _ in range(n):
            self._connect()

    def partial_headers(self, n: int) -> None:
        for _ in range(n):
            self._tls().sendall(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: localhost\r\n")

    def stalled(self, n: int, path: str, token: str) -> None:
        req = (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
               f"Accept: application/json\r\n\r\n").encode()
        for _ in range(n):
            self._tls(rcvbuf=4096).sendall(req)

    def closed_by_server(self, wait: float) -> int:
        """How many of the connections the server has closed, waiting up to `wait` s for all of them.

        Reads nothing (reading would turn a stalled client into a fast one): a connection counts as
        closed once the kernel's TCP state for it has left ESTABLISHED (FIN or RST received).
        """
        deadline = time.monotonic() + wait
        while True:
            closed = sum(1 for s in self.socks if _tcp_state(s) != _TCP_ESTABLISHED)
            if closed == len(self.socks) or time.monotonic() >= deadline:
                return closed
            time.sleep(0.2)

    def close(self) -> None:
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass
        self.socks.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

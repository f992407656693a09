"""Start a real kproxy-apiserver process for tests and tools.

    from controlplane_stub.apiserver.testing import running_apiserver

    with running_apiserver() as api:          # HTTPS on a free loopback port, temp data dir
        api.url, api.token, api.kubeconfig    # admin credentials (api.readonly_token: get/list/watch)
        api.ca_file                           # CA of the serving certificate (None with https=False)
        api.restart()                         # same data dir and port; api.kill() is kill -9

The process is stopped (and the temp dir removed) on exit, even when the body raises.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

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
        cmd = [*_command(), "--data-dir", self.data_dir, port_flag, str(self.port), *self.extra_args]
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
                      extra_args: Sequence[str] = (), timeout: float = 30.0) -> Iterator[APIServerProcess]:
    """A kproxy-apiserver subprocess on 127.0.0.1 (see module doc)."""
    own_dir = data_dir is None
    path = data_dir or tempfile.mkdtemp(prefix="kproxy-apiserver-")
    api = APIServerProcess(path, https, list(extra_args), port)
    try:
        api.start(timeout)
        yield api
    finally:
        api.stop()
        if own_dir:
            shutil.rmtree(path, ignore_errors=True)

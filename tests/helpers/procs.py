"""Processes a test starts: stopping them, and reading the port a server bound for itself.

Ports: a test never picks a port for a server that runs beside other engineers' and CI's
processes on one loopback (a port found free and released can be taken before the server binds
it). The server binds port 0 and says which port it got, in a port file or a log line read here."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` s; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def wait_for_log(path: Path, pattern: str, proc: subprocess.Popen[bytes],
                 timeout: float = 30.0) -> re.Match[str]:
    """The first match of `pattern` in the process's log file; fails at once if the process exits
    first, and after `timeout` s with the log's tail."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        m = rx.search(text)
        if m:
            return m
        assert proc.poll() is None, f"exited {proc.returncode} before logging {pattern!r}: {text[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in the log after {timeout} s: {text[-3000:]}"
        time.sleep(0.05)


def kproxy_bound_port(log_path: Path, what: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """The port kproxy bound for `--{what}-bind-address IP:0` (healthz or metrics), from its log
    line `serving {what} address=IP:0 bound=IP:PORT`."""
    m = wait_for_log(log_path, rf"serving {what} address=\S+ bound=\S*:(\d+)\b", proc, timeout)
    return int(m.group(1))

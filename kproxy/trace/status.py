"""The userspace relay's table over a local status socket: what `kproxy trace` reads in userspace mode.

The relay's state lives in kproxy's memory, not in the kernel, so the userspace proxier publishes
it: after each sync it renders one JSON document (`publish`), and a unix socket in kproxy's run
dir hands that document to whoever connects. The socket is root-only (mode 0600 in a 0700 dir),
read-only (nothing a client sends is read), one answer per connection, bounded in size, and each
client gets a send timeout, so no client holds memory or a thread.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

RUN_DIR = "/run/kproxy"
MAX_STATUS_BYTES = 16 << 20  # ~100 bytes a relay port: well over 10,000 Services
MAX_PORTS = 200_000
MAX_ENDPOINTS = 10_000
SEND_TIMEOUT = 5.0
DRAIN_TIMEOUT = 0.5
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,252}/[a-z0-9][a-z0-9-]{0,62}:[a-z0-9-]{0,63}$")


class StatusError(ValueError):
    pass


def socket_path(netns: str | None) -> str:
    """One socket per network namespace kproxy serves (tests run several on one machine)."""
    if netns is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", netns):
        raise StatusError(f"netns {netns!r}: not a namespace name")
    return os.path.join(RUN_DIR, f"userspace-{netns}.sock" if netns else "userspace.sock")


@dataclass(frozen=True)
class RelayPort:
    """One relay listener: the proxy port the rules redirect to and the endpoints it picks from."""

    service: str  # namespace/name:port
    protocol: str  # TCP | UDP
    role: str  # internal | external | cluster
    port: int
    endpoints: tuple[str, ...]  # "ip:port", picked round robin
    affinity_timeout: float  # ClientIP affinity seconds, 0 for none

    def as_dict(self) -> dict[str, object]:
        return {"service": self.service, "protocol": self.protocol, "role": self.role, "port": self.port,
                "endpoints": list(self.endpoints), "affinityTimeoutSeconds": self.affinity_timeout}


def render(ports: list[RelayPort]) -> bytes:
    return json.dumps({"kind": "UserspaceRelayStatus", "ports": [p.as_dict() for p in ports]}).encode()


def _endpoint(v: object) -> str:
    if not isinstance(v, str):
        raise StatusError("endpoint: not a string")
    host, _, port = v.rpartition(":")
    ipaddress.ip_address(host)
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise StatusError(f"endpoint {v!r}: bad port")
    return v


def parse(data: bytes) -> list[RelayPort]:
    """The status document, validated field by field (it crosses a process boundary)."""
    if len(data) > MAX_STATUS_BYTES:
        raise StatusError(f"status of {len(data)} bytes is over the {MAX_STATUS_BYTES} limit")
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("kind") != "UserspaceRelayStatus":
            raise StatusError("not a UserspaceRelayStatus document")
        raw = doc.get("ports")
        if not isinstance(raw, list) or len(raw) > MAX_PORTS:
            raise StatusError("ports: not a list of bounded length")
        out = []
        for item in raw:
            if not isinstance(item, dict):
                raise StatusError("port entry: not an object")
            name, proto, role, port = item.get("service"), item.get("protocol"), item.get("role"), item.get("port")
            eps, aff = item.get("endpoints"), item.get("affinityTimeoutSeconds")
            if not isinstance(name, str) or not _NAME.match(name):
                raise StatusError(f"service {name!r}: not namespace/name:port")
            if proto not in ("TCP", "UDP") or role not in ("internal", "external", "cluster"):
                raise StatusError(f"{name}: bad protocol or role")
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
                raise StatusError(f"{name}: bad port {port!r}")
            if not isinstance(eps, list) or len(eps) > MAX_ENDPOINTS:
                raise StatusError(f"{name}: endpoints: not a list of bounded length")
            if not isinstance(aff, (int, float)) or isinstance(aff, bool) or not 0 <= aff <= 86400:
                raise StatusError(f"{name}: bad affinity timeout {aff!r}")
            out.append(RelayPort(name, str(proto), str(role), port, tuple(_endpoint(e) for e in eps), float(aff)))
        return out
    except (ValueError, TypeError) as e:
        if isinstance(e, StatusError):
            raise
        raise StatusError(f"bad status document: {e}") from None


def read(path: str, timeout: float = 10.0) -> list[RelayPort]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        chunks, size = [], 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_STATUS_BYTES:
                raise StatusError(f"status over {MAX_STATUS_BYTES} bytes")
            chunks.append(chunk)
    except OSError as e:
        raise StatusError(f"status socket {path}: {e}") from None
    finally:
        s.close()
    return parse(b"".join(chunks))


class StatusServer:
    """Serves the latest published document on a root-only unix socket, one thread, one client at a time
    (each answer is one sendall of a prepared buffer, bounded by SEND_TIMEOUT)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._doc = render([])
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            os.unlink(path)  # a socket left by a kproxy that died: ours to replace
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="kproxy-status", daemon=True)
        self._thread.start()

    def publish(self, doc: bytes) -> None:
        self._doc = doc[:MAX_STATUS_BYTES] if len(doc) <= MAX_STATUS_BYTES else render([])

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(SEND_TIMEOUT)
                try:
                    conn.sendall(self._doc)
                    # Closing over unread client bytes would reset the connection and lose the
                    # answer on the client's side: end ours, then discard (never parse) a
                    # bounded amount until the client closes.
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(DRAIN_TIMEOUT)
                    for _ in range(16):
                        if not conn.recv(4096):
                            break
                except OSError as e:
                    log.info("status socket: client went away err=%s", e)

    def close(self) -> None:
        self._stop = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

"""The userspace relay's status socket (kproxy.trace.status): root-only, read-only, bounded, validated."""
from __future__ import annotations

import json
import os
import secrets
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.trace import Route, status, through_relay

PORT = status.RelayPort("ns/web:http", "TCP", "internal", 40001, ("10.1.0.2:8080", "10.1.0.3:8080"), 10800.0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[status.StatusServer]:
    srv = status.StatusServer(str(tmp_path / "run" / f"userspace-{secrets.token_hex(3)}.sock"))
    try:
        yield srv
    finally:
        srv.close()


def test_serves_the_published_table_root_only(server: status.StatusServer) -> None:
    assert status.read(server.path) == []
    server.publish(status.render([PORT]))
    assert status.read(server.path) == [PORT]
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_what_a_client_sends_is_never_read(server: status.StatusServer) -> None:
    server.publish(status.render([PORT]))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(server.path)
    s.sendall(b"SET anything\n" * 100)  # 1,300 bytes: within what the server discards
    data = b""
    for _ in range(100):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert status.parse(data) == [PORT]
    assert status.read(server.path) == [PORT]  # unchanged, and the server still answers


def test_close_removes_the_socket(tmp_path: Path) -> None:
    srv = status.StatusServer(str(tmp_path / "s.sock"))
    srv.close()
    assert not os.path.exists(srv.path)
    with pytest.raises(status.StatusError):
        status.read(srv.path)


@pytest.mark.parametrize("doc, word", [
    (b"not json", "bad status document"),
    (b'{"kind": "Other", "ports": []}', "not a UserspaceRelayStatus"),
    (json.dumps({"kind": "UserspaceRelayStatus", "ports": [{**PORT.as_dict(), "port": 0}]}).encode(), "bad port"),
    (json.dumps({"kind": "UserspaceRelayStatus", "ports": [{**PORT.as_dict(), "service": "x"}]}).encode(),
     "namespace/name:port"),
    (json.dumps({"kind": "UserspaceRelayStatus", "ports": [{**PORT.as_dict(), "endpoints": ["1.2.3:80"]}]}).encode(),
     "bad status document"),
    (json.dumps({"kind": "UserspaceRelayStatus", "ports": [{**PORT.as_dict(), "role": "x"}]}).encode(), "role"),
    (b" " * (status.MAX_STATUS_BYTES + 1), "over the"),
])
def test_bad_documents_are_errors(doc: bytes, word: str) -> None:
    with pytest.raises(status.StatusError, match=word):
        status.parse(doc)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                    max_leaves=20))
@settings(max_examples=200, deadline=None)
def test_any_json_is_a_status_or_a_status_error(value: object) -> None:
    for doc in (value, {"kind": "UserspaceRelayStatus", "ports": [value]}):
        try:
            status.parse(json.dumps(doc).encode())
        except status.StatusError:
            pass


def test_a_redirect_to_a_relay_port_continues_to_its_endpoints() -> None:
    redirected = Route("ACCEPT", "127.0.0.1:40001", False, False, "ns/web:http", 1.0, ("nat/PREROUTING",))
    other = Route("REJECT", "", False, False, "ns/db:", 1.0, ())
    routes = through_relay([redirected, other], [PORT], "tcp", {"192.168.0.1"})
    new = [r for r in routes if not r.affinity and r.verdict == "ACCEPT"]
    assert {r.endpoint for r in new} == set(PORT.endpoints)
    assert all(r.probability == 0.5 and r.masquerade for r in new)
    assert {r.endpoint for r in routes if r.affinity} == set(PORT.endpoints)
    assert other in routes
    empty = status.RelayPort("ns/web:http", "TCP", "internal", 40001, (), 0.0)
    assert [r.verdict for r in through_relay([redirected], [empty], "tcp", set())] == ["REJECT"]
    assert through_relay([redirected], [PORT], "udp", set()) == [redirected]  # another protocol's port

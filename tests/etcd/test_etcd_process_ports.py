"""running_etcd picks its members' ports free and releases them before etcd binds them (etcd cannot
report a port it chose): when another process takes one in between, the start is retried on new
ports instead of failing the test that wanted an etcd (the race that stops CI on a shared machine)."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from controlplane_stub.store import etcd_process

pytestmark = pytest.mark.skipif(not etcd_process.etcd_available(), reason="etcd is not installed")


@pytest.mark.timeout(90)
def test_a_port_taken_before_etcd_binds_it_is_retried_on_new_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[socket.socket] = []
    real = etcd_process.free_port

    def taken_once(host: str = "127.0.0.1") -> int:
        """The first port handed out is taken at once, as another process would take it."""
        port = real(host)
        if not held:
            s = socket.socket()
            s.bind((host, port))
            s.listen()
            held.append(s)
        return port

    monkeypatch.setattr(etcd_process, "free_port", taken_once)
    try:
        with etcd_process.running_etcd(1) as etcd:
            taken = held[0].getsockname()[1]
            assert taken not in (etcd.members[0].client_port, etcd.members[0].peer_port)
            with urllib.request.urlopen(etcd.urls[0] + "/health", timeout=5) as r:
                assert b'"true"' in r.read()
    finally:
        for s in held:
            s.close()


@pytest.mark.timeout(60)
def test_any_other_start_failure_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    starts: list[int] = []
    real_start = etcd_process.EtcdCluster.start

    def start(self: etcd_process.EtcdCluster, i: int, state: str = "new") -> None:
        starts.append(i)
        real_start(self, i, state)

    monkeypatch.setattr(etcd_process.EtcdCluster, "start", start)
    monkeypatch.setattr(etcd_process, "ETCD", "/bin/false")  # exits 1 without a word
    with pytest.raises(RuntimeError, match="exited with 1"), etcd_process.running_etcd(1):
        pass
    assert starts == [0]

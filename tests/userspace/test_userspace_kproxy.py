"""The real `kproxy --proxy-mode userspace` process in the node namespace, fed by the real
kproxy-apiserver: Services and EndpointSlices created over the API become working ClusterIPs
and NodePorts for a client in another namespace. (The API server and the kproxy process:
tests/helpers/kproxy_e2e.py.)
"""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.kproxy_e2e import Api, apiserver_for, start_kproxy
from helpers.procs import log_tail, stop_process
from userspace_helpers import (
    BACKEND_IPS,
    BACKEND_PORT,
    CLIENT_IP,
    NODE_CLIENT_IP,
    Backends,
    Topology,
    request,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(topo: Topology) -> Iterator[Api]:
    with apiserver_for(topo.node) as api:
        yield api


def _names(topo: Topology, addr: tuple[str, int], n: int) -> list[str]:
    out = []
    for _ in range(n):
        with topo.tcp(topo.client, addr, timeout=5) as s:
            out.append(request(s)[0])
    return out


def _wait_names(topo: Topology, addr: tuple[str, int], want: set[str], proc: subprocess.Popen[bytes],
                timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kproxy exited {proc.returncode}"
        try:
            if set(_names(topo, addr, 3 * len(want))) == want:
                return
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{addr}: never served by exactly {sorted(want)}; last error {last!r}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pure", ["0", "1"], ids=["compiled", "pure"])
def test_kproxy_userspace_mode_end_to_end(pure: str, api: Api, topo: Topology, backends: Backends,
                                          tmp_path: Path) -> None:
    api.call("POST", "/api/v1/nodes", {"metadata": {"name": "node-1"},
                                       "status": {"addresses": [{"type": "InternalIP", "address": NODE_CLIENT_IP}]}})
    svc = api.call("POST", "/api/v1/namespaces/default/services", {
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT}]}})
    cluster_ip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    api.put_slice("web-1", "web", list(BACKEND_IPS), port=BACKEND_PORT, node=None, create=True)

    log_path = tmp_path / "kproxy.log"
    proc = start_kproxy(topo.node, ["--kubeconfig", api.proc.kubeconfig, "--proxy-mode", "userspace",
                                    "--hostname-override", "node-1", "--iptables-min-sync-period", "100ms", "--v=2"],
                        log_path, env={"KPROXY_PURE": pure})
    try:
        _wait_names(topo, (cluster_ip, 80), set(BACKEND_IPS), proc)
        _wait_names(topo, (NODE_CLIENT_IP, node_port), set(BACKEND_IPS), proc)
        # An EndpointSlice update over the API: new connections go to the one endpoint left.
        api.put_slice("web-1", "web", [BACKEND_IPS[1]], port=BACKEND_PORT, node=None)
        _wait_names(topo, (cluster_ip, 80), {BACKEND_IPS[1]}, proc)
        assert backends.peers[BACKEND_IPS[1]] and CLIENT_IP not in backends.peers[BACKEND_IPS[1]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
        print(log_tail(log_path))

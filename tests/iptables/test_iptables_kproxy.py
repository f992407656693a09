"""Full stack: the real `kproxy --proxy-mode iptables` process in a node namespace, fed by the real
kproxy-apiserver, programs iptables there; a client namespace reaches the Service over real packets.
(The API server and the kproxy process: tests/helpers/kproxy_e2e.py.)
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.kproxy_e2e import Api, apiserver_for, start_kproxy, stop_and_clean
from helpers.procs import log_tail
from iptables_topology import NODE_IP, PODS, Topology

from kproxy._purepath import port_proto_hash

pytestmark = pytest.mark.e2e
# The chain of the Service every API server keeps (default/kubernetes, port "https").
KUBERNETES_SVC_CHAIN = "KUBE-SVC-" + port_proto_hash("default/kubernetes:https", "tcp")


def _svc_chains(topology: Topology, backend: str) -> set[str]:
    """The KUBE-SVC- chains declared in the node's nat table."""
    out = topology.node_exec(f"iptables-{backend}-save", "-t", "nat").stdout
    return {line[1:].split()[0] for line in out.splitlines() if line.startswith(":KUBE-SVC-")}


@pytest.fixture
def api(topology: Topology) -> Iterator[Api]:
    with apiserver_for(topology.node) as api:
        yield api


def _served_by(topology: Topology, host: str, port: int, n: int) -> set[str]:
    return {str(r["reply"]).split()[0] for r in topology.tcp(host, port, count=n, timeout=1.0) if r["reply"]}


def _wait(topology: Topology, host: str, port: int, want: set[str], proc: subprocess.Popen[bytes],
          log: Path | None = None) -> float:
    t0 = time.monotonic()
    seen: set[str] = set()
    while time.monotonic() - t0 < 30:
        assert proc.poll() is None, f"kproxy exited {proc.returncode}: {log_tail(log) if log else ''}"
        seen = _served_by(topology, host, port, 4 * len(want))
        if seen == want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{host}:{port} served by {sorted(seen)}, want {sorted(want)}")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_kproxy_iptables_mode_end_to_end(backend: str, api: Api, topology: Topology, tmp_path: Path) -> None:
    api.call(
        "POST",
        "/api/v1/nodes",
        {
            "metadata": {"name": "node-1"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
        },
    )
    svc = api.call(
        "POST",
        "/api/v1/namespaces/default/services",
        {
            "metadata": {"name": "web"},
            "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        },
    )
    vip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    api.put_slice("web-1", "web", list(PODS.values()), create=True)

    log_path = tmp_path / "kproxy.log"
    # Fixed healthz/metrics ports: the node namespace is this test's own.
    proc = start_kproxy(topology.node, [
        "--kubeconfig", api.proc.kubeconfig,
        "--proxy-mode", "iptables", "--iptables-backend", backend, "--hostname-override", "node-1",
        "--cluster-cidr", "10.0.0.0/8", "--iptables-min-sync-period", "0s",
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249", "--v=2",
    ], log_path)  # fmt: skip
    try:
        everyone = set(PODS)
        _wait(topology, vip, 80, everyone, proc, log_path)
        _wait(topology, NODE_IP, node_port, everyone, proc, log_path)
        # An EndpointSlice update over the API moves new connections within one sync.
        api.put_slice("web-1", "web", [PODS["pod2"]])
        moved = _wait(topology, vip, 80, {"pod2"}, proc, log_path)
        assert moved < 10, f"endpoint change took {moved:.1f}s to reach the kernel"
        # A Service delete removes its rules (no endpoints left to reach: timeouts or refusals).
        # The API server's own default/kubernetes Service keeps its chain, as on a real node.
        api.call("DELETE", "/api/v1/namespaces/default/services/web")
        t0 = time.monotonic()
        while _svc_chains(topology, backend) != {KUBERNETES_SVC_CHAIN}:
            assert time.monotonic() - t0 < 20, "service chains not removed after the Service was deleted"
            time.sleep(0.1)
    finally:
        out = stop_and_clean(proc, topology.node, "--proxy-mode", "iptables", "--iptables-backend", backend)
    assert out.returncode == 0, out.stderr
    for table in ("filter", "nat", "mangle"):
        left = topology.node_exec(f"iptables-{backend}-save", "-t", table).stdout
        assert "KUBE-" not in left, f"--cleanup left rules in {table}"
    text = log_path.read_text(errors="replace")
    assert "ok=True" in text and "Traceback" not in text, text[-3000:]

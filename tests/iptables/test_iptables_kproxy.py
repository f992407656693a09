"""Full stack: the real `kproxy --proxy-mode iptables` process in a node namespace, fed by the real
kproxy-apiserver, programs iptables there; a client namespace reaches the Service over real packets.

The API server listens on the root namespace's loopback; a kproxy.relay listener created inside
the node namespace carries 127.0.0.1:PORT across (as tests/userspace does), so nothing is added to
the root namespace's addresses, routes or rules.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from iptables_helpers import stop_kproxy
from iptables_topology import NODE_IP, PODS, Topology

from kproxy._purepath import port_proto_hash
from kproxy.relay import Relay, bind_listener

testing = pytest.importorskip("controlplane_stub.apiserver.testing")
pytestmark = pytest.mark.e2e
# The chain of the Service every API server keeps (default/kubernetes, port "https").
KUBERNETES_SVC_CHAIN = "KUBE-SVC-" + port_proto_hash("default/kubernetes:https", "tcp")


def _svc_chains(topology: Topology, backend: str) -> set[str]:
    """The KUBE-SVC- chains declared in the node's nat table."""
    out = topology.node_exec(f"iptables-{backend}-save", "-t", "nat").stdout
    return {line[1:].split()[0] for line in out.splitlines() if line.startswith(":KUBE-SVC-")}


class Api:
    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.ctx = ssl.create_default_context(cafile=proc.ca_file)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            self.proc.url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.proc.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out

    def put_slice(self, name: str, service: str, ips: list[str], create: bool = False) -> None:
        base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/service-name": service}}
        if not create:
            meta["resourceVersion"] = self.call("GET", f"{base}/{name}")["metadata"]["resourceVersion"]
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": meta,
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-1"} for ip in ips
            ],
        }
        self.call("POST" if create else "PUT", base + ("" if create else f"/{name}"), body)


@pytest.fixture
def api(topology: Topology) -> Iterator[Api]:
    with testing.running_apiserver() as proc:
        port = int(proc.url.rsplit(":", 1)[1].split("/")[0])
        bridge = Relay("compiled").start()  # its loop stays in the root ns and dials the API server
        sock = bind_listener(topology.node, "TCP", "127.0.0.1", port)  # the listener lives in the node ns
        lid = bridge.core.add_listener(sock.detach(), False)
        bridge.set_endpoints(lid, [("127.0.0.1", port)])
        try:
            yield Api(proc)
        finally:
            bridge.stop()


def _served_by(topology: Topology, host: str, port: int, n: int) -> set[str]:
    return {str(r["reply"]).split()[0] for r in topology.tcp(host, port, count=n, timeout=1.0) if r["reply"]}


def _wait(topology: Topology, host: str, port: int, want: set[str], proc: subprocess.Popen[bytes]) -> float:
    t0 = time.monotonic()
    seen: set[str] = set()
    while time.monotonic() - t0 < 30:
        assert proc.poll() is None, f"kproxy exited {proc.returncode}"
        seen = _served_by(topology, host, port, 4 * len(want))
        if seen == want:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{host}:{port} served by {sorted(seen)}, want {sorted(want)}")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_kproxy_iptables_mode_end_to_end(backend: str, api: Api, topology: Topology, tmp_path: Path) -> None:
    kproxy = shutil.which("kproxy", path=os.path.dirname(sys.executable))
    if kproxy is None:
        pytest.skip("the kproxy console script is not installed in this venv")
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
    cmd = [
        "ip", "netns", "exec", topology.node, kproxy, "--kubeconfig", api.proc.kubeconfig,
        "--proxy-mode", "iptables", "--iptables-backend", backend, "--hostname-override", "node-1",
        "--cluster-cidr", "10.0.0.0/8", "--iptables-min-sync-period", "0s",
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249", "--v=2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        everyone = set(PODS)
        _wait(topology, vip, 80, everyone, proc)
        _wait(topology, NODE_IP, node_port, everyone, proc)
        # An EndpointSlice update over the API moves new connections within one sync.
        api.put_slice("web-1", "web", [PODS["pod2"]])
        moved = _wait(topology, vip, 80, {"pod2"}, proc)
        assert moved < 10, f"endpoint change took {moved:.1f}s to reach the kernel"
        # A Service delete removes its rules (no endpoints left to reach: timeouts or refusals).
        # The API server's own default/kubernetes Service keeps its chain, as on a real node.
        api.call("DELETE", "/api/v1/namespaces/default/services/web")
        t0 = time.monotonic()
        while _svc_chains(topology, backend) != {KUBERNETES_SVC_CHAIN}:
            assert time.monotonic() - t0 < 20, "service chains not removed after the Service was deleted"
            time.sleep(0.1)
    finally:
        out = stop_kproxy(proc, topology.node, kproxy, backend)
    assert out.returncode == 0, out.stderr
    for table in ("filter", "nat", "mangle"):
        left = topology.node_exec(f"iptables-{backend}-save", "-t", table).stdout
        assert "KUBE-" not in left, f"--cleanup left rules in {table}"
    text = log_path.read_text(errors="replace")
    assert "ok=True" in text and "Traceback" not in text, text[-3000:]

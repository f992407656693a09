"""The real `kproxy --proxy-mode userspace` process in the node namespace, fed by the real
kproxy-apiserver: Services and EndpointSlices created over the API become working ClusterIPs
and NodePorts for a client in another namespace.

The API server listens on the root namespace's loopback; a relay listener created inside the node
namespace (its loop thread stays in the root namespace) carries the kubeconfig's 127.0.0.1:PORT
across, so nothing is added to the root namespace's addresses, routes or rules.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from userspace_helpers import (
    BACKEND_IPS,
    BACKEND_PORT,
    CLIENT_IP,
    NODE_CLIENT_IP,
    Backends,
    Topology,
    request,
)

from kproxy.relay import Relay, bind_listener

testing = pytest.importorskip("controlplane_stub.apiserver.testing")
pytestmark = pytest.mark.e2e


class Api:
    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.ctx = ssl.create_default_context(cafile=proc.ca_file)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            self.proc.url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.proc.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out

    def slice(self, name: str, service: str, ips: list[str], port: int, method: str = "POST") -> None:
        base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/service-name": service}}
        if method == "PUT":
            meta["resourceVersion"] = self.call("GET", f"{base}/{name}")["metadata"]["resourceVersion"]
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}
        self.call(method, base + (f"/{name}" if method == "PUT" else ""), body)


@pytest.fixture
def api(topo: Topology) -> Iterator[Api]:
    with testing.running_apiserver() as proc:
        port = int(proc.url.rsplit(":", 1)[1].split("/")[0])
        bridge = Relay("compiled").start()  # loop in the root ns: it dials the API server
        sock = bind_listener(topo.node, "TCP", "127.0.0.1", port)  # listener in the node ns
        lid = bridge.core.add_listener(sock.detach(), False)
        bridge.set_endpoints(lid, [("127.0.0.1", port)])
        try:
            yield Api(proc)
        finally:
            bridge.stop()


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
    kproxy = shutil.which("kproxy", path=os.path.dirname(sys.executable))
    if kproxy is None:
        pytest.skip("the kproxy console script is not installed in this venv")
    api.call("POST", "/api/v1/nodes", {"metadata": {"name": "node-1"},
                                       "status": {"addresses": [{"type": "InternalIP", "address": NODE_CLIENT_IP}]}})
    svc = api.call("POST", "/api/v1/namespaces/default/services", {
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": BACKEND_PORT}]}})
    cluster_ip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    api.slice("web-1", "web", list(BACKEND_IPS), BACKEND_PORT)

    log = (tmp_path / "kproxy.log").open("wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", topo.node, kproxy, "--kubeconfig", api.proc.kubeconfig, "--proxy-mode", "userspace",
         "--hostname-override", "node-1", "--iptables-min-sync-period", "100ms", "--v=2"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "KPROXY_PURE": pure})
    try:
        _wait_names(topo, (cluster_ip, 80), set(BACKEND_IPS), proc)
        _wait_names(topo, (NODE_CLIENT_IP, node_port), set(BACKEND_IPS), proc)
        # An EndpointSlice update over the API: new connections go to the one endpoint left.
        api.slice("web-1", "web", [BACKEND_IPS[1]], BACKEND_PORT, method="PUT")
        _wait_names(topo, (cluster_ip, 80), {BACKEND_IPS[1]}, proc)
        assert backends.peers[BACKEND_IPS[1]] and CLIENT_IP not in backends.peers[BACKEND_IPS[1]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        print((tmp_path / "kproxy.log").read_text()[-3000:])

"""The whole path inside the VM: the real API server process, the real `kproxy --proxy-mode ipvs`
process watching it, a Service and an EndpointSlice written over HTTPS, and packets from the
client netns reaching the backends through the IPVS state kproxy programmed."""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ipvs_helpers import Topology, sh, wait_for

testing = pytest.importorskip("controlplane_stub.apiserver.testing")


class Api:
    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.ctx = ssl.create_default_context(cafile=proc.ca_file)

    def call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(self.proc.url + path, method=method, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.proc.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=20) as resp:
            out: dict[str, Any] = json.loads(resp.read())
            return out

    def endpoint_slice(self, service: str, ips: list[str], method: str = "POST", rv: str = "") -> dict[str, Any]:
        base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        meta: dict[str, Any] = {"name": f"{service}-a", "labels": {"kubernetes.io/service-name": service}}
        if rv:
            meta["resourceVersion"] = rv
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [ip], "nodeName": "kptvm", "conditions": {"ready": True}} for ip in ips]}
        return self.call(method, base + ("" if method == "POST" else f"/{service}-a"), body)


@pytest.fixture
def apiserver() -> Iterator[Any]:
    with testing.running_apiserver() as proc:
        yield proc


@pytest.mark.timeout(200)
def test_ipvs_kproxy_process_programs_services_from_the_api(topo: Topology, apiserver: Any) -> None:
    api = Api(apiserver)
    # kproxy waits (30 s) for its Node object to learn the node IPs: give it one.
    api.call("POST", "/api/v1/nodes", {"metadata": {"name": "kptvm"},
                                       "status": {"addresses": [{"type": "InternalIP", "address": "10.250.0.1"}]}})
    svc = api.call("POST", "/api/v1/namespaces/default/services", {
        "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
    cluster_ip = svc["spec"]["clusterIP"]
    first = api.endpoint_slice("web", ["10.244.0.10", "10.244.0.11"])
    kproxy = Path(sys.executable).parent / "kproxy"
    proc = subprocess.Popen(
        [str(kproxy), "--proxy-mode", "ipvs", "--kubeconfig", apiserver.kubeconfig, "--hostname-override", "kptvm",
         "--healthz-bind-address", "", "--metrics-bind-address", "", "--ipvs-min-sync-period", "0s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        programmed = wait_for(lambda: sh("ipvsadm", "-Ln").count("10.244.0.1") == 2, timeout=90, step=0.5)
        if not programmed:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"kproxy did not program {cluster_ip}:\n{sh('ipvsadm', '-Ln')}\n{proc.communicate()[1][-3000:]}")
        assert f"TCP  {cluster_ip}:80 rr" in sh("ipvsadm", "-Ln")
        assert {topo.greet(cluster_ip, 80)[0] for _ in range(4)} == {"b0", "b1"}
        # An EndpointSlice update reaches the kernel as one endpoint change.
        api.endpoint_slice("web", ["10.244.0.12"], method="PUT", rv=first["metadata"]["resourceVersion"])
        assert wait_for(lambda: "10.244.0.12:8080" in sh("ipvsadm", "-Ln"), timeout=30, step=0.3)
        assert wait_for(lambda: topo.greet(cluster_ip, 80)[0] == "b2", timeout=10, step=0.3)
    finally:
        err = ""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, err = proc.communicate()
        cleanup = subprocess.run([str(kproxy), "--proxy-mode", "ipvs", "--cleanup"], capture_output=True, text=True, check=False,
                                 timeout=60)
    assert cleanup.returncode == 0, cleanup.stderr
    assert cluster_ip not in sh("ipvsadm", "-Ln"), err[-2000:]

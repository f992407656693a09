"""The real kproxy process in a test's node namespace, fed by the real kproxy-apiserver (tests/iptables,
tests/nftables, tests/userspace, tests/deploy).

The API server listens on the root namespace's loopback (port 0, its own choice); a kproxy.relay
listener created inside the node namespace carries 127.0.0.1:PORT across, so nothing is added to the
root namespace's addresses, routes or rules and the kubeconfig's address works from inside."""
from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from helpers.procs import stop_process
from kproxy.relay import Relay, bind_listener

SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


def kproxy_bin() -> str:
    """The venv's kproxy console script (skips the test when it is not installed)."""
    exe = shutil.which("kproxy", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the kproxy console script is not installed in this venv")
    return exe


class Api:
    """JSON calls to a running test API server as its admin (urllib: nothing shared with kproxy)."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.ctx = ssl.create_default_context(cafile=proc.ca_file)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(
            self.proc.url + path, method=method, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.proc.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
                out: dict[str, Any] = json.loads(resp.read())
                return out
        except urllib.error.HTTPError as err:  # the Status says why: in the test's failure, not lost
            raise AssertionError(f"{method} {path}: {err.code} {err.read()[:300]!r}") from None

    def put_slice(self, name: str, service: str, ips: list[str], *, port: int = 8080,
                  node: str | None = "node-1", create: bool = False) -> None:
        """Create (or replace, at its current resourceVersion) an IPv4 EndpointSlice of ready
        endpoints on `node` for the Service's port "http"."""
        meta: dict[str, Any] = {"name": name, "labels": {"kubernetes.io/service-name": service}}
        if not create:
            meta["resourceVersion"] = self.call("GET", f"{SLICES}/{name}")["metadata"]["resourceVersion"]
        on_node = {"nodeName": node} if node else {}
        endpoints = [{"addresses": [ip], "conditions": {"ready": True}, **on_node} for ip in ips]
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
                "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": endpoints}
        self.call("POST" if create else "PUT", SLICES + ("" if create else f"/{name}"), body)


@contextmanager
def loopback_into(netns: str, port: int) -> Iterator[None]:
    """127.0.0.1:port inside `netns` relayed to 127.0.0.1:port of the root namespace (the relay's
    loop stays in the root namespace and dials there; its listener lives in `netns`)."""
    bridge = Relay("compiled").start()
    try:
        sock = bind_listener(netns, "TCP", "127.0.0.1", port)
        lid = bridge.core.add_listener(sock.detach(), False)
        bridge.set_endpoints(lid, [("127.0.0.1", port)])
        yield
    finally:
        bridge.stop()


@contextmanager
def apiserver_for(netns: str, **kwargs: Any) -> Iterator[Api]:
    """A running kproxy-apiserver (controlplane_stub.apiserver.testing.running_apiserver(**kwargs))
    reachable at its kubeconfig's address from inside `netns`."""
    testing = pytest.importorskip("controlplane_stub.apiserver.testing")
    with testing.running_apiserver(**kwargs) as proc, loopback_into(netns, proc.port):
        yield Api(proc)


def start_kproxy(netns: str, args: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """`ip netns exec NETNS kproxy ARGS...`, stdout and stderr into log_path."""
    with log_path.open("wb") as log:  # Popen keeps its own copy of the descriptor
        return subprocess.Popen(["ip", "netns", "exec", netns, kproxy_bin(), *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd or log_path.parent,
                                env={**os.environ, **env} if env else None)


def stop_and_clean(proc: subprocess.Popen[bytes], netns: str,
                   *mode_args: str) -> subprocess.CompletedProcess[str]:
    """Stop a kproxy started by start_kproxy, then run `kproxy --cleanup MODE_ARGS...` in the same
    namespace; returns the cleanup's result."""
    stop_process(proc)
    return subprocess.run(["ip", "netns", "exec", netns, kproxy_bin(), "--cleanup", *mode_args,
                           "--hostname-override", "node-1"],
                          capture_output=True, text=True, timeout=60, check=False)

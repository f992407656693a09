"""`kproxy-cluster up --store etcd --apiservers 2` (issue 16): 3 etcd members and 2 API servers behind
one address. kill -9 an etcd member and an API server: kubectl goes on through the same kubeconfig,
kproxy in its node netns keeps its rules and converges on the writes made meanwhile, the supervisor
restarts both and the kubernetes endpoints list both API servers again."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _wait(what: str, cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class EtcdCluster:
    def __init__(self, name: str, home: str) -> None:
        self.name, self.home = name, home
        self.dir = Path(home) / name
        self.env = dict(os.environ, KPROXY_CLUSTER_HOME=home, KUBECONFIG=str(self.dir / "kubeconfig"))

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", *args], env=self.env, capture_output=True, text=True, timeout=60)

    def state(self) -> dict[str, object]:
        out: dict[str, object] = json.loads((self.dir / "state.json").read_text())
        return out

    def pid(self, comp: str) -> int:
        pids = self.state()["pids"]
        assert isinstance(pids, dict)
        return int(pids[comp])

    def rules(self) -> str:
        return subprocess.run(["ip", "netns", "exec", f"{self.name}-n1", "iptables-save"], capture_output=True,
                              text=True, timeout=30).stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    name = "kpe" + secrets.token_hex(3)
    home = tempfile.mkdtemp(prefix="kpe-cluster-")
    c = EtcdCluster(name, home)
    try:
        r = subprocess.run([str(BIN / "kproxy-cluster"), "up", "--name", name, "--nodes", "1", "--store", "etcd",
                            "--apiservers", "2", "--backoff-base", "1", "--backoff-cap", "2", "--no-localhost-lb",
                            "--no-dns", "--proxy-mode", "iptables", "--timeout", "120"],
                           env=c.env, capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n" + (c.dir / "logs" / "supervisor.log").read_text()[-3000:]
        yield c
    finally:
        subprocess.run([str(BIN / "kproxy-cluster"), "down", "--name", name], env=c.env, capture_output=True,
                       timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def _endpoint_count(c: EtcdCluster) -> int:
    r = c.kubectl("get", "endpoints", "kubernetes", "-o", "json")
    if r.returncode:
        return -1
    return sum(len(s.get("addresses") or []) for s in json.loads(r.stdout).get("subsets") or [])


def test_cluster_on_etcd_survives_an_etcd_member_and_an_api_server_kill(cluster: EtcdCluster) -> None:
    c = cluster
    state = c.state()
    components = state["components"]
    assert isinstance(components, dict) and len(components["etcd"].split(",")) == 3
    _wait("both API servers in the kubernetes endpoints", lambda: _endpoint_count(c) == 2)
    assert c.kubectl("create", "service", "clusterip", "before", "--tcp=80:8080").returncode == 0
    _wait("kproxy's rules for default/before", lambda: "default/before" in c.rules())

    old = {k: c.pid(k) for k in ("etcd-0", "apiserver-0")}
    for pid in old.values():
        os.kill(pid, signal.SIGKILL)
    # The same kubeconfig goes on working: the balancer sends new connections to the live server.
    _wait("a create through the kubeconfig after the kills",
          lambda: c.kubectl("create", "service", "clusterip", "during", "--tcp=80:8080").returncode == 0, 30)
    _wait("kproxy's rules for default/during (kproxy reconnected and converged)",
          lambda: "default/during" in c.rules(), 60)
    assert "default/before" in c.rules()  # kept its rules through the failover

    _wait("the supervisor restarting etcd-0 and apiserver-0",
          lambda: all(c.pid(k) != old[k] for k in old), 30)
    _wait("both API servers in the kubernetes endpoints again", lambda: _endpoint_count(c) == 2, 60)
    assert c.kubectl("delete", "service", "before").returncode == 0
    _wait("kproxy removing default/before", lambda: "default/before" not in c.rules(), 60)
    assert "default/during" in c.rules()

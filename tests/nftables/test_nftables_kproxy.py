"""The real `kproxy --proxy-mode nftables` process in a node namespace, fed by the real
kproxy-apiserver: connections reach the Service's endpoints, an EndpointSlice update over the API
moves new connections, a Service delete removes its chains, `--cleanup` removes the table. The
node namespace has IPv6, so kproxy runs dual-stack: the `ip6 kube-proxy` table too (its packets:
tests/conformance), removed by `--cleanup` as well.
(The iptables tests' topology and API helpers, reused.)"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.kproxy_e2e import Api, apiserver_for, start_kproxy, stop_and_clean

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "iptables"))

from iptables_topology import NODE_IP, PODS, SKIP_REASON, Topology, _build, _destroy
from nft_state import table_exists
from test_iptables_kproxy import _wait

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    suffix = "n" + secrets.token_hex(3)
    built: list[Topology] = []
    try:
        built.append(_build(suffix))
        yield built[0]
    finally:
        for topo in built:
            _destroy(topo)
        for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout.split():
            if ns.startswith("kpt") and ns.endswith(suffix):
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


@pytest.fixture
def api(topology: Topology) -> Iterator[Api]:
    with apiserver_for(topology.node) as api:
        yield api


def _web_dispatch(topology: Topology) -> bool:
    """Whether the kernel still sends anything to the web Service: a map element naming its
    chains, or a rule in them (the emptied chains themselves go after a grace period, at a later
    sync, as upstream)."""
    out = topology.node_exec("nft", "list", "table", "ip", "kube-proxy", check=False).stdout
    in_chain = False
    for line in out.splitlines():
        text = line.strip()
        if text.startswith("chain "):
            in_chain = "/web/" in text
        elif text == "}":
            in_chain = False
        elif text and (in_chain or ("/web/" in text and "goto" in text)):
            return True
    return False


@pytest.mark.timeout(150)
def test_kproxy_nftables_mode_end_to_end(api: Api, topology: Topology, tmp_path: Path) -> None:
    api.call("POST", "/api/v1/nodes", {"metadata": {"name": "node-1"},
                                       "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
    svc = api.call("POST", "/api/v1/namespaces/default/services", {
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    vip, node_port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["nodePort"]
    api.put_slice("web-1", "web", list(PODS.values()), create=True)
    log_path = tmp_path / "kproxy.log"
    proc = start_kproxy(topology.node, [
        "--kubeconfig", api.proc.kubeconfig,
        "--proxy-mode", "nftables", "--hostname-override", "node-1", "--cluster-cidr", "10.0.0.0/8",
        "--config-sync-period", "15m", "--healthz-bind-address", "127.0.0.1:10256",
        "--metrics-bind-address", "127.0.0.1:10249", "--v=2",
    ], log_path)  # fmt: skip
    try:
        everyone = set(PODS)
        _wait(topology, vip, 80, everyone, proc, log_path)
        assert table_exists(topology.node, "ip6", "kube-proxy"), "no IPv6 proxier on a node with IPv6"
        _wait(topology, NODE_IP, node_port, everyone, proc, log_path)
        api.put_slice("web-1", "web", [PODS["pod2"]])
        moved = _wait(topology, vip, 80, {"pod2"}, proc, log_path)
        assert moved < 10, f"endpoint change took {moved:.1f}s to reach the kernel"
        assert _web_dispatch(topology)
        api.call("DELETE", "/api/v1/namespaces/default/services/web")
        t0 = time.monotonic()
        while _web_dispatch(topology):
            assert time.monotonic() - t0 < 20, "the Service's elements and rules not removed after its delete"
            time.sleep(0.1)
    finally:
        out = stop_and_clean(proc, topology.node, "--proxy-mode", "nftables")
    assert out.returncode == 0, out.stderr
    assert not table_exists(topology.node, "ip", "kube-proxy")
    assert not table_exists(topology.node, "ip6", "kube-proxy")
    text = log_path.read_text(errors="replace")
    assert "ok=True" in text and "Traceback" not in text, text[-3000:]
    assert "families=IPv4,IPv6" in text, text[-3000:]

"""The real `kproxy --proxy-mode nftables` in a network namespace this test creates, fed by the real
kproxy-apiserver: its drop rule for unallocated ClusterIPs follows the ServiceCIDR objects. A
connection from the node to an address of the default ServiceCIDR that no Service has is dropped;
after a second ServiceCIDR is created its range is dropped too (and a Service allocated from it is
a ClusterIP like any other: other ports refused); deleted while that Service holds its address, it
stays (Terminating) and still drops; once the Service is gone it goes, and its range is reachable.
Listeners on the namespace's lo show what a packet that is not dropped would reach."""
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.kproxy_e2e import Api, apiserver_for, start_kproxy, stop_and_clean
from nft_state import sh, table_exists
from test_nftables_kernel import _connect as connect_from_node

from kproxy.relay import socket_in_netns

pytestmark = pytest.mark.e2e

NODE_IP = "192.168.77.1"  # conftest's netns: eth0
PORT = 8081
UNALLOCATED = "10.96.5.5"  # in the default ServiceCIDR (the flag's 10.96.0.0/16)
SECOND = "10.100.0.5"  # in the ServiceCIDR the test adds (10.100.0.0/24)
OUTSIDE = "10.101.0.1"  # in no ServiceCIDR
SERVICE = "10.100.0.7"  # the ClusterIP the test gives a Service, from the added ServiceCIDR


@pytest.fixture
def api(netns: str) -> Iterator[Api]:
    with apiserver_for(netns, extra_args=["--service-cluster-ip-range", "10.96.0.0/16"]) as a:
        yield a


def _connect(netns: str, ip: str) -> str:
    """What a TCP connect from the node gets: "connected", "refused" or "timeout" (dropped)."""
    return connect_from_node(netns, ip, PORT)


def _drain(listeners: list[socket.socket]) -> None:
    """Accept and close what connected, so a full accept queue never looks like a drop."""
    for srv in listeners:
        while True:
            try:
                srv.accept()[0].close()
            except BlockingIOError:
                break


def _until(netns: str, want: dict[str, str], proc: subprocess.Popen[bytes], log: Path,
           listeners: list[socket.socket]) -> None:
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"kproxy exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}"
        seen = {ip: _connect(netns, ip) for ip in want}
        _drain(listeners)
        if seen == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"got {seen}, want {want}\n{log.read_text(errors='replace')[-3000:]}")


def _drop_rules(netns: str) -> list[str]:
    out = sh("ip", "netns", "exec", netns, "nft", "list", "chain", "ip", "kube-proxy", "cluster-ips-check").stdout
    return [line.split()[2] for line in out.splitlines() if "drop" in line and line.strip().startswith("ip daddr")]


@pytest.mark.timeout(150)
def test_drop_rule_follows_the_servicecidrs(api: Api, netns: str, tmp_path: Path) -> None:
    listeners = []
    try:
        for ip in (UNALLOCATED, SECOND, OUTSIDE, SERVICE):
            sh("ip", "-n", netns, "addr", "add", f"{ip}/32", "dev", "lo")
            srv = socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((ip, PORT))
            srv.listen(16)
            srv.setblocking(False)
            listeners.append(srv)
        before = {ip: _connect(netns, ip) for ip in (UNALLOCATED, SECOND, OUTSIDE, SERVICE)}
        _drain(listeners)
        assert set(before.values()) == {"connected"}, before  # no rule yet: every listener answers
        api.call("POST", "/api/v1/nodes", {"metadata": {"name": "node-1"},
                                             "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}})
        log = tmp_path / "kproxy.log"
        proc = start_kproxy(netns, ["--kubeconfig", api.proc.kubeconfig, "--proxy-mode", "nftables",
                                    "--hostname-override", "node-1", "--cluster-cidr", "10.0.0.0/8",
                                    "--config-sync-period", "15m", "--healthz-bind-address", "127.0.0.1:10256",
                                    "--metrics-bind-address", "127.0.0.1:10249", "--v=2"], log)
        try:
            _until(netns, {UNALLOCATED: "timeout", SECOND: "connected", OUTSIDE: "connected"}, proc, log, listeners)
            assert _drop_rules(netns) == ["10.96.0.0/16"]

            api.call("POST", "/apis/networking.k8s.io/v1/servicecidrs",
                  {"metadata": {"name": "second"}, "spec": {"cidrs": ["10.100.0.0/24"]}})
            _until(netns, {UNALLOCATED: "timeout", SECOND: "timeout", OUTSIDE: "connected"}, proc, log, listeners)
            assert _drop_rules(netns) == ["10.96.0.0/16", "10.100.0.0/24"]

            # A ClusterIP from the second ServiceCIDR: a Service's address, so other ports are rejected
            # (its listener, reachable before, now gets the reject; the rest of the range stays dropped).
            deadline = time.monotonic() + 10
            while True:  # the API server's allocator follows its ServiceCIDRs' events
                try:
                    api.call("POST", "/api/v1/namespaces/default/services",
                          {"metadata": {"name": "web"}, "spec": {"clusterIP": SERVICE, "ports": [{"port": 80}]}})
                    break
                except AssertionError as err:  # Api.call: the Status of a refused create
                    assert " 422 " in str(err) and time.monotonic() < deadline, err
                    time.sleep(0.1)
            _until(netns, {SERVICE: "refused", SECOND: "timeout"}, proc, log, listeners)

            # Deleted while the Service holds an address of it: it stays (Terminating) and still
            # drops; once the Service is gone, so is the ServiceCIDR, and its range is reachable.
            api.call("DELETE", "/apis/networking.k8s.io/v1/servicecidrs/second")
            deadline = time.monotonic() + 10
            while [c.get("reason") for c in api.call("GET", "/apis/networking.k8s.io/v1/servicecidrs/second")
                   .get("status", {}).get("conditions", [])] != ["Terminating"]:
                assert time.monotonic() < deadline, "the ServiceCIDR in use is not held Terminating"
                time.sleep(0.1)
            held_until = time.monotonic() + 1.0  # kproxy had its events: the rule must stay
            while time.monotonic() < held_until:
                assert _drop_rules(netns) == ["10.96.0.0/16", "10.100.0.0/24"]
                time.sleep(0.1)
            assert _connect(netns, SECOND) == "timeout"
            api.call("DELETE", "/api/v1/namespaces/default/services/web")
            _until(netns, {UNALLOCATED: "timeout", SECOND: "connected", OUTSIDE: "connected"}, proc, log, listeners)
            assert _drop_rules(netns) == ["10.96.0.0/16"]
        finally:
            cleaned = stop_and_clean(proc, netns, "--proxy-mode", "nftables")
        assert cleaned.returncode == 0, cleaned.stderr
        assert not table_exists(netns, "ip", "kube-proxy")
        text = log.read_text(errors="replace")
        assert "service CIDRs now 10.96.0.0/16,10.100.0.0/24" in text and "Traceback" not in text, text[-3000:]
    finally:
        for srv in listeners:
            srv.close()

"""Hostile objects served by the real API server to the real kproxy process in a network namespace.

The objects are written straight into the API server's SQLite store (controlplane_stub.store),
around the API server's validation, as a buggy or hostile writer (or another API server sharing
the data) would: one Service per kind of bad field, bad EndpointSlices for valid Services, a Node
whose only address is garbage, and objects whose fields have the wrong JSON type. kproxy must skip
exactly those, program the 100 valid Services beside them, count each skipped object in
kproxy_invalid_objects_total; a bad entry of a list kube-proxy filters entry by entry (an external
IP, a load balancer ingress IP) is left out instead, counted in kproxy_invalid_values_total, and the
rest of its Service programmed; and the node's firewall dump (iptables-save of every table) must only
ever contain values the validators produce (iptables_rulecheck.py). Then, with kproxy still
running, the API server is stopped, the store changed (a valid Service made type-wrong, the
type-wrong one fixed, an invalid one deleted) and the server restarted: the changes arrive by the
resumed watch, and each applies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kproxy_e2e import apiserver_for, start_kproxy, stop_and_clean
from iptables_rulecheck import rule_problems

testing = pytest.importorskip("controlplane_stub.apiserver.testing")
from controlplane_stub.apiserver.resources import BY_ID  # noqa: E402
from controlplane_stub.store.sqlite import SQLiteStore  # noqa: E402

pytestmark = pytest.mark.e2e
GOOD = 100
INJECT = "\n-A INPUT -j ACCEPT"


def _meta(name: str, i: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": "default", "uid": f"00000000-0000-0000-0000-{i:012d}",
            "creationTimestamp": "2026-12-06T00:00:00Z", **extra}


def _service(name: str, i: int, vip: str, spec: dict[str, Any] | None = None,
             status: dict[str, Any] | None = None) -> dict[str, Any]:
    base = {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, i),
            "spec": {**base, **(spec or {})}, "status": status or {}}


def _slice(name: str, service: str, i: int, ips: list[str], port: Any = 8080,
           endpoints: Any = None) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": _meta(name, 10_000 + i, labels={"kubernetes.io/service-name": service}),
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints if endpoints is not None else
            [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-2"} for ip in ips]}


# One Service per kind of bad field; all but bad-clusterip on 10.96.9.x, which must never show up.
BAD_SERVICES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, str]] = {
    "bad-lb-ingress": ({"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "nodePort": 30001}]},
                       {"loadBalancer": {"ingress": [{"ip": "198.51.100.7" + INJECT}]}}, "ip"),
    "bad-port-name": ({"ports": [{"name": 'a" -j ACCEPT -m comment --comment "b', "port": 80}]}, None, "name"),
    "bad-port": ({"ports": [{"name": "http", "port": 70000}]}, None, "port"),
    "bad-node-port": ({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 99999}]}, None, "port"),
    "bad-protocol": ({"ports": [{"name": "http", "port": 80, "protocol": "ICMP"}]}, None, "protocol"),
    "bad-cluster-ip": ({"clusterIP": "10.96.9.300", "clusterIPs": ["10.96.9.300"]}, None, "ip"),
    "bad-external-ip": ({"externalIPs": ["192.0.2.1 -j ACCEPT"]}, None, "ip"),
    "bad-source-range": ({"type": "LoadBalancer", "loadBalancerSourceRanges": ["0.0.0.0/0" + INJECT],
                          "ports": [{"name": "http", "port": 80, "nodePort": 30002}]}, None, "cidr"),
    "bad-affinity": ({"sessionAffinity": "ClientIP",
                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10**9}}}, None, "timeout"),
    "bad-type": ({"type": "Bogus"}, None, "type"),
    "BAD-NAME": ({}, None, "name"),
    "bad-wrong-type": ({"ports": "80"}, None, "decode"),
}
# Of those, the Services whose only bad field is one entry of a filtered list: programmed without
# that entry (kube/ingest.py service_ports), with their cluster IP and endpoint.
PARTIAL = {"bad-lb-ingress", "bad-external-ip"}


async def _seed(data_dir: str) -> None:
    store = SQLiteStore(os.path.join(data_dir, "store.db"))
    svc, es, nodes = BY_ID["services"], BY_ID["endpointslices.discovery.k8s.io"], BY_ID["nodes"]
    try:
        await store.create(nodes.key("", "node-1"), {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1", "uid": "node-1-uid", "creationTimestamp": "2026-12-06T00:00:00Z"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1" + INJECT},
                                     {"type": "Hostname", "address": "node-1"}]}})
        writes = []
        for i in range(GOOD):
            name = f"svc-{i}"
            writes.append(store.create(svc.key("default", name), _service(name, i, f"10.96.{1 + i // 200}.{i % 200 + 1}")))
            writes.append(store.create(es.key("default", f"{name}-a"),
                                       _slice(f"{name}-a", name, i, [f"10.1.{i}.1", f"10.1.{i}.2"])))
        for j, (name, (spec, status, _reason)) in enumerate(BAD_SERVICES.items()):
            writes.append(store.create(svc.key("default", name),
                                       _service(name, 500 + j, f"10.96.9.{j + 1}", spec, status)))
            writes.append(store.create(es.key("default", f"{name}-a"),
                                       _slice(f"{name}-a", name, 500 + j, [f"10.1.200.{j + 1}"])))
        # Bad slices for valid Services: each is skipped, the Service keeps its good slice.
        writes.append(store.create(es.key("default", "svc-0-bad"), _slice("svc-0-bad", "svc-0", 900, ["10.1.201.1" + INJECT])))
        writes.append(store.create(es.key("default", "svc-1-bad"), _slice("svc-1-bad", "svc-1", 901, ["10.1.201.2"], port=70000)))
        writes.append(store.create(es.key("default", "svc-2-bad"), _slice("svc-2-bad", "svc-2", 902, [], endpoints="x")))
        await asyncio.gather(*writes)
    finally:
        await store.close()
        store.close_sync()


async def _change(data_dir: str) -> None:
    """While the API server is down: svc-3 becomes type-wrong, bad-wrong-type is fixed, bad-port
    is deleted. Written as store updates, so they are events the resumed watch delivers."""
    store = SQLiteStore(os.path.join(data_dir, "store.db"))
    svc = BY_ID["services"]
    try:
        broken = store.get(svc.key("default", "svc-3"))
        assert broken is not None
        broken["spec"]["ports"] = {"port": 80}
        await store.update(svc.key("default", "svc-3"), broken)
        fixed = store.get(svc.key("default", "bad-wrong-type"))
        assert fixed is not None
        fixed["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP"}]
        await store.update(svc.key("default", "bad-wrong-type"), fixed)
        await store.delete(svc.key("default", "bad-port"))
    finally:
        await store.close()
        store.close_sync()


def _ns(netns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=60,
                          check=False).stdout


def _dump(netns: str, backend: str) -> str:
    return _ns(netns, f"iptables-{backend}-save")


def _programmed(dump: str) -> set[str]:
    """Service names with a ClusterIP dispatch rule in KUBE-SERVICES."""
    out = set()
    for line in dump.splitlines():
        if line.startswith("-A KUBE-SERVICES") and 'cluster IP"' in line:
            out.add(line.split('--comment "', 1)[1].split(":", 1)[0].split("/", 1)[1])
    return out


def _wait_for(netns: str, backend: str, want: set[str], proc: subprocess.Popen[bytes], log: Path,
              timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        dump = _dump(netns, backend)
        got = _programmed(dump) - {"kubernetes"}
        if got == want:
            return dump
        assert proc.poll() is None, f"kproxy exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, (
            f"programmed {len(got)}: missing {sorted(want - got)[:5]} extra {sorted(got - want)[:5]}\n"
            + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


@pytest.fixture
def served(rules_netns: str) -> Iterator[tuple[Any, str]]:
    data_dir = tempfile.mkdtemp(prefix="kproxy-hostile-")
    try:
        asyncio.run(_seed(data_dir))
        with apiserver_for(rules_netns, data_dir=data_dir) as api:
            yield api.proc, data_dir
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_bad_objects_in_the_store_are_skipped_and_never_reach_the_firewall(
        backend: str, served: tuple[Any, str], rules_netns: str, tmp_path: Path) -> None:
    api, data_dir = served
    log_path = tmp_path / "kproxy.log"
    proc = start_kproxy(rules_netns, [
        "--kubeconfig", api.kubeconfig,
        "--proxy-mode", "iptables", "--iptables-backend", backend, "--hostname-override", "node-1",
        "--cluster-cidr", "10.0.0.0/8", "--iptables-min-sync-period", "0s",
        "--healthz-bind-address", "127.0.0.1:10256", "--metrics-bind-address", "127.0.0.1:10249",
    ], log_path)  # fmt: skip
    try:
        good = {f"svc-{i}" for i in range(GOOD)}
        dump = _wait_for(rules_netns, backend, good | PARTIAL, proc, log_path)
        assert rule_problems(dump) == [], rule_problems(dump)[:5]
        for marker in ("10.1.201.", "198.51.100.7", "192.0.2.1", "ACCEPT -m comment"):
            assert marker not in dump, marker
        for j, name in enumerate(BAD_SERVICES):  # addresses as _seed gives them
            for address in (f"10.96.9.{j + 1}/32", f"10.1.200.{j + 1}:8080"):
                assert (address in dump) == (name in PARTIAL), (name, address)
        # The valid slices of svc-0/1/2 still apply beside their bad ones.
        for i in range(3):
            assert f"--to-destination 10.1.{i}.2:8080" in dump
        metrics = _ns(rules_netns, "curl", "-s", "http://127.0.0.1:10249/metrics")
        for name, (_spec, _status, reason) in BAD_SERVICES.items():
            counter = "kproxy_invalid_values_total" if name in PARTIAL else "kproxy_invalid_objects_total"
            assert f'{counter}{{kind="Service",reason="{reason}"}}' in metrics, (name, reason)
        for reason in ("ip", "port", "decode"):
            assert f'kproxy_invalid_objects_total{{kind="EndpointSlice",reason="{reason}"}}' in metrics, reason
        text = log_path.read_text(errors="replace")
        assert "has no valid InternalIP/ExternalIP address" in text
        # Log lines carry hostile values escaped (repr): none of them starts a line of its own.
        assert "'198.51.100.7\\n-A INPUT -j ACCEPT'" in text
        assert not any(line.startswith("-A ") for line in text.splitlines())

        # Changes while the API server is down arrive through the resumed watch.
        api.stop()
        asyncio.run(_change(data_dir))
        api.start()
        dump = _wait_for(rules_netns, backend, (good - {"svc-3"}) | PARTIAL | {"bad-wrong-type"}, proc, log_path)
        assert rule_problems(dump) == []
        assert proc.poll() is None
        text = log_path.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert "relisting reflector=services" not in text  # the watch was kept, not restarted by a list
    finally:
        stop_and_clean(proc, rules_netns, "--proxy-mode", "iptables", "--iptables-backend", backend)
    left = _dump(rules_netns, backend)
    assert "KUBE-SVC-" not in left and json.dumps(left).count("10.96.9.") == 0

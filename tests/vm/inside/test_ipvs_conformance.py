"""The Service conformance matrix (tests/conformance/conformance_table.py) against IPVS mode, inside
the VM (this host's kernel has no IPVS). The same topology as the netns modes: the node is a
network namespace; the proxier runs on a thread that entered it, so its netlink sockets, the
tools it starts (iptables, ipset, conntrack) and its sysctls all belong to that namespace. Every
probe that passes is also traced with `kproxy trace`, which must say the same."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "conformance"), os.path.join(HERE, "..", "..", "iptables")]

from conformance_probe import check_scenario  # noqa: E402
from conformance_trace import trace_checker  # noqa: E402
from conformance_table import CLUSTER_CIDR, NODE_IP, NODE_ZONE, SCENARIOS, Scenario, endpoints, spn, state  # noqa: E402
from iptables_topology import Topology, _build, _destroy, sh  # noqa: E402

from kproxy.backends.conntrack import Conntrack  # noqa: E402
from kproxy.backends.iptables import IPTables, detect_backend  # noqa: E402
from kproxy.healthcheck import ServiceHealthServer  # noqa: E402
from kproxy.proxiers.base import SyncRequest  # noqa: E402
from kproxy.proxiers.ipvs import IPVSOptions, IPVSProxier  # noqa: E402
from kproxy.relay import enter_netns  # noqa: E402

T = TypeVar("T")


class NodeProxier:
    """An IPVSProxier living in the node namespace: every call runs on its one thread there."""

    def __init__(self, node: str) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, initializer=enter_netns, initargs=(node,))
        self.backend = self.run(lambda: detect_backend())  # as kproxy does: nothing forced
        self.proxier = self.run(lambda: IPVSProxier(
            IPVSOptions(cluster_cidr=CLUSTER_CIDR, node_zone=NODE_ZONE), IPTables(backend=self.backend),
            node_ips=lambda: [NODE_IP], conntrack=Conntrack(), health_server=ServiceHealthServer(netns=node)))
        self.services, self.endpoints = state()

    def run(self, fn: Callable[[], T]) -> T:
        return self.pool.submit(fn).result(timeout=120)

    def sync(self, changed: frozenset[object] | None = None) -> None:
        req = SyncRequest(dict(self.services), dict(self.endpoints), changed=frozenset(changed or ()),  # type: ignore[arg-type]
                          full=changed is None)
        res = self.run(lambda: self.proxier.sync(req))
        assert res.ok, res.error

    def close(self) -> None:
        try:
            assert self.run(self.proxier.cleanup)
            self.run(self.proxier.close)
        finally:
            self.pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[Topology, NodeProxier]]:
    suffix = "v" + secrets.token_hex(2)
    built: list[Topology] = []
    proxier: NodeProxier | None = None
    try:
        # As on any Kubernetes node (kubeadm checks it): bridged pod-to-pod replies must pass
        # through conntrack, or a pod reaching a Service backed by a pod on the same bridge gets
        # the reply from the pod's own address. The host has br_netfilter loaded; the VM must load it.
        subprocess.run(["modprobe", "br_netfilter"], check=False, capture_output=True, timeout=60)
        built.append(_build(suffix))
        sh("ip", "netns", "exec", built[0].node, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        proxier = NodeProxier(built[0].node)
        proxier.sync()
        yield built[0], proxier
    finally:
        if proxier is not None:
            proxier.close()
        for topo in built:
            _destroy(topo)


def test_backend_detected_not_forced(node: tuple[Topology, NodeProxier]) -> None:
    """This VM kernel has no nf_tables: detection (not a default) must pick legacy here."""
    assert node[1].backend == "legacy"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_ipvs_conformance(node: tuple[Topology, NodeProxier], scenario: Scenario) -> None:
    topo, proxier = node
    clients = {"node": topo.node, "outside": topo.client, "pod": topo.pods["pod2"], "self": topo.pods["pod1"]}

    def phase2() -> None:
        proxier.endpoints[spn(scenario)] = endpoints(scenario, 2)
        proxier.sync(frozenset({spn(scenario)}))

    # Every passing probe is also traced (`kproxy trace`, the mode detected) and must agree; the
    # back end is named only to spare the VM's slow process starts a probe of the other one.
    tracer = trace_checker(topo.node, ["--iptables-backend", proxier.backend])
    failures = check_scenario("ipvs", scenario, clients.__getitem__, phase2, tracer)
    assert not failures, f"ipvs / {scenario.name}:\n" + "\n".join(failures)

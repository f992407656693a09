"""The Service conformance matrix (tests/conformance/conformance_table.py) against IPVS mode, inside
the VM (this host's kernel has no IPVS). The same topology as the netns modes: the node is a
network namespace; the proxier runs on a thread that entered it, so its netlink sockets, the
tools it starts (iptables, ipset, conntrack) and its sysctls all belong to that namespace. Every
probe of the IPv4 Services that passes is also traced with `kproxy trace`, which must say the same.

Per family (issue 18), as on the host (tests/conformance/test_conformance.py): the proxier is
built as kproxy builds it, one IPVS proxier per family (kproxy.proxiers.meta), on the dual-stack
topology; the table runs for IPv4-only, IPv6-only and dual-stack Services, the dual-stack ones
reached over each family (FAMILY_RUNS), all of them programmed side by side."""
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
from conformance_table import (  # noqa: E402
    CLUSTER_CIDR,
    CLUSTER_CIDR6,
    FAMILY_RUNS,
    NODE_IP,
    NODE_IP6,
    NODE_NAME,
    NODE_ZONE,
    SCENARIOS,
    Family,
    Scenario,
    Variant,
    endpoints,
    spn,
    state,
)
from iptables_topology import Topology, _build, _destroy, sh  # noqa: E402

from kproxy.backends.iptables import detect_backend  # noqa: E402
from kproxy.config import KProxyConfig  # noqa: E402
from kproxy.proxiers.base import SyncRequest  # noqa: E402
from kproxy.proxiers.ipvs import IPVSProxier, new_proxier  # noqa: E402
from kproxy.proxiers.meta import MetaProxier  # noqa: E402
from kproxy.relay import enter_netns  # noqa: E402

T = TypeVar("T")


class NodeProxier:
    """kproxy's IPVS proxier (one per family) living in the node namespace: every call runs on
    its one thread there, so its netlink sockets, tools and sysctls are the node's."""

    def __init__(self, node: str) -> None:
        self.proxier_netns = node
        self.pool = ThreadPoolExecutor(max_workers=1, initializer=enter_netns, initargs=(node,))
        self.backend = self.run(lambda: detect_backend())  # as kproxy does: nothing forced
        config = KProxyConfig(mode="ipvs", netns=node, cluster_cidr=f"{CLUSTER_CIDR},{CLUSTER_CIDR6}",
                              hostname_override=NODE_NAME, node_ips=(NODE_IP, NODE_IP6), node_zone=NODE_ZONE,
                              bind_address=NODE_IP)
        proxier = self.run(lambda: new_proxier(config))
        assert isinstance(proxier, MetaProxier), proxier
        self.proxier: MetaProxier = proxier
        self.services, self.endpoints = state(1, ("IPv4", "IPv6", "dual"))

    def run(self, fn: Callable[[], T]) -> T:
        return self.pool.submit(fn).result(timeout=120)

    def sync(self, changed: frozenset[object] | None = None) -> None:
        req = SyncRequest(dict(self.services), dict(self.endpoints), changed=frozenset(changed or ()),  # type: ignore[arg-type]
                          full=changed is None)
        res = self.run(lambda: self.proxier.sync(req))
        assert res.ok, res.error

    def sync_phase(self, scenario: Scenario, variant: Variant, phase: int) -> None:
        name = spn(scenario, variant)
        eps = endpoints(scenario, phase, variant)
        if self.endpoints.get(name, ()) != eps:
            self.endpoints[name] = eps
            self.sync(frozenset({name}))

    def close(self) -> None:
        try:
            assert self.run(self.proxier.cleanup)
            self.run(self.proxier.close)
            # `--cleanup` removes both families: no virtual server, set or KUBE- chain is left.
            def node_out(*cmd: str) -> str:
                return sh("ip", "netns", "exec", self.proxier_netns, *cmd).stdout

            assert not [ln for ln in node_out("ipvsadm", "-Ln").splitlines() if ln.startswith(("TCP", "UDP", "SCTP"))]
            assert not [n for n in node_out("ipset", "list", "-n").split() if n.startswith("KUBE-")]
            for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
                assert "KUBE-" not in node_out(tool), tool
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
        # IPv6 is a module in the VM's kernel and nothing else loads it before the topology's
        # IPv6 addresses ("Operation not supported" without it).
        for module in ("ipv6", "br_netfilter"):
            subprocess.run(["modprobe", module], check=False, capture_output=True, timeout=60)
        built.append(_build(suffix))
        for table in ("iptables", "ip6tables"):
            sh("ip", "netns", "exec", built[0].node, "sysctl", "-qw", f"net.bridge.bridge-nf-call-{table}=1")
        proxier = NodeProxier(built[0].node)
        proxier.sync()
        yield built[0], proxier
    finally:
        if proxier is not None:
            proxier.close()
        for topo in built:
            _destroy(topo)


def test_backend_detected_not_forced_and_both_families_proxied(node: tuple[Topology, NodeProxier]) -> None:
    """This VM kernel has no nf_tables: detection (not a default) must pick legacy here. The
    node has IPv6 (ip6tables), so kproxy builds an IPVS proxier per family, the node's first."""
    assert node[1].backend == "legacy"
    assert node[1].proxier.families == ("IPv4", "IPv6")
    assert all(isinstance(p, IPVSProxier) and p.family == f for f, p in node[1].proxier.proxiers.items())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run", FAMILY_RUNS, ids=[f"{v}-services-over-{f}" for v, f in FAMILY_RUNS])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_ipvs_conformance(node: tuple[Topology, NodeProxier], scenario: Scenario, run: tuple[Variant, Family]) -> None:
    variant, family = run
    topo, proxier = node
    clients = {"node": topo.node, "outside": topo.client, "pod": topo.pods["pod2"], "self": topo.pods["pod1"]}
    # Every passing probe of the single-stack Services is also traced (`kproxy trace`, the mode
    # detected; IPv6: ip6tables with the KUBE-6- sets) and must agree; the back end is named only
    # to spare the VM's slow process starts a probe of the other one. The dual-stack runs take
    # the same paths through the tracer at twice the cost, so they are not traced.
    tracer = trace_checker(topo.node, ["--iptables-backend", proxier.backend]) if variant != "dual" else None
    proxier.sync_phase(scenario, variant, 1)  # a dual-stack run over the other family changed it
    failures = check_scenario("ipvs", scenario, clients.__getitem__,
                              lambda: proxier.sync_phase(scenario, variant, 2), tracer, variant, family)
    assert not failures, f"ipvs / {variant} Services over {family} / {scenario.name}:\n" + "\n".join(failures)

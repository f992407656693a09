"""The Service conformance matrix (conformance_table.py) against iptables on both back ends,
nftables and userspace, in network namespaces, with real packets. IPVS runs the same table inside the
User-Mode Linux VM (tests/vm/inside/test_ipvs_conformance.py): this kernel has no IPVS.

Per family (issue 18): the node is dual-stack and every mode's proxier is built as kproxy builds
it (one proxier per family where the mode has them); the whole table runs for IPv4-only,
IPv6-only and dual-stack Services, the dual-stack ones reached over each family (FAMILY_RUNS).
A mode without an IPv6 proxier runs the IPv4 runs only (MODE_FAMILIES says which)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conformance_probe import check_scenario
from conformance_trace import trace_checker
from conformance_table import (
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
from iptables_topology import Topology

from kproxy.config import KProxyConfig
from kproxy.proxiers.base import Proxier, SyncRequest
from kproxy.proxiers.meta import MetaProxier

pytestmark = pytest.mark.e2e

HERE = ("iptables-nft", "iptables-legacy", "userspace", "nftables")
TRACE_ARGS = {"iptables-nft": ["--mode", "iptables", "--iptables-backend", "nft"],
              "iptables-legacy": ["--mode", "iptables", "--iptables-backend", "legacy"],
              "userspace": ["--mode", "userspace"], "nftables": []}  # auto: the mode is detected
# The families each mode proxies here (nftables: the `ip` and `ip6` kube-proxy tables).
MODE_FAMILIES: dict[str, tuple[Family, ...]] = {"iptables-nft": ("IPv4", "IPv6"),
                                                "iptables-legacy": ("IPv4", "IPv6"),
                                                "userspace": ("IPv4", "IPv6"), "nftables": ("IPv4", "IPv6")}


@dataclass
class Mode:
    name: str
    proxier: Proxier
    topo: Topology
    services: dict
    endpoints: dict

    def sync_phase(self, scenario: Scenario, variant: Variant, phase: int) -> None:
        name = spn(scenario, variant)
        eps = endpoints(scenario, phase, variant)
        if self.endpoints.get(name, ()) == eps:
            return
        self.endpoints[name] = eps
        res = self.proxier.sync(SyncRequest(dict(self.services), dict(self.endpoints),
                                            changed=frozenset({name}), full=False))
        assert res.ok, res.error

    def client(self, src: str) -> str:
        return {"node": self.topo.node, "outside": self.topo.client, "pod": self.topo.pods["pod2"],
                "self": self.topo.pods["pod1"]}[src]


def build(mode: str, topo: Topology) -> Proxier:
    config = KProxyConfig(mode=mode.split("-")[0], netns=topo.node, cluster_cidr=f"{CLUSTER_CIDR},{CLUSTER_CIDR6}",
                          hostname_override=NODE_NAME, node_ips=(NODE_IP, NODE_IP6), node_zone=NODE_ZONE,
                          bind_address=NODE_IP, udp_idle_timeout=1.0,
                          iptables_backend=mode.split("-")[1] if "-" in mode else "nft")
    # As kproxy.server's ModeRegistry builds them: one proxier per family.
    if mode == "nftables":
        from kproxy.proxiers.nftables import new_proxier as nftables_proxier

        return nftables_proxier(config)
    if mode.startswith("iptables"):
        from kproxy.proxiers.iptables import new_proxier as iptables_proxier

        return iptables_proxier(config)
    from kproxy.proxiers.userspace import new_proxier as userspace_proxier

    return userspace_proxier(config, "compiled")


@pytest.fixture(scope="module", params=HERE)
def mode(request: pytest.FixtureRequest, conformance_topology: Topology) -> Iterator[Mode]:
    proxier = build(request.param, conformance_topology)
    assert isinstance(proxier, MetaProxier) and proxier.families == MODE_FAMILIES[request.param], proxier
    services, eps = state(1, ("IPv4", "IPv6", "dual"))
    try:
        res = proxier.sync(SyncRequest(services, eps))
        assert res.ok, res.error
        yield Mode(request.param, proxier, conformance_topology, services, eps)
    finally:
        proxier.close()
        assert proxier.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("run", FAMILY_RUNS, ids=[f"{v}-services-over-{f}" for v, f in FAMILY_RUNS])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_conformance(mode: Mode, scenario: Scenario, run: tuple[Variant, Family]) -> None:
    variant, family = run
    if family not in MODE_FAMILIES[mode.name]:
        pytest.skip(f"{mode.name}: no {family} proxier (MODE_FAMILIES)")
    # Every passing probe of the single-stack Services is also traced (`kproxy trace`) and must
    # agree; IPv6 in iptables and nftables modes (userspace's IPv6 relay publishes no status socket); the
    # dual-stack runs take the same paths through the tracer at twice the cost, so they are not.
    traced = variant == "IPv4" or (variant == "IPv6" and mode.name != "userspace")
    tracer = trace_checker(mode.topo.node, TRACE_ARGS[mode.name], mode.name == "nftables") if traced else None
    mode.sync_phase(scenario, variant, 1)  # a dual-stack run over the other family changed it
    failures = check_scenario(mode.name, scenario, mode.client, lambda: mode.sync_phase(scenario, variant, 2),
                              tracer, variant, family)
    assert not failures, f"{mode.name} / {variant} Services over {family} / {scenario.name}:\n" + "\n".join(failures)

"""The Service conformance matrix (conformance_table.py) against iptables on both back ends,
nftables and userspace, in network namespaces, with real packets. IPVS runs the same table inside the
User-Mode Linux VM (tests/vm/inside/test_ipvs_conformance.py): this kernel has no IPVS."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conformance_probe import check_scenario
from conformance_trace import trace_checker
from conformance_table import CLUSTER_CIDR, NODE_IP, NODE_NAME, NODE_ZONE, SCENARIOS, Scenario, endpoints, spn, state
from iptables_topology import Topology

from kproxy.config import KProxyConfig
from kproxy.proxiers.base import Proxier, SyncRequest

pytestmark = pytest.mark.e2e

HERE = ("iptables-nft", "iptables-legacy", "userspace", "nftables")
TRACE_ARGS = {"iptables-nft": ["--mode", "iptables", "--iptables-backend", "nft"],
              "iptables-legacy": ["--mode", "iptables", "--iptables-backend", "legacy"],
              "userspace": ["--mode", "userspace"], "nftables": []}  # auto: the mode is detected


@dataclass
class Mode:
    name: str
    proxier: Proxier
    topo: Topology
    services: dict
    endpoints: dict

    def sync_phase2(self, scenario: Scenario) -> None:
        name = spn(scenario)
        self.endpoints[name] = endpoints(scenario, 2)
        res = self.proxier.sync(SyncRequest(dict(self.services), dict(self.endpoints),
                                            changed=frozenset({name}), full=False))
        assert res.ok, res.error

    def client(self, src: str) -> str:
        return {"node": self.topo.node, "outside": self.topo.client, "pod": self.topo.pods["pod2"],
                "self": self.topo.pods["pod1"]}[src]


def build(mode: str, topo: Topology) -> Proxier:
    config = KProxyConfig(mode=mode.split("-")[0], netns=topo.node, cluster_cidr=CLUSTER_CIDR, hostname_override=NODE_NAME,
                          node_ips=(NODE_IP,), node_zone=NODE_ZONE, bind_address=NODE_IP, udp_idle_timeout=1.0,
                          iptables_backend=mode.split("-")[1] if "-" in mode else "nft")
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
    services, eps = state()
    try:
        res = proxier.sync(SyncRequest(services, eps))
        assert res.ok, res.error
        yield Mode(request.param, proxier, conformance_topology, services, eps)
    finally:
        proxier.close()
        assert proxier.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_conformance(mode: Mode, scenario: Scenario) -> None:
    # Every passing probe is also traced (`kproxy trace`) and must agree.
    tracer = trace_checker(mode.topo.node, TRACE_ARGS[mode.name])
    failures = check_scenario(mode.name, scenario, mode.client, lambda: mode.sync_phase2(scenario), tracer)
    assert not failures, f"{mode.name} / {scenario.name}:\n" + "\n".join(failures)

"""The Service conformance matrix: one table of scenarios, run with real packets against every mode.

Each scenario is one Service (its own ClusterIP, node port, LoadBalancer IP and external IP, so
all of them are programmed in one sync) with endpoints on the test topology's pods, and probes:
a client (the node itself, a pod, or a host outside the cluster) connects to one of the
Service's addresses and the probe states what must happen (which backends answer, refused,
dropped, a health-check status). `LIMITS` is the one place where a mode is allowed to differ, each
with the reason; the tests assert that documented behaviour instead.

Topology (tests/iptables/iptables_topology.py, or its IPVS twin in the VM): an outside client
192.168.50.2 routed via the node 192.168.50.1; pod1 10.1.0.2 and pod2 10.1.0.3 on the node's
bridge (local endpoints), pod3 10.2.0.2 behind another link (a remote endpoint: its node_name is
another node's). Backends answer "NAME PEER_IP" on TCP 8080 and UDP 8053. The node is in zone-a.

Per family (issue 18): every scenario also exists as an IPv6-only and as a dual-stack Service
(`Variant`), on the same topology's IPv6 addresses (fd00:50::/64 node network, pods fd01::/16);
a dual-stack Service is probed over each family. The IPv4 variant keeps the names and addresses
it always had.

Plain data and pure functions only: the VM imports this file too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kproxy.model import Endpoint, ServicePort, ServicePortName

NODE_IP = "192.168.50.1"
CLIENT_IP = "192.168.50.2"
POD_IPS = {"pod1": "10.1.0.2", "pod2": "10.1.0.3", "pod3": "10.2.0.2"}
LOCAL_PODS = frozenset({"pod1", "pod2"})
NODE_NAME = "conformance-node"
NODE_ZONE = "zone-a"
CLUSTER_CIDR = "10.0.0.0/8"
NODE_IP6 = "fd00:50::1"
CLIENT_IP6 = "fd00:50::2"
POD_IPS6 = {"pod1": "fd01:1::2", "pod2": "fd01:1::3", "pod3": "fd01:2::2"}
CLUSTER_CIDR6 = "fd01::/16"
Family = Literal["IPv4", "IPv6"]
Variant = Literal["IPv4", "IPv6", "dual"]  # the Service's ipFamilies: one family, or both
VARIANT_FAMILIES: dict[str, tuple[Family, ...]] = {"IPv4": ("IPv4",), "IPv6": ("IPv6",), "dual": ("IPv4", "IPv6")}
# (Service variant, family probed): single-stack Services over their family, dual-stack over each.
FAMILY_RUNS: tuple[tuple[Variant, Family], ...] = (("IPv4", "IPv4"), ("IPv6", "IPv6"), ("dual", "IPv4"),
                                                   ("dual", "IPv6"))
# The IPv6 twin of every source range the table uses.
RANGES6 = {"192.168.50.0/24": "fd00:50::/64", "203.0.113.0/24": "2001:db8:113::/64"}
_VARIANT_OFFSET = {"IPv4": 0, "IPv6": 100, "dual": 200}
TCP_PORT, UDP_PORT = 8080, 8053

Src = Literal["node", "pod", "outside", "self"]  # self: pod1 reaching a Service it backs (hairpin)
Dst = Literal["cluster_ip", "node_port", "lb_ip", "external_ip", "health"]
# A set of backend names (each connection answered by one of them, all of them seen over the
# probe's connections unless `any_of`), or what happens instead.
Outcome = frozenset[str] | Literal["refused", "dropped", "sticky"] | int  # int: HTTP status


@dataclass(frozen=True)
class Probe:
    src: Src
    dst: Dst
    expect: Outcome
    proto: Literal["TCP", "UDP"] = "TCP"
    count: int = 6
    # The source address the backend must see: "client" (kept), "not-client" (rewritten).
    source: Literal["client", "not-client", ""] = ""
    local_endpoints: int | None = None  # health check body: localEndpoints
    phase: int = 1  # 2: after the scenario's `then` endpoints were synced

    @property
    def key(self) -> str:
        return f"{self.src}->{self.dst}/{self.proto}" + (f"#{self.phase}" if self.phase > 1 else "")


@dataclass(frozen=True)
class Ep:
    pod: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone_hints: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    endpoints: tuple[Ep, ...] = ()
    probes: tuple[Probe, ...] = ()
    protocol: Literal["TCP", "UDP"] = "TCP"
    external_ip: bool = False
    source_ranges: tuple[str, ...] = ()
    affinity: bool = False
    itp_local: bool = False
    etp_local: bool = False
    health_check: bool = False
    then: tuple[Ep, ...] | None = None  # endpoints of phase 2 (an endpoint change)
    extra: dict[str, str] = field(default_factory=dict)


def _names(*pods: str) -> frozenset[str]:
    return frozenset(pods)


BOTH = _names("pod1", "pod3")
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("ClusterIP from node, pod and outside", endpoints=(Ep("pod1"), Ep("pod3")), probes=(
        Probe("node", "cluster_ip", BOTH), Probe("pod", "cluster_ip", BOTH), Probe("outside", "cluster_ip", BOTH))),
    Scenario("NodePort", "NodePort", (Ep("pod1"), Ep("pod3")), probes=(
        Probe("outside", "node_port", BOTH), Probe("node", "node_port", BOTH), Probe("pod", "node_port", BOTH))),
    Scenario("LoadBalancer IP, source range allows the client", "LoadBalancer", (Ep("pod1"), Ep("pod3")),
             source_ranges=("192.168.50.0/24",), probes=(Probe("outside", "lb_ip", BOTH),)),
    Scenario("LoadBalancer IP, source range denies the client", "LoadBalancer", (Ep("pod1"), Ep("pod3")),
             source_ranges=("203.0.113.0/24",), probes=(
                 Probe("outside", "lb_ip", "dropped", count=1), Probe("outside", "node_port", BOTH))),
    Scenario("external IP", endpoints=(Ep("pod1"), Ep("pod3")), external_ip=True, probes=(
        Probe("outside", "external_ip", BOTH), Probe("node", "external_ip", BOTH))),
    Scenario("session affinity ClientIP", endpoints=(Ep("pod1"), Ep("pod2"), Ep("pod3")), affinity=True, probes=(
        Probe("outside", "cluster_ip", "sticky"),)),
    Scenario("internalTrafficPolicy Local, local and remote endpoints", endpoints=(Ep("pod1"), Ep("pod3")),
             itp_local=True, probes=(Probe("pod", "cluster_ip", _names("pod1")), Probe("node", "cluster_ip", _names("pod1")))),
    Scenario("internalTrafficPolicy Local, only a remote endpoint", endpoints=(Ep("pod3"),), itp_local=True,
             probes=(Probe("pod", "cluster_ip", "dropped", count=1),)),
    Scenario("internalTrafficPolicy Local, only a terminating local endpoint and a remote ready one",
             endpoints=(Ep("pod1", ready=False, terminating=True), Ep("pod3")), itp_local=True,
             probes=(Probe("pod", "cluster_ip", _names("pod1")),)),
    Scenario("externalTrafficPolicy Local, local and remote endpoints; health check 200", "LoadBalancer",
             (Ep("pod1"), Ep("pod2"), Ep("pod3")), etp_local=True, health_check=True, probes=(
                 Probe("outside", "node_port", _names("pod1", "pod2"), source="client"),
                 Probe("outside", "lb_ip", _names("pod1", "pod2"), source="client"),
                 Probe("outside", "cluster_ip", _names("pod1", "pod2", "pod3")),
                 Probe("outside", "health", 200, count=1, local_endpoints=2))),
    Scenario("externalTrafficPolicy Local, only a remote endpoint; health check 503", "LoadBalancer", (Ep("pod3"),),
             etp_local=True, health_check=True, probes=(
                 Probe("outside", "node_port", "dropped", count=1),
                 Probe("pod", "node_port", _names("pod3")),  # pods short-circuit to the cluster-wide endpoints
                 Probe("outside", "health", 503, count=1, local_endpoints=0))),
    Scenario("externalTrafficPolicy Local, only a terminating local endpoint", "NodePort",
             (Ep("pod1", ready=False, terminating=True), Ep("pod3")), etp_local=True,
             probes=(Probe("outside", "node_port", _names("pod1")), Probe("outside", "cluster_ip", _names("pod3")))),
    Scenario("terminating fallback: only serving+terminating endpoints", "NodePort",
             (Ep("pod1", ready=False, terminating=True), Ep("pod2", ready=False, serving=False, terminating=True)),
             probes=(Probe("outside", "cluster_ip", _names("pod1")), Probe("outside", "node_port", _names("pod1")))),
    Scenario("no endpoints: refused", "NodePort", (Ep("pod1", ready=False, serving=False),), probes=(
        Probe("outside", "cluster_ip", "refused", count=1), Probe("outside", "node_port", "refused", count=1),
        Probe("node", "cluster_ip", "refused", count=1))),
    Scenario("hairpin: a pod through its own Service", endpoints=(Ep("pod1"),), probes=(
        Probe("self", "cluster_ip", _names("pod1")),)),
    Scenario("endpoint change", endpoints=(Ep("pod1"),), then=(Ep("pod2"),), probes=(
        Probe("outside", "cluster_ip", _names("pod1")), Probe("outside", "cluster_ip", _names("pod2"), phase=2))),
    Scenario("UDP", "NodePort", (Ep("pod1"), Ep("pod3")), protocol="UDP", probes=(
        Probe("outside", "cluster_ip", BOTH, proto="UDP"), Probe("node", "cluster_ip", BOTH, proto="UDP"),
        Probe("outside", "node_port", BOTH, proto="UDP"))),
    Scenario("topology PreferClose: a same-zone and an other-zone endpoint",
             endpoints=(Ep("pod1", zone_hints=("zone-a",)), Ep("pod3", zone_hints=("zone-b",))), probes=(
                 Probe("outside", "cluster_ip", _names("pod1")), Probe("pod", "cluster_ip", _names("pod1")))),
    # Both policies Local on a NodePort: iptables mode once jumped to a chain it never declared here,
    # and the whole restore (every Service) failed.
    Scenario("internal and external traffic policy both Local", "NodePort", (Ep("pod1"), Ep("pod3")),
             itp_local=True, etp_local=True, probes=(
                 Probe("outside", "node_port", _names("pod1"), source="client"),
                 Probe("pod", "cluster_ip", _names("pod1")))),
)

MODES = ("iptables-nft", "iptables-legacy", "userspace", "ipvs", "nftables")

# The one place a mode may differ: (mode, scenario, probe key) -> (what it does instead, why).
_NO_SOURCE = "the relay opens a new connection from the node: the endpoint sees the node's address"
_IPVS_EMPTY = ("a virtual server without real servers is refused by the kernel (ip_vs_leave answers ICMP port "
               "unreachable) where iptables drops; kube-proxy's IPVS mode behaves the same")
_IPVS_NO_SHORT_CIRCUIT = ("one virtual server per node address and port serves every source, so pod traffic to a "
                          "NodePort gets the external policy's endpoints (none here) instead of the cluster-wide "
                          "ones; kube-proxy's IPVS mode behaves the same")


def _scenario(prefix: str) -> str:
    return next(s.name for s in SCENARIOS if s.name.startswith(prefix))


_ETP_LOCAL = _scenario("externalTrafficPolicy Local, local and remote")
_ETP_REMOTE = _scenario("externalTrafficPolicy Local, only a remote")
LIMITS: dict[tuple[str, str, str], tuple[Probe, str]] = {
    ("userspace", _ETP_LOCAL, "outside->node_port/TCP"): (
        Probe("outside", "node_port", _names("pod1", "pod2"), source="not-client"), _NO_SOURCE),
    ("userspace", _ETP_LOCAL, "outside->lb_ip/TCP"): (
        Probe("outside", "lb_ip", _names("pod1", "pod2"), source="not-client"), _NO_SOURCE),
    ("userspace", _scenario("internal and external traffic policy both"), "outside->node_port/TCP"): (
        Probe("outside", "node_port", _names("pod1"), source="not-client"), _NO_SOURCE),
    ("ipvs", _scenario("internalTrafficPolicy Local, only a remote"), "pod->cluster_ip/TCP"): (
        Probe("pod", "cluster_ip", "refused", count=1), _IPVS_EMPTY),
    ("ipvs", _ETP_REMOTE, "outside->node_port/TCP"): (Probe("outside", "node_port", "refused", count=1), _IPVS_EMPTY),
    ("ipvs", _ETP_REMOTE, "pod->node_port/TCP"): (Probe("pod", "node_port", "refused", count=1), _IPVS_NO_SHORT_CIRCUIT),
}


def expected(mode: str, scenario: Scenario, probe: Probe) -> tuple[Probe, str]:
    """The probe as `mode` must pass it, and the documented reason when that is a limit."""
    return LIMITS.get((mode, scenario.name, probe.key), (probe, ""))


def addresses(index: int, family: Family = "IPv4", variant: Variant = "IPv4") -> dict[str, str | int]:
    """Each scenario's own addresses (in `family`) and ports (index: its position in SCENARIOS);
    each variant has its own, so all of them are programmed side by side."""
    off = _VARIANT_OFFSET[variant]
    if family == "IPv6":
        ips = {"cluster_ip": f"fd02:96::{off + index + 10:x}", "lb_ip": f"fd02:98::{off + index + 10:x}",
               "external_ip": f"fd02:99::{off + index + 10:x}"}
    else:
        third = 7 + off // 100
        ips = {"cluster_ip": f"10.96.{third}.{index + 10}", "lb_ip": f"10.98.{third}.{index + 10}",
               "external_ip": f"10.99.{third}.{index + 10}"}
    return {**ips, "node_port": 31000 + off + index, "health": 32000 + off + index, "port": 80}


def spn(scenario: Scenario, variant: Variant = "IPv4") -> ServicePortName:
    index = SCENARIOS.index(scenario)
    suffix = "" if variant == "IPv4" else f"-{variant.lower()}"
    return ServicePortName("conformance", f"s{index}{suffix}", "p", scenario.protocol)


def _ranges(ranges: tuple[str, ...], family: Family) -> tuple[str, ...]:
    return ranges if family == "IPv4" else tuple(RANGES6[r] for r in ranges)


def service_port(scenario: Scenario, variant: Variant = "IPv4") -> ServicePort:
    index = SCENARIOS.index(scenario)
    fams = VARIANT_FAMILIES[variant]
    per = [addresses(index, f, variant) for f in fams]
    a = per[0]
    return ServicePort(
        name=spn(scenario, variant),
        type=scenario.type,
        cluster_ips=tuple(str(x["cluster_ip"]) for x in per),
        port=int(a["port"]),
        protocol=scenario.protocol,
        node_port=int(a["node_port"]) if scenario.type != "ClusterIP" else 0,
        external_ips=tuple(str(x["external_ip"]) for x in per) if scenario.external_ip else (),
        load_balancer_ips=tuple(str(x["lb_ip"]) for x in per) if scenario.type == "LoadBalancer" else (),
        load_balancer_source_ranges=tuple(r for f in fams for r in _ranges(scenario.source_ranges, f)),
        session_affinity_timeout=60 if scenario.affinity else None,
        external_policy_local=scenario.etp_local,
        internal_policy_local=scenario.itp_local,
        health_check_node_port=int(a["health"]) if scenario.health_check else 0,
    )


def endpoints(scenario: Scenario, phase: int = 1, variant: Variant = "IPv4") -> tuple[Endpoint, ...]:
    eps = scenario.then if phase == 2 and scenario.then is not None else scenario.endpoints
    port = UDP_PORT if scenario.protocol == "UDP" else TCP_PORT
    pod_ips = [POD_IPS if f == "IPv4" else POD_IPS6 for f in VARIANT_FAMILIES[variant]]
    return tuple(sorted(
        Endpoint(ip=ips[e.pod], port=port, ready=e.ready, serving=e.serving, terminating=e.terminating,
                 node_name=NODE_NAME if e.pod in LOCAL_PODS else "other-node", is_local=e.pod in LOCAL_PODS,
                 zone_hints=e.zone_hints)
        for e in eps for ips in pod_ips))


def state(phase: int = 1, variants: tuple[Variant, ...] = ("IPv4",)
          ) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    services = {spn(s, v): service_port(s, v) for v in variants for s in SCENARIOS}
    eps = {spn(s, v): endpoints(s, phase, v) for v in variants for s in SCENARIOS}
    return services, {k: v for k, v in eps.items() if v}


def node_ip(family: Family = "IPv4") -> str:
    return NODE_IP6 if family == "IPv6" else NODE_IP


def client_ip(family: Family = "IPv4") -> str:
    return CLIENT_IP6 if family == "IPv6" else CLIENT_IP


def target(scenario: Scenario, probe: Probe, variant: Variant = "IPv4", family: Family = "IPv4") -> tuple[str, int]:
    a = addresses(SCENARIOS.index(scenario), family, variant)
    if probe.dst == "node_port":
        return node_ip(family), int(a["node_port"])
    if probe.dst == "health":
        return node_ip(family), int(a["health"])
    return str(a[probe.dst]), int(a["port"])

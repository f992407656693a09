"""Where a ServicePort is exposed, as data: its addresses by role and its source ranges.

Upstream's ServicePort.ExternallyAccessible decides whether the external traffic policy applies
at all; LoadBalancer source ranges (spec.loadBalancerSourceRanges) restrict who may reach the
LoadBalancer IPs. Ranges are parsed once here: a range that does not parse is dropped (the API
server validates them; a proxy must not fail a whole sync on one bad object).
"""
from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from kproxy.model import IPFamily, ServicePort

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_v6(ip: str) -> bool:
    return ":" in ip


def externally_accessible(svc: ServicePort) -> bool:
    """A node port, an external IP or a LoadBalancer IP: the external traffic policy applies."""
    return svc.node_port != 0 or bool(svc.external_ips) or bool(svc.load_balancer_ips)


def service_ips(svc: ServicePort, family: IPFamily = "IPv4") -> list[str]:
    """Every address the ServicePort answers on in one family: cluster IPs, then external IPs,
    then LoadBalancer IPs (upstream's order for conntrack cleanup), without repeats."""
    v6 = family == "IPv6"
    ips = [ip for ip in (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips) if ip and _is_v6(ip) == v6]
    return list(dict.fromkeys(ips))


@dataclass(frozen=True, slots=True)
class SourceRanges:
    """spec.loadBalancerSourceRanges parsed; empty means everyone may connect."""

    networks: tuple[Network, ...]

    @classmethod
    def parse(cls, ranges: Iterable[str]) -> SourceRanges:
        nets: list[Network] = []
        for cidr in ranges:
            try:
                nets.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                continue
        return cls(tuple(dict.fromkeys(nets)))

    @property
    def restricted(self) -> bool:
        return bool(self.networks)

    def allows(self, ip: str) -> bool:
        """Whether a client at `ip` may reach the LoadBalancer IPs (any range contains it)."""
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self.networks)

    def contains_any(self, ips: Iterable[str]) -> bool:
        """Upstream's rule: when a range contains one of the node's IPs, traffic from the LB IP
        itself (a hairpinning load balancer that keeps its own address) is allowed too."""
        return bool(self.networks) and any(self.allows(ip) for ip in ips)

    def cidrs(self, family: IPFamily = "IPv4") -> list[str]:
        v = 6 if family == "IPv6" else 4
        return [str(n) for n in self.networks if n.version == v]


def nodeport_cidrs(addresses: tuple[str, ...], node_ips: tuple[str, ...]) -> tuple[str, ...]:
    """--nodeport-addresses as CIDRs of one meaning in every mode: "primary" is the node's own
    IPs (the Node object's addresses), each as a /32 or /128; the others stay as given; empty
    means every local address. When "primary" is asked and the node's IPs are unknown it adds
    nothing (the caller logs it)."""
    primary = tuple(f"{ip}/{128 if _is_v6(ip) else 32}" for ip in node_ips) if "primary" in addresses else ()
    return tuple(dict.fromkeys((*(c for c in addresses if c != "primary"), *primary)))


@dataclass(frozen=True)
class NodeAddresses:
    """One family's addresses a rule-writing proxier (iptables, nftables) works with, checked once."""

    node_ips: tuple[str, ...]
    nodeport_cidrs: tuple[str, ...]
    cluster_cidr: str


IPv4NodeAddresses = NodeAddresses  # the name the IPv4-only proxiers knew


def node_addresses(
    nodeport_addresses: Iterable[str], node_ips: Iterable[str], cluster_cidr: str, log: logging.Logger,
    family: IPFamily = "IPv4",
) -> NodeAddresses:
    """One family's side of --nodeport-addresses, the node's IPs and --cluster-cidr, for the
    proxiers that write rules per family (upstream's NewNodePortAddresses(family, ...) and its
    local detector, which takes the one cluster CIDR of that family). A bad CIDR raises
    ValueError naming it. CIDRs of the other family are that family's proxier's business."""
    v6 = family == "IPv6"
    fam_node_ips = tuple(ip for ip in node_ips if _is_v6(ip) == v6)
    addresses = tuple(nodeport_addresses)
    if "primary" in addresses and not fam_node_ips:
        log.warning("nodeport-addresses primary: the node's %s IPs are unknown; NodePorts on every address",
                    family)
    cidrs = nodeport_cidrs(addresses, fam_node_ips)
    for cidr in cidrs:
        ipaddress.ip_network(cidr, strict=False)  # raises ValueError naming the bad CIDR
    fam_cluster = next((c.strip() for c in cluster_cidr.split(",") if c.strip() and _is_v6(c) == v6), "")
    if fam_cluster:
        ipaddress.ip_network(fam_cluster, strict=False)
    return NodeAddresses(fam_node_ips, tuple(c for c in cidrs if _is_v6(c) == v6), fam_cluster)


def check_masquerade_bit(masquerade_bit: int) -> None:
    if not 0 <= masquerade_bit <= 31:
        raise ValueError(f"masqueradeBit {masquerade_bit}: must be within [0, 31]")

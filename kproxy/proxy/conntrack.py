"""Stale UDP conntrack entries, with upstream's meaning (pkg/proxy/conntrack/cleanup.go).

UDP has no teardown: a client that keeps sending keeps matching its conntrack entry, so
- an entry NATed to an endpoint that is gone keeps steering packets to it: delete the entries
  from every service address (and the node port) to that endpoint;
- an entry recorded while a UDP Service had no endpoint (the packet was rejected, or went to the
  node itself) keeps the flow away from the endpoints that appeared since: delete every entry to
  the service's addresses (and node port) when it gets its first endpoint.
The computation is pure; `apply_cleanup` runs it against the conntrack tool.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from kproxy.backends.conntrack import Conntrack
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.proxy.exposure import service_ips


@dataclass(frozen=True, slots=True)
class ConntrackCleanup:
    """The conntrack deletions one sync needs (sets: each runs once)."""

    service_ips: frozenset[str] = field(default_factory=frozenset)  # all UDP entries to this IP
    node_ports: frozenset[int] = field(default_factory=frozenset)  # all UDP entries to this port
    nat: frozenset[tuple[str, str]] = field(default_factory=frozenset)  # (service IP, endpoint IP)
    port_nat: frozenset[tuple[int, str]] = field(default_factory=frozenset)  # (node port, endpoint IP)

    def __bool__(self) -> bool:
        return bool(self.service_ips or self.node_ports or self.nat or self.port_nat)

    def __or__(self, other: ConntrackCleanup) -> ConntrackCleanup:
        return ConntrackCleanup(self.service_ips | other.service_ips, self.node_ports | other.node_ports,
                                self.nat | other.nat, self.port_nat | other.port_nat)


def udp_conntrack_cleanup(
    services: Mapping[ServicePortName, ServicePort],
    stale_endpoints: Iterable[tuple[ServicePortName, Endpoint]],
    newly_active: Iterable[ServicePortName],
    previous: Mapping[ServicePortName, ServicePort] | None = None,
    family: IPFamily = "IPv4",
) -> ConntrackCleanup:
    """`stale_endpoints`: UDP endpoints that served and are gone (or no longer serve);
    `newly_active`: UDP ServicePorts that had no endpoint and have one now. A stale endpoint's
    Service is looked up in `services` and in `previous` (its state before this sync), so entries
    to a deleted or re-addressed Service's endpoints go too. Other-family endpoints are skipped."""
    v6 = family == "IPv6"
    ips: set[str] = set()
    ports: set[int] = set()
    for name in newly_active:
        svc = services.get(name)
        if svc is None or svc.protocol != "UDP":
            continue
        ips.update(service_ips(svc, family))
        if svc.node_port:
            ports.add(svc.node_port)
    nat: set[tuple[str, str]] = set()
    port_nat: set[tuple[int, str]] = set()
    for name, ep in stale_endpoints:
        if (":" in ep.ip) != v6:
            continue
        # Entries were made against the addresses the Service had then, and a client may keep
        # using the ones it has now: both, when a Service changed in the same sync.
        for svc in (services.get(name), previous.get(name) if previous is not None else None):
            if svc is None or svc.protocol != "UDP":
                continue
            nat.update((ip, ep.ip) for ip in service_ips(svc, family))
            if svc.node_port:
                port_nat.add((svc.node_port, ep.ip))
    return ConntrackCleanup(frozenset(ips), frozenset(ports), frozenset(nat), frozenset(port_nat))


def apply_cleanup(ct: Conntrack, cleanup: ConntrackCleanup) -> None:
    """Runs the deletions, in a stable order (logs and tests read them)."""
    ct.deletions.clear()
    for ip in sorted(cleanup.service_ips):
        ct.clear_entries_for_ip(ip, "udp")
    for port in sorted(cleanup.node_ports):
        ct.clear_entries_for_port(port, "udp")
    for vip, ep_ip in sorted(cleanup.nat):
        ct.clear_entries_for_nat(vip, ep_ip, "udp")
    for port, ep_ip in sorted(cleanup.port_nat):
        ct.clear_entries_for_port_nat(ep_ip, port, "udp")

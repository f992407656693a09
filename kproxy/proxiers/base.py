"""The interface every proxy mode implements (iptables, ipvs, userspace, later nftables).

The server owns informers, change trackers and the runner; a Proxier only turns the tracked state
into kernel (or socket) state. `sync` is called by the bounded-frequency runner, never concurrently.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

from kproxy.model import Endpoint, EndpointsMap, ServicePortMap, ServicePortName


@dataclass(slots=True)
class SyncRequest:
    """What changed since the previous successful sync.

    `full` asks for everything to be rewritten (first sync, periodic resync, after a failure).
    `services` and `endpoints` are the complete current state; `changed` names the ServicePorts
    whose service or endpoints changed, so partial syncs touch only those.
    `stale_endpoints` lists (ServicePortName, Endpoint) removed since the last sync, for UDP
    conntrack cleanup; `stale_services` lists UDP ServicePorts that gained their first endpoint.
    """

    services: ServicePortMap
    endpoints: EndpointsMap
    changed: frozenset[ServicePortName] = frozenset()
    full: bool = True
    stale_endpoints: list[tuple[ServicePortName, Endpoint]] = field(default_factory=list)
    stale_services: list[ServicePortName] = field(default_factory=list)


@dataclass(slots=True)
class SyncResult:
    """What a sync did, for metrics and logs."""

    ok: bool
    rules_total: dict[str, int] = field(default_factory=dict)  # table -> rules, for *_iptables_total
    error: str = ""
    # One proxier per family (kproxy.proxiers.meta): each family's outcome, for healthz per
    # family; empty for a single proxier (its `ok` is the one family's).
    family_ok: dict[str, bool] = field(default_factory=dict)
    # ...and each family's own sync time and rule counts (table -> rules), for the metrics
    # upstream labels with ip_family (pkg/proxy/metrics since 1.33); empty for a single proxier.
    family_seconds: dict[str, float] = field(default_factory=dict)
    family_rules: dict[str, dict[str, int]] = field(default_factory=dict)


class Proxier(abc.ABC):
    """One proxy mode. Implementations must be all-or-nothing per sync: a failed apply leaves
    the previously programmed state untouched and returns ok=False (the runner then retries
    with full=True)."""

    mode: str = ""

    @abc.abstractmethod
    def sync(self, request: SyncRequest) -> SyncResult: ...

    @abc.abstractmethod
    def cleanup(self) -> bool:
        """Remove everything this mode ever programmed (kproxy --cleanup). True if clean."""

    def close(self) -> None:
        """Release sockets, threads and netlink handles; programmed state stays."""

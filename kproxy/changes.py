"""Pending changes per Service and the state a sync consumes (shared/DESIGN.md §3.3).

As upstream's ServiceChangeTracker / EndpointsChangeTracker: per Service we keep what the last
sync applied and the latest pending state; a change that returns to the applied state cancels
out, so a relist or a no-op update (new resourceVersion, same content) never triggers work.
The EndpointSlice cache keeps each Service's slices apart and merges them per ServicePortName.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kproxy.kube.ingest import SliceEndpoints
from kproxy.model import Endpoint, EndpointsMap, ServicePort, ServicePortMap, ServicePortName
from kproxy.proxiers.base import SyncRequest

_CONNTRACK_PROTOCOLS = frozenset(("UDP", "SCTP"))  # connectionless: entries outlive backends


class ServiceChangeTracker:
    """Service "namespace/name" -> its ServicePorts, applied vs pending."""

    def __init__(self) -> None:
        self._applied: dict[str, ServicePortMap] = {}
        self._pending: dict[str, ServicePortMap] = {}

    def update(self, service_key: str, ports: ServicePortMap) -> bool:
        """Record the Service's current ports ({} when deleted or not proxied). True when
        this leaves a pending change for that Service."""
        if ports == self._applied.get(service_key, {}):
            self._pending.pop(service_key, None)
            return False
        self._pending[service_key] = ports
        return True

    def pending(self) -> int:
        return len(self._pending)

    def checkout(self) -> dict[str, tuple[ServicePortMap, ServicePortMap]]:
        """Move pending into applied; per changed Service, (previous, current)."""
        out: dict[str, tuple[ServicePortMap, ServicePortMap]] = {}
        for key, ports in self._pending.items():
            out[key] = (self._applied.get(key, {}), ports)
            if ports:
                self._applied[key] = ports
            else:
                self._applied.pop(key, None)
        self._pending = {}
        return out


def merge_slices(slices: dict[str, SliceEndpoints]) -> EndpointsMap:
    """One Service's EndpointsMap from its slices (by slice name, for a stable order). An
    address listed twice (in two slices while a slice controller moves it) counts once, the
    ready copy first."""
    if len(slices) == 1:
        # The common case (up to 100 endpoints per slice): slice_endpoints already sorted and
        # de-duplicated each port's tuple.
        # Shared, not copied: applied slices are replaced whole, never mutated.
        (only,) = slices.values()
        if all(only.values()):
            return only
        return {spn: eps for spn, eps in only.items() if eps}
    merged: dict[ServicePortName, dict[str, Endpoint]] = {}
    for name in sorted(slices):
        for spn, eps in slices[name].items():
            by_addr = merged.setdefault(spn, {})
            for ep in eps:
                # By ip:port: two slices of one port may carry different port numbers while
                # a targetPort change rolls out.
                seen = by_addr.get(ep.addr)
                if seen is None or (ep.ready and not seen.ready):
                    by_addr[ep.addr] = ep
    return {spn: tuple(sorted(d.values())) for spn, d in merged.items() if d}


class EndpointsChangeTracker:
    """Service "namespace/name" -> {slice name -> its endpoints}, applied vs pending, plus
    the trigger times (endpoints.kubernetes.io/last-change-trigger-time) of pending changes."""

    def __init__(self) -> None:
        self._applied: dict[str, dict[str, SliceEndpoints]] = {}
        self._merged: dict[str, EndpointsMap] = {}  # merge_slices(_applied[key]), kept
        self._pending: dict[str, dict[str, SliceEndpoints | None]] = {}
        self._triggers: dict[str, list[float]] = {}

    def update(self, service_key: str, slice_name: str, endpoints: SliceEndpoints | None,
               trigger_time: float | None = None) -> bool:
        """Record one slice's content (None: deleted). True when the Service has a pending
        change afterwards."""
        applied = self._applied.get(service_key, {}).get(slice_name)
        pending = self._pending.setdefault(service_key, {})
        if endpoints == applied or (endpoints is None and applied is None):
            pending.pop(slice_name, None)
        else:
            pending[slice_name] = endpoints
            if trigger_time is not None:
                self._triggers.setdefault(service_key, []).append(trigger_time)
        if not pending:
            del self._pending[service_key]
            self._triggers.pop(service_key, None)
            return False
        return True

    def pending(self) -> int:
        return len(self._pending)

    def checkout(self) -> tuple[dict[str, tuple[EndpointsMap, EndpointsMap]], dict[str, list[float]]]:
        """Apply pending slices; per Service whose merged endpoints really changed,
        (previous, current), and the trigger times of the changes consumed."""
        out: dict[str, tuple[EndpointsMap, EndpointsMap]] = {}
        for key, changes in self._pending.items():
            slices = self._applied.setdefault(key, {})
            before = self._merged.get(key, {})
            for name, eps in changes.items():
                if eps is None:
                    slices.pop(name, None)
                else:
                    slices[name] = eps
            after = merge_slices(slices)
            if after:
                self._merged[key] = after
            else:
                self._merged.pop(key, None)
            if not slices:
                del self._applied[key]
            if before != after:
                out[key] = (before, after)
        triggers = self._triggers
        self._pending, self._triggers = {}, {}
        return out, triggers


@dataclass(slots=True)
class Checkout:
    request: SyncRequest
    trigger_times: dict[str, list[float]] = field(default_factory=dict)  # service key -> times
    service_changes: int = 0
    endpoint_changes: int = 0


def _differs(old: dict[ServicePortName, ServicePort] | EndpointsMap,
             new: dict[ServicePortName, ServicePort] | EndpointsMap) -> set[ServicePortName]:
    return {spn for spn in old.keys() | new.keys() if old.get(spn) != new.get(spn)}


class ProxyState:
    """The complete current ServicePortMap and EndpointsMap, advanced by checkout()."""

    def __init__(self) -> None:
        self.services_tracker = ServiceChangeTracker()
        self.endpoints_tracker = EndpointsChangeTracker()
        self.services: ServicePortMap = {}
        self.endpoints: EndpointsMap = {}
        self._carry_stale_endpoints: list[tuple[ServicePortName, Endpoint]] = []
        self._carry_stale_services: list[ServicePortName] = []

    def pending(self) -> bool:
        return bool(self.services_tracker.pending() or self.endpoints_tracker.pending())

    def checkout(self, full: bool) -> Checkout:
        changed: set[ServicePortName] = set()
        svc_changes = self.services_tracker.checkout()
        for old, new in svc_changes.values():
            for spn in old:
                self.services.pop(spn, None)
            self.services.update(new)
            changed |= _differs(old, new)
        ep_changes, triggers = self.endpoints_tracker.checkout()
        stale_eps = self._carry_stale_endpoints
        stale_svcs = self._carry_stale_services
        self._carry_stale_endpoints, self._carry_stale_services = [], []
        for old_eps, new_eps in ep_changes.values():
            for spn in old_eps:
                self.endpoints.pop(spn, None)
            self.endpoints.update(new_eps)
            changed |= _differs(old_eps, new_eps)
            _stale_conntrack(old_eps, new_eps, stale_eps, stale_svcs)
        request = SyncRequest(
            services=dict(self.services),
            endpoints=dict(self.endpoints),
            changed=frozenset(changed),
            full=full,
            stale_endpoints=stale_eps,
            stale_services=stale_svcs,
        )
        return Checkout(request, {k: v for k, v in triggers.items() if k in ep_changes},
                        len(svc_changes), len(ep_changes))

    def requeue_stale(self, request: SyncRequest) -> None:
        """A failed sync did not clear conntrack: hand its stale entries to the next one."""
        self._carry_stale_endpoints.extend(request.stale_endpoints)
        self._carry_stale_services.extend(request.stale_services)


def _stale_conntrack(old: EndpointsMap, new: EndpointsMap,
                     stale_eps: list[tuple[ServicePortName, Endpoint]],
                     stale_svcs: list[ServicePortName]) -> None:
    """Upstream's detectStaleConntrackEntries: a ready UDP endpoint that is gone (or no longer
    ready) leaves flows pinned to it; a UDP ServicePort that gets its first ready endpoint has
    flows pinned to the REJECT it used to hit."""
    for spn, eps in old.items():
        if spn.protocol not in _CONNTRACK_PROTOCOLS:
            continue
        still = {e.addr for e in new.get(spn, ()) if e.ready}
        stale_eps.extend((spn, e) for e in eps if e.ready and e.addr not in still)
    for spn, eps in new.items():
        if spn.protocol not in _CONNTRACK_PROTOCOLS:
            continue
        if any(e.ready for e in eps) and not any(e.ready for e in old.get(spn, ())):
            stale_svcs.append(spn)


def parse_trigger_time(value: str) -> float | None:
    """RFC 3339 (as the annotation is written) -> epoch seconds; None when absent/garbled."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None

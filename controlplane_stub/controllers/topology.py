"""Topology Aware Hints for `service.kubernetes.io/topology-mode: Auto` (and the older
`service.kubernetes.io/topology-aware-hints` annotation), as upstream's EndpointSlice controller
sets them (k8s.io/endpointslice/topologycache).

Every zone gets a share of a Service's ready endpoints in proportion to the allocatable CPU of its
ready nodes (control-plane nodes excluded). Each endpoint is first hinted for its own zone; zones
with more than their share give endpoints to zones below it. A zone may be short of its share by
at most the overload threshold (20%): when that cannot be met, when a node has no zone or CPU,
when all ready nodes are in one zone, when there are fewer ready endpoints than zones, or when an
endpoint has no zone, no endpoint gets a hint and the Service gets a Warning Event with upstream's
reason and message.

Differences from upstream, both of order only: Go iterates maps in random order where zones tie
(which zone gives or receives first); here zones are taken in name order, so the same input always
gives the same hints. Upstream keeps the hints of EndpointSlices it does not otherwise rewrite and
counts them; this controller recomputes every endpoint's hint on every sync (deterministically,
so an unchanged Service keeps its hints and no slice is rewritten).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

Obj = dict[str, Any]

OVERLOAD_THRESHOLD = 0.2
ZONE_LABEL = "topology.kubernetes.io/zone"
TOPOLOGY_MODE = "service.kubernetes.io/topology-mode"
TOPOLOGY_AWARE_HINTS = "service.kubernetes.io/topology-aware-hints"  # deprecated, still read first
EXCLUDED_NODE_LABELS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")

# upstream's Event messages (topologycache/event.go), each followed by ", addressType: IPv4|IPv6".
NO_ZONE_SPECIFIED = "One or more endpoints do not have a zone specified"
NO_ALLOCATED_HINTS_FOR_ZONES = "No hints allocated for zones"
HINTS_ENABLED = "Topology Aware Hints has been enabled"
HINTS_DISABLED = "Topology Aware Hints has been disabled"
INSUFFICIENT_NODE_INFO = "Insufficient Node information: allocatable CPU or zone not specified on one or more nodes"
NODES_READY_IN_ONE_ZONE_ONLY = "Nodes only ready in one zone"
INSUFFICIENT_NUMBER_OF_ENDPOINTS = "Insufficient number of endpoints"
MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD = (
    "Unable to allocate minimum required endpoints to each zone without exceeding overload threshold"
)
REASON_ENABLED = "TopologyAwareHintsEnabled"
REASON_DISABLED = "TopologyAwareHintsDisabled"


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Allocation:
    minimum: int
    maximum: int
    desired: float


def hints_enabled(annotations: Any) -> bool:
    """The deprecated annotation wins when both are set; only Auto (or auto) asks for hints."""
    if not isinstance(annotations, dict):
        return False
    value = annotations.get(TOPOLOGY_AWARE_HINTS, annotations.get(TOPOLOGY_MODE))
    return value in ("Auto", "auto")


_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)")
_SUFFIX = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def cpu_millis(quantity: Any) -> int:
    """resource.Quantity(q).MilliValue() (rounded up), 0 for anything that is not a quantity."""
    if isinstance(quantity, bool) or not isinstance(quantity, (str, int)):
        return 0
    m = _QUANTITY.fullmatch(str(quantity).strip())
    if m is None:
        return 0
    try:
        value = Decimal(m.group(1)) * (Decimal(10) ** int(m.group(2)[1:]) if m.group(2) else _SUFFIX[m.group(3)])
    except (InvalidOperation, ValueError, OverflowError):
        return 0
    if value <= 0 or value > Decimal(10) ** 15:
        return 0
    return int((value * 1000).to_integral_value(rounding="ROUND_CEILING"))


def _node_ready(node: Obj) -> bool:
    for c in (node.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def cpu_ratios_by_zone(nodes: Iterable[Obj]) -> dict[str, float] | None:
    """Each zone's share of the ready nodes' allocatable CPU; None when hints cannot be given:
    a ready node without a zone or CPU, no CPU at all, or fewer than two zones (SetNodes)."""
    cpu: dict[str, int] = {}
    for node in nodes:
        labels = (node.get("metadata") or {}).get("labels") or {}
        if not isinstance(labels, dict) or any(k in labels for k in EXCLUDED_NODE_LABELS):
            continue
        if not _node_ready(node):
            continue
        zone = labels.get(ZONE_LABEL)
        millis = cpu_millis(((node.get("status") or {}).get("allocatable") or {}).get("cpu"))
        if not isinstance(zone, str) or not zone or millis == 0:
            return None
        cpu[zone] = cpu.get(zone, 0) + millis
    total = sum(cpu.values())
    if total == 0 or len(cpu) < 2:
        return None
    return {zone: c / total for zone, c in sorted(cpu.items())}


def allocations(ratios: dict[str, float] | None, endpoints: int) -> dict[str, Allocation] | str:
    """Minimum, maximum and desired endpoints per zone, or why there are none (getAllocations)."""
    if ratios is None:
        return INSUFFICIENT_NODE_INFO
    if len(ratios) < 2:
        return NODES_READY_IN_ONE_ZONE_ONLY
    if len(ratios) > endpoints:
        return f"{INSUFFICIENT_NUMBER_OF_ENDPOINTS} ({endpoints} endpoints, {len(ratios)} zones)"
    minimums: dict[str, tuple[int, float]] = {}
    remaining = endpoints
    for zone, ratio in ratios.items():
        desired = ratio * endpoints
        minimum = int(math.ceil(desired * (1 / (1 + OVERLOAD_THRESHOLD))))
        minimums[zone] = (minimum, max(desired, float(minimum)))
        remaining -= minimum
        if remaining < 0:
            return f"{MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD} ({endpoints} endpoints, {len(ratios)} zones)"
    min_total = endpoints - remaining
    return {z: Allocation(mn, mn + endpoints - min_total, d) for z, (mn, d) in minimums.items()}


def _most(wanted: dict[str, float]) -> tuple[str, float]:
    zone, most = "", 0.0
    for z, n in wanted.items():  # name order: the first of equals wins
        if n > most:
            zone, most = z, n
    return zone, most


def giving_and_receiving(allocs: dict[str, Allocation], hinted: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """How many endpoints each zone gives away and receives (getGivingAndReceivingZones): whole
    endpoints from the zone furthest above its desired share to the one furthest below, while
    either is at least one endpoint off and both at least half of one."""
    give: dict[str, float] = {}
    take: dict[str, float] = {}
    for zone in sorted(allocs):
        have, target = float(hinted.get(zone, 0)), allocs[zone].desired
        if have > target:
            give[zone] = have - target
        elif have < target:
            take[zone] = target - have
    giving: dict[str, int] = {}
    receiving: dict[str, int] = {}
    while True:
        gz, g = _most(give)
        rz, r = _most(take)
        if not gz or not rz or (g < 1.0 and r < 1.0) or g < 0.5 or r < 0.5:
            return giving, receiving
        giving[gz] = giving.get(gz, 0) + 1
        give[gz] -= 1
        receiving[rz] = receiving.get(rz, 0) + 1
        take[rz] -= 1


def _ready(ep: Obj) -> bool:
    return bool((ep.get("conditions") or {}).get("ready"))


def set_hints(endpoints: list[Obj], ratios: dict[str, float] | None) -> str:
    """Hints on `endpoints` (all of one address type of one Service, changed in place), as
    upstream's AddHints; returns "" when hints were set, else the reason message for the Event
    (and then no endpoint has a hint)."""
    ready = [ep for ep in endpoints if _ready(ep)]
    allocs = allocations(ratios, len(ready))
    if isinstance(allocs, str):
        remove_hints(endpoints)
        return allocs
    hinted: dict[str, int] = {}
    for ep in endpoints:
        if not _ready(ep):
            ep.pop("hints", None)
            continue
        zone = ep.get("zone")
        if not isinstance(zone, str) or not zone:
            remove_hints(endpoints)
            return NO_ZONE_SPECIFIED
        hinted[zone] = hinted.get(zone, 0) + 1
        ep["hints"] = {"forZones": [{"name": zone}]}
    giving, receiving = giving_and_receiving(allocs, hinted)
    for ep in ready:  # redistributeHints
        if not giving or not receiving:
            break
        zone = ep["zone"]
        if giving.get(zone, 0) > 0:
            to = next(z for z in sorted(receiving) if receiving[z] > 0)
            ep["hints"] = {"forZones": [{"name": to}]}
            _take_one(giving, zone)
            _take_one(receiving, to)
            hinted[zone] -= 1
            hinted[to] = hinted.get(to, 0) + 1
    if not hinted:
        remove_hints(endpoints)
        return NO_ALLOCATED_HINTS_FOR_ZONES
    return ""


def _take_one(counts: dict[str, int], zone: str) -> None:
    if counts[zone] == 1:
        del counts[zone]
    else:
        counts[zone] -= 1


def remove_hints(endpoints: list[Obj]) -> None:
    for ep in endpoints:
        ep.pop("hints", None)


def overloaded(hinted: dict[str, int], ratios: dict[str, float] | None) -> bool:
    """serviceOverloaded: a zone now gets fewer endpoints than its share allows (nodes changed)."""
    if not hinted:
        return False
    if not ratios:
        return True
    total = sum(hinted.values())
    return any(
        zone not in hinted or hinted[zone] < math.ceil(total * ratio * (1 / (1 + OVERLOAD_THRESHOLD)))
        for zone, ratio in ratios.items()
    )


class TopologyCache:
    """The zones' CPU shares and, per Service and address type, the hints it was given; says
    which Events a sync publishes (enabled once, disabled with the reason)."""

    def __init__(self) -> None:
        self.ratios: dict[str, float] | None = None
        self._hints: dict[str, dict[str, dict[str, int]]] = {}  # service -> address type -> zone -> n
        self._populated: set[str] = set()  # Services told "enabled" (hintsPopulatedByService)

    def set_nodes(self, nodes: Iterable[Obj]) -> list[str]:
        """New CPU shares; returns the Services whose hints now overload a zone (to sync again)."""
        self.ratios = cpu_ratios_by_zone(nodes)
        return sorted(
            key for key, by_type in self._hints.items() if any(overloaded(h, self.ratios) for h in by_type.values())
        )

    def add_hints(self, service: str, address_type: str, endpoints: list[Obj]) -> list[Event]:
        why = set_hints(endpoints, self.ratios)
        if why:
            self._remove(service, address_type)
            return [Event("Warning", REASON_DISABLED, f"{why}, addressType: {address_type}")]
        was_enabled = service in self._populated
        hinted: dict[str, int] = {}
        for ep in endpoints:
            for z in (ep.get("hints") or {}).get("forZones") or []:
                hinted[z["name"]] = hinted.get(z["name"], 0) + 1
        self._hints.setdefault(service, {})[address_type] = hinted
        self._populated.add(service)
        if was_enabled:
            return []
        return [Event("Normal", REASON_ENABLED, f"{HINTS_ENABLED}, addressType: {address_type}")]

    def annotation_off(self, service: str, address_type: str) -> list[Event]:
        """The Service no longer asks for Auto: forget its hints, and say so if it had them."""
        had = service in self._populated
        self._remove(service, address_type)
        return [Event("Warning", REASON_DISABLED, f"{HINTS_DISABLED}, addressType: {address_type}")] if had else []

    def forget(self, service: str) -> None:
        self._hints.pop(service, None)
        self._populated.discard(service)

    def _remove(self, service: str, address_type: str) -> None:
        by_type = self._hints.get(service)
        if by_type is not None:
            by_type.pop(address_type, None)
            if not by_type:
                del self._hints[service]
        self._populated.discard(service)  # upstream: on a removal of either address type

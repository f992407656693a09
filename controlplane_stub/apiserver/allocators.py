"""Service ClusterIP and NodePort allocation, as kube-apiserver's service REST storage does it.

ServiceAllocator owns the --service-cluster-ip-range CIDRs (one, or one per family for dual-stack)
and the --service-node-port-range. assign() fills clusterIP/clusterIPs/ipFamilies/ipFamilyPolicy,
nodePorts and healthCheckNodePort in place, or raises the real server's 422 (or 500 when a range
is full) having allocated nothing. Each range keeps a set of used offsets and a next-free cursor,
so allocating stays O(1) amortised with 10,000+ services; like upstream, dynamic allocation starts
above a small "static" band at the bottom of the range that is left for user-chosen values.
"""
from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .errors import StatusError
from .ipfamilies import family_of as _family_of
from .ipfamilies import init_ip_families
from .validation import FieldErrors, externally_accessible

if TYPE_CHECKING:  # the etcd client is imported only by an etcd-backed server (tests/unit/test_lazy_etcd_import.py)
    from ..store.base import Event
    from ..store.etcd_wire import Cmp, Op

Obj = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_SERVICE_CIDR = "10.96.0.0/12"
DEFAULT_NODE_PORT_RANGE = (30000, 32767)


class RangeFull(Exception):
    pass


class NotInRange(Exception):
    pass


class AlreadyAllocated(Exception):
    pass


class OffsetRange:
    """A bounded set of small integers with O(1) reserve/release and a wrapping next-free cursor."""

    def __init__(self, low: int, high: int, static_band: int) -> None:
        self.low = low
        self.high = high  # inclusive
        self.used: set[int] = set()
        self.dynamic_start = min(low + static_band, high)
        self._cursor = self.dynamic_start

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def contains(self, value: int) -> bool:
        return self.low <= value <= self.high

    def reserve(self, value: int) -> None:
        if not self.contains(value):
            raise NotInRange(value)
        if value in self.used:
            raise AlreadyAllocated(value)
        self.used.add(value)

    def release(self, value: int) -> None:
        self.used.discard(value)

    def scatter(self) -> None:
        """Move the next-free cursor to a random place in the dynamic band (upstream's allocators
        start at a random offset): two API servers that collided stop picking in lockstep."""
        self._cursor = random.randint(self.dynamic_start, self.high)

    def next_free(self) -> int:
        """The next free value at or after the cursor in the dynamic band, then the static band."""
        if len(self.used) >= self.size:
            raise RangeFull()
        for start, end in ((self._cursor, self.high), (self.dynamic_start, self._cursor - 1),
                           (self.low, self.dynamic_start - 1)):
            value = start
            while value <= end:
                if value not in self.used:
                    self.used.add(value)
                    self._cursor = value + 1 if value < self.high else self.dynamic_start
                    return value
                value += 1
        raise RangeFull()


class IPRange:
    """One service CIDR: usable addresses exclude the network address (and IPv4 broadcast)."""

    def __init__(self, cidr: str) -> None:
        try:
            self.network = ipaddress.ip_network(cidr, strict=False)
        except ValueError as e:
            raise ValueError(f"--service-cluster-ip-range: invalid CIDR {cidr!r}: {e}") from None
        self.cidr = str(self.network)
        self.family = "IPv4" if self.network.version == 4 else "IPv6"
        total = self.network.num_addresses
        last = total - 2 if self.network.version == 4 else total - 1
        # Upstream caps huge IPv6 ranges the same way: nobody needs more than 2^20 service IPs.
        last = min(last, 1 << 20)
        if last < 1:
            raise ValueError(f"--service-cluster-ip-range: {cidr} is too small")
        band = min(max(16, (last + 1) // 16), 256)
        self.offsets = OffsetRange(1, last, band)
        self.base = int(self.network.network_address)

    def offset_of(self, ip: str) -> int:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise NotInRange(ip) from None
        if addr not in self.network:
            raise NotInRange(ip)
        offset = int(addr) - self.base
        if not self.offsets.contains(offset):
            raise NotInRange(ip)
        return offset

    def ip_of(self, offset: int) -> str:
        return str(ipaddress.ip_address(self.base + offset))

    def reserve(self, ip: str) -> None:
        self.offsets.reserve(self.offset_of(ip))

    def release(self, ip: str) -> None:
        try:
            self.offsets.release(self.offset_of(ip))
        except NotInRange:
            pass

    def allocate_next(self) -> str:
        return self.ip_of(self.offsets.next_free())


def _needs_node_ports(spec: Obj) -> bool:
    if spec.get("type") == "NodePort":
        return True
    return spec.get("type") == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts", True) is not False


def _needs_health_check(spec: Obj) -> bool:
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def _spec(svc: Obj) -> Obj:
    spec = svc.get("spec")
    return spec if isinstance(spec, dict) else {}


def _ports(spec: Obj) -> list[Obj]:
    ports = spec.get("ports")
    return [p for p in ports if isinstance(p, dict)] if isinstance(ports, list) else []


def _cluster_ips(spec: Obj) -> list[str]:
    ips = spec.get("clusterIPs")
    if isinstance(ips, list) and ips:
        return [ip for ip in ips if isinstance(ip, str)]
    ip = spec.get("clusterIP")
    return [ip] if isinstance(ip, str) and ip else []


def _node_ports(spec: Obj) -> set[int]:
    ports = {p["nodePort"] for p in _ports(spec) if isinstance(p.get("nodePort"), int) and p["nodePort"]}
    hc = spec.get("healthCheckNodePort")
    if isinstance(hc, int) and hc:
        ports.add(hc)
    return ports


class _Txn:
    """What one assign() took, so a failure gives all of it back."""

    def __init__(self) -> None:
        self.ips: list[tuple[IPRange, str]] = []
        self.ports: list[int] = []


class ServiceAllocator:
    def __init__(self, service_cidrs: list[str] | None = None,
                 node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE) -> None:
        cidrs = list(service_cidrs or [DEFAULT_SERVICE_CIDR])
        if len(cidrs) > 2:
            raise ValueError("--service-cluster-ip-range: at most two CIDRs (one per IP family) may be given")
        self.ranges = [IPRange(c) for c in cidrs]
        if len(self.ranges) == 2 and self.ranges[0].family == self.ranges[1].family:
            raise ValueError("--service-cluster-ip-range: two CIDRs must be of different IP families (dual-stack)")
        self.by_family = {r.family: r for r in self.ranges}
        # The CIDRs of the other Ready ServiceCIDR objects (servicecidrs.py keeps them): a family's
        # addresses come from its flag range first, then from these in order, as upstream's
        # allocator takes ClusterIPs from every Ready ServiceCIDR.
        self.extra: dict[str, IPRange] = {}
        low, high = node_port_range
        if not 0 < low <= high <= 65535:
            raise ValueError(f"--service-node-port-range: invalid range {low}-{high}")
        self.port_range_text = f"{low}-{high}"
        band = min(max(16, (high - low + 1) // 32), 128)
        self.node_ports = OffsetRange(low, high, band)
        # ClusterIPs held for one Service whatever its lifetime ("namespace/name" by IP): the
        # kubernetes Service's address stays out of every other Service's reach even while that
        # Service is deleted and waits for the bootstrap controller to re-create it.
        self.reserved: dict[str, str] = {}
        # What the last assign() picked itself (not asked for by the client): the values an etcd
        # write may re-pick when another API server took them first (EtcdReservations).
        self.last_dynamic: set[str | int] = set()

    def set_extra_ranges(self, cidrs: Iterable[str], existing_services: Callable[[], Iterable[Obj]]) -> None:
        """The additional ranges are now cidrs; a range kept keeps what it had allocated, a new one
        first marks what existing_services() hold in it. A CIDR overlapping a flag range or an
        earlier one adds nothing: each address has one range, so it cannot be handed out twice
        (upstream keeps one IPAddress object per address instead; a supernet's other addresses
        are not used here)."""
        kept: dict[str, IPRange] = {}
        for text in cidrs:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                continue  # stored around validation: that object only is left out
            taken = (r.network for r in (*self.ranges, *kept.values()) if r.network.version == net.version)
            if any(net.overlaps(other) for other in taken):
                continue
            cidr = str(net)
            try:
                kept[cidr] = self.extra.get(cidr) or IPRange(cidr)
            except ValueError:
                continue  # no usable address (a /32, a /128): nothing to allocate from
        added = kept.keys() - self.extra.keys()
        self.extra = kept
        if added:
            self.load(existing_services())

    def _family_ranges(self, family: str) -> list[IPRange]:
        first = self.by_family.get(family)
        return ([first] if first is not None else []) + [r for r in self.extra.values() if r.family == family]

    def _range_of(self, ip: str) -> IPRange | None:
        """The range ip is a usable address of (its family's flag range first), or None."""
        for rng in self._family_ranges(_family_of(ip) or ""):
            try:
                rng.offset_of(ip)
            except NotInRange:
                continue
            return rng
        return None

    def first_ip(self) -> str:
        """The first usable address of the primary range: the kubernetes Service's ClusterIP."""
        return self.ranges[0].ip_of(self.ranges[0].offsets.low)

    def reserve_for(self, ip: str, namespace: str, name: str, *, held_by_owner: bool) -> bool:
        """Hold ip for namespace/name only, now and after that Service is deleted.

        held_by_owner: the stored namespace/name already has ip (load() marked it used). False when
        ip is out of range or something else holds it (a Service stored before the reservation
        existed); the caller tries again once that Service is gone.
        """
        owner = f"{namespace}/{name}"
        if self.reserved.get(ip) == owner:
            return True
        rng = self.by_family.get(_family_of(ip) or "")
        if rng is None:
            return False
        try:
            rng.reserve(ip)
        except NotInRange:
            return False
        except AlreadyAllocated:
            if not held_by_owner:
                return False
        self.reserved[ip] = owner
        return True

    @property
    def dual_stack(self) -> bool:
        return len(self.ranges) == 2

    @property
    def families(self) -> list[str]:
        return [r.family for r in self.ranges]

    # --- startup -----------------------------------------------------------------------------------

    def load(self, existing_services: Iterable[dict[str, Any]]) -> None:
        """Mark what stored services already hold (values out of today's ranges are ignored)."""
        for svc in existing_services:
            spec = _spec(svc)
            for ip in _cluster_ips(spec):
                self.reserve_ip_if_free(ip)
            for port in _node_ports(spec):
                self.reserve_node_port_if_free(port)

    def reserve_node_port_if_free(self, port: int) -> None:
        try:
            self.node_ports.reserve(port)
        except (NotInRange, AlreadyAllocated):
            pass

    def scatter(self) -> None:
        """Every range's next-free cursor to a random place (see OffsetRange.scatter)."""
        for cursor in (*(r.offsets for r in self.ranges), self.node_ports):
            cursor.scatter()

    def reserve_ip_if_free(self, ip: str) -> None:
        """Mark ip used if it is in a range and free (a stored or another server's value)."""
        rng = self._range_of(ip)
        if rng is None:
            return
        try:
            rng.reserve(ip)
        except (NotInRange, AlreadyAllocated):
            pass

    # --- assign ------------------------------------------------------------------------------------

    def assign(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        """Fill the allocated fields of a Service being created (old None) or updated, in place.

        Never releases anything: what an update gives up (old's values it no longer holds) stays
        taken until the write commits, then the caller returns it with release(old, new). A failed
        write is undone with release(obj, old) (release(obj) for a create).
        """
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return
        old_spec = old.get("spec") if old is not None and isinstance(old.get("spec"), dict) else None
        meta = obj.get("metadata") or {}
        name = str(meta.get("name", ""))
        owner = f'{meta.get("namespace", "")}/{name}'
        if old_spec is not None:
            self._patch_allocated_values(spec, old_spec)
            self._drop_type_dependent_fields(spec, old_spec)
        old_ips = set(_cluster_ips(old_spec)) if old_spec is not None else set()
        old_ports = _node_ports(old_spec) if old_spec is not None else set()
        txn = _Txn()
        self.last_dynamic = set()
        try:
            self._assign_ips(spec, old_spec, name, owner, old_ips, txn)
            self._assign_node_ports(spec, name, old_ports, txn)
        except BaseException:
            self._rollback(txn)
            raise

    def _patch_allocated_values(self, spec: Obj, old_spec: Obj) -> None:
        """An update that omits allocated values keeps them (kubectl replace/apply send none)."""
        if spec.get("type") != "ExternalName" and old_spec.get("type") != "ExternalName":
            if not spec.get("clusterIP") and not spec.get("clusterIPs") and old_spec.get("clusterIP"):
                spec["clusterIP"] = old_spec["clusterIP"]
                spec["clusterIPs"] = list(_cluster_ips(old_spec))
                if not spec.get("ipFamilies") and old_spec.get("ipFamilies"):
                    spec["ipFamilies"] = list(old_spec["ipFamilies"])
            if not spec.get("ipFamilyPolicy") and old_spec.get("ipFamilyPolicy"):
                spec["ipFamilyPolicy"] = old_spec["ipFamilyPolicy"]
            if not spec.get("ipFamilies") and old_spec.get("ipFamilies") and \
                    _cluster_ips(spec) == _cluster_ips(old_spec):
                spec["ipFamilies"] = list(old_spec["ipFamilies"])
        if _needs_node_ports(old_spec) and _needs_node_ports(spec):
            used_both = ({p.get("nodePort") for p in _ports(old_spec)} &
                         {p.get("nodePort") for p in _ports(spec)})
            by_name = {p.get("name", ""): p.get("nodePort") for p in _ports(old_spec)}
            for port in _ports(spec):
                if not port.get("nodePort"):
                    old_value = by_name.get(port.get("name", ""))
                    if old_value and old_value not in used_both:
                        port["nodePort"] = old_value
        if _needs_health_check(old_spec) and _needs_health_check(spec) and not spec.get("healthCheckNodePort"):
            if old_spec.get("healthCheckNodePort"):
                spec["healthCheckNodePort"] = old_spec["healthCheckNodePort"]

    @staticmethod
    def _drop_type_dependent_fields(spec: Obj, old_spec: Obj) -> None:
        """Changing type drops what only the old type needed, unless the user changed it on purpose."""
        if spec.get("type") == "ExternalName" and old_spec.get("type") != "ExternalName":
            for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
                if spec.get(key) == old_spec.get(key):
                    spec.pop(key, None)
        if not _needs_node_ports(spec) and _needs_node_ports(old_spec):
            old_by_name = {p.get("name", ""): p.get("nodePort") for p in _ports(old_spec)}
            for port in _ports(spec):
                if port.get("nodePort") and port.get("nodePort") == old_by_name.get(port.get("name", "")):
                    port.pop("nodePort", None)
        if not _needs_health_check(spec) and spec.get("healthCheckNodePort") == old_spec.get("healthCheckNodePort"):
            spec.pop("healthCheckNodePort", None)
        if old_spec.get("type") == "LoadBalancer" and spec.get("type") != "LoadBalancer":
            for key in ("allocateLoadBalancerNodePorts", "loadBalancerClass"):
                if spec.get(key) == old_spec.get(key):
                    spec.pop(key, None)
        if externally_accessible(old_spec) and not externally_accessible(spec) and \
                spec.get("externalTrafficPolicy") == old_spec.get("externalTrafficPolicy"):
            spec.pop("externalTrafficPolicy", None)

    def _assign_ips(self, spec: Obj, old_spec: Obj | None, name: str, owner: str, old_ips: set[str],
                    txn: _Txn) -> None:
        if spec.get("type") == "ExternalName":
            return
        old_with_ips = old_spec if old_spec is not None and old_spec.get("type") != "ExternalName" else None
        init_ip_families(spec, old_with_ips, self.families, name)
        families = spec["ipFamilies"]
        ips = _cluster_ips(spec)
        if ips[:1] == ["None"]:
            spec["clusterIP"] = "None"
            spec["clusterIPs"] = ["None"]
            return
        result: list[str] = []
        for i, family in enumerate(families):
            wanted = ips[i] if i < len(ips) else ""
            rng = (self._range_of(wanted) if wanted else None) or self.by_family[family]
            if wanted and wanted in old_ips:
                result.append(wanted)  # the update keeps its own address
                continue
            if wanted and self.reserved.get(wanted) == owner:
                # Its reserved address: already marked used, and not part of txn so that a failed
                # write does not give it back.
                result.append(wanted)
                continue
            if wanted:
                try:
                    rng.reserve(wanted)
                except AlreadyAllocated:
                    self._ip_error(name, ips, f"failed to allocate IP {wanted}: provided IP is already allocated")
                except NotInRange:
                    valid = ", ".join(r.cidr for r in self._family_ranges(family))
                    self._ip_error(name, ips, f"failed to allocate IP {wanted}: the provided IP ({wanted}) is not "
                                              f"in the valid range. The range of valid IPs is {valid}")
                txn.ips.append((rng, wanted))
                result.append(wanted)
                continue
            rng, ip = self._allocate_next(family)
            txn.ips.append((rng, ip))
            self.last_dynamic.add(ip)
            result.append(ip)
        spec["clusterIP"] = result[0]
        spec["clusterIPs"] = result

    def _allocate_next(self, family: str) -> tuple[IPRange, str]:
        for rng in self._family_ranges(family):
            try:
                return rng, rng.allocate_next()
            except RangeFull:
                continue
        raise StatusError(500, "InternalError", "Internal error occurred: failed to allocate a serviceIP: range is full")

    @staticmethod
    def _ip_error(name: str, ips: list[str], detail: str) -> None:
        errs = FieldErrors()
        errs.invalid("spec.clusterIPs", ips, detail)
        errs.raise_if_any("Service", name)

    def _assign_node_ports(self, spec: Obj, name: str, old_ports: set[int], txn: _Txn) -> None:
        errs = FieldErrors()
        if _needs_node_ports(spec):
            by_service_port: dict[Any, int] = {}
            for i, port in enumerate(_ports(spec)):
                wanted = port.get("nodePort")
                if wanted:
                    if wanted not in old_ports and wanted not in txn.ports:
                        self._reserve_port(errs, f"spec.ports[{i}].nodePort", wanted, txn, "")
                    by_service_port.setdefault(port.get("port"), wanted)
                    continue
                shared = by_service_port.get(port.get("port"))
                if shared:
                    port["nodePort"] = shared  # same port number, other protocol: same node port
                    continue
                value = self._next_port(txn, "nodePort")
                port["nodePort"] = value
                by_service_port[port.get("port")] = value
        if _needs_health_check(spec):
            wanted = spec.get("healthCheckNodePort")
            if wanted:
                if wanted not in old_ports:
                    self._reserve_port(errs, "spec.healthCheckNodePort", wanted, txn,
                                       f"failed to allocate requested HealthCheck NodePort {wanted}: ")
            else:
                spec["healthCheckNodePort"] = self._next_port(txn, "health check nodePort")
        errs.raise_if_any("Service", name)

    def _reserve_port(self, errs: FieldErrors, path: str, wanted: Any, txn: _Txn, prefix: str) -> None:
        if not isinstance(wanted, int):
            errs.invalid(path, wanted, "must be an integer")
            return
        try:
            self.node_ports.reserve(wanted)
        except AlreadyAllocated:
            errs.invalid(path, wanted, prefix + "provided port is already allocated")
            return
        except NotInRange:
            errs.invalid(path, wanted, prefix + "provided port is not in the valid range. The range of valid ports "
                                                f"is {self.port_range_text}")
            return
        txn.ports.append(wanted)

    def _next_port(self, txn: _Txn, what: str) -> int:
        try:
            value = self.node_ports.next_free()
        except RangeFull:
            raise StatusError(500, "InternalError",
                              f"Internal error occurred: failed to allocate a {what}: range is full") from None
        txn.ports.append(value)
        self.last_dynamic.add(value)
        return value

    def _rollback(self, txn: _Txn) -> None:
        for rng, ip in txn.ips:
            rng.release(ip)
        for port in txn.ports:
            self.node_ports.release(port)

    # --- release -----------------------------------------------------------------------------------

    def _release_ip(self, ip: str) -> None:
        if ip in self.reserved:
            return  # held for its owner beyond the Service's lifetime (reserve_for)
        rng = self._range_of(ip)
        if rng is not None:
            rng.release(ip)

    def release(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        """Give back what obj holds beyond old (everything when old is None), keeping old's.

        release(svc) after a delete or a failed create; release(new, old) after a failed update;
        release(old, new) after a committed update, for what the update gave up.
        """
        spec = _spec(obj)
        old_spec = _spec(old) if old is not None else {}
        keep_ips = set(_cluster_ips(old_spec))
        keep_ports = _node_ports(old_spec)
        for ip in _cluster_ips(spec):
            if ip != "None" and ip not in keep_ips:
                self._release_ip(ip)
        for port in _node_ports(spec) - keep_ports:
            self.node_ports.release(port)
        for ip in keep_ips:
            if ip != "None":
                self.reserve_ip_if_free(ip)
        for port in keep_ports:
            try:
                self.node_ports.reserve(port)
            except (NotInRange, AlreadyAllocated):
                pass

    # --- introspection for tests and metrics -------------------------------------------------------

    def allocated_ips(self) -> int:
        return sum(len(r.offsets.used) for r in (*self.ranges, *self.extra.values()))

    def allocated_node_ports(self) -> int:
        return len(self.node_ports.used)



# --- several API servers on one etcd ---------------------------------------------------------------

SERVICES_PREFIX = "/registry/services/"


def reservation_names(svc: Obj | None) -> set[str]:
    """The allocation keys a Service holds (kube's IPAddress objects, one per value):
    ranges/serviceips/IP and ranges/servicenodeports/PORT."""
    if svc is None:
        return set()
    spec = _spec(svc)
    names = {f"ranges/serviceips/{ip}" for ip in _cluster_ips(spec) if ip != "None"}
    names |= {f"ranges/servicenodeports/{p}" for p in _node_ports(spec)}
    return names


class EtcdReservations:
    """Keeps ClusterIPs and NodePorts unique across API servers sharing one etcd.

    Each API server allocates from its own ServiceAllocator (fast, in memory), and the allocation is
    made binding by the same etcd transaction that writes the Service: it creates one key per value
    it takes, compared absent (create_revision == 0), and deletes the keys of the values it gives
    up. Two servers that picked the same value race in etcd; the loser's transaction writes nothing,
    and the loser re-picks the values it chose itself (a value the client asked for gets the usual
    422 "provided ... is already allocated"). Every server also follows the others' Service writes
    through its store's mirror (observe), so its allocator rarely picks a value already taken.
    """

    def __init__(self, allocator: ServiceAllocator, internal_key: Callable[[str], bytes]) -> None:
        self.allocator = allocator
        self.internal_key = internal_key  # "ranges/..." -> the etcd key under the store's prefix
        self._dynamic: dict[int, set[str | int]] = {}
        self.conflicts = 0

    def ops(self, key: str, new: Obj | None, old: Obj | None) -> tuple[list[Cmp], list[Op], list[bytes]]:
        if not key.startswith(SERVICES_PREFIX):  # every other write (first: it is most of them)
            return [], [], []
        from ..store.etcd_client import Delete, Put, cmp_create

        if new is not None:
            self._dynamic[id(new)] = set(self.allocator.last_dynamic)
            if len(self._dynamic) > 4096:  # entries of writes that ended without a conflict: the oldest go
                for k in list(self._dynamic)[:2048]:
                    del self._dynamic[k]
        owner = key[len(SERVICES_PREFIX):].encode()
        want, have = reservation_names(new), reservation_names(old)
        cmps: list[Cmp] = []
        ops: list[Op] = []
        reserved: list[bytes] = []
        for name in sorted(want - have):
            rkey = self.internal_key(name)
            cmps.append(cmp_create(rkey, 0))
            ops.append(Put(rkey, owner))
            reserved.append(rkey)
        ops.extend(Delete(self.internal_key(name)) for name in sorted(have - want))
        return cmps, ops, reserved

    def retry(self, obj: Obj, old: Obj | None, taken: list[str]) -> None:
        """Another API server took some of obj's new values: re-pick them (see class doc)."""
        self.conflicts += 1
        dynamic = self._dynamic.pop(id(obj), set())
        self.allocator.release(obj, old)
        # Both servers walk their ranges from the same cursor: after a collision, jump to a random place.
        self.allocator.scatter()
        spec = _spec(obj)
        for name in taken:
            kind, _, value = name.rpartition("/")
            if kind.endswith("serviceips"):
                self.allocator.reserve_ip_if_free(value)  # someone else's now
                if value in dynamic:
                    spec.pop("clusterIP", None)
                    spec.pop("clusterIPs", None)
            elif kind.endswith("servicenodeports") and value.isdigit():
                port = int(value)
                self.allocator.reserve_node_port_if_free(port)
                if port in dynamic:
                    for p in _ports(spec):
                        if p.get("nodePort") == port:
                            p.pop("nodePort", None)
                    if spec.get("healthCheckNodePort") == port:
                        spec.pop("healthCheckNodePort", None)
        self.allocator.assign(obj, old)
        # Values picked on an earlier attempt and kept stay this server's picks for the next one.
        self.allocator.last_dynamic |= dynamic

    def observe(self, ev: Event) -> None:
        """A Service write from the store's mirror (any API server's): mark its values used and give
        back what it released. Idempotent, so this server's own writes pass through harmlessly."""
        if not ev.key.startswith(SERVICES_PREFIX):
            return
        new = ev.obj if ev.type != "DELETED" else None
        prev = ev.prev
        if prev is not None:
            self.allocator.release(prev, new)
        if new is not None:
            self.allocator.load([new])

"""The Kubernetes DNS-based service discovery specification (schema 1.1.0) as a record index.

Services and EndpointSlices go in; pre-encoded responses keyed by (lowercase wire name, qtype)
come out, in the dict the hot path (wire.impl.Table) reads. Each Service's records are rebuilt
only when that Service or one of its EndpointSlices changes, so a watch event costs a handful
of encodes, not a zone rebuild. Record shapes follow kubernetes/dns docs/specification.md and
CoreDNS's kubernetes plugin where the spec leaves a choice (dashed-IP endpoint names, SRV
weights, "pods insecure" pod records).
"""
from __future__ import annotations

import ipaddress
import logging
import struct
import sys
import time
from collections.abc import Iterable
from typing import Any, cast

from kdns import wire
from kdns.objects import EndpointSlice, Service, Shared
from kdns.wire import AAAA, CNAME, NS, PTR, RR, SOA, SRV, TXT, A, Message, Question

SCHEMA_VERSION = "1.1.0"
RESPONSE_FLAGS = wire.QR | wire.AA | wire.RA
# An ExternalName's CNAME answers every query type for its name; these are pre-encoded.
CNAME_QTYPES = (A, AAAA, CNAME, SRV, TXT, PTR, wire.MX, NS, SOA)
ServiceKey = tuple[str, str]
RRKey = tuple[str, int]  # (lowercase owner, type)
# What one Service contributes, computed from its objects when needed: RRKey -> the rdata of
# each record (RR objects are only built while encoding).
Contrib = dict[RRKey, list[object]]
_APEX: ServiceKey = ("", "")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
log = logging.getLogger("kdns.records")
_SLICE_FAMILY = {"IPv4": 4, "IPv6": 6}
_HEX_DASH = frozenset("0123456789abcdef-")


def dashed(ip: str) -> str:
    """Endpoint name for an address without a hostname, as CoreDNS: 10-0-0-1, fd00--1."""
    return ip.replace(".", "-").replace(":", "-")


def _family(ip: IP) -> int:
    return int(AAAA if ip.version == 6 else A)


def parse_ip(text: str, version: int = 0) -> IP | None:
    """An address read from the API as a typed value (of that IP version when given), or None:
    what is not an address (or carries a zone index, which no DNS record can hold) gets no record,
    and the rest of its object is still served."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if version and ip.version != version or isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None
    return ip


def pod_ip(label: str) -> IP | None:
    """The address a pod name's first label spells, by CoreDNS's rule: three dashes and no "--"
    is an IPv4 address (10-244-1-7), anything else an IPv6 address with ":" written "-"
    (fd00--7, fd00-10-244--7)."""
    if label.count("-") == 3 and "--" not in label:
        return parse_ip(label.replace("-", "."), 4)
    if not _HEX_DASH.issuperset(label):
        return None  # also keeps "%zone" and IPv4-in-IPv6 tails out
    return parse_ip(label.replace("-", ":"), 6)


class ZoneIndex:
    """Cluster records for one zone; call set_service/delete_service/set_slice/delete_slice as
    watch events arrive, and mark_synced once both lists are in."""

    def __init__(self, zone: str = "cluster.local", ttl: int = 5, table: Any = None) -> None:
        self.zone = zone.strip(".").lower()
        self.ttl = ttl
        self.table = table if table is not None else wire.impl.Table()
        self.services: dict[ServiceKey, Service] = {}
        self.shared: Shared = {}  # equal parts of the objects kept, stored once (objects.share)
        self.slices: dict[ServiceKey, EndpointSlice] = {}
        self.slices_by_service: dict[ServiceKey, set[ServiceKey]] = {}
        # RRset keys (wire owner + type; type 0 marks a name that exists without records) per
        # Service, and who holds each RRset: one ServiceKey almost always, a set when several do
        # (a pod IP in two headless Services).
        self.keys_of: dict[ServiceKey, tuple[bytes, ...]] = {}
        self.holders: dict[bytes, ServiceKey | set[ServiceKey]] = {}
        # Existing names (wire, lowercase) with how many owners keep each alive; the hot path
        # only asks `name in names` to tell NODATA from NXDOMAIN.
        self.names: dict[bytes, int] = {}
        self.answers: dict[bytes, bytes] = {}
        self.pending: set[ServiceKey] = set()  # objects changed, answers not re-encoded yet
        self._warned: set[tuple[ServiceKey, str]] = set()  # bad addresses logged once
        self.synced = False
        self.serial = int(time.time()) & 0xFFFFFFFF
        self.mname = f"ns.dns.{self.zone}"
        self.soa_data = (self.mname, f"hostmaster.{self.zone}", self.serial, 7200, 1800, 86400, ttl)
        self._zone_wire = wire.name_to_wire(self.zone)
        self._pod_wire = wire.name_to_wire(f"pod.{self.zone}")
        self._soa_tail = self._encode_soa_tail()
        self._mname_wire = wire.name_to_wire(self.mname)
        self._ns_key = self._rrkey(self.zone, NS)
        self._apply(_APEX, self._apex_records())
        self._publish()

    # ----------------------------------------------------------------------- object events

    def set_service(self, svc: Service) -> None:
        self.services[svc.key] = svc.compact(self.shared)
        self._refresh(svc.key)

    def delete_service(self, key: ServiceKey) -> None:
        self.services.pop(key, None)
        self._refresh(key)

    def set_slice(self, eps: EndpointSlice) -> None:
        eps.compact(self.shared)
        old = self.slices.get(eps.key)
        self.slices[eps.key] = eps
        old_svc = old.service_key if old is not None else None
        new_svc = eps.service_key
        if old_svc is not None and old_svc != new_svc:
            self.slices_by_service.get(old_svc, set()).discard(eps.key)
            self._refresh(old_svc)
        if new_svc is not None:
            self.slices_by_service.setdefault(new_svc, set()).add(eps.key)
            self._refresh(new_svc)

    def delete_slice(self, key: ServiceKey) -> None:
        old = self.slices.pop(key, None)
        if old is not None and old.service_key is not None:
            self.slices_by_service.get(old.service_key, set()).discard(key)
            self._refresh(old.service_key)

    def replace(self, services: Iterable[Service] | None = None,
                slices: Iterable[EndpointSlice] | None = None, *, defer: bool = False) -> None:
        """Swap in a full list (initial list or relist): services and/or slices. Only Services
        whose object or slices differ are re-encoded, so a relist after 410 Gone does not stall
        the server for a zone rebuild."""
        touched: set[ServiceKey] = set()
        if services is not None:
            new = {s.key: s.compact(self.shared) for s in services}
            old = self.services
            touched |= {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            self.services = new
        if slices is not None:
            new_slices = {e.key: e.compact(self.shared) for e in slices}
            for k in self.slices.keys() | new_slices.keys():
                a, b = self.slices.get(k), new_slices.get(k)
                if a != b:
                    touched |= {e.service_key for e in (a, b) if e is not None and e.service_key is not None}
            self.slices = new_slices
            self.slices_by_service = {}
            for eps in self.slices.values():
                if eps.service_key is not None:
                    self.slices_by_service.setdefault(eps.service_key, set()).add(eps.key)
        if defer:
            # The caller re-encodes in slices between queries (encode_pending): a 10,000-Service
            # list must not stall the event loop for seconds.
            self.pending |= touched
            return
        for key in touched:
            self._refresh(key, publish=False)
        self._publish()

    def encode_pending(self, budget: int = 200) -> bool:
        """Re-encode up to `budget` Services left by replace(defer=True); True when none are left."""
        for _ in range(min(budget, len(self.pending))):
            self._refresh(self.pending.pop(), publish=False)
        self._publish()
        if self.pending:
            return False
        # A set keeps its largest table when emptied: half a MiB after a 10,000-Service list.
        self.pending = set()
        return True

    def mark_synced(self, synced: bool = True) -> None:
        self.synced = synced
        self._publish()

    # ------------------------------------------------------------------------- records

    def _rr(self, owner: str, rtype: int, data: object) -> RR:
        return RR(owner, rtype, self.ttl, data)

    def _apex_records(self) -> Contrib:
        z = self.zone
        return {
            (z, SOA): [self.soa_data],
            (z, NS): [self.mname],
            (f"dns-version.{z}", TXT): [(SCHEMA_VERSION,)],
            (f"pod.{z}", 0): [],  # an empty non-terminal: pod names are synthesized
        }

    def _service_records(self, key: ServiceKey) -> Contrib:
        svc = self.services.get(key)
        if svc is None:
            return {}
        ns, name = key
        base = sys.intern(f"{name}.{ns}.svc.{self.zone}".lower())
        out: Contrib = {}

        def add(owner: str, rtype: int, data: object) -> None:
            out.setdefault((sys.intern(owner.lower()), rtype), []).append(data)

        spec = svc.spec
        if spec.type == "ExternalName":
            if spec.external_name:
                add(base, CNAME, spec.external_name.strip(".").lower())
            return out
        if not svc.headless:
            # clusterIPs holds one address per family (primary first); a dual-stack Service has
            # an A and an AAAA record and a PTR for each.
            ips = self._addresses(key, [t for t in (spec.cluster_ips or [spec.cluster_ip]) if t and t != "None"])
            for ip in ips:
                add(base, _family(ip), str(ip))
                add(ip.reverse_pointer, PTR, base)
            if key == ("kube-system", "kube-dns"):
                for ip in ips:
                    add(self.mname, _family(ip), str(ip))
            for port in spec.ports or []:
                if port.name:
                    add(f"_{port.name}._{port.protocol.lower()}.{base}", SRV, (0, 100, port.port, base))
            out.setdefault((base, 0), [])  # the name exists even with no address of a family
            return out
        # Headless: the endpoints' addresses, per-endpoint names, per-endpoint SRV targets. A
        # dual-stack headless Service has a slice set per family: a pod with a hostname has its A
        # and AAAA under one name (one SRV target), one without has a dashed name per address.
        out.setdefault((base, 0), [])
        seen: set[str] = set()
        srv: dict[str, dict[tuple[int, str], None]] = {}  # owner -> (port, target), once each
        for skey in sorted(self.slices_by_service.get(key, ())):
            eps = self.slices[skey]
            version = _SLICE_FAMILY.get(eps.address_type)
            if version is None:
                continue  # FQDN slices carry no addresses DNS can serve
            for ep in eps.endpoints or []:
                if not spec.publish_not_ready_addresses and ep.conditions.ready is False:
                    continue
                # one address per endpoint (discovery.k8s.io/v1), of the slice's family
                for parsed in self._addresses(key, ep.addresses[:1], version):
                    text = str(parsed)
                    host = (ep.hostname or dashed(text)).lower()
                    target = f"{host}.{base}"
                    if text not in seen:
                        add(base, _family(parsed), text)
                        seen.add(text)
                    if text not in out.get((target, _family(parsed)), ()):
                        add(target, _family(parsed), text)
                        add(parsed.reverse_pointer, PTR, target)
                    for port in eps.ports or []:
                        if port.name and port.port is not None:
                            owner = f"_{port.name}._{(port.protocol or 'TCP').lower()}.{base}"
                            srv.setdefault(owner, {})[(port.port, target)] = None
        for owner, targets in srv.items():
            weight = max(1, 100 // len(targets))
            for port_number, target in targets:
                add(owner, SRV, (0, weight, port_number, target))
        return out

    def _addresses(self, key: ServiceKey, texts: Iterable[str], version: int = 0) -> list[IP]:
        """The parsed addresses of texts; one that does not parse (or is not of the slice's family)
        is left out with a warning, and the Service keeps its other records."""
        out: list[IP] = []
        for text in texts:
            ip = parse_ip(text, version)
            if ip is None and (key, text) not in self._warned:
                if len(self._warned) >= 1024:  # bounded: a flood of bad objects cannot grow it
                    self._warned.clear()
                self._warned.add((key, text))
                log.warning("service=%s/%s: address %r skipped: not an IPv%s address", key[0], key[1],
                            text[:64], version or "4/IPv6")
            elif ip is not None:
                out.append(ip)
        return out

    # ---------------------------------------------------------------------- maintenance
    #
    # Only what the hot path reads is kept per record: the encoded answers and the existing
    # names. Which Service holds which RRset is kept as the RRset's key bytes; the record data is
    # recomputed from the (trimmed) objects when an RRset must be re-encoded, which is cheap
    # because it happens only for the Services a watch event touched.

    def _records_of(self, key: ServiceKey) -> Contrib:
        return self._apex_records() if key == _APEX else self._service_records(key)

    def _refresh(self, key: ServiceKey, publish: bool = True) -> None:
        self.pending.discard(key)
        self._apply(key, self._records_of(key))
        if publish:
            self._publish()

    def _rrkey(self, owner: str, rtype: int) -> bytes:
        return bytes(wire.name_to_wire(owner) + struct.pack("!H", rtype))

    def _apply(self, key: ServiceKey, new: Contrib) -> None:
        old_keys = self.keys_of.pop(key, ())
        # An existence marker (type 0) is only needed for a name with no records of its own: a
        # kept key per Service otherwise (about 0.7 MiB at 10,000 Services).
        owners = {owner for owner, rtype in new if rtype}
        new_map = {self._rrkey(owner, rtype): (owner, rtype) for owner, rtype in new
                   if rtype or owner not in owners}
        new_keys = tuple(new_map)
        if new_keys:
            self.keys_of[key] = new_keys
        old_set, new_set = set(old_keys), set(new_keys)
        for kb in old_set - new_set:
            self._unref_names(kb)
            cur = self.holders.get(kb)
            if cur == key:
                del self.holders[kb]
            elif isinstance(cur, set):
                cur.discard(key)
                if len(cur) == 1:
                    self.holders[kb] = cur.pop()
        for kb in new_set - old_set:
            self._ref_names(kb)
            if kb[-2:] == b"\x00\x00":
                continue  # an existence marker, no RRset
            cur = self.holders.get(kb)
            if cur is None:
                self.holders[kb] = key
            elif isinstance(cur, set):
                cur.add(key)
            elif cur != key:
                self.holders[kb] = {cur, key}
        others: dict[ServiceKey, Contrib] = {key: new}
        dirty = old_set | new_set
        if any(kb[:-2] == self._mname_wire for kb in dirty):
            dirty.add(self._ns_key)  # the apex NS answer carries the address of ns.dns.ZONE
        # Removals first, CNAMEs last: an ExternalName's CNAME is pre-encoded under the A/AAAA/...
        # keys of its name too, and a Service switching type must not have one step undo the other.
        for kb in sorted(dirty, key=lambda k: (k in self.holders, k[-2:] == b"\x00\x05")):
            if kb[-2:] != b"\x00\x00":
                self._encode(kb, new_map.get(kb), others)

    def _names_of(self, kb: bytes) -> list[bytes]:
        """The owner of an RRset key and every name up to the apex, if it is in the zone."""
        w = kb[:-2]
        zl = len(self._zone_wire)
        found: list[bytes] = []
        while len(w) >= zl:
            found.append(w)
            if w == self._zone_wire:
                return found  # reached the apex on a label boundary
            w = w[w[0] + 1:]
        return []

    def _ref_names(self, kb: bytes) -> None:
        for name in self._names_of(kb):
            self.names[name] = self.names.get(name, 0) + 1

    def _unref_names(self, kb: bytes) -> None:
        for name in self._names_of(kb):
            n = self.names.get(name, 0) - 1
            if n > 0:
                self.names[name] = n
            else:
                self.names.pop(name, None)

    def _gather(self, kb: bytes, owner: str, rtype: int, others: dict[ServiceKey, Contrib]) -> list[RR]:
        cur = self.holders.get(kb)
        if cur is None:
            return []
        out: list[RR] = []
        for k in sorted(cur) if isinstance(cur, set) else [cur]:
            recs = others.get(k)
            if recs is None:
                recs = others[k] = self._records_of(k)
            out += [RR(owner, rtype, self.ttl, d) for d in recs.get((owner, rtype), ())]
        return out

    def rrset(self, owner: str, rtype: int) -> list[RR]:
        owner = owner.lower()
        return self._gather(self._rrkey(owner, rtype), owner, rtype, {})

    def _encode(self, kb: bytes, ident: RRKey | None, others: dict[ServiceKey, Contrib]) -> None:
        rtype = struct.unpack("!H", kb[-2:])[0]
        owner = ident[0] if ident is not None else wire.wire_to_name(kb[:-2])
        answers = self._gather(kb, owner, rtype, others)
        wkey = kb[:-2]
        for qtype in CNAME_QTYPES if rtype == CNAME else (rtype,):
            k = kb if qtype == rtype else wkey + struct.pack("!H", qtype)
            if not answers:
                self.answers.pop(k, None)
                continue
            additional: list[RR] = []
            if rtype == SRV:
                for target in dict.fromkeys(str(cast(tuple[Any, ...], rr.data)[3]) for rr in answers):
                    for family in (A, AAAA):
                        additional += self._gather(self._rrkey(target, family), target, family, others)
            elif rtype == NS:
                for family in (A, AAAA):
                    additional += self._gather(self._rrkey(self.mname, family), self.mname, family, others)
            self.answers[k] = self._fit(owner, qtype, answers, additional)

    def _fit(self, owner: str, qtype: int, answers: list[RR], additional: list[RR]) -> bytes:
        """The encoded answer, no larger than a DNS message can be (64 KiB less room for the OPT
        record): a huge headless Service drops its SRV glue first, then the records that do not fit
        (a client may use any subset of an RRset; TC is left to the UDP size check)."""
        limit = 65535 - 11
        while True:
            msg = Message(id=0, flags=RESPONSE_FLAGS, questions=[Question(owner, qtype)],
                          answers=answers, authority=[], additional=additional)
            data: bytes = wire.encode_message(msg)
            if len(data) <= limit:
                return data
            if additional:
                additional = []
            else:
                answers = answers[: max(1, len(answers) * limit // len(data) - 1)]

    def _encode_soa_tail(self) -> bytes:
        mname, rname, *nums = self.soa_data
        rdata = wire.name_to_wire(str(mname)) + wire.name_to_wire(str(rname)) + struct.pack("!IIIII", *nums)
        return bytes(struct.pack("!HHIH", SOA, wire.CLASS_IN, self.ttl, len(rdata)) + rdata)

    def _publish(self) -> None:
        # The table holds references to the live dict/set, which change in place between queries
        # (one thread); update() only matters for the flags and the first call.
        self.table.update(self.answers, self.names, self._zone_wire, self._pod_wire, self._soa_tail,
                          self.synced)

    # ------------------------------------------------------------------- for the slow path

    def in_zone(self, name: str) -> bool:
        n = name.strip(".").lower()
        return n == self.zone or n.endswith("." + self.zone)

    def soa_rr(self) -> RR:
        return self._rr(self.zone, SOA, self.soa_data)

    def pod_answer(self, name: str, qtype: int) -> tuple[int, list[RR]] | None:
        """CoreDNS "pods insecure": A-B-C-D.NS.pod.ZONE answers A-B-C-D's address for any
        namespace without checking that such a pod exists. None if not a pod name."""
        n = name.strip(".").lower()
        suffix = f".pod.{self.zone}"
        if not n.endswith(suffix):
            return None
        labels = n[: -len(suffix)].split(".")
        if len(labels) == 1:
            return (wire.NOERROR, [])  # NS.pod.ZONE: an empty non-terminal
        if len(labels) != 2:
            return (wire.NXDOMAIN, [])
        ip = pod_ip(labels[0])
        if ip is None:
            return (wire.NXDOMAIN, [])
        return (wire.NOERROR, [self._rr(n, _family(ip), str(ip))] if qtype == _family(ip) else [])

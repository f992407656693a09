"""kproxy's ServiceCIDR watch: upstream's pkg/proxy/config ServiceCIDRConfig for the nftables mode.

The nftables proxier drops traffic to addresses of the service CIDRs that no Service has
(cluster-ips-check); the CIDRs are those of every networking.k8s.io ServiceCIDR object, handed to
the proxier whole on every change (upstream's OnServiceCIDRsChanged; each family's proxier keeps
its family's). Unlike upstream's handler, which adds and deletes one object's CIDRs in a shared
set (deleting one of two ServiceCIDRs with the same CIDR drops it from the set), the union is
recomputed from every object, and overlapping CIDRs are merged (one drop rule each).

Which API: discovery of networking.k8s.io/v1, then v1beta1 (1.31-1.32 with the beta enabled).
A server that serves neither (kube-apiserver before 1.31, or with the feature off) gets one log
line and no drop rule, as upstream behaves with the MultiCIDRServiceAllocator gate off; kproxy
works on without it.

Every CIDR is parsed (kproxy.kube.validate.cidr) before it can reach a rule: an object with a
CIDR that does not parse, or more than two, is skipped whole (one log line, counted in
kproxy_invalid_objects_total{kind="ServiceCIDR"}), the others still count.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable

import msgspec

from kproxy.kube.client import ApiClient, ApiError
from kproxy.kube.informer import Informer, object_key
from kproxy.kube.ingest import InvalidObject
from kproxy.kube.reflector import Backoff, Reflector
from kproxy.kube.types import ObjectMeta
from kproxy.kube.validate import InvalidField, cidr
from kproxy.model import CIDR

log = logging.getLogger("kproxy.servicecidrs")

GROUP = "networking.k8s.io"
VERSIONS = ("v1", "v1beta1")
MAX_CIDRS = 2  # spec.cidrs: one per family (upstream's validation)
# How long the first sync waits for the ServiceCIDR list once Services and EndpointSlices are
# listed: long enough that it normally has the drop rule (no second full sync just for it), short
# enough that a server refusing the list (RBAC) does not hold the node's rules back.
FIRST_SYNC_WAIT = 5.0

class ServiceCIDRSpec(msgspec.Struct, gc=False):
    cidrs: list[str] = []


class ServiceCIDR(msgspec.Struct, gc=False):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ServiceCIDRSpec = msgspec.field(default_factory=ServiceCIDRSpec)


class _Resource(msgspec.Struct, gc=False):
    name: str = ""


class _ResourceList(msgspec.Struct, gc=False):
    resources: list[_Resource] = []


def parse_service_cidr(obj: ServiceCIDR) -> tuple[CIDR, ...]:
    """The object's CIDRs in canonical text; InvalidObject if any does not parse or there are
    more than two."""
    key = object_key(obj)
    if len(obj.spec.cidrs) > MAX_CIDRS:
        raise InvalidObject("ServiceCIDR", key, InvalidField("cidr", "spec.cidrs", len(obj.spec.cidrs),
                                                             f"more than {MAX_CIDRS} CIDRs"))
    try:
        return tuple(cidr(c, f"spec.cidrs[{i}]") for i, c in enumerate(obj.spec.cidrs))
    except InvalidField as err:
        raise InvalidObject("ServiceCIDR", key, err) from None


def merge(cidrs: list[CIDR]) -> tuple[CIDR, ...]:
    """The union of cidrs as the fewest CIDRs, IPv4 first, each family in address order."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return tuple(CIDR(str(n)) for n in (*v4, *v6))


class ServiceCIDRSource:
    """run() finds the served version, then lists and watches ServiceCIDRs; on_change gets the
    merged CIDRs of all of them whenever that set changes."""

    def __init__(self, client: ApiClient, on_change: Callable[[tuple[CIDR, ...]], None], *,
                 on_invalid: Callable[[InvalidObject], None] | None = None,
                 on_undecodable: Callable[[], None] | None = None, backoff: Backoff | None = None) -> None:
        self.client = client
        self.on_change = on_change
        self.on_invalid = on_invalid
        self.on_undecodable = on_undecodable
        self.backoff = backoff or Backoff()
        self.path = ""  # the collection watched; "" until found, or when the server has none
        self.cidrs: tuple[CIDR, ...] = ()
        self._by_name: dict[str, tuple[CIDR, ...]] = {}
        self._listed = asyncio.Event()
        self._decoder = msgspec.json.Decoder(_ResourceList)

    async def wait_listed(self, timeout: float) -> bool:
        """True once the first list is in (or the server was found to have no ServiceCIDRs)."""
        try:
            await asyncio.wait_for(self._listed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _served_path(self) -> str:
        """The collection path of the first version that serves servicecidrs, "" if none does.
        Other failures (connection, 5xx, 403) are retried with backoff: only the server's word
        that it has no such resource turns the drop rule off."""
        while True:
            try:
                for version in VERSIONS:
                    try:
                        body = await self.client.get(f"/apis/{GROUP}/{version}")
                    except ApiError as err:
                        if err.code == 404:
                            continue
                        raise
                    if any(r.name == "servicecidrs" for r in self._decoder.decode(body).resources):
                        return f"/apis/{GROUP}/{version}/servicecidrs"
                return ""
            except asyncio.CancelledError:
                raise
            except (ApiError, OSError, TimeoutError, msgspec.DecodeError) as err:
                delay = self.backoff.next_delay(time.monotonic())
                log.warning('servicecidrs discovery error="%s: %s" retry_in=%.2fs', type(err).__name__, err, delay)
                await asyncio.sleep(delay)

    async def run(self) -> None:
        """Forever (until cancelled), also when the server has no ServiceCIDRs."""
        self.path = await self._served_path()
        if not self.path:
            log.info("the API server serves no ServiceCIDRs (%s %s): traffic to unallocated ClusterIPs is not "
                     "dropped", GROUP, "/".join(VERSIONS))
            self._listed.set()
            await asyncio.Event().wait()
        informer: Informer[ServiceCIDR] = Informer(self._on_event)
        reflector = Reflector(self.client, self.path, ServiceCIDR, informer, name="servicecidrs",
                              on_undecodable=self.on_undecodable)

        async def mark_listed() -> None:
            await reflector.wait_synced()
            log.info("synced servicecidrs=%d cidrs=%s", len(informer), ",".join(self.cidrs) or "-")
            self._listed.set()

        waiter = asyncio.create_task(mark_listed())
        try:
            await reflector.run()
        finally:
            waiter.cancel()

    def _on_event(self, old: ServiceCIDR | None, new: ServiceCIDR | None) -> None:
        if new is None:
            if old is not None:
                self._by_name.pop(object_key(old), None)
        else:
            try:
                self._by_name[object_key(new)] = parse_service_cidr(new)
            except InvalidObject as err:
                self._by_name.pop(object_key(new), None)
                if self.on_invalid is not None:
                    self.on_invalid(err)
                else:
                    log.warning("skipping invalid object: %s", err)
        cidrs = merge([c for cs in self._by_name.values() for c in cs])
        if cidrs != self.cidrs:
            self.cidrs = cidrs
            log.info("service CIDRs now %s", ",".join(cidrs) or "-")
            self.on_change(cidrs)


def for_proxier(client: ApiClient, proxier: object, request_sync: Callable[[], None], *,
                on_invalid: Callable[[InvalidObject], None] | None = None,
                on_undecodable: Callable[[], None] | None = None) -> ServiceCIDRSource | None:
    """A source feeding proxier.set_service_cidrs and asking for a sync on every change; None
    when the proxier takes no service CIDRs."""
    setter: Callable[[tuple[str, ...]], None] | None = getattr(proxier, "set_service_cidrs", None)
    if setter is None:
        return None

    def changed(cidrs: tuple[CIDR, ...]) -> None:
        setter(tuple(cidrs))
        request_sync()

    return ServiceCIDRSource(client, changed, on_invalid=on_invalid, on_undecodable=on_undecodable)

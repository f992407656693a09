"""One IP family's view of the proxy state, as upstream's per-family change trackers see it.

Upstream runs one proxier per family (the metaproxier) and each one's trackers keep only its
family: a Service without a ClusterIP of the family is not there at all; a Service's external IPs,
LoadBalancer ingress IPs and loadBalancerSourceRanges are cut to the family (newBaseServiceInfo);
an EndpointSlice reaches only the proxier of its addressType. FamilyView does the same cut on
kproxy's one shared state, per sync, keeping the previous sync's results by identity so that an
unchanged Service (or endpoint list) costs one dict lookup and an `is`; a record that is already
all of the family is passed through as the same object.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import msgspec

from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName


def _is_v6(text: str) -> bool:
    return ":" in text


def family_of(ip: str) -> IPFamily:
    return "IPv6" if _is_v6(ip) else "IPv4"


def service_for_family(svc: ServicePort, family: IPFamily) -> ServicePort | None:
    """svc as the family's proxier sees it; None when it has no ClusterIP of that family
    (headless and ExternalName Services included: no proxier programs them)."""
    v6 = family == "IPv6"
    if svc.type == "ExternalName" or svc.cluster_ip(family) is None:
        return None
    fields = (svc.cluster_ips, svc.external_ips, svc.load_balancer_ips, svc.load_balancer_source_ranges)
    if all(_is_v6(x) == v6 for values in fields for x in values):
        return svc
    return msgspec.structs.replace(
        svc,
        cluster_ips=tuple(ip for ip in svc.cluster_ips if _is_v6(ip) == v6),
        external_ips=tuple(ip for ip in svc.external_ips if _is_v6(ip) == v6),
        load_balancer_ips=tuple(ip for ip in svc.load_balancer_ips if _is_v6(ip) == v6),
        load_balancer_source_ranges=tuple(c for c in svc.load_balancer_source_ranges if _is_v6(c) == v6),
    )


def endpoints_for_family(eps: tuple[Endpoint, ...], family: IPFamily) -> tuple[Endpoint, ...]:
    v6 = family == "IPv6"
    if all(_is_v6(e.ip) == v6 for e in eps):
        return eps
    return tuple(e for e in eps if _is_v6(e.ip) == v6)


_S = TypeVar("_S")
_V = TypeVar("_V")


def _cached(cache: dict[ServicePortName, tuple[_S, _V]], fresh: dict[ServicePortName, tuple[_S, _V]],
            name: ServicePortName, source: _S | None, cut: Callable[[_S], _V]) -> _V | None:
    """name's view of source (None when source is gone); a cut that made a new object is
    remembered in `fresh`, so an unchanged record (the same object as in `cache`) gets the same
    view object again instead of a new cut. A record already all of the family is its own view
    and is not remembered: checking it again is cheap (~35 ms for 10,000 Services x 10 endpoints
    per full sync), remembering it cost ~3.5 MiB at that size (one tuple per Service and per
    endpoint list, and the dicts), most of a single-stack node's FamilyView."""
    if source is None:
        fresh.pop(name, None)
        return None
    hit = cache.get(name)
    if hit is not None and hit[0] is source:
        fresh[name] = hit
        return hit[1]
    view = cut(source)
    passed_through = view is source  # (a bool: `if view is source` would narrow view's type)
    if passed_through:
        fresh.pop(name, None)
    else:
        fresh[name] = (source, view)
    return view


def _put(view: dict[ServicePortName, _V], name: ServicePortName, value: _V | None) -> None:
    if value is None:
        view.pop(name, None)
    else:
        view[name] = value


class FamilyView:
    """Cuts the shared state to one family; the caches hold only the last sync's names.

    request() is what a sync uses: on a full sync it walks everything (services(), endpoints());
    on a partial one it visits only the request's changed ServicePorts and hands out copies of
    the view it keeps, since at 10,000 Services a walk of the whole state per sync (a hash and a
    lookup of every ServicePortName, twice) was most of write -> rule present. A partial request
    names every ServicePort whose Service or endpoints differ from the previous request's
    (kproxy.changes.ProxyState.checkout), which is what makes the kept view exact."""

    def __init__(self, family: IPFamily) -> None:
        self.family = family
        self._services: dict[ServicePortName, tuple[ServicePort, ServicePort | None]] = {}
        self._endpoints: dict[ServicePortName, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]] = {}
        self._view_services: dict[ServicePortName, ServicePort] | None = None  # None: no full walk yet
        self._view_endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}

    def request(self, services: Mapping[ServicePortName, ServicePort],
                endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]],
                changed: Iterable[ServicePortName], full: bool
                ) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
        """This family's (services, endpoints) of one sync request (fresh dicts the caller may keep)."""
        view_services = self._view_services
        if full or view_services is None:
            self._view_services = view_services = self.services(services)
            self._view_endpoints = self.endpoints(endpoints)
            return dict(view_services), dict(self._view_endpoints)
        view_endpoints = self._view_endpoints
        for name in changed:
            _put(view_services, name, _cached(self._services, self._services, name, services.get(name), self._cut))
            _put(view_endpoints, name,
                 _cached(self._endpoints, self._endpoints, name, endpoints.get(name), self._cut_eps) or None)
        return dict(view_services), dict(view_endpoints)

    def _cut(self, svc: ServicePort) -> ServicePort | None:
        return service_for_family(svc, self.family)

    def _cut_eps(self, eps: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        return endpoints_for_family(eps, self.family)

    def services(self, services: Mapping[ServicePortName, ServicePort]) -> dict[ServicePortName, ServicePort]:
        fresh: dict[ServicePortName, tuple[ServicePort, ServicePort | None]] = {}
        out: dict[ServicePortName, ServicePort] = {}
        for name, svc in services.items():
            _put(out, name, _cached(self._services, fresh, name, svc, self._cut))
        self._services = fresh
        return out

    def endpoints(self, endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]]
                  ) -> dict[ServicePortName, tuple[Endpoint, ...]]:
        fresh: dict[ServicePortName, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]] = {}
        out: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        for name, eps in endpoints.items():
            _put(out, name, _cached(self._endpoints, fresh, name, eps, self._cut_eps) or None)
        self._endpoints = fresh
        return out

    def stale_endpoints(self, stale: list[tuple[ServicePortName, Endpoint]]) -> list[tuple[ServicePortName, Endpoint]]:
        v6 = self.family == "IPv6"
        return [(n, e) for n, e in stale if _is_v6(e.ip) == v6]

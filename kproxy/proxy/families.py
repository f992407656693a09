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

from collections.abc import Mapping

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


class FamilyView:
    """Cuts the shared state to one family; the caches hold only the last sync's names."""

    def __init__(self, family: IPFamily) -> None:
        self.family = family
        self._services: dict[ServicePortName, tuple[ServicePort, ServicePort | None]] = {}
        self._endpoints: dict[ServicePortName, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]] = {}

    def services(self, services: Mapping[ServicePortName, ServicePort]) -> dict[ServicePortName, ServicePort]:
        cache = self._services
        fresh: dict[ServicePortName, tuple[ServicePort, ServicePort | None]] = {}
        out: dict[ServicePortName, ServicePort] = {}
        family = self.family
        for name, svc in services.items():
            hit = cache.get(name)
            view = hit[1] if hit is not None and hit[0] is svc else service_for_family(svc, family)
            fresh[name] = (svc, view)
            if view is not None:
                out[name] = view
        self._services = fresh
        return out

    def endpoints(self, endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]]
                  ) -> dict[ServicePortName, tuple[Endpoint, ...]]:
        cache = self._endpoints
        fresh: dict[ServicePortName, tuple[tuple[Endpoint, ...], tuple[Endpoint, ...]]] = {}
        out: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        family = self.family
        for name, eps in endpoints.items():
            hit = cache.get(name)
            view = hit[1] if hit is not None and hit[0] is eps else endpoints_for_family(eps, family)
            fresh[name] = (eps, view)
            if view:
                out[name] = view
        self._endpoints = fresh
        return out

    def stale_endpoints(self, stale: list[tuple[ServicePortName, Endpoint]]) -> list[tuple[ServicePortName, Endpoint]]:
        v6 = self.family == "IPv6"
        return [(n, e) for n, e in stale if _is_v6(e.ip) == v6]

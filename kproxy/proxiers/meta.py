"""One proxier per IP family behind the one Proxier interface, as upstream's metaproxier.

Upstream's NewDualStackProxier builds the mode's proxier twice (IPv4 and IPv6) when the node can
run both (platformCheckSupported: ip6tables, IPv6 IPVS, ...) and hands every event to both; each
keeps only its family (kproxy.proxy.families.FamilyView cuts kproxy's one shared state the same
way per sync). A mode opts in by exposing in its module

    new_family_proxier(config, family) -> Proxier     # the proxier of one family, no health server
    family_supported(config, family) -> bool          # optional: can this node run that family

and kproxy.server builds `new_proxier_for_families` from them (dual_stack_factory); a mode
without new_family_proxier stays single-family (IPv4). The Service health-check node ports are
one server for the node, owned here (a port can be bound once): each Service answers from its
own primary family's endpoints (the first family it has a ClusterIP of), so a dual-stack pod is
counted once.

A sync runs every family's proxier on the same request; it is ok only when all are. Each family's
outcome is in SyncResult.family_ok (healthz is per family, healthy only if all are, as
upstream's ProxierHealthServer); rule counts are summed per table.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from kproxy.config import KProxyConfig
from kproxy.healthcheck import ServiceHealthServer
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxy import HealthChecks
from kproxy.proxy.families import FamilyView, family_of

log = logging.getLogger(__name__)

FAMILIES: tuple[IPFamily, IPFamily] = ("IPv4", "IPv6")


class FamilyProxierFactory(Protocol):
    def __call__(self, config: KProxyConfig, family: IPFamily) -> Proxier: ...


FamilySupported = Callable[[KProxyConfig, IPFamily], bool]


def primary_family(config: KProxyConfig) -> IPFamily:
    """Upstream's PrimaryIPFamily: the family of the node's first IP (the Node object's, which
    the server fills in), else of a specific --bind-address, else IPv4."""
    if config.node_ips:
        return family_of(config.node_ips[0])
    if config.bind_address not in ("", "0.0.0.0", "::"):
        return family_of(config.bind_address)
    return "IPv4"


def other_family(family: IPFamily) -> IPFamily:
    return "IPv6" if family == "IPv4" else "IPv4"


def node_families(config: KProxyConfig, supported: FamilySupported | None) -> tuple[IPFamily, ...]:
    """The primary family first, then the other one when this node can run it (upstream: dual
    stack whenever the platform supports both families)."""
    primary = primary_family(config)
    other = other_family(primary)
    if supported is None or supported(config, other):
        return primary, other
    log.info("family=%s not supported on this node: single-stack %s", other, primary)
    return (primary,)


class MetaProxier(Proxier):
    def __init__(self, proxiers: Mapping[IPFamily, Proxier], health_server: ServiceHealthServer | None = None
                 ) -> None:
        if not proxiers:
            raise ValueError("MetaProxier: no family proxier")
        self.proxiers: dict[IPFamily, Proxier] = dict(proxiers)
        self.families = tuple(self.proxiers)
        self.mode = next(iter(self.proxiers.values())).mode
        self.health_server = health_server
        self._views = {family: FamilyView(family) for family in self.families}
        self._health = HealthChecks()
        # Service CIDRs (set_service_cidrs) come from the event loop while a sync may run in a
        # worker thread: a family proxier gets them only while no sync runs (_sync_lock), else at
        # the start of the next sync; _pending_lock guards the hand-over slot itself.
        self._sync_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending_cidrs: tuple[str, ...] | None = None

    def family_request(self, family: IPFamily, request: SyncRequest) -> SyncRequest:
        services, endpoints = self._views[family].request(request.services, request.endpoints, request.changed,
                                                          request.full)
        return SyncRequest(
            services=services,
            endpoints=endpoints,
            changed=request.changed,
            full=request.full,
            stale_endpoints=self._views[family].stale_endpoints(request.stale_endpoints),
            stale_services=request.stale_services,
        )

    def sync(self, request: SyncRequest) -> SyncResult:
        with self._sync_lock:
            self._hand_over_service_cidrs()
            return self._sync_families(request)

    def _sync_families(self, request: SyncRequest) -> SyncResult:
        family_ok: dict[str, bool] = {}
        seconds: dict[str, float] = {}
        family_rules: dict[str, dict[str, int]] = {}
        rules: dict[str, int] = {}
        errors: list[str] = []
        views: dict[IPFamily, SyncRequest] = {}
        for family, proxier in self.proxiers.items():
            t0 = time.perf_counter()
            views[family] = sub = self.family_request(family, request)
            try:
                res = proxier.sync(sub)
            except Exception as err:  # one family's bug must not stop the other's sync
                log.exception("sync raised family=%s", family)
                res = SyncResult(ok=False, error=f"{type(err).__name__}: {err}")
            seconds[family] = time.perf_counter() - t0
            family_rules[family] = dict(res.rules_total)
            family_ok[family] = res.ok
            for table, n in res.rules_total.items():
                rules[table] = rules.get(table, 0) + n
            if res.error:
                errors.append(f"{family}: {res.error}" if len(self.proxiers) > 1 else res.error)
        if self.health_server is not None:
            self._health_view(views, request)
            self._health.sync(self.health_server)
        return SyncResult(ok=all(family_ok.values()), rules_total=rules, error="; ".join(errors),
                          family_ok=family_ok, family_seconds=seconds, family_rules=family_rules)

    def _health_view(self, views: Mapping[IPFamily, SyncRequest], request: SyncRequest) -> None:
        """Each Service from its primary family: the first family view holding it, families
        in the node's order, so a Service only in the second family is served too. A partial
        sync visits only its changed ServicePorts (HealthChecks keeps the rest)."""
        complete = self._health.needs_all(request.full)
        names: Iterable[ServicePortName] = request.changed
        if complete:
            names = {name for family in self.families for name in views[family].services}

        def lookup(name: ServicePortName) -> tuple[ServicePort | None, tuple[Endpoint, ...]]:
            for family in self.families:
                svc = views[family].services.get(name)
                if svc is not None:
                    own = views.get(family_of(svc.cluster_ips[0]))
                    return svc, own.endpoints.get(name, ()) if own is not None else ()
            return None, ()

        self._health.update(names, lookup, complete)

    def set_service_cidrs(self, cidrs: tuple[str, ...]) -> None:
        """The cluster's service CIDRs, both families, to every family's proxier that drops
        traffic to unallocated ClusterIPs (nftables); each keeps its own family's, as upstream's
        metaproxier hands OnServiceCIDRsChanged to both. At once when no sync runs, else at the
        start of the next sync (kproxy.servicecidrs asks for one): never in the middle of one,
        whose end would mark a change made during it as synced."""
        with self._pending_lock:
            self._pending_cidrs = tuple(cidrs)
        if self._sync_lock.acquire(blocking=False):
            try:
                self._hand_over_service_cidrs()
            finally:
                self._sync_lock.release()

    def _hand_over_service_cidrs(self) -> None:
        """With _sync_lock held."""
        with self._pending_lock:
            cidrs, self._pending_cidrs = self._pending_cidrs, None
        if cidrs is None:
            return
        for proxier in self.proxiers.values():
            setter = getattr(proxier, "set_service_cidrs", None)
            if callable(setter):
                setter(cidrs)

    def cleanup(self) -> bool:
        results = [proxier.cleanup() for proxier in self.proxiers.values()]  # every family, even after a failure
        return all(results)

    def close(self) -> None:
        for proxier in self.proxiers.values():
            proxier.close()
        if self.health_server is not None:
            self.health_server.close()


def single_family(proxier: Proxier, family: IPFamily = "IPv4") -> Proxier:
    """A mode without per-family proxiers (new_family_proxier) still sees only its family's
    Services and endpoints: a dual-stack Service's IPv6 half must not reach an IPv4-only renderer
    (nftables' failed whole syncs on one). Its own health-check server stays its own."""
    if isinstance(proxier, MetaProxier):
        return proxier
    return MetaProxier({family: proxier})


def new_proxier_for_families(config: KProxyConfig, family_factory: FamilyProxierFactory,
                             supported: FamilySupported | None = None,
                             families: tuple[IPFamily, ...] | None = None, health: bool = True) -> MetaProxier:
    """The node's families (node_families), one proxier each, and the one health-check server
    (none with `health` False: userspace's rule-free localhost variant has no node ports)."""
    wanted = families if families is not None else node_families(config, supported)
    built: dict[IPFamily, Proxier] = {}
    try:
        for family in wanted:
            built[family] = family_factory(config, family)
    except BaseException:
        for proxier in built.values():
            proxier.close()
        raise
    log.info("proxier mode=%s families=%s", next(iter(built.values())).mode, ",".join(built))
    server = ServiceHealthServer(config.healthcheck_bind_address, netns=config.netns or None) if health else None
    return MetaProxier(built, server)

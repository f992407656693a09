"""Which endpoints serve which traffic, with upstream's meaning (pkg/proxy/topology.go).

`categorize` is CategorizeEndpoints: cluster-wide endpoints are the ready ones (restricted to
the node's zone when topology hints allow it), else the serving+terminating ones (KEP-1669: a
rolling update never leaves a Service without backends); local endpoints are this node's ready
ones, else this node's serving+terminating ones, decided on their own (a local terminating
endpoint serves a Local policy even while a remote one is ready). `service_endpoints` turns that
into what each kind of traffic gets: ClusterIP traffic the internal policy's list, NodePort /
external IP / LoadBalancer traffic the external policy's list, and whether a Service with no
usable endpoint at all is rejected or one without local endpoints is dropped.

`health_checks` is the health-check node port server's input (upstream servicehealth): one port
per Service with externalTrafficPolicy Local and the number of distinct local ready endpoint
IPs over all its ports.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from kproxy.healthcheck import NamespacedName, ServiceHealthServer
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxy.exposure import externally_accessible

Endpoints = tuple[Endpoint, ...]


def external_policy_local(svc: ServicePort) -> bool:
    """externalTrafficPolicy Local only means something for an externally reachable port."""
    return svc.external_policy_local and externally_accessible(svc)


def uses_cluster_endpoints(svc: ServicePort) -> bool:
    """Internal policy Cluster, or any external traffic at all: even under externalTrafficPolicy
    Local, traffic from pods and from the node to an external address goes cluster-wide (upstream's
    short circuit, as if it went out to the load balancer and came back)."""
    return not svc.internal_policy_local or externally_accessible(svc)


def uses_local_endpoints(svc: ServicePort) -> bool:
    return svc.internal_policy_local or external_policy_local(svc)


def _serving_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating and not ep.ready


def can_use_topology(endpoints: Iterable[Endpoint], node_zone: str) -> bool:
    """Zone hints are honoured only if the node has a zone, every ready endpoint carries hints
    (one without means the controller did not finish, or gave up: no filtering) and at least one
    ready endpoint is hinted for this zone (else this node would have nothing)."""
    if not node_zone:
        return False
    for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        if not ep.zone_hints:
            return False
        if node_zone in ep.zone_hints:
            for_zone = True
    return for_zone


class Categorized(NamedTuple):
    """CategorizeEndpoints' result, each list in the input's order. `reachable` is every endpoint
    some traffic may go to (the ones a mode needs a chain, a real server or a relay target for).
    A NamedTuple: made once per ServicePort per sync, a tuple costs a fraction of a dataclass."""

    cluster: Endpoints
    local: Endpoints
    reachable: Endpoints
    has_any: bool
    topology: bool = False  # cluster endpoints were narrowed to the node's zone


def categorize(svc: ServicePort, endpoints: Sequence[Endpoint], node_zone: str = "") -> Categorized:
    # The iptables renderer calls this once per ServicePort of every sync (10,000 at a time):
    # plain loops and no sorting keep it at a few microseconds.
    eps = endpoints
    if not (svc.internal_policy_local or svc.external_policy_local or node_zone):
        # The common case (no Local policy, no zone): ready endpoints, else the fallback.
        ready = tuple([e for e in eps if e.ready]) or tuple([e for e in eps if e.serving and e.terminating])
        return Categorized(ready, (), ready, bool(ready))
    cluster: Endpoints = ()
    local: Endpoints = ()
    has_any = False
    topology = False
    if uses_cluster_endpoints(svc):
        topology = bool(node_zone) and can_use_topology(eps, node_zone)
        if topology:
            cluster = tuple([e for e in eps if e.ready and node_zone in e.zone_hints])
        else:
            cluster = tuple([e for e in eps if e.ready])
        if not cluster:
            # The fallback ignores topology: it is a best effort not to drop connections.
            cluster = tuple([e for e in eps if e.serving and e.terminating])
            topology = False
        has_any = bool(cluster)
    if not uses_local_endpoints(svc):
        return Categorized(cluster, (), cluster, has_any, topology)
    if not has_any:
        has_any = any(e.ready or (e.serving and e.terminating) for e in eps)
    local = tuple([e for e in eps if e.is_local and e.ready])
    local_terminating = False
    if not local:
        local = tuple([e for e in eps if e.is_local and _serving_terminating(e)])
        local_terminating = bool(local)
    if not uses_cluster_endpoints(svc):
        return Categorized((), local, local, has_any, False)
    if not topology and not local_terminating:
        # cluster holds every ready endpoint and local only ready ones: a superset.
        return Categorized(cluster, local, cluster, has_any, topology)
    seen = {e.addr for e in cluster}
    merged = cluster + tuple([e for e in local if e.addr not in seen])
    return Categorized(cluster, local, merged, has_any, topology)


@dataclass(frozen=True, slots=True)
class ServiceEndpoints:
    """What each kind of traffic to one ServicePort gets on this node.

    `internal`: ClusterIP traffic (internalTrafficPolicy). `external`: NodePort, external IP and
    LoadBalancer traffic (externalTrafficPolicy). When `has_any` is false the Service has no
    usable endpoint anywhere and every mode refuses (iptables: REJECT; relay: reset). When it is
    true but `internal`/`external` is empty, that traffic asked for Local endpoints this node does
    not have: dropped, as upstream, so a client retries elsewhere instead of seeing a refusal.
    `cluster` is what traffic from pods and the node itself to an external address gets under
    externalTrafficPolicy Local (upstream short-circuits it to the cluster-wide endpoints)."""

    internal: Endpoints
    external: Endpoints
    cluster: Endpoints
    reachable: Endpoints
    has_any: bool
    topology: bool = False
    external_traffic: bool = False  # externally accessible: `external` means something

    @property
    def drops_internal(self) -> bool:
        return self.has_any and not self.internal

    @property
    def drops_external(self) -> bool:
        return self.external_traffic and self.has_any and not self.external


def service_endpoints(svc: ServicePort, endpoints: Sequence[Endpoint], node_zone: str = "") -> ServiceEndpoints:
    c = categorize(svc, endpoints, node_zone)
    internal = c.local if svc.internal_policy_local else c.cluster
    if not externally_accessible(svc):
        external: Endpoints = ()  # there is no external traffic
    else:
        external = c.local if external_policy_local(svc) else c.cluster
    return ServiceEndpoints(internal, external, c.cluster, c.reachable, c.has_any, c.topology,
                            externally_accessible(svc))


def health_checks(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
) -> tuple[dict[NamespacedName, int], dict[NamespacedName, int]]:
    """(health-check node port, local ready endpoint count) per Service, as upstream's
    SyncServices / SyncEndpoints input: counted by distinct endpoint IP over the Service's ports,
    ready ones only (a terminating endpoint makes a load balancer move traffic away)."""
    ports: dict[NamespacedName, int] = {}
    local_ips: dict[NamespacedName, set[str]] = {}
    for name, svc in services.items():
        if not (svc.health_check_node_port and external_policy_local(svc)):
            continue
        nsn = NamespacedName(name.namespace, name.name)
        ports[nsn] = svc.health_check_node_port
        ips = local_ips.setdefault(nsn, set())
        ips.update(e.ip for e in endpoints.get(name, ()) if e.is_local and e.ready)
    return ports, {nsn: len(ips) for nsn, ips in local_ips.items()}


def sync_health_server(
    server: ServiceHealthServer,
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
) -> list[str]:
    """Brings the listeners and their counts to the current state; returns bind errors."""
    ports, counts = health_checks(services, endpoints)
    errors = server.sync_services(ports)
    server.sync_endpoints(counts)
    return errors


class HealthChecks:
    """The Services a ServiceHealthServer answers for (a health-check node port and
    externalTrafficPolicy Local), kept from sync to sync, so that a partial sync brings the server
    up to date by visiting only its changed ServicePorts: at 10,000 Services, walking all of them
    on every sync to find the few with a health check cost a large part of write -> rule present."""

    def __init__(self) -> None:
        self.services: dict[ServicePortName, ServicePort] = {}
        self.endpoints: dict[ServicePortName, Sequence[Endpoint]] = {}
        self.primed = False  # a full update happened: the subset is complete

    def needs_all(self, full: bool) -> bool:
        """Whether the next update must be given every current ServicePort."""
        return full or not self.primed

    def update(self, names: Iterable[ServicePortName],
               lookup: Callable[[ServicePortName], tuple[ServicePort | None, Sequence[Endpoint]]],
               complete: bool) -> None:
        """Re-read `names` through lookup (a Service, or None when gone, and its endpoints);
        `complete`: names are every current ServicePort (a full sync), the subset starts anew."""
        if complete:
            self.services, self.endpoints = {}, {}
            self.primed = True
        for name in names:
            svc, eps = lookup(name)
            if svc is None or not (svc.health_check_node_port and external_policy_local(svc)):
                self.services.pop(name, None)
                self.endpoints.pop(name, None)
                continue
            self.services[name] = svc
            if eps:
                self.endpoints[name] = eps
            else:
                self.endpoints.pop(name, None)

    def update_request(self, services: Mapping[ServicePortName, ServicePort],
                       endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
                       changed: Iterable[ServicePortName], full: bool) -> None:
        """One proxier's sync request: everything when full (or never done), else `changed`."""
        empty: tuple[Endpoint, ...] = ()
        complete = self.needs_all(full)
        self.update(services if complete else changed, lambda name: (services.get(name), endpoints.get(name, empty)),
                    complete)

    def sync(self, server: ServiceHealthServer) -> list[str]:
        return sync_health_server(server, self.services, self.endpoints)

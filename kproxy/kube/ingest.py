"""API objects -> kproxy.model records, once, at ingestion (shared/DESIGN.md §3.2).

The Structs below are trimmed views of v1.Service, discovery.k8s.io/v1 EndpointSlice and v1.Node:
msgspec fills only these fields while parsing and skips the rest of the JSON.
"""
from __future__ import annotations

from sys import intern

import msgspec

from kproxy.kube.types import AnnotatedObjectMeta, ObjectMeta
from kproxy.model import Endpoint, Protocol, ServicePort, ServicePortName

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
# kube-proxy's informer selectors: services handed to another proxy, and the endpoints of
# headless services, are never its business.
SERVICE_LABEL_SELECTOR = f"!{SERVICE_PROXY_NAME_LABEL}"
ENDPOINTSLICE_LABEL_SELECTOR = f"!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"
DEFAULT_AFFINITY_TIMEOUT = 10800  # v1.DefaultClientIPServiceAffinitySeconds



# ---- v1.Service ------------------------------------------------------------------------------

class SvcPort(msgspec.Struct, rename="camel", gc=False):
    port: int = 0
    name: str = ""
    protocol: str = "TCP"
    node_port: int = 0


class ClientIPConfig(msgspec.Struct, rename="camel", gc=False):
    timeout_seconds: int | None = None


class SessionAffinityConfig(msgspec.Struct, rename="camel", gc=False):
    client_ip: ClientIPConfig | None = msgspec.field(default=None, name="clientIP")


class ServiceSpec(msgspec.Struct, rename="camel", gc=False):
    type: str = "ClusterIP"
    cluster_ip: str = msgspec.field(default="", name="clusterIP")
    cluster_ips: list[str] = msgspec.field(default_factory=list, name="clusterIPs")
    ports: list[SvcPort] = []
    external_ips: list[str] = msgspec.field(default_factory=list, name="externalIPs")
    load_balancer_source_ranges: list[str] = []
    session_affinity: str = "None"
    session_affinity_config: SessionAffinityConfig | None = None
    external_traffic_policy: str = ""
    internal_traffic_policy: str = ""
    health_check_node_port: int = 0


class LoadBalancerIngress(msgspec.Struct, rename="camel", gc=False):
    ip: str = ""
    hostname: str = ""
    ip_mode: str = ""


class LoadBalancerStatus(msgspec.Struct, gc=False):
    ingress: list[LoadBalancerIngress] = []


class ServiceStatus(msgspec.Struct, rename="camel", gc=False):
    load_balancer: LoadBalancerStatus | None = None


class Service(msgspec.Struct, gc=False):
    metadata: ObjectMeta
    spec: ServiceSpec = msgspec.field(default_factory=ServiceSpec)
    status: ServiceStatus = msgspec.field(default_factory=ServiceStatus)


_PROTOCOL_CONST: dict[str, Protocol] = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}
_TYPE_CONST = {"ClusterIP": "ClusterIP", "NodePort": "NodePort", "LoadBalancer": "LoadBalancer"}


def _protocol(value: str | None) -> Protocol | None:
    # The module's constant, not the decoded copy: 100,000 records then share one string.
    return _PROTOCOL_CONST.get(value or "TCP")


def service_ports(svc: Service) -> dict[ServicePortName, ServicePort]:
    """All proxied ServicePorts of one Service; none for ExternalName and headless services
    (upstream's ShouldSkipService). A Service being deleted is still served until it is gone."""
    spec = svc.spec
    if spec.type == "ExternalName":
        return {}
    cluster_ips = tuple(ip for ip in (spec.cluster_ips or ([spec.cluster_ip] if spec.cluster_ip else []))
                        if ip and ip != "None")
    if not cluster_ips:
        return {}
    svc_type = _TYPE_CONST.get(spec.type, "ClusterIP")
    affinity: int | None = None
    if spec.session_affinity == "ClientIP":
        cfg = spec.session_affinity_config
        timeout = cfg.client_ip.timeout_seconds if cfg and cfg.client_ip else None
        affinity = timeout if timeout else DEFAULT_AFFINITY_TIMEOUT
    externally_accessible = svc_type in ("NodePort", "LoadBalancer") or bool(spec.external_ips)
    ext_local = externally_accessible and spec.external_traffic_policy == "Local"
    int_local = spec.internal_traffic_policy == "Local"
    lb_ips: tuple[str, ...] = ()
    if svc_type == "LoadBalancer" and svc.status.load_balancer:
        # ipMode Proxy: the load balancer delivers to the node itself, the VIP must not be
        # short-circuited on the node (KEP-1860).
        lb_ips = tuple(i.ip for i in svc.status.load_balancer.ingress if i.ip and i.ip_mode != "Proxy")
    hc_port = spec.health_check_node_port if svc_type == "LoadBalancer" and ext_local else 0
    ranges = tuple(r.strip() for r in spec.load_balancer_source_ranges if r.strip())
    out: dict[ServicePortName, ServicePort] = {}
    for p in spec.ports:
        proto = _protocol(p.protocol)
        if proto is None or not p.port:
            continue
        # Interned: the same names recur in every Endpoint's and ServicePort's key, and the
        # decoder makes a fresh copy of each occurrence (memory at 10,000 Services).
        spn = ServicePortName(intern(svc.metadata.namespace), intern(svc.metadata.name), intern(p.name), proto)
        out[spn] = ServicePort(
            name=spn,
            type=svc_type,  # type: ignore[arg-type]
            cluster_ips=cluster_ips,
            port=p.port,
            protocol=proto,
            node_port=p.node_port if svc_type in ("NodePort", "LoadBalancer") else 0,
            external_ips=tuple(spec.external_ips),
            load_balancer_ips=lb_ips,
            load_balancer_source_ranges=ranges if svc_type == "LoadBalancer" else (),
            session_affinity_timeout=affinity,
            external_policy_local=ext_local,
            internal_policy_local=int_local,
            health_check_node_port=hc_port,
        )
    return out


# ---- discovery.k8s.io/v1 EndpointSlice -------------------------------------------------------

class EndpointConditions(msgspec.Struct, gc=False):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ForZone(msgspec.Struct, gc=False):
    name: str = ""


class EndpointHints(msgspec.Struct, rename="camel", gc=False):
    for_zones: list[ForZone] | None = None


class SliceEndpoint(msgspec.Struct, rename="camel", gc=False):
    addresses: list[str] = []
    conditions: EndpointConditions = msgspec.field(default_factory=EndpointConditions)
    hostname: str | None = None
    node_name: str | None = None
    zone: str | None = None
    hints: EndpointHints | None = None


class EndpointPort(msgspec.Struct, gc=False):
    name: str | None = None
    protocol: str | None = None
    port: int | None = None


class EndpointSlice(msgspec.Struct, rename="camel", gc=False):
    metadata: AnnotatedObjectMeta
    address_type: str = "IPv4"
    endpoints: list[SliceEndpoint] | None = None
    ports: list[EndpointPort] | None = None

    @property
    def service_name(self) -> str:
        return self.metadata.labels.get(SERVICE_NAME_LABEL, "")


SliceEndpoints = dict[ServicePortName, tuple[Endpoint, ...]]


def slice_endpoints(es: EndpointSlice, node_name: str) -> SliceEndpoints:
    """Per ServicePortName, the endpoints of one slice with conditions defaulted as upstream:
    ready nil -> true; serving nil -> ready; terminating nil -> false. FQDN slices and slices
    without a service-name label carry nothing for a proxy."""
    svc = es.service_name
    if not svc or es.address_type not in ("IPv4", "IPv6"):
        return {}
    out: SliceEndpoints = {}
    for p in es.ports or ():
        proto = _protocol(p.protocol)
        if p.port is None or proto is None:
            continue
        spn = ServicePortName(intern(es.metadata.namespace), intern(svc), intern(p.name or ""), proto)
        eps: dict[str, Endpoint] = {}  # by IP: one port, so the IP identifies the endpoint
        for e in es.endpoints or ():
            if not e.addresses:
                continue
            c = e.conditions
            ready = True if c.ready is None else c.ready
            ip = e.addresses[0]  # upstream uses only the first address of an endpoint
            seen = eps.get(ip)
            if seen is not None and (seen.ready or not ready):
                continue  # a duplicate listing: keep the ready copy
            node = intern(e.node_name) if e.node_name else ""
            eps[ip] = Endpoint(
                ip=ip,
                port=p.port,
                ready=ready,
                serving=ready if c.serving is None else c.serving,
                terminating=bool(c.terminating),
                node_name=node,
                zone=intern(e.zone) if e.zone else "",
                hostname=e.hostname or "",
                is_local=bool(node_name) and node == node_name,
                zone_hints=_zone_hints(e.hints),
            )
        out[spn] = tuple(sorted(eps.values()))
    return out


def _zone_hints(hints: EndpointHints | None) -> tuple[str, ...]:
    """hints.forZones as a sorted tuple of zone names (empty names dropped)."""
    if hints is None or not hints.for_zones:
        return ()
    return tuple(sorted({intern(z.name) for z in hints.for_zones if z.name}))


def trigger_time(es: EndpointSlice) -> str:
    return es.metadata.annotations.get(TRIGGER_TIME_ANNOTATION, "")


# ---- v1.Node -----------------------------------------------------------------------------------

class NodeAddress(msgspec.Struct, gc=False):
    type: str = ""
    address: str = ""


class Taint(msgspec.Struct, gc=False):
    key: str = ""
    effect: str = ""


class NodeSpec(msgspec.Struct, rename="camel", gc=False):
    pod_cidr: str = msgspec.field(default="", name="podCIDR")
    pod_cidrs: list[str] = msgspec.field(default_factory=list, name="podCIDRs")
    taints: list[Taint] = []


class NodeStatus(msgspec.Struct, gc=False):
    addresses: list[NodeAddress] = []


class Node(msgspec.Struct, gc=False):
    metadata: ObjectMeta
    spec: NodeSpec = msgspec.field(default_factory=NodeSpec)
    status: NodeStatus = msgspec.field(default_factory=NodeStatus)


def node_ips(node: Node) -> list[str]:
    """The node's primary IPs, at most one per family, as upstream's GetNodeHostIPs: all
    InternalIP addresses ahead of all ExternalIP ones, then the first of each family."""
    candidates = [a.address for a in node.status.addresses if a.type == "InternalIP"]
    candidates += [a.address for a in node.status.addresses if a.type == "ExternalIP"]
    out: list[str] = []
    families: set[bool] = set()
    for ip in candidates:
        v6 = ":" in ip
        if v6 not in families:
            families.add(v6)
            out.append(ip)
    return out


def node_eligible(node: Node) -> bool:
    """healthz's nodeEligible: not being deleted and not tainted for deletion by the autoscaler."""
    if node.metadata.deletion_timestamp:
        return False
    return not any(t.key == "ToBeDeletedByClusterAutoscaler" for t in node.spec.taints)

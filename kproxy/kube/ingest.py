"""API objects -> kproxy.model records, once, at ingestion (shared/DESIGN.md §3.2).

The Structs below are trimmed views of v1.Service, discovery.k8s.io/v1 EndpointSlice and v1.Node:
msgspec fills only these fields while parsing and skips the rest of the JSON.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from sys import intern
from typing import TypeVar

import msgspec

from kproxy.kube import validate
from kproxy.kube.types import AnnotatedObjectMeta, ObjectMeta
from kproxy.model import CIDR, IP, Endpoint, Port, ServicePort, ServicePortName, SvcType

log = logging.getLogger("kproxy.ingest")

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


_V = TypeVar("_V")

_TYPE_CONST: dict[str, SvcType] = {
    "ClusterIP": "ClusterIP", "NodePort": "NodePort", "LoadBalancer": "LoadBalancer",
}


class InvalidObject(ValueError):
    """An object with a field that failed its parser: skipped whole (nothing of it is
    programmed) and reported once by the caller (a log line and kproxy_invalid_objects_total).
    Also what service_ports reports for one entry left out of a filtered list (the caller
    counts those in kproxy_invalid_values_total)."""

    def __init__(self, kind: str, key: str, err: validate.InvalidField) -> None:
        self.kind, self.key, self.reason = kind, key, err.reason
        super().__init__(f"{kind} {validate.show(key)}: {err}")


def _service_name(svc: Service) -> tuple[str, str]:
    meta = svc.metadata
    return (validate.dns1123_label(meta.namespace, "metadata.namespace"),
            validate.dns1035_label(meta.name, "metadata.name"))


def service_ports(svc: Service, skipped: Callable[[InvalidObject], None] | None = None
                  ) -> dict[ServicePortName, ServicePort]:
    """All proxied ServicePorts of one Service; none for ExternalName and headless services
    (upstream's ShouldSkipService). A Service being deleted is still served until it is gone.
    Raises InvalidObject when a field that would be programmed fails its parser: the whole
    Service is dropped, never a part of it (a half-programmed Service is worse than none).

    Except in the three lists kube-proxy filters entry by entry because an API server may not
    have validated them (its MapIPsByIPFamily and MapCIDRsByIPFamily): spec.externalIPs,
    status.loadBalancer.ingress[].ip and spec.loadBalancerSourceRanges. A bad entry there is left
    out and reported to `skipped`, and the rest of the Service is programmed. Leaving out an
    address or a source range never opens more than the valid entries do, except when every
    source range is bad: kube-proxy then programs no firewall at all (open to every source);
    here the Service is dropped instead (it fails closed)."""
    try:
        return _service_ports(svc, skipped)
    except validate.InvalidField as err:
        raise InvalidObject("Service", f"{svc.metadata.namespace}/{svc.metadata.name}", err) from None


def _each_valid(values: Iterable[str], parse: Callable[[object, str], _V], field: str
                ) -> tuple[tuple[_V, ...], list[validate.InvalidField]]:
    """The entries of one filtered list that parse, and the errors of the others. Empty and blank
    entries are left out silently, as upstream's filters do."""
    out: list[_V] = []
    errors: list[validate.InvalidField] = []
    for value in values:
        if not value.strip():
            continue
        try:
            out.append(parse(value, field))
        except validate.InvalidField as err:
            errors.append(err)
    return tuple(out), errors


def _service_ports(svc: Service, skipped: Callable[[InvalidObject], None] | None
                   ) -> dict[ServicePortName, ServicePort]:
    spec = svc.spec
    if spec.type == "ExternalName":
        return {}
    raw_ips = [ip for ip in (spec.cluster_ips or ([spec.cluster_ip] if spec.cluster_ip else [])) if ip]
    if not raw_ips or raw_ips[0] == "None":
        return {}
    if not spec.ports:
        return {}
    svc_type = _TYPE_CONST.get(spec.type)
    if svc_type is None:
        raise validate.InvalidField("type", "spec.type", spec.type, "not a Service type")
    namespace, name = _service_name(svc)
    cluster_ips = tuple(validate.ip(ip, "spec.clusterIPs") for ip in raw_ips)
    affinity: int | None = None
    if spec.session_affinity == "ClientIP":
        cfg = spec.session_affinity_config
        timeout = cfg.client_ip.timeout_seconds if cfg and cfg.client_ip else None
        affinity = (validate.affinity_timeout(timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds")
                    if timeout else DEFAULT_AFFINITY_TIMEOUT)
    external_ips, bad = _each_valid(spec.external_ips, validate.ip, "spec.externalIPs")
    externally_accessible = svc_type in ("NodePort", "LoadBalancer") or bool(external_ips)
    ext_local = externally_accessible and spec.external_traffic_policy == "Local"
    int_local = spec.internal_traffic_policy == "Local"
    lb_ips: tuple[IP, ...] = ()
    ranges: tuple[CIDR, ...] = ()
    hc_port = Port(0)
    if svc_type == "LoadBalancer":
        if svc.status.load_balancer:
            # ipMode Proxy: the load balancer delivers to the node itself, the VIP must not be
            # short-circuited on the node (KEP-1860).
            lb_ips, bad_lb = _each_valid((i.ip for i in svc.status.load_balancer.ingress
                                          if i.ip and i.ip_mode != "Proxy"), validate.ip,
                                         "status.loadBalancer.ingress.ip")
            bad += bad_lb
        ranges, bad_ranges = _each_valid(spec.load_balancer_source_ranges, validate.cidr,
                                         "spec.loadBalancerSourceRanges")
        if bad_ranges and not ranges:
            raise bad_ranges[0]  # every range is bad: no firewall would let every source in (see service_ports)
        bad += bad_ranges
        if ext_local:
            hc_port = validate.optional_port(spec.health_check_node_port, "spec.healthCheckNodePort")
    with_node_port = svc_type in ("NodePort", "LoadBalancer")
    # Interned: the same names recur in every Endpoint's and ServicePort's key, and the
    # decoder makes a fresh copy of each occurrence (memory at 10,000 Services).
    namespace, name = intern(namespace), intern(name)
    out: dict[ServicePortName, ServicePort] = {}
    for p in spec.ports:
        proto = validate.protocol(p.protocol, "spec.ports.protocol")
        spn = ServicePortName(namespace, name, intern(validate.port_name(p.name, "spec.ports.name")), proto)
        out[spn] = ServicePort(
            name=spn,
            type=svc_type,
            cluster_ips=cluster_ips,
            port=validate.port(p.port, "spec.ports.port"),
            protocol=proto,
            node_port=validate.optional_port(p.node_port, "spec.ports.nodePort") if with_node_port else Port(0),
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
            load_balancer_source_ranges=ranges,
            session_affinity_timeout=affinity,
            external_policy_local=ext_local,
            internal_policy_local=int_local,
            health_check_node_port=hc_port,
        )
    if bad and skipped is not None:  # reported once the Service as a whole parsed: else it alone is
        for err in bad:
            skipped(InvalidObject("Service", f"{namespace}/{name}", err))
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
    without a service-name label carry nothing for a proxy. Raises InvalidObject when a port,
    protocol, name or address fails its parser (the whole slice is skipped)."""
    svc = es.service_name
    if not svc or es.address_type not in ("IPv4", "IPv6"):
        return {}
    try:
        return _slice_endpoints(es, svc, node_name)
    except validate.InvalidField as err:
        raise InvalidObject("EndpointSlice", f"{es.metadata.namespace}/{es.metadata.name}", err) from None


def _slice_endpoints(es: EndpointSlice, svc: str, node_name: str) -> SliceEndpoints:
    namespace = intern(validate.dns1123_label(es.metadata.namespace, "metadata.namespace"))
    svc = intern(validate.dns1035_label(svc, f"metadata.labels[{SERVICE_NAME_LABEL}]"))
    v6 = es.address_type == "IPv6"
    # Addresses are parsed once per slice, not once per port (a slice has one address list).
    addresses: list[IP | None] = []
    for e in es.endpoints or ():
        if not e.addresses:
            addresses.append(None)
            continue
        first = validate.ip(e.addresses[0], "endpoints.addresses")  # upstream uses only the first
        if (":" in first) != v6:
            raise validate.InvalidField("ip", "endpoints.addresses", e.addresses[0],
                                        f"not an address of the slice's type {es.address_type}")
        addresses.append(first)
    out: SliceEndpoints = {}
    for p in es.ports or ():
        if p.port is None:
            continue  # upstream: a port without a number carries no endpoints for a proxy
        proto = validate.protocol(p.protocol, "ports.protocol")
        port = validate.port(p.port, "ports.port")
        spn = ServicePortName(namespace, svc, intern(validate.port_name(p.name, "ports.name")), proto)
        eps: dict[str, Endpoint] = {}  # by IP: one port, so the IP identifies the endpoint
        for e, addr in zip(es.endpoints or (), addresses):
            if addr is None:
                continue
            ip = addr
            c = e.conditions
            ready = True if c.ready is None else c.ready
            seen = eps.get(ip)
            if seen is not None and (seen.ready or not ready):
                continue  # a duplicate listing: keep the ready copy
            node = intern(e.node_name) if e.node_name else ""
            eps[ip] = Endpoint(
                ip=ip,
                port=port,
                ready=ready,
                serving=ready if c.serving is None else c.serving,
                terminating=bool(c.terminating),
                node_name=node,
                zone=intern(e.zone) if e.zone else "",
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


def node_ips(node: Node) -> list[IP]:
    """The node's primary IPs, at most one per family, as upstream's GetNodeHostIPs: all
    InternalIP addresses ahead of all ExternalIP ones, then the first of each family. An
    address that does not parse is skipped, as upstream's ParseIPSloppy -> nil is (the caller
    warns when none is left)."""
    candidates = [a.address for a in node.status.addresses if a.type == "InternalIP"]
    candidates += [a.address for a in node.status.addresses if a.type == "ExternalIP"]
    out: list[IP] = []
    families: set[bool] = set()
    for text in candidates:
        try:
            ip = validate.ip(text, "status.addresses.address")
        except validate.InvalidField as err:
            log.warning("node=%s skipping address: %s", validate.show(node.metadata.name), err)
            continue
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

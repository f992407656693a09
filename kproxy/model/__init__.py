"""Trimmed, typed records the proxiers consume (shared/DESIGN.md §3).

Objects from the API are cut down to these at ingestion (kproxy/kube/ingest.py); nothing else keeps
JSON dicts. Records are frozen msgspec Structs: cheap to build, compare and hash, so change
trackers can tell "really changed" from "same content, new resourceVersion" by equality.
"""
from __future__ import annotations

from typing import Literal, NewType

import msgspec

Protocol = Literal["TCP", "UDP", "SCTP"]
IPFamily = Literal["IPv4", "IPv6"]
SvcType = Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]
# Values that reach kernel interfaces, made only by kproxy.kube.validate's parsers (canonical
# text of a parsed address / network; a port in 1-65535, or 0 for "none" where a field says so).
# NewTypes cost nothing at run time and make mypy refuse a raw API string in their place.
IP = NewType("IP", str)
CIDR = NewType("CIDR", str)
Port = NewType("Port", int)


class ServicePortName(msgspec.Struct, frozen=True, gc=False, order=True):
    """Identifies one port of one Service, as upstream's proxy.ServicePortName."""

    namespace: str
    name: str
    port: str  # the ServicePort's name; "" for an unnamed single port
    protocol: Protocol = "TCP"

    def __str__(self) -> str:
        # Upstream's String(): "ns/name:port" (":port" kept even when empty), used in chain hashes.
        return f"{self.namespace}/{self.name}:{self.port}"

    @property
    def namespaced_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class ServicePort(msgspec.Struct, frozen=True, gc=False):
    """One port of one Service with everything a proxier needs to program it."""

    name: ServicePortName
    type: SvcType
    cluster_ips: tuple[IP, ...]  # spec.clusterIPs; empty for headless ("None") and ExternalName
    port: Port
    protocol: Protocol
    node_port: Port = Port(0)
    external_ips: tuple[IP, ...] = ()
    load_balancer_ips: tuple[IP, ...] = ()  # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[CIDR, ...] = ()
    # None: sessionAffinity None; else ClientIP with this timeout in seconds.
    session_affinity_timeout: int | None = None
    external_policy_local: bool = False  # externalTrafficPolicy: Local (only for NodePort/LB/externalIPs)
    internal_policy_local: bool = False  # internalTrafficPolicy: Local
    health_check_node_port: Port = Port(0)

    @property
    def is_headless(self) -> bool:
        return not self.cluster_ips

    def cluster_ip(self, family: IPFamily) -> IP | None:
        for ip in self.cluster_ips:
            if (":" in ip) == (family == "IPv6"):
                return ip
        return None


class Endpoint(msgspec.Struct, frozen=True, gc=False, order=True):
    """One backend of one ServicePort, from an EndpointSlice entry with the port resolved."""

    ip: IP
    port: Port
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    # (No hostname: no proxy mode reads it; 8 bytes of every Endpoint, 0.8 MiB at 100,000.)
    is_local: bool = False  # node_name equals this node's name (set at ingestion)
    zone_hints: tuple[str, ...] = ()  # hints.forZones[].name: zones this endpoint should serve

    @property
    def addr(self) -> str:
        """ip:port as upstream's Endpoint.String() (IPv6 bracketed): part of KUBE-SEP- hashes."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


ServicePortMap = dict[ServicePortName, ServicePort]
EndpointsMap = dict[ServicePortName, tuple[Endpoint, ...]]

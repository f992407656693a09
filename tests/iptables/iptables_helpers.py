"""Builders for ServicePorts/Endpoints shared by the iptables tests (plain functions, no fixtures)."""

from __future__ import annotations

from typing import Any

from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest


def spn(name: str, port: str = "p80", proto: str = "TCP", ns: str = "ns1") -> ServicePortName:
    return ServicePortName(ns, name, port, proto)  # type: ignore[arg-type]


def svc(name: ServicePortName, vip: str, port: int = 80, **kw: Any) -> ServicePort:
    kw.setdefault("type", "NodePort" if kw.get("node_port") else "ClusterIP")
    return ServicePort(name=name, cluster_ips=(vip,), port=port, protocol=name.protocol, **kw)


def ep(ip: str, port: int = 8080, **kw: Any) -> Endpoint:
    return Endpoint(ip, port, **kw)


def request(
    services: list[ServicePort],
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]],
    changed: set[ServicePortName] | None = None,
) -> SyncRequest:
    smap = {s.name: s for s in services}
    if changed is None:
        return SyncRequest(services=smap, endpoints=endpoints)
    return SyncRequest(services=smap, endpoints=endpoints, changed=frozenset(changed), full=False)


def strip_dump(dump: str) -> str:
    """iptables-save output without the comment lines (timestamps) and counters."""
    out = []
    for line in dump.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.rsplit(" ", 1)[0]
        out.append(line)
    return "\n".join(out)

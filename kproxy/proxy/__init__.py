"""Service semantics shared by every proxy mode (issue 14).

What a Service means on this node is decided here once; a proxier (iptables, IPVS, userspace)
only translates the decision into kernel rules or a relay table:
- `endpoints`: which endpoints serve which traffic (upstream pkg/proxy/topology.go
  CategorizeEndpoints: ready, serving+terminating fallback, internal/external traffic policy Local,
  topology zone hints), and the health-check node ports with their local endpoint counts.
- `conntrack`: which UDP conntrack entries a sync made stale (upstream pkg/proxy/conntrack).
- `exposure`: a ServicePort's addresses by role and its LoadBalancer source ranges, parsed.
Everything here is pure (no I/O), so unit and property tests cover it whole.
"""
from __future__ import annotations

from kproxy.proxy.conntrack import ConntrackCleanup, apply_cleanup, udp_conntrack_cleanup
from kproxy.proxy.endpoints import (
    Categorized,
    HealthChecks,
    ServiceEndpoints,
    categorize,
    health_checks,
    service_endpoints,
    sync_health_server,
)
from kproxy.proxy.exposure import SourceRanges, externally_accessible, nodeport_cidrs, service_ips

__all__ = [
    "Categorized",
    "ConntrackCleanup",
    "HealthChecks",
    "ServiceEndpoints",
    "SourceRanges",
    "apply_cleanup",
    "categorize",
    "externally_accessible",
    "health_checks",
    "nodeport_cidrs",
    "service_endpoints",
    "service_ips",
    "sync_health_server",
    "udp_conntrack_cleanup",
]

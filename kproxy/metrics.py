"""Prometheus metrics under kube-proxy's names (pkg/proxy/metrics), on a private registry.

Per IP family as upstream since 1.33 (kubernetes#129173, one proxier per family): the sync
durations, last sync and last queued timestamps, network programming latency, iptables restore
failures and rule counts carry `ip_family` (IPv4|IPv6); the change counters and healthz/livez
counts do not (one change tracker and one health server for the node)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# upstream: metrics.ExponentialBuckets(0.001, 2, 15)
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# upstream network programming buckets: 0.25 s steps to 3 s, 1 s to 10 s, ... up to 5 min
_NPL_BUCKETS = (
    tuple(0.25 * i for i in range(1, 12)) + tuple(float(i) for i in range(3, 10))
    + tuple(5.0 * i for i in range(2, 12)) + tuple(30.0 * i for i in range(2, 11))
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ns = "kubeproxy"
        self.sync_duration = Histogram(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds",
            ["ip_family"], namespace=ns, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_full_duration = Histogram(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs",
            ["ip_family"], namespace=ns, buckets=_SYNC_BUCKETS, registry=r)
        self.sync_partial_duration = Histogram(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs", ["ip_family"], namespace=ns, buckets=_SYNC_BUCKETS,
            registry=r)
        self.last_sync_timestamp = Gauge(
            "sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced",
            ["ip_family"], namespace=ns, registry=r)
        self.last_queued_timestamp = Gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued", ["ip_family"], namespace=ns, registry=r)
        self.network_programming = Histogram(
            "network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds",
            ["ip_family"], namespace=ns, buckets=_NPL_BUCKETS, registry=r)
        self.endpoint_changes_pending = Gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes",
            namespace=ns, registry=r)
        self.endpoint_changes_total = Counter(
            "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes",
            namespace=ns, registry=r)
        self.service_changes_pending = Gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes",
            namespace=ns, registry=r)
        self.service_changes_total = Counter(
            "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes",
            namespace=ns, registry=r)
        self.iptables_total = Gauge(
            "sync_proxy_rules_iptables_total", "Total number of iptables rules owned by kube-proxy",
            ["table", "ip_family"], namespace=ns, registry=r)
        self.restore_failures = Counter(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures", ["ip_family"], namespace=ns, registry=r)
        self.partial_restore_failures = Counter(
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures", ["ip_family"], namespace=ns, registry=r)
        self.healthz_total = Counter(
            "proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], namespace=ns, registry=r)
        # kproxy's own (no upstream equivalent: kube-proxy trusts its API server): objects
        # skipped because a field failed its parser (reason: the field's kind) or the object did
        # not decode at all (reason "decode"). Both labels come from closed sets.
        self.invalid_objects = Counter(
            "kproxy_invalid_objects_total", "API objects skipped because a field is invalid or the object does not decode",
            ["kind", "reason"], registry=r)
        # And single entries left out of a list kube-proxy filters entry by entry (externalIPs,
        # load balancer ingress IPs, source ranges: kube/ingest.py service_ports); the rest of the
        # object is programmed.
        self.invalid_values = Counter(
            "kproxy_invalid_values_total", "Entries left out of an API object's address or source range list because "
            "they do not parse; the rest of the object is programmed", ["kind", "reason"], registry=r)
        self.livez_total = Counter(
            "proxy_livez", "Cumulative proxy livez HTTP status", ["code"], namespace=ns, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

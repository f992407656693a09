"""Metrics per IP family, as upstream labels them since 1.33 (kubernetes#129173): each family's
proxier (kproxy.proxiers.meta) reports its own sync time, rule counts, last sync and failures
under ip_family; a single proxier's are its (primary) family's."""
from __future__ import annotations

import asyncio
import time

from prometheus_client.parser import text_string_to_metric_families

from kproxy.changes import Checkout
from kproxy.config import KProxyConfig
from kproxy.model import ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import MetaProxier
from kproxy.server import ProxyServer


class _Family(Proxier):
    mode = "recording"

    def __init__(self, rules: int, ok: bool = True, delay: float = 0.0) -> None:
        self.rules, self.ok, self.delay = rules, ok, delay

    def sync(self, request: SyncRequest) -> SyncResult:
        time.sleep(self.delay)
        return SyncResult(ok=self.ok, rules_total={"nat": self.rules}, error="" if self.ok else "boom")

    def cleanup(self) -> bool:
        return True


def _samples(srv: ProxyServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(srv.metrics.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_family_reports_its_own_sync_rules_and_failures() -> None:
    srv = ProxyServer(KProxyConfig(hostname_override="n1", mode="iptables"), lambda c: None,  # type: ignore[arg-type,return-value]
                      client=None)
    v4, v6 = _Family(7), _Family(3, delay=0.02)
    srv.proxier = MetaProxier({"IPv4": v4, "IPv6": v6})
    assert asyncio.run(srv._sync(True)) is True
    got = _samples(srv)
    assert got[("kubeproxy_sync_proxy_rules_iptables_total", (("ip_family", "IPv4"), ("table", "nat")))] == 7
    assert got[("kubeproxy_sync_proxy_rules_iptables_total", (("ip_family", "IPv6"), ("table", "nat")))] == 3
    for family in ("IPv4", "IPv6"):
        assert got[("kubeproxy_sync_proxy_rules_duration_seconds_count", (("ip_family", family),))] == 1
        assert got[("kubeproxy_sync_full_proxy_rules_duration_seconds_count", (("ip_family", family),))] == 1
        assert got[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", (("ip_family", family),))] > 0
    # Each family's own time: the IPv6 proxier's 20 ms is not the IPv4 one's.
    assert got[("kubeproxy_sync_proxy_rules_duration_seconds_sum", (("ip_family", "IPv6"),))] >= 0.02
    assert got[("kubeproxy_sync_proxy_rules_duration_seconds_sum", (("ip_family", "IPv4"),))] < 0.02
    # One family failing: its restore failure only.
    v6.ok = False
    assert asyncio.run(srv._sync(True)) is False
    got = _samples(srv)
    assert got[("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", (("ip_family", "IPv6"),))] == 1
    assert ("kubeproxy_sync_proxy_rules_iptables_restore_failures_total", (("ip_family", "IPv4"),)) not in got


def test_network_programming_latency_goes_to_the_services_families() -> None:
    srv = ProxyServer(KProxyConfig(hostname_override="n1"), lambda c: None, client=None)  # type: ignore[arg-type,return-value]
    srv.proxier = MetaProxier({"IPv4": _Family(1), "IPv6": _Family(1)})
    dual = ServicePortName("ns", "dual", "p", "TCP")
    six = ServicePortName("ns", "six", "p", "TCP")
    services = {dual: ServicePort(name=dual, type="ClusterIP", cluster_ips=("10.96.0.5", "fd00::5"), port=80,  # type: ignore[arg-type]
                                  protocol="TCP"),
                six: ServicePort(name=six, type="ClusterIP", cluster_ips=("fd00::6",), port=80, protocol="TCP")}  # type: ignore[arg-type]
    now = time.time()
    co = Checkout(SyncRequest(services, {}, changed=frozenset({dual, six}), full=False),
                  {"ns/dual": [now - 1.0], "ns/six": [now - 2.0]})
    srv._observe_programming(co, now, ("IPv4", "IPv6"))
    got = _samples(srv)
    assert got[("kubeproxy_network_programming_duration_seconds_count", (("ip_family", "IPv4"),))] == 1
    assert got[("kubeproxy_network_programming_duration_seconds_count", (("ip_family", "IPv6"),))] == 2
    assert 2.9 <= got[("kubeproxy_network_programming_duration_seconds_sum", (("ip_family", "IPv6"),))] <= 3.1


def test_a_single_proxier_reports_the_primary_family() -> None:
    srv = ProxyServer(KProxyConfig(hostname_override="n1", node_ips=("fd00::1",)), lambda c: None,  # type: ignore[arg-type,return-value]
                      client=None)
    srv.proxier = _Family(4)
    assert asyncio.run(srv._sync(True)) is True
    got = _samples(srv)
    assert got[("kubeproxy_sync_proxy_rules_iptables_total", (("ip_family", "IPv6"), ("table", "nat")))] == 4
    assert ("kubeproxy_sync_proxy_rules_duration_seconds_count", (("ip_family", "IPv4"),)) not in got

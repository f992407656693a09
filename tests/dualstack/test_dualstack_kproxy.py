"""kproxy per family (issue 18), the pure parts: each family's view of the shared state (as
upstream's per-family trackers), the metaproxier's merging of per-family syncs, healthz per family,
--cluster-cidr validation as upstream's, and which families a node runs. The real packets per
family are tests/conformance; the ip6tables rules in the kernel tests/iptables/test_iptables_ipv6.py."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.config import ConfigError, KProxyConfig, validate
from kproxy.healthz import ProxierHealth
from kproxy.model import Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import MetaProxier, node_families, primary_family, single_family
from kproxy.proxy.exposure import node_addresses
from kproxy.proxy.families import FamilyView, endpoints_for_family, service_for_family

N = ServicePortName("ns", "web", "http")
V4 = ServicePort(name=N, type="ClusterIP", cluster_ips=("10.96.0.1",), port=80, protocol="TCP")
DUAL = ServicePort(name=N, type="LoadBalancer", cluster_ips=("fd02::1", "10.96.0.1"), port=80, protocol="TCP",
                   node_port=30080, external_ips=("192.0.2.1", "2001:db8::1"),
                   load_balancer_ips=("203.0.113.1", "2001:db8::2"),
                   load_balancer_source_ranges=("198.51.100.0/24", "2001:db8:1::/48"))
EPS = (Endpoint("10.1.0.2", 80), Endpoint("fd01::2", 80), Endpoint("10.1.0.3", 80))

_v4 = st.integers(1, 250).map(lambda n: f"10.96.0.{n}")
_v6 = st.integers(1, 0xFFFF).map(lambda n: f"fd02::{n:x}")
_ip = st.one_of(_v4, _v6)


def test_service_view_per_family() -> None:
    v6 = service_for_family(DUAL, "IPv6")
    assert v6 is not None and v6.cluster_ips == ("fd02::1",) and v6.external_ips == ("2001:db8::1",)
    assert v6.load_balancer_ips == ("2001:db8::2",) and v6.load_balancer_source_ranges == ("2001:db8:1::/48",)
    v4 = service_for_family(DUAL, "IPv4")
    assert v4 is not None and v4.cluster_ips == ("10.96.0.1",) and v4.load_balancer_source_ranges == ("198.51.100.0/24",)
    assert service_for_family(V4, "IPv4") is V4  # already all IPv4: the same record, no copy
    assert service_for_family(V4, "IPv6") is None  # no IPv6 ClusterIP: not in the IPv6 proxier at all
    headless = ServicePort(name=N, type="ClusterIP", cluster_ips=(), port=80, protocol="TCP")
    assert service_for_family(headless, "IPv4") is None
    assert endpoints_for_family(EPS, "IPv6") == (Endpoint("fd01::2", 80),)
    only4 = EPS[::2]
    assert endpoints_for_family(only4, "IPv4") is only4


@settings(max_examples=80, deadline=None)
@given(cluster=st.lists(_ip, min_size=1, max_size=2, unique=True), ext=st.lists(_ip, max_size=3),
       eps=st.lists(_ip, max_size=5, unique=True), family=st.sampled_from(["IPv4", "IPv6"]))
def test_a_family_view_holds_only_that_family(cluster: list[str], ext: list[str], eps: list[str],
                                              family: IPFamily) -> None:
    svc = ServicePort(name=N, type="NodePort", cluster_ips=tuple(cluster), port=80, protocol="TCP",
                      node_port=30000, external_ips=tuple(ext))
    endpoints = tuple(Endpoint(ip, 80) for ip in eps)
    view = FamilyView(family)
    services = view.services({N: svc})
    want_version = 6 if family == "IPv6" else 4
    has_family = any(ipaddress.ip_address(ip).version == want_version for ip in cluster)
    assert (N in services) == has_family
    if has_family:
        got = services[N]
        assert all(ipaddress.ip_address(ip).version == want_version for ip in (*got.cluster_ips, *got.external_ips))
        assert set(got.external_ips) == {ip for ip in ext if ipaddress.ip_address(ip).version == want_version}
    got_eps = view.endpoints({N: endpoints}).get(N, ())
    assert [e.ip for e in got_eps] == [ip for ip in eps if ipaddress.ip_address(ip).version == want_version]
    # The next sync with the same records reuses the view (same objects, no rebuild).
    assert view.services({N: svc}).get(N) is services.get(N)


class Recording(Proxier):
    def __init__(self, family: str, ok: bool = True) -> None:
        self.mode = "recording"
        self.family, self.ok, self.requests = family, ok, []  # type: ignore[var-annotated]
        self.cleaned = self.closed = False

    def sync(self, request: SyncRequest) -> SyncResult:
        self.requests.append(request)
        return SyncResult(ok=self.ok, rules_total={"nat": len(request.services)}, error="" if self.ok else "boom")

    def cleanup(self) -> bool:
        self.cleaned = True
        return self.ok

    def close(self) -> None:
        self.closed = True


def test_meta_proxier_gives_each_family_its_view_and_merges() -> None:
    p4, p6 = Recording("IPv4"), Recording("IPv6", ok=False)
    meta = MetaProxier({"IPv4": p4, "IPv6": p6})
    other = ServicePortName("ns", "v4only", "")
    req = SyncRequest({N: DUAL, other: V4}, {N: EPS}, changed=frozenset({N}), full=False,
                      stale_endpoints=[(N, Endpoint("fd01::9", 80)), (N, Endpoint("10.1.0.9", 80))])
    res = meta.sync(req)
    assert not res.ok and res.family_ok == {"IPv4": True, "IPv6": False} and res.error == "IPv6: boom"
    assert res.rules_total == {"nat": 3}
    r4, r6 = p4.requests[0], p6.requests[0]
    assert set(r4.services) == {N, other} and set(r6.services) == {N}
    assert [e.ip for e in r6.endpoints[N]] == ["fd01::2"] and len(r4.endpoints[N]) == 2
    assert [e.ip for _, e in r6.stale_endpoints] == ["fd01::9"] and r6.changed == req.changed and not r6.full
    assert not meta.cleanup() and p4.cleaned and p6.cleaned  # every family is cleaned, even after a failure
    meta.close()
    assert p4.closed and p6.closed
    assert single_family(meta) is meta and single_family(p4).families == ("IPv4",)  # type: ignore[attr-defined]


def test_healthz_is_per_family_and_healthy_only_if_all_are() -> None:
    t = [1000.0]
    h = ProxierHealth(60.0, clock=lambda: t[0])
    h.families = ("IPv4", "IPv6")
    h.queued_update()
    t[0] += 10
    h.updated("IPv4")  # the IPv6 proxier has not synced the change
    t[0] += 55
    ok, last, _ = h.check()
    assert not ok and last is None  # upstream answers with the failing family's lastUpdated
    h.updated("IPv6")
    assert h.check()[0]
    h.queued_update()
    h.updated()  # a sync of every family
    assert h.check()[0] and h.oldest_pending_queued is None


@pytest.mark.parametrize("cidr", ["10.244.0.0/16", "fd01::/48", "10.244.0.0/16,fd01::/48", "fd01::/48, 10.0.0.0/8"])
def test_cluster_cidr_accepted_as_upstream(cidr: str) -> None:
    validate(KProxyConfig(cluster_cidr=cidr))


@pytest.mark.parametrize("cidr,why", [
    ("10.0.0.0/8,10.1.0.0/16", "DualStack"), ("fd01::/48,fd02::/48", "DualStack"),
    ("10.0.0.0/8,fd01::/48,10.1.0.0/16", "only one CIDR"), ("10.0.0.0/8,nonsense", "not a CIDR")])
def test_cluster_cidr_refused_as_upstream(cidr: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        validate(KProxyConfig(cluster_cidr=cidr))


def test_node_addresses_per_family() -> None:
    import logging

    log = logging.getLogger("test")
    a6 = node_addresses(("primary", "10.0.0.0/8", "fd00::/8"), ("192.168.1.2", "fd00::2"),
                        "10.244.0.0/16,fd01::/48", log, "IPv6")
    assert a6.node_ips == ("fd00::2",) and a6.cluster_cidr == "fd01::/48"
    assert a6.nodeport_cidrs == ("fd00::/8", "fd00::2/128")
    a4 = node_addresses(("primary", "10.0.0.0/8", "fd00::/8"), ("192.168.1.2", "fd00::2"),
                        "10.244.0.0/16,fd01::/48", log, "IPv4")
    assert a4.nodeport_cidrs == ("10.0.0.0/8", "192.168.1.2/32") and a4.cluster_cidr == "10.244.0.0/16"


def test_families_of_a_node() -> None:
    assert primary_family(KProxyConfig(node_ips=("fd00::1", "10.0.0.1"))) == "IPv6"
    assert primary_family(KProxyConfig(bind_address="fd00::1")) == "IPv6"
    assert primary_family(KProxyConfig()) == "IPv4"
    assert node_families(KProxyConfig(node_ips=("fd00::1",)), None) == ("IPv6", "IPv4")
    assert node_families(KProxyConfig(), lambda _c, f: f == "IPv4") == ("IPv4",)


def test_detect_local_mode_flags_and_node_cidr() -> None:
    import msgspec

    from kproxy.cli import parse_config
    from kproxy.kube.ingest import Node
    from kproxy.server import node_local_cidrs

    cfg = parse_config(["--detect-local-mode", "NodeCIDR", "--hostname-override", "n1",
                        "--cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"])
    assert cfg.detect_local_mode == "NodeCIDR"
    for bad, why in (("Bogus", "must be one of"), ("BridgeInterface", "not supported by kproxy")):
        with pytest.raises(ConfigError, match=why):
            parse_config(["--detect-local-mode", bad, "--hostname-override", "n1"])
    node = msgspec.convert({"metadata": {"name": "n1"}, "spec": {"podCIDRs": [
        "10.244.1.0/24", "not-a-cidr", "fd00:10:244:1::/64", "10.244.9.0/24"]}}, Node)
    # One per family, the first of each; what does not parse is skipped.
    assert node_local_cidrs(node) == "10.244.1.0/24,fd00:10:244:1::/64"
    assert node_local_cidrs(msgspec.convert({"metadata": {"name": "n2"}}, Node)) == ""
    assert node_local_cidrs(None) == ""


def test_conntrack_deletions_name_their_family(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion by port alone (a UDP NodePort's entries) matches only the family it names, and
    conntrack's default is IPv4: the IPv6 proxier's must say -f ipv6."""
    import subprocess

    from kproxy.backends.conntrack import Conntrack

    calls: list[list[str]] = []

    def run(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been deleted.")

    monkeypatch.setattr(subprocess, "run", run)
    assert Conntrack(family="IPv6").clear_entries_for_port(30053) == 1
    assert Conntrack().clear_entries_for_port(30053) == 1
    assert calls == [["conntrack", "-D", "-f", "ipv6", "-p", "udp", "--dport", "30053"],
                     ["conntrack", "-D", "-p", "udp", "--dport", "30053"]]

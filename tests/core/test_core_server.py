"""The server's event handlers and mode registry, without the network (the process-level run
against the real API server is in test_core_apiserver.py)."""
from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from kproxy.config import ConfigError, KProxyConfig
from kproxy.kube.informer import SummaryStore
from kproxy.kube.ingest import EndpointSlice, Node, Service
from kproxy.model import ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.server import ModeRegistry, ProxyServer, _slice_service_key

WEB = ServicePortName("ns", "web", "http", "TCP")


def _server() -> ProxyServer:
    return ProxyServer(KProxyConfig(hostname_override="n1"), lambda c: None, client=None)  # type: ignore[arg-type,return-value]


def _svc(name: str, **labels: str) -> Service:
    return msgspec.convert({"metadata": {"name": name, "namespace": "ns", "labels": labels},
                            "spec": {"clusterIP": "10.0.0.1", "ports": [{"name": "http", "port": 80}]}}, Service)


def _slice(name: str, service: str, ips: list[str]) -> EndpointSlice:
    return msgspec.convert({"metadata": {"name": name, "namespace": "ns",
                                         "labels": {"kubernetes.io/service-name": service}},
                            "ports": [{"name": "http", "port": 8080}],
                            "endpoints": [{"addresses": [ip], "nodeName": "n1"} for ip in ips]}, EndpointSlice)


def test_handlers_track_relist_relabel_and_queue_runs() -> None:
    srv = _server()
    svcs: SummaryStore[Service] = SummaryStore(srv.on_service)
    slices: SummaryStore[EndpointSlice] = SummaryStore(srv.on_slice, _slice_service_key)
    svcs.replace([_svc("web"), _svc("api")], "1")
    slices.replace([_slice("web-1", "web", ["10.1.0.1"]), _slice("web-2", "web", ["10.1.0.2"])], "1")
    # Initial lists: a run is requested, but health does not count the wait (as upstream).
    assert srv.health.oldest_pending_queued is None and srv.runner.policy.requested
    srv.initialized = True
    req = srv.state.checkout(full=True).request
    assert [e.ip for e in req.endpoints[WEB]] == ["10.1.0.1", "10.1.0.2"] and req.endpoints[WEB][0].is_local

    # web-2 is relabelled to "api": its endpoint leaves web and joins api.
    slices.apply("MODIFIED", _slice("web-2", "api", ["10.1.0.2"]))
    assert srv.health.oldest_pending_queued is not None
    req = srv.state.checkout(full=False).request
    assert [e.ip for e in req.endpoints[WEB]] == ["10.1.0.1"]
    assert [e.ip for e in req.endpoints[ServicePortName("ns", "api", "http", "TCP")]] == ["10.1.0.2"]

    # A relist that drops web-1 and api (gone while the watch was down) and repeats the rest:
    # only the removals are changes.
    slices.replace([_slice("web-2", "api", ["10.1.0.2"])], "2")
    svcs.replace([_svc("web")], "2")
    co = srv.state.checkout(full=False)
    assert co.request.changed == {WEB, ServicePortName("ns", "api", "http", "TCP")}
    assert WEB not in co.request.endpoints and list(co.request.services) == [WEB]
    # Same content again: nothing pending.
    svcs.replace([_svc("web")], "3")
    assert not srv.state.pending()


def test_node_eligibility_follows_the_node() -> None:
    srv = _server()
    node = msgspec.convert({"metadata": {"name": "n1"}}, Node)
    srv.on_node(None, node)
    assert srv.health.node_eligible and srv.node is node
    srv.on_node(node, msgspec.convert({"metadata": {"name": "n1", "deletionTimestamp": "2026-11-23T19:00:00Z"}},
                                      Node))
    assert not srv.health.node_eligible
    srv.on_node(node, None)
    assert not srv.health.node_eligible


def test_mode_registry_errors_name_the_flag(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "core_mode_without_factory.py").write_text("X = 1\n")
    (tmp_path / "core_mode_broken_import.py").write_text("import core_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = ModeRegistry({"a": "core_mode_without_factory", "b": "core_mode_broken_import",
                        "c": "core_no_such_mode_module", "d": lambda cfg: "proxier"})
    with pytest.raises(ConfigError, match="--proxy-mode a: core_mode_without_factory has no new_proxier"):
        reg.factory("a")
    # A module that exists but whose own import fails is a bug to show, not "not available".
    with pytest.raises(ModuleNotFoundError, match="core_no_such_dependency"):
        reg.factory("b")
    with pytest.raises(ConfigError, match="--proxy-mode c: not available in this build"):
        reg.factory("c")
    assert reg.factory("d")(KProxyConfig()) == "proxier"
    assert {"iptables", "ipvs", "nftables", "userspace"} <= set(reg.names())


class _Flaky(Proxier):
    def __init__(self) -> None:
        self.requests: list[SyncRequest] = []
        self.fail = True

    def sync(self, request: SyncRequest) -> SyncResult:
        self.requests.append(request)
        if self.fail:
            raise RuntimeError("renderer bug")
        return SyncResult(ok=True, rules_total={"nat": 7})

    def cleanup(self) -> bool:
        return True


def test_a_raising_proxier_is_a_failed_sync_that_keeps_stale_udp_entries() -> None:
    srv = _server()
    srv.proxier = flaky = _Flaky()
    dns = ServicePortName("ns", "dns", "", "UDP")
    slices: SummaryStore[EndpointSlice] = SummaryStore(srv.on_slice, _slice_service_key)
    udp = msgspec.convert({"metadata": {"name": "dns-1", "namespace": "ns",
                                        "labels": {"kubernetes.io/service-name": "dns"}},
                           "ports": [{"port": 53, "protocol": "UDP"}],
                           "endpoints": [{"addresses": ["10.1.0.9"]}]}, EndpointSlice)
    slices.replace([udp], "1")
    assert asyncio.run(srv._sync(True)) is False
    assert flaky.requests[0].stale_services == [dns]
    flaky.fail = False
    assert asyncio.run(srv._sync(True)) is True
    # The failed sync's conntrack work is handed to the next one.
    assert flaky.requests[1].stale_services == [dns] and flaky.requests[1].full
    assert srv.health.last_updated is not None
    assert 'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 7.0' in srv.metrics.exposition().decode()


def test_busy_port_is_logged_or_fatal_with_hard_fail() -> None:
    import socket

    from kproxy.server import _start_http

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"

        async def main() -> None:
            assert await _start_http({}, addr, "healthz", hard_fail=False) is None
            with pytest.raises(ConfigError, match=f"--healthz-bind-address {addr}: cannot listen"):
                await _start_http({}, addr, "healthz", hard_fail=True)
            assert await _start_http({}, "", "metrics", hard_fail=True) is None

        asyncio.run(main())
    assert parse_config_flag(["--bind-address-hard-fail"]).bind_address_hard_fail


def parse_config_flag(argv: list[str]) -> KProxyConfig:
    from kproxy.cli import parse_config

    return parse_config([*argv, "--hostname-override", "n"])


def test_cleanup_visits_every_mode_only_for_kube_proxys_own_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    from kproxy import server

    visited: list[tuple[str, bool]] = []

    def clean(registry: Any, mode: str, cfg: KProxyConfig, factory: Any) -> bool:
        visited.append((mode, factory is not None))
        return True

    monkeypatch.setattr(server, "_clean_mode", clean)
    # A mode registered in place of a module (tests' recording proxier) leaves the kernel alone.
    registry = ModeRegistry({"recording": lambda c: None})
    assert server.cleanup(KProxyConfig(mode="recording"), registry.factory("recording"), registry) == 0
    assert visited == [("recording", True)]
    visited.clear()
    registry = ModeRegistry()
    assert server.cleanup(KProxyConfig(mode="ipvs"), lambda c: None, registry) == 0  # type: ignore[arg-type,return-value]
    assert visited == [("iptables", False), ("nftables", False), ("userspace", False), ("ipvs", True)]
    assert not ModeRegistry({"iptables": lambda c: None}).is_builtin("iptables")

"""The per-sync views a partial sync updates from its `changed` names alone (FamilyView.request,
HealthChecks) against a from-scratch computation over the whole state, after any sequence of
Service and EndpointSlice changes and full or partial syncs (property test, hypothesis), and the
cost that made them incremental: a partial sync's hand-over no longer grows with the table."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.changes import ProxyState
from kproxy.healthcheck import NamespacedName, ServiceHealthServer
from kproxy.model import IP, Endpoint, IPFamily, Port, ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import MetaProxier
from kproxy.proxy import HealthChecks, health_checks
from kproxy.proxy.families import FamilyView, endpoints_for_family, family_of, service_for_family

SERVICES = ["a", "b", "c", "d"]
FAMILIES: tuple[IPFamily, IPFamily] = ("IPv4", "IPv6")


class Recording(Proxier):
    mode = "recording"

    def __init__(self) -> None:
        self.requests: list[SyncRequest] = []

    def sync(self, request: SyncRequest) -> SyncResult:
        self.requests.append(request)
        return SyncResult(ok=True)

    def cleanup(self) -> bool:
        return True


class RecordingHealthServer(ServiceHealthServer):
    """What the meta proxier hands the health-check server; no listener is opened."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:0")
        self.ports: dict[NamespacedName, int] = {}
        self.counts: dict[NamespacedName, int] = {}

    def sync_services(self, ports: dict[NamespacedName, int]) -> list[str]:
        self.ports = dict(ports)
        return []

    def sync_endpoints(self, counts: dict[NamespacedName, int]) -> None:
        self.counts = dict(counts)


def _spn(svc: str) -> ServicePortName:
    return ServicePortName("ns", svc, "http", "TCP")


def _service(svc: str, ips: tuple[str, ...], hc: int, local: bool) -> ServicePort:
    return ServicePort(name=_spn(svc), type="LoadBalancer" if hc else "ClusterIP",
                       cluster_ips=tuple(IP(ip) for ip in ips), port=Port(80), protocol="TCP",
                       node_port=Port(30000 + hc) if hc else Port(0),
                       external_ips=(IP("192.0.2.9"), IP("2001:db8::9")),
                       external_policy_local=local, health_check_node_port=Port(hc))


cluster_ips = st.sampled_from([("10.96.0.1",), ("fd00::1",), ("10.96.0.1", "fd00::1"), ("fd00::1", "10.96.0.1")])
endpoint = st.builds(lambda ip, local, ready: Endpoint(IP(ip), Port(8080), ready=ready, serving=ready,
                                                       is_local=local, node_name="n1" if local else "n2"),
                     st.sampled_from(["10.0.0.1", "10.0.0.2", "fd01::1", "fd01::2"]), st.booleans(), st.booleans())
op = st.one_of(
    st.tuples(st.just("svc"), st.sampled_from(SERVICES),
              st.one_of(st.none(), st.tuples(cluster_ips, st.sampled_from([0, 31000, 31001]), st.booleans()))),
    st.tuples(st.just("slice"), st.sampled_from(SERVICES), st.sampled_from(["IPv4", "IPv6"]),
              st.one_of(st.none(), st.lists(endpoint, max_size=3))),
    st.tuples(st.just("sync"), st.booleans()),
)


def _expected_health(services: dict[ServicePortName, ServicePort],
                     endpoints: dict[ServicePortName, tuple[Endpoint, ...]]
                     ) -> tuple[dict[NamespacedName, int], dict[NamespacedName, int]]:
    """From scratch: each Service from its primary family (the node's first family that has it),
    with that family's endpoints."""
    merged_svc: dict[ServicePortName, ServicePort] = {}
    merged_eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for name, svc in services.items():
        for family in FAMILIES:
            view = service_for_family(svc, family)
            if view is not None:
                merged_svc[name] = view
                eps = endpoints_for_family(endpoints.get(name, ()), family_of(view.cluster_ips[0]))
                if eps:
                    merged_eps[name] = eps
                break
    return health_checks(merged_svc, merged_eps)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=30))
def test_incremental_views_match_a_from_scratch_computation(ops: list[tuple[object, ...]]) -> None:
    state = ProxyState()
    family_proxiers = {family: Recording() for family in FAMILIES}
    health = RecordingHealthServer()
    meta = MetaProxier(family_proxiers, health)
    first = True
    for o in [*ops, ("sync", False)]:
        if o[0] == "svc":
            _, svc, spec = o
            assert isinstance(svc, str)
            ports = {} if spec is None else {_spn(svc): _service(svc, *spec)}  # type: ignore[misc]
            state.services_tracker.update(f"ns/{svc}", ports)
        elif o[0] == "slice":
            _, svc, family, eps = o
            assert isinstance(svc, str) and isinstance(family, str)
            content = None if eps is None else {
                _spn(svc): tuple(sorted({e.ip: e for e in eps  # type: ignore[attr-defined]
                                         if family_of(e.ip) == family}.values()))}
            state.endpoints_tracker.update(f"ns/{svc}", family, content)
        else:
            full = bool(o[1]) or first
            first = False
            request = state.checkout(full).request
            assert meta.sync(request).ok
            for family, proxier in family_proxiers.items():
                got = proxier.requests[-1]
                scratch = FamilyView(family)
                assert got.services == scratch.services(request.services)
                assert got.endpoints == scratch.endpoints(request.endpoints)
            assert (health.ports, health.counts) == _expected_health(request.services, request.endpoints)
            # What a proxier got is its own: the next sync does not change it under its feet.
            kept = {family: (dict(p.requests[-1].services), dict(p.requests[-1].endpoints))
                    for family, p in family_proxiers.items()}
            meta.sync(state.checkout(False).request)
            for family, (services, endpoints) in kept.items():
                req = family_proxiers[family].requests[-2]
                assert (req.services, req.endpoints) == (services, endpoints)


def test_health_checks_alone_track_a_proxiers_requests() -> None:
    """HealthChecks as a single-family proxier uses it (update_request): a partial request only
    re-reads its changed names; the subset holds only Services with a health check."""
    checks = HealthChecks()
    a, b = _service("a", ("10.96.0.1",), 31000, True), _service("b", ("10.96.0.2",), 0, False)
    local = (Endpoint(IP("10.0.0.1"), Port(8080), is_local=True),)
    checks.update_request({a.name: a, b.name: b}, {a.name: local}, frozenset(), full=False)  # first: all
    assert checks.primed and set(checks.services) == {a.name}
    assert health_checks(checks.services, checks.endpoints) == (
        {NamespacedName("ns", "a"): 31000}, {NamespacedName("ns", "a"): 1})
    a2 = _service("a", ("10.96.0.1",), 31001, True)
    checks.update_request({a.name: a2, b.name: b}, {}, frozenset({a.name}), full=False)
    assert health_checks(checks.services, checks.endpoints) == (
        {NamespacedName("ns", "a"): 31001}, {NamespacedName("ns", "a"): 0})
    checks.update_request({b.name: b}, {}, frozenset({a.name}), full=False)
    assert checks.services == {} and checks.endpoints == {}


class CountingDict(dict[ServicePortName, object]):
    """Counts how often it is walked and how many keys are looked up."""

    walks = 0
    lookups = 0

    def items(self):  # type: ignore[override]
        CountingDict.walks += 1
        return super().items()

    def __iter__(self):  # type: ignore[override]
        CountingDict.walks += 1
        return super().__iter__()

    def get(self, key, default=None):  # type: ignore[override]
        CountingDict.lookups += 1
        return super().get(key, default)


def test_a_partial_sync_visits_only_its_changed_names() -> None:
    """At 10,000 Services the views' walk of the whole state on every sync (a hash and a lookup
    of every ServicePortName per view) was ~100 ms of write -> rule present on a loaded machine;
    a partial sync now looks up its changed names only (the dict copies a proxier may keep are
    C-level and do not hash)."""
    n = 2000
    services = {_spn(f"s{i}"): _service(f"s{i}", (f"10.96.{i >> 8}.{i & 255}",), 31000 if i % 2 else 0, True)
                for i in range(n)}
    endpoints = {name: (Endpoint(IP("10.0.0.1"), Port(8080), is_local=True),) for name in services}
    meta = MetaProxier({family: Recording() for family in FAMILIES}, RecordingHealthServer())
    meta.sync(SyncRequest(services=services, endpoints=endpoints, full=True))
    changed = _spn("s4")
    services[changed] = _service("s4", ("10.96.0.4",), 31005, True)
    CountingDict.walks = CountingDict.lookups = 0
    meta.sync(SyncRequest(services=CountingDict(services), endpoints=CountingDict(endpoints),  # type: ignore[arg-type]
                          changed=frozenset({changed}), full=False))
    assert CountingDict.walks == 0 and CountingDict.lookups <= 2 * len(FAMILIES) + 2
    assert meta.health_server is not None
    assert isinstance(meta.health_server, RecordingHealthServer)
    assert meta.health_server.ports[NamespacedName("ns", "s4")] == 31005
    assert len(meta.health_server.ports) == n // 2 + 1

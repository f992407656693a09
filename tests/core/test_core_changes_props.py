"""Property test of the trackers: after any sequence of Service/EndpointSlice updates, deletes and
checkouts, the state handed to the proxier equals what a from-scratch computation of the
current objects gives, and `changed` names exactly the ServicePorts that differ from the
previous request."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.changes import ProxyState, merge_slices
from kproxy.kube.ingest import SliceEndpoints
from kproxy.model import Endpoint, ServicePort, ServicePortName

SERVICES = ["a", "b", "c"]
SLICES = ["s1", "s2"]
PORTS = [("http", "TCP"), ("dns", "UDP")]


def _spn(svc: str, port: tuple[str, str]) -> ServicePortName:
    return ServicePortName("ns", svc, port[0], port[1])  # type: ignore[arg-type]


endpoint = st.builds(lambda ip, port, ready: Endpoint(f"10.0.0.{ip}", port, ready=ready, serving=ready),
                     st.integers(1, 4), st.sampled_from([8080, 8081]), st.booleans())
slice_content = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(PORTS), st.lists(endpoint, max_size=4), max_size=2))
service_content = st.one_of(st.none(), st.lists(st.sampled_from(PORTS), unique=True, max_size=2))
op = st.one_of(
    st.tuples(st.just("svc"), st.sampled_from(SERVICES), service_content, st.integers(80, 81)),
    st.tuples(st.just("slice"), st.sampled_from(SERVICES), st.sampled_from(SLICES), slice_content),
    st.tuples(st.just("checkout")),
)


def _slice_eps(svc: str, content: dict[tuple[str, str], list[Endpoint]]) -> SliceEndpoints:
    # As slice_endpoints() delivers them: sorted, one entry per IP within a port.
    out: SliceEndpoints = {}
    for port, eps in content.items():
        by_ip: dict[str, Endpoint] = {}
        for e in eps:
            by_ip.setdefault(e.ip, e)
        out[_spn(svc, port)] = tuple(sorted(by_ip.values()))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=25))
def test_trackers_match_a_from_scratch_computation(ops: list[tuple[object, ...]]) -> None:
    state = ProxyState()
    services: dict[str, dict[ServicePortName, ServicePort]] = {}
    slices: dict[str, dict[str, SliceEndpoints]] = {}
    last_services: dict[ServicePortName, ServicePort] = {}
    last_endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for o in [*ops, ("checkout",)]:
        if o[0] == "svc":
            _, svc, ports, number = o
            assert isinstance(svc, str) and isinstance(number, int)
            new = {} if ports is None else {
                _spn(svc, p): ServicePort(name=_spn(svc, p), type="ClusterIP", cluster_ips=("10.96.0.1",),
                                          port=number, protocol=p[1])  # type: ignore[arg-type, misc]
                for p in ports}  # type: ignore[union-attr]
            services[svc] = new
            state.services_tracker.update(f"ns/{svc}", new)
        elif o[0] == "slice":
            _, svc, name, content = o
            assert isinstance(svc, str) and isinstance(name, str)
            eps = None if content is None else _slice_eps(svc, content)  # type: ignore[arg-type]
            if eps is None:
                slices.get(svc, {}).pop(name, None)
            else:
                slices.setdefault(svc, {})[name] = eps
            state.endpoints_tracker.update(f"ns/{svc}", name, eps)
        else:
            req = state.checkout(full=False).request
            want_services = {k: v for ports in services.values() for k, v in ports.items()}
            want_endpoints = {k: v for sl in slices.values() for k, v in merge_slices(sl).items()}
            assert req.services == want_services
            assert req.endpoints == want_endpoints
            want_changed = {k for k in last_services.keys() | want_services.keys()
                            if last_services.get(k) != want_services.get(k)}
            want_changed |= {k for k in last_endpoints.keys() | want_endpoints.keys()
                             if last_endpoints.get(k) != want_endpoints.get(k)}
            assert req.changed == want_changed
            # Stale UDP entries: exactly the ready endpoints that stopped being ready/present.
            for spn, ep in req.stale_endpoints:
                assert spn.protocol == "UDP" and ep.ready
                assert ep.addr not in {e.addr for e in want_endpoints.get(spn, ()) if e.ready}
            last_services, last_endpoints = want_services, want_endpoints
            assert not state.pending()

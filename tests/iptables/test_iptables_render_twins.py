"""The compiled renderer and its pure-Python twin must produce identical bytes."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy import _fastpath, _purepath
from kproxy.model import Endpoint, ServicePort, ServicePortName

TWINS = [pytest.param(_fastpath, id="compiled"), pytest.param(_purepath, id="pure")]


def test_compiled_renderer_is_compiled() -> None:
    assert str(_fastpath.__file__).endswith(".so")
    assert _fastpath.render_service_port is not _purepath.render_service_port


def _representative() -> list[tuple[ServicePort, tuple[Endpoint, ...]]]:
    n = ServicePortName("ns1", "svc1", "p80")
    u = ServicePortName("kube-system", "kube-dns", "dns", "UDP")
    eps = (Endpoint("10.180.0.1", 80, is_local=True), Endpoint("10.180.2.1", 80), Endpoint("10.180.0.2", 80))
    term = (
        Endpoint("10.180.0.1", 80, ready=False, serving=True, terminating=True, is_local=True),
        Endpoint("10.180.2.1", 80, ready=False, serving=False, terminating=True),
    )
    return [
        (ServicePort(name=n, type="ClusterIP", cluster_ips=("172.30.0.41",), port=80, protocol="TCP"), eps),
        (
            ServicePort(name=u, type="ClusterIP", cluster_ips=("172.30.0.10",), port=53, protocol="UDP"),
            eps[:1],
        ),
        (ServicePort(name=n, type="ClusterIP", cluster_ips=("172.30.0.41",), port=80, protocol="TCP"), ()),
        (
            ServicePort(
                name=n,
                type="LoadBalancer",
                cluster_ips=("172.30.0.41",),
                port=80,
                protocol="TCP",
                node_port=30080,
                external_ips=("192.168.99.11", "2001:db8::1"),
                load_balancer_ips=("1.2.3.4",),
                load_balancer_source_ranges=("203.0.113.0/25", "10.0.0.0/8"),
                session_affinity_timeout=10800,
                external_policy_local=True,
                health_check_node_port=30000,
            ),
            eps,
        ),
        (
            ServicePort(
                name=n,
                type="NodePort",
                cluster_ips=("172.30.0.41",),
                port=80,
                protocol="TCP",
                node_port=3001,
                internal_policy_local=True,
            ),
            term,
        ),
    ]


@pytest.mark.parametrize("impl", TWINS)
@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("cidr", ["", "10.0.0.0/8"])
def test_twins_agree_on_representative_services(impl: ModuleType, case: int, large: bool, cidr: str) -> None:
    svc, eps = _representative()[case]
    got = impl.render_service_port(svc, eps, False, cidr, large, ("10.0.0.5",))
    want = _purepath.render_service_port(svc, eps, False, cidr, large, ("10.0.0.5",))
    assert got == want
    assert got[0] or got[1]  # every service renders something (dispatch or filter)


_ips = st.builds(lambda a, b: f"10.{a}.{b}.1", st.integers(0, 3), st.integers(0, 3))
_endpoint = st.builds(
    Endpoint,
    ip=_ips,
    port=st.sampled_from([80, 8080, 53]),
    ready=st.booleans(),
    serving=st.booleans(),
    terminating=st.booleans(),
    is_local=st.booleans(),
)


@st.composite
def _service(draw: st.DrawFn) -> ServicePort:
    proto = draw(st.sampled_from(["TCP", "UDP", "SCTP"]))
    name = ServicePortName(
        draw(st.sampled_from(["a", "ns-1"])),
        draw(st.sampled_from(["s", "web"])),
        draw(st.sampled_from(["", "http"])),
        proto,
    )  # type: ignore[arg-type]
    typ = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    return ServicePort(
        name=name,
        type=typ,  # type: ignore[arg-type]
        cluster_ips=("172.30.1.1",),
        port=draw(st.integers(1, 65535)),
        protocol=proto,  # type: ignore[arg-type]
        node_port=draw(st.sampled_from([0, 30001])) if typ != "ClusterIP" else 0,
        external_ips=tuple(
            draw(st.lists(st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::5"]), max_size=2))
        ),
        load_balancer_ips=("198.51.100.7",) if typ == "LoadBalancer" and draw(st.booleans()) else (),
        load_balancer_source_ranges=tuple(
            draw(st.lists(st.sampled_from(["10.0.0.0/8", "192.0.2.0/24"]), max_size=2))
        ),
        session_affinity_timeout=draw(st.sampled_from([None, 10, 10800])),
        external_policy_local=draw(st.booleans()),
        internal_policy_local=draw(st.booleans()),
        health_check_node_port=draw(st.sampled_from([0, 32000])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    svc=_service(),
    eps=st.lists(_endpoint, max_size=12, unique_by=lambda e: (e.ip, e.port)),
    masq_all=st.booleans(),
    cidr=st.sampled_from(["", "10.0.0.0/8"]),
    large=st.booleans(),
)
def test_twins_agree_on_random_services(
    svc: ServicePort, eps: list[Endpoint], masq_all: bool, cidr: str, large: bool
) -> None:
    args = (svc, tuple(eps), masq_all, cidr, large, ("10.1.1.1",))
    assert _fastpath.render_service_port(*args) == _purepath.render_service_port(*args)


@pytest.mark.parametrize("impl", TWINS)
def test_probability_formatting_matches_go(impl: ModuleType) -> None:
    # Go's fmt.Sprintf("%0.10f", 1.0/float64(n)), as upstream's computeProbability.
    assert [impl.probability(n) for n in (2, 3, 7, 10, 300)] == [
        "0.5000000000",
        "0.3333333333",
        "0.1428571429",
        "0.1000000000",
        "0.0033333333",
    ]


@pytest.mark.parametrize("impl", TWINS)
def test_endpoint_chain_name_matches_upstream(impl: ModuleType) -> None:
    # Upstream proxier_test.go: ns1/svc1:p80 -> 10.180.0.1:80 is KUBE-SEP-SXIVWICOYRO3J4NJ.
    assert impl.endpoint_chain_name("ns1/svc1:p80", "tcp", "10.180.0.1:80") == "KUBE-SEP-SXIVWICOYRO3J4NJ"

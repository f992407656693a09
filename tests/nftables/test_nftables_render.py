"""The nftables renderer: the compiled module and the same source run as Python produce identical
output (conformance Services of both families and random ones from hypothesis); chain names are stable, valid nft
identifiers and unique per ServicePort; what each kind of traffic gets follows kproxy.proxy."""
from __future__ import annotations

import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.backends import nftnl
from kproxy.backends.nftables import Nft
from kproxy.proxiers.nftables import NftablesProxier, load_renderer
from kproxy.proxy.families import endpoints_for_family, service_for_family

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conformance"))
from conformance_table import CLUSTER_CIDR, CLUSTER_CIDR6, NODE_IP, NODE_IP6, NODE_ZONE, state

COMPILED = load_renderer(pure=False)


def _text(rules: tuple[nftnl.Rule, ...]) -> str:
    return "\n".join(nftnl.rule_text(rule) for rule in rules)
PURE = load_renderer(pure=True)


def test_the_compiled_module_is_compiled() -> None:
    assert COMPILED.__file__.endswith(".so"), "setup.py build_ext did not compile kproxy/_nftpath.py"
    assert PURE.__file__.endswith("_nftpath.py")


def _both(svc: ServicePort, eps: tuple[Endpoint, ...], masq_all: bool = False, family: str = "IPv4") -> object:
    v6 = family == "IPv6"
    args = (svc, eps, masq_all, CLUSTER_CIDR6 if v6 else CLUSTER_CIDR, (NODE_IP6 if v6 else NODE_IP,), NODE_ZONE, family)
    a, b = COMPILED.render_service_port(*args), PURE.render_service_port(*args)
    assert tuple(a) == tuple(b)
    return a


def test_conformance_services_render_identically() -> None:
    """Every conformance Service as each family's proxier gets it (kproxy.proxiers.meta's cut);
    in the ip6 table only ip6 matches, and no chain name holds an IPv6 address's colons."""
    for phase in (1, 2):
        services, eps = state(phase, ("IPv4", "IPv6", "dual"))
        for family in ("IPv4", "IPv6"):
            for name, full in services.items():
                svc = service_for_family(full, family)  # type: ignore[arg-type]
                if svc is None:
                    continue
                for masq in (False, True):
                    r = _both(svc, endpoints_for_family(eps.get(name, ()), family), masq, family)  # type: ignore[arg-type]
                    text = " ".join(f"{c} {_text(body)}" for c, body in r.chains)  # type: ignore[attr-defined]
                    assert all(":" not in c for c, _ in r.chains)  # type: ignore[attr-defined]
                    if family == "IPv6":
                        assert " ip " not in f" {text} " and "ip saddr" not in text and "ip daddr" not in text


ips = st.builds(lambda a, b: f"10.{a}.{b}.{(a * 7 + b) % 250 + 1}", st.integers(0, 255), st.integers(0, 255))
endpoint = st.builds(Endpoint, ip=ips, port=st.integers(1, 65535), ready=st.booleans(), serving=st.booleans(),
                     terminating=st.booleans(), is_local=st.booleans(),
                     zone_hints=st.sampled_from([(), ("zone-a",), ("zone-b",)]))
service = st.builds(
    lambda kind, proto, np, ext, lb, ranges, aff, etp, itp, ns, n: ServicePort(
        name=ServicePortName(ns, n, "p", proto), type=kind, cluster_ips=("10.96.0.9",), port=80, protocol=proto,
        node_port=np if kind != "ClusterIP" else 0, external_ips=ext, load_balancer_ips=lb if kind == "LoadBalancer" else (),
        load_balancer_source_ranges=ranges, session_affinity_timeout=aff, external_policy_local=etp,
        internal_policy_local=itp),
    st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), st.sampled_from(["TCP", "UDP", "SCTP"]),
    st.integers(30000, 32767), st.sampled_from([(), ("10.99.0.1",)]), st.sampled_from([(), ("10.98.0.1",)]),
    st.sampled_from([(), ("192.168.50.0/24",), ("203.0.113.0/24", "198.51.100.0/24")]),
    st.sampled_from([None, 60]), st.booleans(), st.booleans(),
    st.sampled_from(["default", "kube-system", "a-b"]), st.sampled_from(["svc", "web-1"]))


@settings(max_examples=300, deadline=None)
@given(service, st.lists(endpoint, max_size=6, unique_by=lambda e: (e.ip, e.port)), st.booleans())
def test_random_services_render_identically_and_consistently(svc: ServicePort, eps: list[Endpoint], masq: bool) -> None:
    r = _both(svc, tuple(eps), masq)
    chains = dict(r.chains)  # type: ignore[attr-defined]
    assert len(chains) == len(r.chains)  # type: ignore[attr-defined]
    base = f"{svc.name.namespace}/{svc.name.name}/{svc.protocol.lower()}/p"
    for chain in chains:
        assert chain[0].isalpha() and len(chain) < 256 and base in chain
    # Every verdict goes to a chain this ServicePort defines, or to the shared reject/drop.
    for _map, _key, value in r.elements:  # type: ignore[attr-defined]
        if value.startswith("goto "):
            target = value[5:]
            assert target == "reject-chain" or target in chains, value
    for body in chains.values():
        for word in _text(body).split():
            if word.startswith(("service-", "local-", "external-", "endpoint-")) and "/" in word:
                assert word in chains, f"rule refers to an undefined chain {word}"


def test_chain_names_are_stable() -> None:
    name = ServicePortName("ns1", "svc1", "p80", "TCP")
    assert COMPILED.chain_base(name) == PURE.chain_base(name) == COMPILED.chain_base(ServicePortName("ns1", "svc1", "p80", "TCP"))
    assert COMPILED.chain_base(name).endswith("-ns1/svc1/tcp/p80")
    assert COMPILED.chain_base(name) != COMPILED.chain_base(ServicePortName("ns1", "svc1", "p81", "TCP"))


def test_each_family_table_takes_its_family_of_the_service_cidrs() -> None:
    """Both families' proxiers get every service CIDR (upstream's OnServiceCIDRsChanged); each
    keeps its own family's and writes its unallocated-ClusterIP drop with its own address match
    (no kernel)."""
    p4, p6 = (NftablesProxier(Nft("unused"), family=f) for f in ("IPv4", "IPv6"))  # type: ignore[arg-type]
    for p in (p4, p6):
        p.set_service_cidrs(("10.96.0.0/12", "fd00:10:96::/108"))
    assert p4.service_cidrs == ("10.96.0.0/12",) and p6.service_cidrs == ("fd00:10:96::/108",)
    assert p6._cluster_ips_check()[-1].startswith("add rule ip6 kube-proxy cluster-ips-check ip6 daddr fd00:10:96::/108 drop")
    assert p4._cluster_ips_check()[-1].startswith("add rule ip kube-proxy cluster-ips-check ip daddr 10.96.0.0/12 drop")

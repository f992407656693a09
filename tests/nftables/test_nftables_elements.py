"""The nftables proxier's compact element bookkeeping (kproxy.proxiers.nftelements): packing is
lossless, the shared reference counts agree with a plain Counter of every reference (hypothesis),
and against the kernel: after a random run of partial syncs over Services that share ClusterIPs
(ports of one Service), endpoint pods (hairpin-ips) and no-endpoint verdicts, the table's
elements are those a fresh full sync of the same Services writes (read back with `nft -j list`)."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nft_state import kernel_entries

from kproxy.backends.nftables import Nft
from kproxy.fastpath import pure_twin
from kproxy.model import IP, Endpoint, Port, ServicePort, ServicePortName
from kproxy.proxiers import nftelements
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.nftables import NftablesProxier
from kproxy.proxiers.nftelements import (CLUSTER_IPS, HAIRPIN, Element, SharedRefs, is_shared, pack, slot_key, unpack,
                                          unpack_set)

# The module as setup.py compiles it (when built) and as Python (KPROXY_PURE=1).
TWINS = (nftelements, pure_twin(nftelements))
# Rendered text never has a tab or newline (validated names and addresses): any other text.
TEXT = st.text(st.characters(blacklist_characters="\t\n", blacklist_categories=("Cs",)), max_size=12)
ELEMENT = st.one_of(
    st.tuples(st.sampled_from(["endpoints-tcp-1", "endpoints-tcp-17", HAIRPIN, CLUSTER_IPS, "service-ips"]), TEXT, TEXT),
    st.builds(lambda a: (HAIRPIN, f"{a} . {a}", ""), TEXT),  # kept as A alone
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ELEMENT, max_size=30))
def test_pack_keeps_every_element_once(elements: list[Element]) -> None:
    packed = pack(elements)
    once = list(dict.fromkeys(elements))
    assert sorted(unpack(packed)) == sorted(once)
    for set_name in {e[0] for e in elements}:
        assert sorted(unpack_set(packed, set_name)) == sorted(e for e in once if e[0] == set_name)


@pytest.mark.parametrize("bad", ["a\tb", "a\nb"])
def test_pack_refuses_separators(bad: str) -> None:
    with pytest.raises(ValueError):
        pack([("service-ips", bad, "")])
    with pytest.raises(ValueError):
        pack([("service-ips", "k", bad)])


ADDR = st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1"])
SHARED = st.one_of(
    st.builds(lambda a: (HAIRPIN, f"{a} . {a}", ""), ADDR),
    st.builds(lambda a, b: (HAIRPIN, f"{a} . {b}", ""), ADDR, ADDR),
    st.builds(lambda a: (CLUSTER_IPS, a, ""), ADDR),
    st.builds(lambda a: ("no-endpoint-services", f"{a} . tcp . 80", "drop"), ADDR),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(SHARED, st.sampled_from([1, 1, -1])), max_size=40))
def test_shared_refs_count_as_a_counter(ops: list[tuple[Element, int]]) -> None:
    refs, plain = SharedRefs(), Counter[Element]()
    for e, d in ops:
        if d < 0 and plain[e] == 0:
            continue  # a reference is only dropped by its holder
        refs.add(e, d, canon={"10.0.0.1": "10.0.0.1"})
        plain[e] += d
    want = {e: n for e, n in plain.items() if n > 0}
    assert {e: refs.count(e) for e in want} == want
    assert sorted(refs.elements()) == sorted(want)
    assert len(refs) == len(want)


PODS = [f"10.128.0.{i}" for i in range(1, 7)]


def _services(rng: random.Random, present: dict[int, bool], two_ports: dict[int, bool],
              eps_of: dict[int, list[str]]) -> tuple[dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    """Services 0-5: a ClusterIP, ports 80 (and 81), endpoints from a pool of 6 pods (shared
    hairpin-ips pairs; none: no-endpoint verdicts); 6 and 7: never endpoints, one external IP
    and port for both (their no-endpoint-services element is the same)."""
    services: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i in range(8):
        if not present[i]:
            continue
        for port in (80, 81) if two_ports[i] else (80,):
            spn = ServicePortName("el", f"svc-{i}", f"p{port}", "TCP")
            services[spn] = ServicePort(spn, "ClusterIP", (IP(f"10.96.0.{i + 1}"),), Port(port), "TCP",
                                        external_ips=(IP("192.0.2.10"),) if i >= 6 else ())
            endpoints[spn] = tuple(Endpoint(IP(ip), Port(8080 + port)) for ip in eps_of[i]) if i < 6 else ()
    return services, endpoints


def _elements(netns: str) -> tuple[set[str], int]:
    """The table's elements but the endpoint maps' (their slots depend on the order of syncs),
    and how many endpoint map elements there are."""
    entries = [e for e in kernel_entries(netns) if e.startswith("elem ")]
    return {e for e in entries if not e.startswith("elem endpoints-")}, sum(e.startswith("elem endpoints-") for e in entries)


BLOCK = st.tuples(st.sampled_from(["endpoints-tcp-1", "endpoints-udp-3"]), st.integers(0, 5000),
                  st.lists(TEXT, max_size=4).map(tuple))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ELEMENT, SHARED).filter(lambda e: not e[0].startswith("endpoints-")), max_size=30),
       st.lists(BLOCK, max_size=3), st.lists(SHARED, max_size=5))
def test_pack_counting_is_pack_refs_and_the_rest_of_each_element(
        elements: list[Element], blocks: list[tuple[str, int, tuple[str, ...]]], before: list[Element]) -> None:
    """A full sync's one pass over a ServicePort's elements (the renderer's, which are not in an
    endpoint map, and its blocks') gives what packing the deduplicated elements, counting each
    shared one in SharedRefs and keeping the others but the endpoint maps' gave: the same packed
    text, the same counts, the same other elements in the same order; compiled (setup.py) and
    as Python alike."""
    expected = SharedRefs()
    for e in before:  # other ServicePorts' references, already counted
        expected.add(e)
    everything = [*elements, *((m, slot_key(first + k), t) for m, first, targets in blocks for k, t in enumerate(targets))]
    unique = list(dict.fromkeys(everything))
    for e in unique:
        if is_shared(e[0]):
            expected.add(e)
    for twin in TWINS:
        refs = twin.SharedRefs()
        for e in before:
            refs.add(e)
        own: list[Element] = []
        assert twin.pack_counting(elements, blocks, refs, {}, own) == pack(unique)
        assert (refs.hairpin, refs.cluster_ips, refs.other) == (expected.hairpin, expected.cluster_ips, expected.other)
        assert own == [e for e in unique if not is_shared(e[0]) and not e[0].startswith("endpoints-")]


def test_partial_syncs_end_where_a_full_sync_starts(netns: str) -> None:
    rng = random.Random(15)
    present = {i: True for i in range(8)}
    two_ports = {i: i % 2 == 0 for i in range(8)}
    eps_of = {i: rng.sample(PODS, rng.randint(0, 3)) for i in range(6)}
    p = NftablesProxier(Nft(netns), cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",))
    p.stale_grace = 0.0
    services, endpoints = _services(rng, present, two_ports, eps_of)
    assert p.sync(SyncRequest(services, endpoints)).ok
    seen_shared = 0
    for _ in range(16):
        i = rng.randrange(8)
        what = rng.choice(["endpoints", "endpoints", "presence", "ports"] if i < 6 else ["presence", "ports"])
        if what == "endpoints":
            eps_of[i] = rng.sample(PODS, rng.randint(0, 4))
        elif what == "presence":
            present[i] = not present[i]
        else:
            two_ports[i] = not two_ports[i]
        old = set(services)
        services, endpoints = _services(rng, present, two_ports, eps_of)
        changed = frozenset(n for n in old | set(services) if n.name == f"svc-{i}")
        res = p.sync(SyncRequest(services, endpoints, changed=changed, full=False))
        assert res.ok, res.error
        elements, _ = _elements(netns)
        seen_shared += sum(1 for e in elements if e.startswith("elem hairpin-ips"))
    partial, partial_slots = _elements(netns)
    assert seen_shared, "no hairpin element was ever programmed: the run tested nothing shared"
    p.cleanup()
    fresh = NftablesProxier(Nft(netns), cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",))
    assert fresh.sync(SyncRequest(services, endpoints)).ok
    full, full_slots = _elements(netns)
    assert partial == full
    assert partial_slots == full_slots


def test_a_resync_keeps_the_bookkeeping_it_had(netns: str) -> None:
    """A full resync that finds a ServicePort as it was keeps the object it had (the fresh copy
    goes at once: a resync never holds two bookkeepings of 10,000 Services); a changed one is new."""
    rng = random.Random(16)
    present, two_ports = {i: True for i in range(8)}, {i: True for i in range(8)}
    eps_of = {i: rng.sample(PODS, 2) for i in range(6)}
    services, endpoints = _services(rng, present, two_ports, eps_of)
    p = NftablesProxier(Nft(netns), cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",))
    assert p.sync(SyncRequest(services, endpoints)).ok
    before = dict(p._programmed)
    eps_of[0] = [PODS[5]]
    services, endpoints = _services(rng, present, two_ports, eps_of)
    assert p.sync(SyncRequest(services, endpoints)).ok
    kept = {n for n, x in p._programmed.items() if x is before[n]}
    assert kept == {n for n in services if n.name != "svc-0"}

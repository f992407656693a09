"""The record index updated event by event must equal an index built from scratch from the final
objects (same encoded answers, same existing names), whatever the order of events; and a relist
that changes nothing re-encodes nothing. The Reflector stores feed it page by page."""
from __future__ import annotations

import asyncio
import ipaddress
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kdns import _purewire
from kdns.objects import (
    SHARED_MAX,
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    ObjectMeta,
    Service,
    ServicePort,
    ServiceSpec,
    share,
)
from kdns.records import ZoneIndex, dashed, parse_ip, pod_ip
from kdns.source import IndexFeeder, ServiceStore, SliceStore

from kproxy.kube.reflector import PagedReflectorStore


def _random_service(rnd: random.Random, ns: str, name: str) -> Service:
    kind = rnd.choice(["clusterip", "clusterip", "headless", "external", "dual", "kube-dns"])
    ports = [ServicePort(rnd.choice(["http", "grpc", ""]), rnd.choice([80, 443, 53]), rnd.choice(["TCP", "UDP"]))
             for _ in range(rnd.randrange(3))]
    if kind == "headless":
        spec = ServiceSpec(cluster_ip="None", ports=ports, publish_not_ready_addresses=rnd.random() < 0.3)
    elif kind == "external":
        spec = ServiceSpec(type="ExternalName", external_name=rnd.choice(["a.example.com", "b.example.org"]))
    elif kind == "dual":
        spec = ServiceSpec(cluster_ip="10.96.1.1", cluster_ips=["10.96.1.1", "fd00::1"], ports=ports)
    else:
        # shared ClusterIPs across Services make shared PTR RRsets: the multi-holder path
        ip = f"10.96.0.{rnd.randrange(1, 6)}"
        spec = ServiceSpec(cluster_ip=ip, cluster_ips=[ip], ports=ports)
    if kind == "kube-dns":
        ns, name = "kube-system", "kube-dns"
    return Service(ObjectMeta(name=name, namespace=ns), spec)


def _random_slice(rnd: random.Random, ns: str, name: str, svc: str) -> EndpointSlice:
    eps = [Endpoint([f"10.1.0.{rnd.randrange(1, 12)}"], EndpointConditions(rnd.choice([True, False, None])),
                    hostname=rnd.choice([None, None, f"h{rnd.randrange(3)}"]))
           for _ in range(rnd.randrange(4))]
    return EndpointSlice(ObjectMeta(name=name, namespace=ns, labels={"kubernetes.io/service-name": svc}),
                         endpoints=eps, ports=[EndpointPort(rnd.choice(["http", "grpc"]), 8080, "TCP")])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(8))
def test_dns_incremental_index_equals_fresh(seed: int) -> None:
    rnd = random.Random(seed)
    idx = ZoneIndex(table=_purewire.Table())
    services: dict[tuple[str, str], Service] = {}
    slices: dict[tuple[str, str], EndpointSlice] = {}
    for _ in range(250):
        ns = rnd.choice(["a", "b"])
        name = f"s{rnd.randrange(6)}"
        op = rnd.random()
        if op < 0.35:
            svc = _random_service(rnd, ns, name)
            services[svc.key] = svc
            idx.set_service(svc)
        elif op < 0.45:
            services.pop((ns, name), None)
            idx.delete_service((ns, name))
        elif op < 0.85:
            eps = _random_slice(rnd, ns, f"{name}-{rnd.randrange(2)}", rnd.choice([name, f"s{rnd.randrange(6)}"]))
            slices[eps.key] = eps
            idx.set_slice(eps)
        else:
            key = (ns, f"{name}-{rnd.randrange(2)}")
            slices.pop(key, None)
            idx.delete_slice(key)
    fresh = ZoneIndex(table=_purewire.Table())
    fresh.soa_data = idx.soa_data  # same serial
    fresh._soa_tail = idx._soa_tail
    fresh.keys_of.clear(), fresh.holders.clear(), fresh.names.clear(), fresh.answers.clear()
    fresh._refresh(("", ""))
    fresh.replace(services=list(services.values()), slices=list(slices.values()))
    assert set(idx.answers) == set(fresh.answers)
    for k in idx.answers:
        assert idx.answers[k] == fresh.answers[k], k
    assert idx.names == fresh.names
    assert idx.holders == fresh.holders


@pytest.mark.timeout(60)
def test_dns_relist_without_changes_reencodes_nothing() -> None:
    rnd = random.Random(9)
    idx = ZoneIndex(table=_purewire.Table())
    svcs = [_random_service(rnd, "a", f"s{i}") for i in range(40)]
    eps = [_random_slice(rnd, "a", f"s{i}-0", f"s{i}") for i in range(40)]
    idx.replace(services=svcs, slices=eps)
    encoded: list[bytes] = []
    original = idx._encode
    idx._encode = lambda kb, ident, others: (encoded.append(kb), original(kb, ident, others))  # type: ignore[method-assign]
    idx.replace(services=[Service(s.metadata, s.spec) for s in svcs], slices=list(eps))
    assert encoded == []
    changed = Service(svcs[3].metadata, ServiceSpec(cluster_ip="10.96.9.9", cluster_ips=["10.96.9.9"]))
    idx.replace(services=[changed if s.key == changed.key else s for s in svcs], slices=list(eps))
    assert encoded  # the one changed Service was re-encoded


@pytest.mark.timeout(60)
def test_dns_deferred_replace_encodes_in_slices_to_the_same_index() -> None:
    rnd = random.Random(4)
    svcs = [_random_service(rnd, "a", f"s{i}") for i in range(60)]
    eps = [_random_slice(rnd, "a", f"s{i}-0", f"s{i}") for i in range(60)]
    now = ZoneIndex(table=_purewire.Table())
    now.replace(services=svcs, slices=eps)
    later = ZoneIndex(table=_purewire.Table())
    later.soa_data, later._soa_tail = now.soa_data, now._soa_tail
    later.keys_of.clear(), later.holders.clear(), later.names.clear(), later.answers.clear()
    later._refresh(("", ""))
    later.replace(services=svcs, slices=eps, defer=True)
    assert later.pending and len(later.answers) < len(now.answers)
    rounds = 0
    while not later.encode_pending(budget=7):
        rounds += 1
        assert rounds < 100
    assert rounds >= 5  # really done in slices
    assert later.answers == now.answers and later.names == now.names


def test_dns_index_keeps_compacted_objects_with_shared_parts() -> None:
    def decoded(name: str, ip: str) -> Service:
        return msgspec.json.decode(
            b'{"metadata":{"name":"%s","namespace":"ns","resourceVersion":"42"},"spec":{"type":"ClusterIP",'
            b'"clusterIP":"%s","clusterIPs":["%s"],"ports":[{"name":"http","port":80,"protocol":"TCP"}]}}'
            % (name.encode(), ip.encode(), ip.encode()), type=Service)

    idx = ZoneIndex(table=_purewire.Table())
    idx.replace(services=[decoded("a", "10.96.0.1"), decoded("b", "10.96.0.2")])
    a, b = idx.services[("ns", "a")], idx.services[("ns", "b")]
    assert a.spec.ports is b.spec.ports and a.metadata.namespace is b.metadata.namespace
    assert (a.metadata.resource_version, a.spec.cluster_ips) == ("", ())
    assert [rr.data for rr in idx.rrset("a.ns.svc.cluster.local", 1)] == ["10.96.0.1"]
    # A relist of the same objects is equal once compacted: nothing to re-encode.
    idx.replace(services=[decoded("a", "10.96.0.1"), decoded("b", "10.96.0.2")], defer=True)
    assert not idx.pending
    table: dict[object, object] = {}
    for i in range(SHARED_MAX + 5):
        share(table, (i,))
    assert len(table) <= SHARED_MAX


def test_dns_stores_take_a_list_page_by_page_and_a_relist_drops_what_vanished() -> None:
    def svc(name: str, ip: str) -> Service:
        return Service(ObjectMeta(name=name, namespace="ns", resource_version="7"),
                       ServiceSpec(cluster_ip=ip, cluster_ips=[ip], ports=[ServicePort("http", 80, "TCP")]))

    def headless_slice(name: str, ip: str) -> EndpointSlice:
        return EndpointSlice(ObjectMeta(name=f"{name}-x", namespace="ns",
                                        labels={"kubernetes.io/service-name": name, "other": "label"}),
                             endpoints=[Endpoint([ip], EndpointConditions(True))],
                             ports=[EndpointPort("http", 8080, "TCP")])

    async def main() -> None:
        idx = ZoneIndex(table=_purewire.Table())
        feeder = IndexFeeder(idx)
        services, slices = ServiceStore(idx, feeder), SliceStore(idx, feeder)
        assert isinstance(services, PagedReflectorStore) and isinstance(slices, PagedReflectorStore)
        services.begin_replace()
        services.replace_page([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")])
        services.replace_page([svc("c", "10.96.0.3"), Service(ObjectMeta(name="h", namespace="ns"),
                                                              ServiceSpec(cluster_ip="None"))])
        assert not idx.services  # nothing reaches the index before the list is complete
        services.end_replace("9")
        slices.begin_replace()
        slices.replace_page([headless_slice("h", "10.1.0.5")])
        slices.end_replace("9")
        await feeder.idle.wait()
        assert sorted(n for _, n in idx.services) == ["a", "b", "c", "h"]
        assert idx.slices[("ns", "h-x")].metadata.labels == {"kubernetes.io/service-name": "h"}
        assert [rr.data for rr in idx.rrset("h.ns.svc.cluster.local", 1)] == ["10.1.0.5"]
        # A relist in which b is gone (deleted while the watch was down).
        services.begin_replace()
        services.replace_page([svc("a", "10.96.0.1"), svc("c", "10.96.0.3")])
        services.replace_page([Service(ObjectMeta(name="h", namespace="ns"), ServiceSpec(cluster_ip="None"))])
        services.end_replace("12")
        await feeder.idle.wait()
        assert ("ns", "b") not in idx.services and not idx.rrset("b.ns.svc.cluster.local", 1)
        assert [rr.data for rr in idx.rrset("c.ns.svc.cluster.local", 1)] == ["10.96.0.3"]

    asyncio.run(main())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_dns_pod_names_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """Every address's dashed name (CoreDNS's endpoint and pod name form) reads back as that
    address by CoreDNS's pod-name rule: an IPv6 address never has exactly three dashes without "--"."""
    assert pod_ip(dashed(str(ip))) == ip
    assert parse_ip(str(ip), ip.version) == ip
    assert parse_ip(str(ip), 10 - ip.version) is None  # the other family (4 <-> 6)


@pytest.mark.parametrize("label", ["fe80--1%eth0", "1-2-3", "1-2-3-4-5", "::1", "fd00-0-0-7", "g--1", "",
                                   "0x7f-0-0-1", "1--2--3"])
def test_dns_pod_names_that_are_not_addresses(label: str) -> None:
    assert pod_ip(label) is None

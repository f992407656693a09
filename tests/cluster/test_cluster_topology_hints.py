"""Topology Aware Hints, Auto mode (controlplane_stub/controllers/topology.py), against upstream's
rules in k8s.io/endpointslice/topologycache: worked examples computed by hand from those rules,
and properties over any zones, CPU and endpoints (hypothesis)."""
from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.controllers import topology as t

Obj = dict[str, Any]


def node(name: str, zone: str | None, cpu: str = "2", ready: bool = True, **labels: str) -> Obj:
    lab = dict(labels)
    if zone is not None:
        lab[t.ZONE_LABEL] = zone
    return {"metadata": {"name": name, "labels": lab},
            "status": {"allocatable": {"cpu": cpu},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def ep(zone: str | None, ready: bool = True) -> Obj:
    e: Obj = {"addresses": ["10.0.0.1"], "conditions": {"ready": ready}}
    if zone is not None:
        e["zone"] = zone
    return e


def hints(eps: list[Obj]) -> list[str | None]:
    return [e["hints"]["forZones"][0]["name"] if "hints" in e else None for e in eps]


def test_cpu_quantities_as_resource_quantity_milli_value() -> None:
    assert [t.cpu_millis(q) for q in ("2", "1500m", "0.5", "1k", "1e3", "100u", 4)] == [
        2000, 1500, 500, 1_000_000, 1_000_000, 1, 4000]
    for bad in ("", "two", "-1", "0", "1.5.2", None, True, [], "1Zi", "9" * 40):
        assert t.cpu_millis(bad) == 0, bad


def test_zone_shares_from_ready_worker_nodes() -> None:
    nodes = [node("a1", "a", "3"), node("a2", "a", "1"), node("b1", "b", "4000m"),
             node("cp", "c", "8", **{"node-role.kubernetes.io/control-plane": ""}),  # excluded
             node("down", "d", "8", ready=False)]  # not ready: excluded, even without anything else
    assert t.cpu_ratios_by_zone(nodes) == {"a": 0.5, "b": 0.5}
    # a ready node without a zone (or CPU) leaves no shares at all, as does a single zone
    assert t.cpu_ratios_by_zone([*nodes, node("x", None)]) is None
    assert t.cpu_ratios_by_zone([*nodes, node("x", "a", "0")]) is None
    assert t.cpu_ratios_by_zone([node("a1", "a"), node("a2", "a")]) is None
    assert t.cpu_ratios_by_zone([]) is None


def test_equal_zones_take_endpoints_from_the_crowded_one() -> None:
    # 3 equal zones, 6 endpoints (4 in a): desired 2 each, min ceil(2/1.2)=2, so a gives one to b
    # and one to c (ties: zone name order; upstream takes Go's map order).
    ratios = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    eps = [ep("a"), ep("a"), ep("a"), ep("a"), ep("b"), ep("c"), ep("a", ready=False)]
    assert t.set_hints(eps, ratios) == ""
    assert hints(eps) == ["b", "c", "a", "a", "b", "c", None]


def test_proportional_to_cpu() -> None:
    # zone a has 3/4 of the CPU: of 8 endpoints (4 and 4) it should get 6; b gives 2.
    ratios = {"a": 0.75, "b": 0.25}
    eps = [ep(z) for z in "aaaabbbb"]
    assert t.set_hints(eps, ratios) == ""
    assert sorted(h for h in hints(eps) if h) == ["a"] * 6 + ["b"] * 2
    assert hints(eps)[4:6] == ["a", "a"]  # the first endpoints of b moved


def test_the_reasons_hints_are_dropped() -> None:
    eps = [ep("a"), ep("b")]
    assert t.set_hints(eps, None) == t.INSUFFICIENT_NODE_INFO
    assert t.set_hints(eps, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == (
        "Insufficient number of endpoints (2 endpoints, 3 zones)")
    # a: desired 1.8, minimum ceil(1.5) = 2; b: minimum ceil(0.167) = 1: 3 > 2 endpoints
    assert t.set_hints(eps, {"a": 0.9, "b": 0.1}) == (
        "Unable to allocate minimum required endpoints to each zone without exceeding overload threshold"
        " (2 endpoints, 2 zones)")
    # 3 endpoints in two equal zones: minimum ceil(1.5 / 1.2) = 2 each, 4 > 3
    assert t.set_hints([ep("a"), ep("a"), ep("b")], {"a": 0.5, "b": 0.5}).startswith(
        t.MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD)
    with_unzoned = [ep("a"), ep("b"), ep("b"), ep(None)]
    assert t.set_hints(with_unzoned, {"a": 0.5, "b": 0.5}) == t.NO_ZONE_SPECIFIED
    assert hints(with_unzoned) == [None, None, None, None]
    assert hints(eps) == [None, None]


def test_annotations_and_events() -> None:
    assert t.hints_enabled({t.TOPOLOGY_MODE: "Auto"}) and t.hints_enabled({t.TOPOLOGY_MODE: "auto"})
    assert not t.hints_enabled({t.TOPOLOGY_MODE: "PreferClose"}) and not t.hints_enabled(None)
    # the deprecated annotation is read first, whatever the new one says
    assert not t.hints_enabled({t.TOPOLOGY_AWARE_HINTS: "disabled", t.TOPOLOGY_MODE: "Auto"})
    assert t.hints_enabled({t.TOPOLOGY_AWARE_HINTS: "Auto"})
    cache = t.TopologyCache()
    assert cache.set_nodes([node("a1", "a"), node("b1", "b")]) == []
    eps = [ep("a"), ep("b")]
    assert cache.add_hints("ns/s", "IPv4", eps) == [
        t.Event("Normal", "TopologyAwareHintsEnabled", "Topology Aware Hints has been enabled, addressType: IPv4")]
    assert cache.add_hints("ns/s", "IPv4", eps) == []  # already enabled
    # zone b loses its node: the Service is overloaded and must be synced again
    assert cache.set_nodes([node("a1", "a"), node("b1", "b", ready=False), node("a2", "a")]) == ["ns/s"]
    assert cache.add_hints("ns/s", "IPv4", eps) == [t.Event(
        "Warning", "TopologyAwareHintsDisabled",
        "Insufficient Node information: allocatable CPU or zone not specified on one or more nodes, addressType: IPv4")]
    assert hints(eps) == [None, None]
    cache.set_nodes([node("a1", "a"), node("b1", "b")])
    assert cache.add_hints("ns/s", "IPv4", eps)[0].reason == "TopologyAwareHintsEnabled"
    assert cache.annotation_off("ns/s", "IPv4") == [t.Event(
        "Warning", "TopologyAwareHintsDisabled", "Topology Aware Hints has been disabled, addressType: IPv4")]
    assert cache.annotation_off("ns/s", "IPv4") == []


zones_st = st.lists(st.sampled_from("abcde"), min_size=0, max_size=5, unique=True)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_hints_hold_upstreams_rules_for_any_input(data: st.DataObject) -> None:
    zones = data.draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True))
    cpu = {z: data.draw(st.integers(1, 64)) for z in zones}
    ratios: dict[str, float] | None = {z: c / sum(cpu.values()) for z, c in sorted(cpu.items())}
    if len(zones) < 2:
        ratios = None
    eps = data.draw(st.lists(st.builds(ep, st.sampled_from([*zones, None]) if data.draw(st.booleans())
                                       else st.sampled_from(zones), st.booleans()), max_size=40))
    own = [e.get("zone") for e in eps]
    why = t.set_hints(eps, ratios)
    ready = [e for e in eps if e["conditions"]["ready"]]
    assert all("hints" not in e for e in eps if not e["conditions"]["ready"])
    if why:
        # all or nothing: a reason means no endpoint has a hint
        assert all("hints" not in e for e in eps)
        if ratios is None:
            assert why == t.INSUFFICIENT_NODE_INFO
        elif len(ratios) > len(ready):
            assert why.startswith(t.INSUFFICIENT_NUMBER_OF_ENDPOINTS)
        elif why == t.NO_ZONE_SPECIFIED:
            assert any("zone" not in e for e in ready)
        else:
            assert why.startswith(t.MIN_ALLOCATION_EXCEEDS_OVERLOAD_THRESHOLD)
            n = len(ready)
            assert sum(math.ceil(r * n / 1.2) for r in ratios.values()) > n
        return
    assert ratios is not None
    assert all(len(e["hints"]["forZones"]) == 1 for e in ready)
    counts = {z: 0 for z in ratios}
    for e, zone in zip(eps, own):
        if "hints" in e:
            to = e["hints"]["forZones"][0]["name"]
            counts[to] += 1
            # an endpoint is moved only from a zone above its desired share to one below
            if to != zone:
                desired = max(ratios[to] * len(ready), math.ceil(ratios[to] * len(ready) / 1.2))
                assert counts[to] <= math.ceil(desired)
    # Stopped where upstream's rule stops: no zone still above its desired share by half an
    # endpoint while another is below by half, with one of them a whole endpoint off. (Upstream
    # guarantees no more: a zone may stay under its minimum, e.g. 5 endpoints all in zone a with
    # zone b's share 1/11: a is above by 0.45 only, so b gets none.)
    n = len(ready)
    desired = {z: max(r * n, math.ceil(r * n / 1.2)) for z, r in ratios.items()}
    start = {z: sum(1 for e in ready if e.get("zone") == z) for z in ratios}
    above = max([counts[z] - desired[z] for z in ratios if start[z] > desired[z]] + [0.0])
    below = max([desired[z] - counts[z] for z in ratios if start[z] < desired[z]] + [0.0])
    assert not (above >= 0.5 and below >= 0.5 and (above >= 1.0 or below >= 1.0)), (counts, desired, start)


def test_a_zone_can_stay_below_its_minimum_as_upstream() -> None:
    # zone b has 1/11 of the CPU: minimum ceil(5/11/1.2) = 1, but a is above its desired 4.55 by
    # less than half an endpoint, so upstream moves none and b gets no endpoint.
    eps = [ep("a") for _ in range(5)]
    assert t.set_hints(eps, {"a": 10 / 11, "b": 1 / 11}) == ""
    assert hints(eps) == ["a"] * 5

"""ipFamilyPolicy / ipFamilies defaulting, validation and updates (kube-apiserver's initIPFamilyFields and
the documented "IPv4/IPv6 dual-stack" rules), on the pure function and on the ServiceAllocator."""
from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.apiserver.allocators import ServiceAllocator
from controlplane_stub.apiserver.defaults import apply_defaults
from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.ipfamilies import init_ip_families

DUAL = ["IPv4", "IPv6"]
V4 = ["IPv4"]
DUAL_CIDRS = ["10.96.0.0/12", "fd00:10:96::/108"]


def svc(name: str, **spec: Any) -> dict[str, Any]:
    """A Service as the API server has it after defaulting, before allocation."""
    obj = {"metadata": {"name": name, "namespace": "default"},
           "spec": {"selector": {"app": name}, "ports": [{"port": 80}], **spec}}
    apply_defaults("services", obj)
    return obj


def causes(err: StatusError) -> list[str]:
    """The 422's causes as kubectl prints them."""
    return [f"{c['field']}: {c['message']}" for c in err.causes]


def families(spec: dict[str, Any], configured: list[str], old: dict[str, Any] | None = None) -> tuple[Any, Any]:
    init_ip_families(spec, old, configured, "s")
    return spec["ipFamilyPolicy"], spec["ipFamilies"]


# -- create: defaulting ---------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "configured", "want"), [
    # No policy: SingleStack of the cluster's primary family.
    ({}, DUAL, ("SingleStack", ["IPv4"])),
    ({}, ["IPv6", "IPv4"], ("SingleStack", ["IPv6"])),
    # PreferDualStack gets both families on a dual-stack cluster, one on a single-stack cluster.
    ({"ipFamilyPolicy": "PreferDualStack"}, DUAL, ("PreferDualStack", ["IPv4", "IPv6"])),
    ({"ipFamilyPolicy": "PreferDualStack"}, V4, ("PreferDualStack", ["IPv4"])),
    # The first family listed is the primary one; the other is appended.
    ({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6"]}, DUAL, ("RequireDualStack", ["IPv6", "IPv4"])),
    # Families follow the clusterIPs the client chose.
    ({"clusterIP": "fd00:10:96::5", "clusterIPs": ["fd00:10:96::5"]}, DUAL, ("SingleStack", ["IPv6"])),
    ({"ipFamilyPolicy": "PreferDualStack", "clusterIP": "fd00:10:96::5", "clusterIPs": ["fd00:10:96::5", "10.96.0.5"]}, DUAL,
     ("PreferDualStack", ["IPv6", "IPv4"])),
    # Headless with a selector follows the ClusterIP rules.
    ({"clusterIP": "None", "clusterIPs": ["None"]}, DUAL, ("SingleStack", ["IPv4"])),
    # Headless without a selector: RequireDualStack, both families even on a single-stack cluster.
    ({"clusterIP": "None", "clusterIPs": ["None"], "selector": None}, V4, ("RequireDualStack", ["IPv4", "IPv6"])),
    ({"clusterIP": "None", "clusterIPs": ["None"], "selector": None, "ipFamilies": ["IPv6"]}, V4,
     ("RequireDualStack", ["IPv6", "IPv4"])),
    ({"clusterIP": "None", "clusterIPs": ["None"], "selector": None, "ipFamilyPolicy": "SingleStack"}, V4,
     ("SingleStack", ["IPv4"])),
])
def test_create_defaults(spec: dict[str, Any], configured: list[str], want: tuple[Any, Any]) -> None:
    spec = {"type": "ClusterIP", "selector": {"a": "b"}, **spec}
    assert families(spec, configured) == want


@pytest.mark.parametrize(("spec", "configured", "want"), [
    ({"ipFamilyPolicy": "RequireDualStack"}, V4,
     [('spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for dual-stack '
       'services')]),
    ({"ipFamilies": ["IPv6"]}, V4, ['spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster']),
    ({"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4", "IPv6"]}, DUAL,
     [('spec.ipFamilyPolicy: Invalid value: "SingleStack": must be \'RequireDualStack\' or \'PreferDualStack\' '
       'when multiple IP families are specified')]),
    ({"clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9", "fd00:10:96::9"]}, DUAL,
     [('spec.ipFamilyPolicy: Invalid value: "SingleStack": must be \'RequireDualStack\' or \'PreferDualStack\' '
       'when multiple cluster IPs are specified')]),
    ({"clusterIP": "fd00::9", "clusterIPs": ["fd00::9"]}, V4,
     ['spec.clusterIPs[0]: Invalid value: []string{"fd00::9"}: IPv6 is not configured on this cluster']),
])
def test_create_rejects(spec: dict[str, Any], configured: list[str], want: list[str]) -> None:
    spec = {"type": "ClusterIP", "selector": {"a": "b"}, **spec}
    with pytest.raises(StatusError) as info:
        families(spec, configured)
    assert info.value.code == 422
    assert causes(info.value) == want


# -- update: upgrade, downgrade, PreferDualStack left alone -----------------------------------------

def test_upgrade_adds_secondary_ip_and_downgrade_releases_it() -> None:
    alloc = ServiceAllocator(DUAL_CIDRS)
    stored = svc("web")
    alloc.assign(stored, None)
    assert stored["spec"]["ipFamilyPolicy"] == "SingleStack" and len(stored["spec"]["clusterIPs"]) == 1
    primary = stored["spec"]["clusterIP"]

    up = copy.deepcopy(stored)
    up["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    alloc.assign(up, stored)
    alloc.release(stored, up)
    assert up["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert up["spec"]["clusterIPs"][0] == primary
    secondary = up["spec"]["clusterIPs"][1]
    assert ipaddress.ip_address(secondary) in ipaddress.ip_network("fd00:10:96::/108")

    # Reducing clusterIPs without SingleStack is refused.
    bad = copy.deepcopy(up)
    bad["spec"]["clusterIPs"] = [primary]
    with pytest.raises(StatusError) as info:
        alloc.assign(bad, up)
    assert causes(info.value) == [('spec.ipFamilyPolicy: Invalid value: "RequireDualStack": must be \'SingleStack\' '
                                   'to release the secondary cluster IP')]

    down = copy.deepcopy(up)
    down["spec"]["ipFamilyPolicy"] = "SingleStack"
    alloc.assign(down, up)
    alloc.release(up, down)
    assert down["spec"]["clusterIPs"] == [primary] and down["spec"]["ipFamilies"] == ["IPv4"]
    # The released secondary is free again: asking for it explicitly succeeds.
    other = svc("other", ipFamilyPolicy="RequireDualStack", clusterIPs=["10.96.0.200", secondary],
                clusterIP="10.96.0.200")
    alloc.assign(other, None)
    assert other["spec"]["clusterIPs"] == ["10.96.0.200", secondary]


def test_update_without_policy_keeps_the_stored_one() -> None:
    alloc = ServiceAllocator(DUAL_CIDRS)
    stored = svc("web", ipFamilyPolicy="PreferDualStack")
    alloc.assign(stored, None)
    put = svc("web")  # kubectl replace of the original manifest: no policy, no IPs
    alloc.assign(put, stored)
    assert put["spec"]["ipFamilyPolicy"] == "PreferDualStack"
    assert put["spec"]["clusterIPs"] == stored["spec"]["clusterIPs"]


def test_prefer_dual_stack_is_not_upgraded_when_the_cluster_becomes_dual_stack() -> None:
    single = ServiceAllocator(["10.96.0.0/12"])
    stored = svc("web", ipFamilyPolicy="PreferDualStack")
    single.assign(stored, None)
    assert stored["spec"]["ipFamilies"] == ["IPv4"]
    dual = ServiceAllocator(DUAL_CIDRS)
    dual.load([stored])
    again = copy.deepcopy(stored)
    dual.assign(again, stored)
    assert again["spec"]["ipFamilies"] == ["IPv4"] and again["spec"]["clusterIPs"] == stored["spec"]["clusterIPs"]
    # Switching to RequireDualStack is the explicit upgrade.
    req = copy.deepcopy(stored)
    req["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    dual.assign(req, stored)
    assert req["spec"]["ipFamilies"] == ["IPv4", "IPv6"] and len(req["spec"]["clusterIPs"]) == 2


def test_a_failed_dual_stack_assign_takes_nothing() -> None:
    alloc = ServiceAllocator(DUAL_CIDRS)
    taken = svc("taken", ipFamilies=["IPv6"], clusterIP="fd00:10:96::7", clusterIPs=["fd00:10:96::7"])
    alloc.assign(taken, None)
    clash = svc("clash", ipFamilyPolicy="RequireDualStack", clusterIP="10.96.0.7",
                clusterIPs=["10.96.0.7", "fd00:10:96::7"])
    with pytest.raises(StatusError):
        alloc.assign(clash, None)
    retry = svc("retry", clusterIP="10.96.0.7", clusterIPs=["10.96.0.7"])
    alloc.assign(retry, None)  # 10.96.0.7 was given back by the failed write
    assert retry["spec"]["clusterIPs"] == ["10.96.0.7"]


# -- properties -----------------------------------------------------------------------------------

POLICIES = st.sampled_from([None, "SingleStack", "PreferDualStack", "RequireDualStack"])
FAMS = st.lists(st.sampled_from(["IPv4", "IPv6"]), max_size=2, unique=True)
CONFIGS = st.sampled_from([["IPv4"], ["IPv6"], ["IPv4", "IPv6"], ["IPv6", "IPv4"]])


@settings(max_examples=300, deadline=None)
@given(policy=POLICIES, fams=FAMS, configured=CONFIGS, headless=st.booleans(), selector=st.booleans())
def test_result_is_always_consistent(policy: str | None, fams: list[str], configured: list[str],
                                     headless: bool, selector: bool) -> None:
    spec: dict[str, Any] = {"type": "ClusterIP", "ipFamilies": list(fams)}
    if policy is not None:
        spec["ipFamilyPolicy"] = policy
    if headless:
        spec["clusterIPs"] = ["None"]
        spec["clusterIP"] = "None"
    if selector:
        spec["selector"] = {"a": "b"}
    try:
        got_policy, got = families(spec, configured)
    except StatusError as e:
        assert e.code == 422 and e.causes
        return
    assert got_policy in ("SingleStack", "PreferDualStack", "RequireDualStack")
    assert 1 <= len(got) <= 2 and len(set(got)) == len(got)
    assert got[: len(fams)] == fams  # what the client listed stays, in its order
    if got_policy == "SingleStack":
        assert len(got) == 1
    if not (headless and not selector):
        assert set(got) <= set(configured)
        if got_policy == "RequireDualStack":
            assert len(got) == 2
        if got_policy == "PreferDualStack":
            assert len(got) == min(2, len(configured))

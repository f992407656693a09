"""Validation of the fields node proxies write into kernel interfaces (issue 13): whatever string
reaches an IP, CIDR or port field, only what parses as one is accepted (property tests), and the
fields kube-apiserver checks on Services, EndpointSlices, Nodes and Pods are checked here too."""
from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.apiserver.defaults import apply_defaults
from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.validation import validate_create, validate_update

LB: dict[str, Any] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb", "namespace": "default"},
                      "spec": {"type": "LoadBalancer", "ports": [{"port": 80}], "clusterIP": "10.96.0.20",
                               "clusterIPs": ["10.96.0.20"]}}


def fields_of(resource: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    apply_defaults(resource, obj)
    try:
        if old is None:
            validate_create(resource, obj)
        else:
            validate_update(resource, obj, old)
    except StatusError as e:
        assert e.code == 422
        return [c["field"] for c in e.causes]
    return []


def plain_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["10.0.0.1", "fe80::1%eth0", "10.0.0.1\n-j ACCEPT",
                                                        "::ffff:10.0.0.1", "10.0.0.0/8", " 10.0.0.0/8 "]))


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_only_ips_pass_as_ingress_ip_external_ip_and_endpoint_address(text: str) -> None:
    svc = copy.deepcopy(LB)
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": text}]}}
    assert ("status.loadBalancer.ingress[0].ip" not in fields_of("services", svc)) == (plain_ip(text) or not text)
    svc = copy.deepcopy(LB)
    svc["spec"]["externalIPs"] = [text]
    if "spec.externalIPs[0]" not in fields_of("services", svc):
        assert plain_ip(text) and not ipaddress.ip_address(text).is_loopback
    eps = {"metadata": {"name": "e", "namespace": "default"}, "addressType": "IPv4",
           "endpoints": [{"addresses": [text]}]}
    if "endpoints[0].addresses[0]" not in fields_of("endpointslices.discovery.k8s.io", eps):
        assert plain_ip(text) and ipaddress.ip_address(text).version == 4


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_only_cidrs_pass_as_source_ranges_and_pod_cidrs(text: str) -> None:
    svc = copy.deepcopy(LB)
    svc["spec"]["loadBalancerSourceRanges"] = [text]
    if "spec.loadBalancerSourceRanges[0]" not in fields_of("services", svc):
        ipaddress.ip_network(text.strip(), strict=False)  # raises if it is not a CIDR
        assert "/" in text and "%" not in text
    node = {"metadata": {"name": "n"}, "spec": {"podCIDRs": [text]}}
    if "spec.podCIDRs[0]" not in fields_of("nodes", node):
        ipaddress.ip_network(text, strict=False)
        assert "/" in text and "%" not in text


@pytest.mark.parametrize(("ip", "ok"), [("192.0.2.1", True), ("127.0.0.1", False), ("0.0.0.0", False),
                                        ("169.254.1.1", False), ("224.0.0.5", False), ("::1", False),
                                        ("fe80::1", False), ("ff02::1", False), ("2001:db8::1", True)])
def test_external_ips_may_not_be_special(ip: str, ok: bool) -> None:
    svc = copy.deepcopy(LB)
    svc["spec"]["externalIPs"] = [ip]
    assert ("spec.externalIPs[0]" not in fields_of("services", svc)) == ok


def test_load_balancer_only_fields() -> None:
    svc = copy.deepcopy(LB)
    svc["spec"].update(type="ClusterIP", loadBalancerSourceRanges=["10.0.0.0/8"], loadBalancerClass="x/y")
    svc["spec"].pop("allocateLoadBalancerNodePorts", None)
    assert fields_of("services", svc) == ["spec.loadBalancerSourceRanges", "spec.loadBalancerClass"]
    svc = copy.deepcopy(LB)
    svc["spec"].update(trafficDistribution="Anywhere", loadBalancerClass="example.com/lb")
    assert fields_of("services", svc) == ["spec.trafficDistribution"]
    old = copy.deepcopy(LB)
    old["spec"]["loadBalancerClass"] = "example.com/lb"
    apply_defaults("services", old)
    new = copy.deepcopy(old)
    new["spec"]["loadBalancerClass"] = "example.com/other"
    assert fields_of("services", new, old) == ["spec.loadBalancerClass"]


def test_node_pod_cidrs_and_provider_id_are_set_once() -> None:
    old = {"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.244.1.0/24"], "providerID": "p1"}}
    new = copy.deepcopy(old)
    new["spec"].update(podCIDRs=["10.244.2.0/24"], providerID="p2")
    assert fields_of("nodes", new, old) == ["spec.podCIDRs", "spec.providerID"]
    fresh = {"metadata": {"name": "n"}, "spec": {}}
    set_once = copy.deepcopy(fresh)
    set_once["spec"]["podCIDRs"] = ["10.244.3.0/24", "fd00::/64"]
    assert fields_of("nodes", set_once, fresh) == []
    two_v4 = {"metadata": {"name": "n"}, "spec": {"podCIDRs": ["10.244.3.0/24", "10.244.4.0/24"]}}
    assert fields_of("nodes", two_v4) == ["spec.podCIDRs"]


def test_pod_status_ips() -> None:
    pod = {"metadata": {"name": "p", "namespace": "default"},
           "spec": {"containers": [{"name": "c", "image": "i"}]},
           "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.6"}, {"ip": "10.244.1.7"}],
                      "hostIPs": [{"ip": "not-an-ip"}]}}
    assert fields_of("pods", pod) == ["status.podIPs", "status.podIPs[0].ip", "status.hostIPs[0].ip"]

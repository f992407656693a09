"""API JSON -> trimmed records, with upstream's defaults and skips."""
from __future__ import annotations

from typing import Any

import msgspec
import pytest

from kproxy.kube.ingest import (
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    node_eligible,
    node_ips,
    service_ports,
    slice_endpoints,
    trigger_time,
)
from kproxy.model import Endpoint, ServicePortName


def svc(spec: dict[str, Any], status: dict[str, Any] | None = None, name: str = "web") -> Service:
    doc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "ns", "resourceVersion": "7",
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                        "managedFields": [{"manager": "kubectl"}]},
           "spec": spec, "status": status or {}}
    return msgspec.json.decode(msgspec.json.encode(doc), type=Service)


def test_clusterip_service_one_record_per_port_and_defaults() -> None:
    s = svc({"type": "ClusterIP", "clusterIP": "10.0.0.10", "clusterIPs": ["10.0.0.10", "fd00::a"],
             "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                       {"name": "dns", "port": 53, "protocol": "UDP"}],
             "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP"})
    ports = service_ports(s)
    http = ports[ServicePortName("ns", "web", "http", "TCP")]
    dns = ports[ServicePortName("ns", "web", "dns", "UDP")]
    assert len(ports) == 2
    assert http.cluster_ips == ("10.0.0.10", "fd00::a") and http.port == 80 and http.protocol == "TCP"
    assert http.cluster_ip("IPv6") == "fd00::a"
    assert dns.protocol == "UDP" and dns.node_port == 0
    # ClientIP without sessionAffinityConfig: upstream's default 3 h.
    assert http.session_affinity_timeout == 10800
    # ETP Local means nothing for a ClusterIP service without externalIPs.
    assert http.external_policy_local is False


def test_loadbalancer_service_carries_external_fields() -> None:
    s = svc({"type": "LoadBalancer", "clusterIP": "10.0.0.11",
             "ports": [{"port": 443, "nodePort": 30443}],
             "externalIPs": ["192.0.2.5"], "loadBalancerSourceRanges": [" 203.0.113.0/24 "],
             "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
             "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local", "healthCheckNodePort": 32000},
            {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb.example"},
                                          {"ip": "198.51.100.2", "ipMode": "Proxy"}]}})
    (p,) = service_ports(s).values()
    assert p.name == ServicePortName("ns", "web", "", "TCP")
    assert (p.type, p.node_port, p.health_check_node_port) == ("LoadBalancer", 30443, 32000)
    assert p.external_ips == ("192.0.2.5",)
    assert p.load_balancer_ips == ("198.51.100.1",)
    assert p.load_balancer_source_ranges == ("203.0.113.0/24",)
    assert p.session_affinity_timeout == 60
    assert p.external_policy_local and p.internal_policy_local


@pytest.mark.parametrize("spec", [
    {"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 80}]},
    {"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]},
    {"type": "ClusterIP", "ports": [{"port": 80}]},
])
def test_externalname_and_headless_produce_nothing(spec: dict[str, Any]) -> None:
    assert service_ports(svc(spec)) == {}


def test_nodeport_ignored_on_clusterip_and_unknown_protocol_invalidates_the_service() -> None:
    s = svc({"clusterIP": "10.0.0.1", "ports": [{"port": 1, "nodePort": 30001}]})
    (p,) = service_ports(s).values()
    assert p.port == 1 and p.node_port == 0 and p.session_affinity_timeout is None
    # A protocol outside the closed set drops the whole Service (tests/core/test_core_hostile.py).
    bad = svc({"clusterIP": "10.0.0.1", "ports": [{"port": 1}, {"port": 2, "protocol": "ICMP"}]})
    with pytest.raises(InvalidObject, match="protocol"):
        service_ports(bad)


def eslice(endpoints: list[dict[str, Any]], ports: list[dict[str, Any]], **meta: Any) -> EndpointSlice:
    doc = {"metadata": {"name": "web-abc", "namespace": "ns",
                        "labels": {"kubernetes.io/service-name": "web"}, **meta},
           "addressType": "IPv4", "endpoints": endpoints, "ports": ports}
    return msgspec.json.decode(msgspec.json.encode(doc), type=EndpointSlice)


def test_endpointslice_conditions_default_like_upstream() -> None:
    es = eslice([
        {"addresses": ["10.1.0.2", "10.1.0.99"], "nodeName": "n1", "zone": "z1"},  # all conditions nil
        {"addresses": ["10.1.0.3"], "conditions": {"ready": False}, "nodeName": "n2"},
        {"addresses": ["10.1.0.4"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": []},
    ], [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "noport"}],
        annotations={"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-23T18:00:00Z"})
    got = slice_endpoints(es, node_name="n1")
    http = got[ServicePortName("ns", "web", "http", "TCP")]
    assert set(got) == {ServicePortName("ns", "web", "http", "TCP"), ServicePortName("ns", "web", "dns", "UDP")}
    assert http == (
        Endpoint("10.1.0.2", 8080, ready=True, serving=True, terminating=False, node_name="n1", zone="z1",
                 is_local=True),
        Endpoint("10.1.0.3", 8080, ready=False, serving=False, terminating=False, node_name="n2"),
        Endpoint("10.1.0.4", 8080, ready=False, serving=True, terminating=True),
    )
    assert trigger_time(es) == "2026-11-23T18:00:00Z"


def test_endpointslice_without_service_label_or_fqdn_is_ignored() -> None:
    es = eslice([{"addresses": ["10.1.0.2"]}], [{"port": 80}])
    es.metadata.labels.clear()
    assert slice_endpoints(es, "n1") == {}
    es2 = eslice([{"addresses": ["a.example"]}], [{"port": 80}])
    es2.address_type = "FQDN"
    assert slice_endpoints(es2, "n1") == {}


def test_node_ips_and_eligibility() -> None:
    doc = {"metadata": {"name": "n1"}, "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]},
           "status": {"addresses": [{"type": "Hostname", "address": "n1"},
                                    {"type": "ExternalIP", "address": "203.0.113.9"},
                                    {"type": "ExternalIP", "address": "2001:db8::9"},
                                    {"type": "InternalIP", "address": "10.0.0.5"},
                                    {"type": "InternalIP", "address": "10.0.0.6"}]}}
    node = msgspec.json.decode(msgspec.json.encode(doc), type=Node)
    assert node_ips(node) == ["10.0.0.5", "2001:db8::9"]
    assert node_eligible(node)
    node.spec.taints.append(type(node.spec.taints[0])(key="ToBeDeletedByClusterAutoscaler"))
    assert not node_eligible(node)

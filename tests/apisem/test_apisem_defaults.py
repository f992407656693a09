from __future__ import annotations

from typing import Any

import pytest

from controlplane_stub.apiserver.defaults import apply_defaults


@pytest.mark.timeout(10)
def test_service_defaults(seed_service: dict[str, Any]) -> None:
    apply_defaults("services", seed_service)
    spec = seed_service["spec"]
    assert spec["ports"][0] == {"port": 6000, "targetPort": 5000, "protocol": "TCP"}
    assert spec["sessionAffinity"] == "None"
    assert spec["externalTrafficPolicy"] == "Cluster"
    assert spec["internalTrafficPolicy"] == "Cluster"
    assert spec["allocateLoadBalancerNodePorts"] is True
    assert "sessionAffinityConfig" not in spec


@pytest.mark.timeout(10)
def test_service_target_port_defaults_to_port_and_clientip_timeout() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a"},
                           "spec": {"ports": [{"port": 80}, {"port": 53, "protocol": "UDP", "targetPort": "dns"}],
                                    "sessionAffinity": "ClientIP"}}
    apply_defaults("services", svc)
    spec = svc["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"][0]["targetPort"] == 80 and spec["ports"][0]["protocol"] == "TCP"
    assert spec["ports"][1]["targetPort"] == "dns" and spec["ports"][1]["protocol"] == "UDP"
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert "externalTrafficPolicy" not in spec  # only NodePort/LoadBalancer get one


@pytest.mark.timeout(10)
def test_external_name_has_no_traffic_policies() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a"}, "spec": {"type": "ExternalName", "externalName": "x.org"}}
    apply_defaults("services", svc)
    assert "internalTrafficPolicy" not in svc["spec"] and "externalTrafficPolicy" not in svc["spec"]


@pytest.mark.timeout(10)
def test_deployment_defaults(seed_deployment: dict[str, Any]) -> None:
    del seed_deployment["spec"]["replicas"]
    apply_defaults("deployments.apps", seed_deployment)
    spec = seed_deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}
    assert spec["revisionHistoryLimit"] == 10 and spec["progressDeadlineSeconds"] == 600
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Always" and pod["dnsPolicy"] == "ClusterFirst"
    assert pod["terminationGracePeriodSeconds"] == 30 and pod["schedulerName"] == "default-scheduler"
    container = pod["containers"][0]
    assert container["imagePullPolicy"] == "Always"  # :latest
    assert container["ports"][0]["protocol"] == "TCP"
    assert container["terminationMessagePath"] == "/dev/termination-log"
    # Pod-only defaults stay off templates, as upstream.
    assert "enableServiceLinks" not in pod and "priority" not in pod
    limited: dict[str, Any] = {"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [
        {"name": "c", "image": "x", "resources": {"limits": {"cpu": "1"}}}]}}}}
    apply_defaults("deployments.apps", limited)
    assert limited["spec"]["template"]["spec"]["containers"][0]["resources"] == {"limits": {"cpu": "1"}}


@pytest.mark.timeout(10)
def test_recreate_strategy_gets_no_rolling_update() -> None:
    d: dict[str, Any] = {"metadata": {"name": "a"}, "spec": {"strategy": {"type": "Recreate"}, "template": {}}}
    apply_defaults("deployments.apps", d)
    assert d["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("image,policy", [
    ("nginx", "Always"), ("nginx:latest", "Always"), ("nginx:1.25", "IfNotPresent"),
    ("registry:5000/app", "Always"), ("registry:5000/app:v2", "IfNotPresent"),
    ("nginx@sha256:" + "a" * 64, "IfNotPresent"),
])
@pytest.mark.timeout(10)
def test_image_pull_policy(image: str, policy: str) -> None:
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": image}]}}
    apply_defaults("pods", pod)
    assert pod["spec"]["containers"][0]["imagePullPolicy"] == policy
    assert pod["spec"]["enableServiceLinks"] is True
    assert pod["status"]["phase"] == "Pending" and pod["status"]["qosClass"] == "BestEffort"


@pytest.mark.timeout(10)
def test_explicit_values_are_kept() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "p"}, "spec": {
        "restartPolicy": "Never", "dnsPolicy": "Default",
        "containers": [{"name": "c", "image": "x", "imagePullPolicy": "Never",
                        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}}
    apply_defaults("pods", pod)
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["dnsPolicy"] == "Default"
    assert spec["containers"][0]["imagePullPolicy"] == "Never"
    assert spec["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "1Gi"}
    assert pod["status"]["qosClass"] == "Guaranteed"


@pytest.mark.timeout(10)
def test_other_kinds() -> None:
    ns: dict[str, Any] = {"metadata": {"name": "team-a"}}
    apply_defaults("namespaces", ns)
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team-a"}
    assert ns["status"]["phase"] == "Active" and ns["spec"]["finalizers"] == ["kubernetes"]
    secret: dict[str, Any] = {"metadata": {"name": "s"}}
    apply_defaults("secrets", secret)
    assert secret["type"] == "Opaque"
    eps: dict[str, Any] = {"metadata": {"name": "e"}, "addressType": "IPv4", "ports": [{"port": 80}]}
    apply_defaults("endpointslices.discovery.k8s.io", eps)
    assert eps["ports"][0]["protocol"] == "TCP"
    rs: dict[str, Any] = {"metadata": {"name": "r"}, "spec": {"template": {"spec": {"containers": []}}}}
    apply_defaults("replicasets.apps", rs)
    assert rs["spec"]["replicas"] == 1
    cm: dict[str, Any] = {"data": {"a": "b"}}
    apply_defaults("configmaps", cm)
    assert cm == {"data": {"a": "b"}, "metadata": {}}

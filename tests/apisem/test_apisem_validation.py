from __future__ import annotations

import copy
from typing import Any

import pytest

from controlplane_stub.apiserver.defaults import apply_defaults
from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.validation import validate_create, validate_update

DNS1035 = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
           "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
           "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")


def errors_of(resource: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> StatusError:
    apply_defaults(resource, obj)
    with pytest.raises(StatusError) as info:
        if old is None:
            validate_create(resource, obj)
        else:
            validate_update(resource, obj, old)
    assert info.value.code == 422 and info.value.reason == "Invalid"
    return info.value


def lines(err: StatusError) -> list[str]:
    return [f"{c['field']}: {c['message']}" for c in err.causes]


@pytest.mark.timeout(10)
def test_seed_manifest_corrected_is_valid(seed_service: dict[str, Any], seed_deployment: dict[str, Any]) -> None:
    for resource, obj in (("services", seed_service), ("deployments.apps", seed_deployment)):
        apply_defaults(resource, obj)
        validate_create(resource, obj)
        validate_update(resource, obj, copy.deepcopy(obj))


@pytest.mark.timeout(10)
def test_seed_mistake_service_name_with_space(seed_service: dict[str, Any]) -> None:
    seed_service["metadata"]["name"] = "flask-kubernetes -service"
    err = errors_of("services", seed_service)
    assert err.causes == [{"reason": "FieldValueInvalid", "field": "metadata.name",
                           "message": f'Invalid value: "flask-kubernetes -service": {DNS1035}'}]
    assert err.message == f'Service "flask-kubernetes -service" is invalid: metadata.name: ' \
                          f'Invalid value: "flask-kubernetes -service": {DNS1035}'
    status = err.to_status()
    assert status["details"]["kind"] == "Service" and status["details"]["name"] == "flask-kubernetes -service"


@pytest.mark.timeout(10)
def test_seed_mistake_deployment_without_selector(seed_deployment: dict[str, Any]) -> None:
    del seed_deployment["spec"]["selector"]
    err = errors_of("deployments.apps", seed_deployment)
    assert lines(err) == [
        "spec.selector: Required value",
        'spec.template.metadata.labels: Invalid value: map[string]string{"app":"flask-kubernetes"}: '
        "`selector` does not match template `labels`",
    ]
    assert [c["reason"] for c in err.causes] == ["FieldValueRequired", "FieldValueInvalid"]
    assert err.message.startswith('Deployment.apps "flask-kubernetes" is invalid: [spec.selector: Required value, ')
    assert err.to_status()["details"]["group"] == "apps"


@pytest.mark.timeout(10)
def test_selector_must_match_template(seed_deployment: dict[str, Any]) -> None:
    seed_deployment["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    assert lines(errors_of("deployments.apps", seed_deployment)) == [
        'spec.template.metadata.labels: Invalid value: map[string]string{"app":"flask-kubernetes"}: '
        "`selector` does not match template `labels`"]


@pytest.mark.timeout(10)
def test_selector_expressions(seed_deployment: dict[str, Any]) -> None:
    seed_deployment["spec"]["selector"] = {"matchExpressions": [
        {"key": "app", "operator": "In", "values": ["flask-kubernetes", "x"]},
        {"key": "tier", "operator": "DoesNotExist"}]}
    apply_defaults("deployments.apps", seed_deployment)
    validate_create("deployments.apps", seed_deployment)
    seed_deployment["spec"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "Near", "values": []}]}
    assert 'spec.selector.matchExpressions[0].operator: Invalid value: "Near": not a valid selector operator' in \
        lines(errors_of("deployments.apps", seed_deployment))


@pytest.mark.timeout(10)
def test_deployment_numbers_and_strategy(seed_deployment: dict[str, Any]) -> None:
    spec = seed_deployment["spec"]
    spec["replicas"] = -1
    spec["strategy"] = {"type": "Rolling"}
    spec["template"]["spec"]["restartPolicy"] = "Never"
    got = lines(errors_of("deployments.apps", seed_deployment))
    assert "spec.replicas: Invalid value: -1: must be greater than or equal to 0" in got
    assert 'spec.strategy.type: Unsupported value: "Rolling": supported values: "Recreate", "RollingUpdate"' in got
    assert 'spec.template.spec.restartPolicy: Unsupported value: "Never": supported values: "Always"' in got


@pytest.mark.timeout(10)
def test_deployment_selector_is_immutable(seed_deployment: dict[str, Any]) -> None:
    apply_defaults("deployments.apps", seed_deployment)
    old = copy.deepcopy(seed_deployment)
    seed_deployment["spec"]["selector"]["matchLabels"]["tier"] = "web"
    seed_deployment["spec"]["template"]["metadata"]["labels"]["tier"] = "web"
    assert lines(errors_of("deployments.apps", seed_deployment, old)) == [
        'spec.selector: Invalid value: v1.LabelSelector{MatchLabels:map[string]string{"app":"flask-kubernetes", '
        '"tier":"web"}, MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: field is immutable']


@pytest.mark.timeout(10)
def test_service_ports(seed_service: dict[str, Any]) -> None:
    seed_service["spec"]["ports"] = [
        {"name": "web", "port": 70000, "protocol": "HTTP", "targetPort": "x--y"},
        {"name": "web", "port": 80, "targetPort": 0},
        {"name": "web2", "port": 80},
        {"port": 81, "targetPort": 65536},
    ]
    got = lines(errors_of("services", seed_service))
    assert got == [
        "spec.ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
        'spec.ports[0].protocol: Unsupported value: "HTTP": supported values: "SCTP", "TCP", "UDP"',
        'spec.ports[0].targetPort: Invalid value: "x--y": must not contain consecutive hyphens',
        'spec.ports[1].name: Duplicate value: "web"',
        "spec.ports[3].name: Required value",
        "spec.ports[3].targetPort: Invalid value: 65536: must be between 1 and 65535, inclusive",
        'spec.ports[2]: Duplicate value: core.ServicePort{Name:"", Protocol:"TCP", AppProtocol:(*string)(nil), '
        'Port:80, TargetPort:intstr.IntOrString{Type:0, IntVal:0, StrVal:""}, NodePort:0}',
    ]


@pytest.mark.timeout(10)
def test_same_port_different_protocols_is_fine() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "dns", "namespace": "kube-system"}, "spec": {
        "clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                             {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}
    apply_defaults("services", svc)
    validate_create("services", svc)
    assert svc["spec"]["clusterIPs"] == ["10.96.0.10"]


@pytest.mark.timeout(10)
def test_service_type_and_external_name() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"}, "spec": {"type": "Cluster",
                                                                                     "ports": [{"port": 80}]}}
    assert lines(errors_of("services", svc)) == [
        'spec.type: Unsupported value: "Cluster": supported values: "ClusterIP", "ExternalName", "LoadBalancer", '
        '"NodePort"']
    ext: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"}, "spec": {"type": "ExternalName"}}
    assert lines(errors_of("services", ext)) == ["spec.externalName: Required value"]
    ext["spec"]["externalName"] = "db.example.com."
    validate_create("services", ext)


@pytest.mark.timeout(10)
def test_headless_and_bad_cluster_ip() -> None:
    headless: dict[str, Any] = {"metadata": {"name": "h", "namespace": "default"}, "spec": {"clusterIP": "None"}}
    apply_defaults("services", headless)
    validate_create("services", headless)  # no ports needed when headless
    bad: dict[str, Any] = {"metadata": {"name": "b", "namespace": "default"},
                           "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}}
    assert lines(errors_of("services", bad)) == [
        'spec.clusterIPs[0]: Invalid value: "10.96.0.300": must be a valid IP address, (e.g. 10.9.8.7 or '
        "2001:db8::ffff)"]
    np: dict[str, Any] = {"metadata": {"name": "n", "namespace": "default"},
                          "spec": {"type": "NodePort", "clusterIP": "None", "ports": [{"port": 80}]}}
    assert "spec.clusterIPs[0]: Invalid value: \"None\": may not be set to 'None' for NodePort services" in \
        lines(errors_of("services", np))


@pytest.mark.timeout(10)
def test_traffic_distribution() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"},
                           "spec": {"ports": [{"port": 80}], "trafficDistribution": "PreferFar"}}
    assert lines(errors_of("services", svc)) == [
        'spec.trafficDistribution: Unsupported value: "PreferFar": supported values: "PreferClose"']
    svc["spec"]["trafficDistribution"] = "PreferClose"
    validate_create("services", svc)


@pytest.mark.timeout(10)
def test_node_port_on_cluster_ip_service() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"},
                           "spec": {"ports": [{"port": 80, "nodePort": 30080}]}}
    assert lines(errors_of("services", svc)) == [
        "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'"]


@pytest.mark.timeout(10)
def test_cluster_ip_is_immutable(seed_service: dict[str, Any]) -> None:
    seed_service["spec"]["clusterIP"] = "10.96.0.20"
    apply_defaults("services", seed_service)
    old = copy.deepcopy(seed_service)
    new = copy.deepcopy(seed_service)
    new["spec"]["clusterIP"] = "10.96.0.21"
    new["spec"]["clusterIPs"] = ["10.96.0.21"]
    assert lines(errors_of("services", new, old)) == [
        'spec.clusterIPs[0]: Invalid value: []string{"10.96.0.21"}: may not change once set']
    # Leaving clusterIP out of an update (kubectl replace/apply) is not a change.
    same = copy.deepcopy(seed_service)
    del same["spec"]["clusterIP"], same["spec"]["clusterIPs"]
    validate_update("services", same, old)


@pytest.mark.timeout(10)
def test_metadata_rules() -> None:
    cm: dict[str, Any] = {"metadata": {"namespace": "default", "labels": {"bad key!": "v", "ok": "bad value!"}},
                          "data": {"bad key": "x", "good.key": "y"}}
    got = lines(errors_of("configmaps", cm))
    assert got[0] == "metadata.name: Required value: name or generateName is required"
    assert got[1].startswith('metadata.labels: Invalid value: "bad key!": name part must consist of alphanumeric')
    assert got[2].startswith('metadata.labels: Invalid value: "bad value!": a valid label must be an empty string')
    assert got[3].startswith('data[bad key]: Invalid value: "bad key": a valid config key must consist of')
    ns: dict[str, Any] = {"metadata": {"name": "Team_A"}}
    assert lines(errors_of("namespaces", ns)) == [
        'metadata.name: Invalid value: "Team_A": a lowercase RFC 1123 label must consist of lower case alphanumeric '
        "characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
        "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"]
    node: dict[str, Any] = {"metadata": {"name": "node-1.example"}}
    apply_defaults("nodes", node)
    validate_create("nodes", node)  # node names are subdomains: dots allowed
    gen: dict[str, Any] = {"metadata": {"generateName": "web-", "namespace": "default"}, "data": {}}
    assert lines(errors_of("configmaps", gen)) == ["metadata.name: Required value: name or generateName is required"]


@pytest.mark.timeout(10)
def test_pod_rules() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "p", "namespace": "default"}, "spec": {
        "dnsPolicy": "Cluster",
        "containers": [
            {"name": "web", "image": "nginx", "ports": [{"containerPort": 0}, {"containerPort": 80, "name": "HTTP"}],
             "volumeMounts": [{"name": "data", "mountPath": "/d"}]},
            {"name": "web", "image": ""}]}}
    got = lines(errors_of("pods", pod))
    assert got == [
        "spec.containers[0].ports[0].containerPort: Required value",
        'spec.containers[0].ports[1].name: Invalid value: "HTTP": must contain only alpha-numeric characters '
        "(a-z, 0-9), and hyphens (-)",
        'spec.containers[0].ports[1].name: Invalid value: "HTTP": must contain at least one letter (a-z)',
        'spec.containers[0].volumeMounts[0].name: Not found: "data"',
        'spec.containers[1].name: Duplicate value: "web"',
        "spec.containers[1].image: Required value",
        'spec.dnsPolicy: Unsupported value: "Cluster": supported values: "ClusterFirst", "ClusterFirstWithHostNet", '
        '"Default", "None"',
    ]
    empty: dict[str, Any] = {"metadata": {"name": "p", "namespace": "default"}, "spec": {}}
    assert lines(errors_of("pods", empty)) == ["spec.containers: Required value"]


@pytest.mark.timeout(10)
def test_pod_update_may_change_image_only() -> None:
    pod: dict[str, Any] = {"metadata": {"name": "p", "namespace": "default"},
                           "spec": {"containers": [{"name": "c", "image": "a:1"}]}}
    apply_defaults("pods", pod)
    old = copy.deepcopy(pod)
    new = copy.deepcopy(pod)
    new["spec"]["containers"][0]["image"] = "a:2"
    new["spec"]["nodeName"] = "node-1"
    validate_update("pods", new, old)
    bad = copy.deepcopy(new)
    bad["spec"]["restartPolicy"] = "Never"
    err = errors_of("pods", bad, new)
    assert err.causes[0]["field"] == "spec" and err.causes[0]["message"].startswith(
        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`")


@pytest.mark.timeout(10)
def test_endpointslice_rules() -> None:
    eps: dict[str, Any] = {"metadata": {"name": "s-abc", "namespace": "default"}, "addressType": "IPv5",
                           "endpoints": [{"addresses": []}], "ports": [{"name": "http", "port": 80, "protocol": "FOO"}]}
    assert lines(errors_of("endpointslices.discovery.k8s.io", eps)) == [
        "endpoints[0].addresses: Required value: must contain at least 1 address",
        'ports[0].protocol: Unsupported value: "FOO": supported values: "SCTP", "TCP", "UDP"',
        'addressType: Unsupported value: "IPv5": supported values: "FQDN", "IPv4", "IPv6"',
    ]
    good: dict[str, Any] = {"metadata": {"name": "s-abc", "namespace": "default"}, "addressType": "IPv4",
                            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}],
                            "ports": [{"name": "", "port": 5000, "protocol": "TCP"}]}
    validate_create("endpointslices.discovery.k8s.io", good)
    v6 = copy.deepcopy(good)
    v6["endpoints"][0]["addresses"] = ["fd00::1"]
    assert lines(errors_of("endpointslices.discovery.k8s.io", v6)) == [
        'endpoints[0].addresses[0]: Invalid value: "fd00::1": must be a valid IPv4 address']
    changed = copy.deepcopy(v6)
    changed["addressType"] = "IPv6"
    assert lines(errors_of("endpointslices.discovery.k8s.io", changed, good)) == [
        'addressType: Invalid value: "IPv6": field is immutable']


@pytest.mark.timeout(10)
def test_secret_and_configmap_immutability() -> None:
    secret: dict[str, Any] = {"metadata": {"name": "s", "namespace": "default"}, "data": {"k": "dmFsdWU="},
                              "immutable": True}
    apply_defaults("secrets", secret)
    validate_create("secrets", secret)
    new = copy.deepcopy(secret)
    new["data"]["k"] = "b3RoZXI="
    assert lines(errors_of("secrets", new, secret)) == ["data: Forbidden: field is immutable when `immutable` is set"]
    broken = copy.deepcopy(secret)
    broken["data"]["k"] = "not base64!"
    with pytest.raises(StatusError) as info:
        validate_create("secrets", broken)
    assert info.value.code == 400
    assert info.value.message == ('Secret in version "v1" cannot be handled as a Secret: illegal base64 data at '
                                  "input byte 3")


@pytest.mark.timeout(10)
def test_lease_and_endpoints() -> None:
    lease: dict[str, Any] = {"metadata": {"name": "node-1", "namespace": "kube-node-lease"},
                             "spec": {"holderIdentity": "node-1", "leaseDurationSeconds": 0}}
    assert lines(errors_of("leases.coordination.k8s.io", lease)) == [
        "spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0"]
    ep: dict[str, Any] = {"metadata": {"name": "e", "namespace": "default"},
                          "subsets": [{"addresses": [{"ip": "10.1.1.1"}, {"ip": "nope"}], "ports": [{"port": 80}]}]}
    assert lines(errors_of("endpoints", ep)) == [
        'subsets[0].addresses[1].ip: Invalid value: "nope": must be a valid IP address, (e.g. 10.9.8.7 or '
        "2001:db8::ffff)"]


@pytest.mark.timeout(10)
def test_event_namespace_must_match_its_object() -> None:
    event: dict[str, Any] = {"metadata": {"name": "web.1", "namespace": "default"}, "type": "Normal",
                             "involvedObject": {"kind": "Pod", "name": "web", "namespace": "default"}}
    validate_create("events", event)
    node_event = copy.deepcopy(event)
    node_event["involvedObject"] = {"kind": "Node", "name": "node-1"}
    validate_create("events", node_event)
    elsewhere = copy.deepcopy(event)
    elsewhere["involvedObject"]["namespace"] = "team-a"
    assert lines(errors_of("events", elsewhere)) == [
        'involvedObject.namespace: Invalid value: "team-a": does not match event.namespace']
    odd = copy.deepcopy(event)
    odd["type"] = "Critical"
    assert lines(errors_of("events", odd)) == [
        'type: Unsupported value: "Critical": supported values: "Normal", "Warning"']


@pytest.mark.timeout(10)
def test_session_affinity() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"},
                           "spec": {"ports": [{"port": 80}], "sessionAffinity": "Sticky"}}
    assert lines(errors_of("services", svc)) == [
        'spec.sessionAffinity: Unsupported value: "Sticky": supported values: "ClientIP", "None"']
    svc["spec"].update(sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}})
    assert lines(errors_of("services", svc)) == [
        "spec.sessionAffinityConfig: Forbidden: must not be set when session affinity is None"]
    svc["spec"].update(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 90000}})
    assert lines(errors_of("services", svc)) == [
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 90000: must be greater than 0 and less "
        "than 86400"]


@pytest.mark.parametrize("resource,obj,message", [
    ("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                  "spec": {"ports": [{"port": "80"}]}},
     'Service in version "v1" cannot be handled as a Service: json: cannot unmarshal string into Go struct field '
     "ServicePort.spec.ports.port of type int32"),
    ("services", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": {"port": 80}}},
     'Service in version "v1" cannot be handled as a Service: json: cannot unmarshal object into Go struct field '
     "ServiceSpec.spec.ports of type []v1.ServicePort"),
    ("deployments.apps", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                          "spec": {"replicas": 1.5}},
     'Deployment in version "v1" cannot be handled as a Deployment: json: cannot unmarshal number 1.5 into Go struct '
     "field DeploymentSpec.spec.replicas of type int32"),
    ("configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": {"n": 1}}},
     'ConfigMap in version "v1" cannot be handled as a ConfigMap: json: cannot unmarshal number into Go struct field '
     "ObjectMeta.metadata.labels of type string"),
    ("deployments.apps", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                          "spec": {"template": {"spec": {"containers": [{"name": "c", "ports": [
                              {"containerPort": 80, "protocol": True}]}]}}}},
     'Deployment in version "v1" cannot be handled as a Deployment: json: cannot unmarshal bool into Go struct field '
     "ContainerPort.spec.template.spec.containers.ports.protocol of type string"),
])
@pytest.mark.timeout(10)
def test_wrong_json_types_are_400_before_defaulting(resource: str, obj: dict[str, Any], message: str) -> None:
    with pytest.raises(StatusError) as info:
        apply_defaults(resource, obj)
    assert info.value.code == 400 and info.value.reason == "BadRequest"
    assert info.value.message == message


@pytest.mark.timeout(10)
def test_right_json_types_pass(seed_service: dict[str, Any], seed_deployment: dict[str, Any]) -> None:
    seed_service["spec"]["ports"][0]["targetPort"] = "http"  # int-or-string takes both
    seed_service["metadata"]["labels"] = None  # null is the zero value, as in Go
    apply_defaults("services", seed_service)
    seed_deployment["spec"]["strategy"] = {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": "10%"}}
    seed_deployment["spec"]["template"]["spec"]["affinity"] = {"anything": [1, "x"]}  # free-form
    apply_defaults("deployments.apps", seed_deployment)
    validate_create("deployments.apps", seed_deployment)


@pytest.mark.timeout(10)
def test_resource_quantities(seed_deployment: dict[str, Any]) -> None:
    container = seed_deployment["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"limits": {"cpu": "500m", "memory": "128Mi"}, "requests": {"cpu": "1", "memory": "64Mi"}}
    assert lines(errors_of("deployments.apps", copy.deepcopy(seed_deployment))) == [
        'spec.template.spec.containers[0].resources.requests: Invalid value: "1": must be less than or equal to cpu '
        "limit of 500m"]
    container["resources"] = {"requests": {"cpu": "-1"}}
    assert lines(errors_of("deployments.apps", copy.deepcopy(seed_deployment))) == [
        'spec.template.spec.containers[0].resources.requests[cpu]: Invalid value: "-1": must be greater than or '
        "equal to 0"]
    container["resources"] = {"limits": {"memory": "1Gb"}}
    with pytest.raises(StatusError) as info:
        apply_defaults("deployments.apps", seed_deployment)
    assert info.value.code == 400 and info.value.message == (
        'Deployment in version "v1" cannot be handled as a Deployment: quantities must match the regular expression '
        "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    container["resources"] = {"limits": {"memory": "1Gi", "cpu": 2}, "requests": {"memory": "1024Mi", "cpu": "1500m"}}
    apply_defaults("deployments.apps", seed_deployment)
    validate_create("deployments.apps", seed_deployment)


@pytest.mark.timeout(10)
def test_probes_and_env_sources(seed_deployment: dict[str, Any]) -> None:
    container = seed_deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"] = {"httpGet": {"path": "/", "port": 70000}, "tcpSocket": {"port": 80},
                                  "successThreshold": 2}
    container["readinessProbe"] = {"periodSeconds": 5}
    container["startupProbe"] = {"exec": {}}
    container["env"] = [{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"},
                                                                   "secretKeyRef": {"name": "s", "key": "k"}}}]
    assert lines(errors_of("deployments.apps", seed_deployment)) == [
        'spec.template.spec.containers[0].env[0].valueFrom: Invalid value: "": may not have more than one field '
        "specified at a time",
        'spec.template.spec.containers[0].env[0].valueFrom: Invalid value: "": may not be specified when `value` is '
        "not empty",
        "spec.template.spec.containers[0].livenessProbe.tcpSocket: Forbidden: may not specify more than 1 handler type",
        "spec.template.spec.containers[0].livenessProbe.httpGet.port: Invalid value: 70000: must be between 1 and "
        "65535, inclusive",
        "spec.template.spec.containers[0].livenessProbe.successThreshold: Invalid value: 2: must be 1",
        "spec.template.spec.containers[0].readinessProbe: Required value: must specify a handler type",
        "spec.template.spec.containers[0].startupProbe.exec.command: Required value",
    ]
    container["livenessProbe"] = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 3}
    container["readinessProbe"] = {"tcpSocket": {"port": 5000}}
    container["startupProbe"] = {"exec": {"command": ["true"]}}
    container["env"] = [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    validate_create("deployments.apps", seed_deployment)


@pytest.mark.timeout(10)
def test_external_traffic_policy_needs_external_access() -> None:
    svc: dict[str, Any] = {"metadata": {"name": "a", "namespace": "default"},
                           "spec": {"ports": [{"port": 80}], "externalTrafficPolicy": "Local"}}
    assert lines(errors_of("services", svc)) == [
        'spec.externalTrafficPolicy: Invalid value: "Local": may only be set for externally-accessible services']
    with_ips: dict[str, Any] = {"metadata": {"name": "b", "namespace": "default"},
                                "spec": {"ports": [{"port": 80}], "externalIPs": ["192.0.2.10"]}}
    apply_defaults("services", with_ips)
    assert with_ips["spec"]["externalTrafficPolicy"] == "Cluster"  # external IPs make it externally accessible
    validate_create("services", with_ips)
    hc: dict[str, Any] = {"metadata": {"name": "c", "namespace": "default"},
                          "spec": {"type": "NodePort", "ports": [{"port": 80}], "healthCheckNodePort": 30000}}
    assert lines(errors_of("services", hc)) == [
        "spec.healthCheckNodePort: Invalid value: 30000: may only be set when `type` is 'LoadBalancer'",
        "spec.healthCheckNodePort: Invalid value: 30000: may only be set when `externalTrafficPolicy` is 'Local'"]

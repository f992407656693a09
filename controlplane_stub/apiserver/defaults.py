"""Defaulting as kube-apiserver applies it before validation (pkg/apis/*/v1/defaults.go).

apply_defaults(resource, obj) fills, in place, the fields a real server fills on create and
update, so that what clients read back (kubectl get -o yaml, informers) looks like Kubernetes.
Cluster IPs, node ports and ipFamilies are not defaults: the ServiceAllocator assigns them.
"""
from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from .validation import decode_check
from .validation.rbacobjects import default_binding

Obj = dict[str, Any]

# Session affinity ClientIP keeps a client on one endpoint for 3 hours unless told otherwise.
DEFAULT_CLIENT_IP_TIMEOUT = 10800


def _sub(obj: Obj, key: str) -> Obj:
    """The dict at obj[key], created when missing or null."""
    value = obj.get(key)
    if not isinstance(value, dict):
        value = {}
        obj[key] = value
    return value


def _dicts(value: Any) -> list[Obj]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def default_service(svc: Obj) -> None:
    spec = _sub(svc, "spec")
    spec.setdefault("type", "ClusterIP")
    svc_type = spec["type"]
    spec.setdefault("sessionAffinity", "None")
    if spec["sessionAffinity"] == "ClientIP":
        client_ip = _sub(_sub(spec, "sessionAffinityConfig"), "clientIP")
        client_ip.setdefault("timeoutSeconds", DEFAULT_CLIENT_IP_TIMEOUT)
    for port in _dicts(spec.get("ports")):
        port.setdefault("protocol", "TCP")
        # targetPort 0 / "" / absent all mean "same as port" upstream.
        if port.get("targetPort") in (None, 0, "") and "port" in port:
            port["targetPort"] = port["port"]
    if svc_type in ("NodePort", "LoadBalancer") or (svc_type == "ClusterIP" and spec.get("externalIPs")):
        spec.setdefault("externalTrafficPolicy", "Cluster")  # externally accessible services only
    if svc_type == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    if svc_type != "ExternalName":
        spec.setdefault("internalTrafficPolicy", "Cluster")
    # The strategy keeps clusterIP and clusterIPs in step before validation runs.
    cluster_ip = spec.get("clusterIP")
    if cluster_ip and not spec.get("clusterIPs"):
        spec["clusterIPs"] = [cluster_ip]
    elif not cluster_ip and isinstance(spec.get("clusterIPs"), list) and spec["clusterIPs"]:
        spec["clusterIP"] = spec["clusterIPs"][0]
    status = _sub(svc, "status")
    _sub(status, "loadBalancer")


def _image_pull_policy(image: str) -> str:
    """Always for ':latest' or an untagged image, IfNotPresent otherwise (digests pin too)."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "Always"
    return "Always" if last.rsplit(":", 1)[1] == "latest" else "IfNotPresent"


def _default_probe(probe: Any) -> None:
    if not isinstance(probe, dict):
        return
    probe.setdefault("timeoutSeconds", 1)
    probe.setdefault("periodSeconds", 10)
    probe.setdefault("successThreshold", 1)
    probe.setdefault("failureThreshold", 3)
    http = probe.get("httpGet")
    if isinstance(http, dict):
        http.setdefault("path", "/")
        http.setdefault("scheme", "HTTP")


def default_container(container: Obj) -> None:
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    image = container.get("image")
    if isinstance(image, str) and image:
        container.setdefault("imagePullPolicy", _image_pull_policy(image))
    for port in _dicts(container.get("ports")):
        port.setdefault("protocol", "TCP")
    for env in _dicts(container.get("env")):
        value_from = env.get("valueFrom")
        if isinstance(value_from, dict) and isinstance(value_from.get("fieldRef"), dict):
            value_from["fieldRef"].setdefault("apiVersion", "v1")
    for name in ("livenessProbe", "readinessProbe", "startupProbe"):
        _default_probe(container.get(name))
    if not isinstance(container.get("resources"), dict):
        container["resources"] = {}


def default_pod_spec(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("schedulerName", "default-scheduler")
    if not isinstance(spec.get("securityContext"), dict):
        spec["securityContext"] = {}
    for key in ("containers", "initContainers"):
        for container in _dicts(spec.get(key)):
            default_container(container)
    for volume in _dicts(spec.get("volumes")):
        for source in ("secret", "configMap", "downwardAPI", "projected"):
            if isinstance(volume.get(source), dict):
                volume[source].setdefault("defaultMode", 420)
        if isinstance(volume.get("emptyDir"), dict):
            pass  # emptyDir has no defaults
        elif isinstance(volume.get("hostPath"), dict):
            volume["hostPath"].setdefault("type", "")
    for toleration in _dicts(spec.get("tolerations")):
        if toleration.get("operator") is None and "key" in toleration:
            toleration["operator"] = "Equal"


def default_pod(pod: Obj) -> None:
    spec = _sub(pod, "spec")
    default_pod_spec(spec)
    # Pods only (not templates): SetDefaults_Pod and the Priority admission plugin.
    for key in ("containers", "initContainers"):
        for container in _dicts(spec.get(key)):
            resources = container.get("resources")
            if isinstance(resources, dict) and isinstance(resources.get("limits"), dict):
                # Requests default to limits for every resource that only has a limit.
                requests = _sub(resources, "requests")
                for name, value in resources["limits"].items():
                    requests.setdefault(name, value)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    status = _sub(pod, "status")
    status.setdefault("phase", "Pending")
    status.setdefault("qosClass", _qos_class(pod["spec"]))


def _qos_class(spec: Obj) -> str:
    containers = _dicts(spec.get("containers"))
    if not containers:
        return "BestEffort"
    any_set = False
    guaranteed = True
    for container in containers:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or {}
        if limits or requests:
            any_set = True
        for res in ("cpu", "memory"):
            if res not in limits or requests.get(res, limits.get(res)) != limits.get(res):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def _default_template(workload: Obj) -> None:
    template = _sub(_sub(workload, "spec"), "template")
    default_pod_spec(_sub(template, "spec"))


def default_deployment(deploy: Obj) -> None:
    spec = _sub(deploy, "spec")
    spec.setdefault("replicas", 1)
    strategy = _sub(spec, "strategy")
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        rolling = _sub(strategy, "rollingUpdate")
        rolling.setdefault("maxUnavailable", "25%")
        rolling.setdefault("maxSurge", "25%")
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    _default_template(deploy)


def default_replicaset(rs: Obj) -> None:
    _sub(rs, "spec").setdefault("replicas", 1)
    _default_template(rs)


def default_daemonset(ds: Obj) -> None:
    """SetDefaults_DaemonSet: RollingUpdate one node at a time, 10 old revisions kept."""
    spec = _sub(ds, "spec")
    strategy = _sub(spec, "updateStrategy")
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        rolling = _sub(strategy, "rollingUpdate")
        rolling.setdefault("maxUnavailable", 1)
        rolling.setdefault("maxSurge", 0)
    spec.setdefault("revisionHistoryLimit", 10)
    _default_template(ds)


def default_namespace(ns: Obj) -> None:
    name = ns.get("metadata", {}).get("name")
    if isinstance(name, str) and name:
        # Since 1.21 every namespace carries its own name as an immutable label.
        _sub(ns["metadata"], "labels")["kubernetes.io/metadata.name"] = name
    _sub(ns, "spec").setdefault("finalizers", ["kubernetes"])
    _sub(ns, "status").setdefault("phase", "Active")


def default_secret(secret: Obj) -> None:
    secret.setdefault("type", "Opaque")
    # stringData is write-only: the v1 -> internal conversion merges it into data (base64, its
    # entries win) and it is never stored or returned.
    string_data = secret.pop("stringData", None)
    if isinstance(string_data, dict) and string_data:
        data = secret.get("data")
        if not isinstance(data, dict):
            data = secret["data"] = {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode("utf-8")).decode("ascii")


def default_endpoints(ep: Obj) -> None:
    for subset in _dicts(ep.get("subsets")):
        for port in _dicts(subset.get("ports")):
            port.setdefault("protocol", "TCP")


def default_endpointslice(eps: Obj) -> None:
    for port in _dicts(eps.get("ports")):
        port.setdefault("protocol", "TCP")


def default_node(node: Obj) -> None:
    _sub(node, "spec")


def default_event(event: Obj) -> None:
    event.setdefault("type", "Normal")


_DEFAULTERS: dict[str, Callable[[Obj], None]] = {
    "services": default_service,
    "pods": default_pod,
    "deployments.apps": default_deployment,
    "replicasets.apps": default_replicaset,
    "daemonsets.apps": default_daemonset,
    "namespaces": default_namespace,
    "secrets": default_secret,
    "endpoints": default_endpoints,
    "endpointslices.discovery.k8s.io": default_endpointslice,
    "nodes": default_node,
    "events": default_event,
    "rolebindings.rbac.authorization.k8s.io": default_binding,
    "clusterrolebindings.rbac.authorization.k8s.io": default_binding,
}


def apply_defaults(resource: str, obj: dict[str, Any], *, decode_checked: bool = False) -> None:
    """Fill the server-side defaults of `resource` into obj, in place. Unknown resources pass.

    Values of the wrong JSON type are rejected first (400, as the real server's decoder does), so
    defaulting never papers over them; decode_checked=True says the caller did that already (the
    registry does it before touching the object).
    """
    if not decode_checked:
        decode_check(resource, obj)
    if not isinstance(obj.get("metadata"), dict):
        obj["metadata"] = {}
    defaulter = _DEFAULTERS.get(resource)
    if defaulter is not None:
        defaulter(obj)


def normalize_cluster_ips(svc: dict[str, Any], old: dict[str, Any]) -> None:
    """On a Service update, guess which of the linked clusterIP / clusterIPs the client changed and
    make the other follow (upstream's NormalizeClusterIPs), so that validation sees the change and
    refuses it (422 "may not change once set") instead of the old value silently winning."""
    spec, old_spec = svc.get("spec"), old.get("spec")
    if not isinstance(spec, dict) or not isinstance(old_spec, dict):
        return
    if spec.get("type") == "ExternalName" or old_spec.get("type") == "ExternalName":
        return
    same_ips = spec.get("clusterIPs") == old_spec.get("clusterIPs")
    same_ip = spec.get("clusterIP") == old_spec.get("clusterIP")
    if old_spec.get("clusterIP") and not spec.get("clusterIP"):
        if same_ips:
            spec.pop("clusterIPs", None)  # cleared on purpose: the allocator keeps the old one
        return
    if not same_ip and same_ips:
        spec["clusterIPs"] = [spec["clusterIP"]]
    elif not same_ips and same_ip and isinstance(spec.get("clusterIPs"), list) and spec["clusterIPs"]:
        spec["clusterIP"] = spec["clusterIPs"][0]

"""The OpenAPI documents kubectl reads: /openapi/v2 and /openapi/v3 (index + one per group-version).

What kubectl 1.32 needs, from its sources (kubectl/pkg/cmd/util.factory Validator, resource
QueryParamVerifierV3, apply.Patcher):
- /openapi/v3 lists "api/v1", "apis/apps/v1", ... each with a serverRelativeURL; the document for
  a group-version has, for every kind, a PATCH operation carrying x-kubernetes-group-version-kind
  and a "fieldValidation" query parameter. Then kubectl sends fieldValidation=Strict and leaves
  validation to the server instead of validating client-side against /openapi/v2 (protobuf).
- kubectl apply computes its strategic merge patch from the v3 schema only when the PATCH
  operation lists application/strategic-merge-patch+json; we leave it out on purpose, so kubectl
  uses its compiled-in Go types (exact upstream merge keys) rather than a schema we abbreviate.
- /openapi/v2 is fetched as protobuf (gnostic openapi_v2.Document) by kubectl's OpenAPI getter and
  by old clients (1.20) for client-side validation: openapi_v2_protobuf() answers with a valid
  minimal document in which no kind is described, so those clients skip schema validation (their
  documented behaviour for unknown kinds) and use their built-in patch metadata.

Schemas are complete for the fields this server gives meaning to and permissive
(x-kubernetes-preserve-unknown-fields) for deep structures it stores as is (affinity, probes,
securityContext, pod status, ...). The same schemas drive unknown_fields() for
fieldValidation=Strict|Warn, so what is published is exactly what is enforced.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
from typing import Any

from .patch import PATCH_META, FieldMeta

Obj = dict[str, Any]

KUBERNETES_VERSION = "v1.32.0"

META = "io.k8s.apimachinery.pkg.apis.meta.v1."
CORE = "io.k8s.api.core.v1."
APPS = "io.k8s.api.apps.v1."
DISCOVERY = "io.k8s.api.discovery.v1."
COORDINATION = "io.k8s.api.coordination.v1."
NETWORKING = "io.k8s.api.networking.v1."

# Field types: s string, i int32, l int64, b boolean, ios int-or-string, t date-time, o free-form
# object, m map of strings, mq map of quantities, [x] list of x, otherwise a type name below.
_TYPE_FIELDS: dict[str, dict[str, str]] = {
    META + "ObjectMeta": {
        "annotations": "m", "creationTimestamp": "t", "deletionGracePeriodSeconds": "l", "deletionTimestamp": "t",
        "finalizers": "[s]", "generateName": "s", "generation": "l", "labels": "m",
        "managedFields": "[ManagedFieldsEntry]", "name": "s", "namespace": "s",
        "ownerReferences": "[OwnerReference]", "resourceVersion": "s", "selfLink": "s", "uid": "s"},
    META + "ManagedFieldsEntry": {"apiVersion": "s", "fieldsType": "s", "fieldsV1": "o", "manager": "s",
                                  "operation": "s", "subresource": "s", "time": "t"},
    META + "OwnerReference": {"apiVersion": "s", "blockOwnerDeletion": "b", "controller": "b", "kind": "s",
                              "name": "s", "uid": "s"},
    META + "LabelSelector": {"matchExpressions": "[LabelSelectorRequirement]", "matchLabels": "m"},
    META + "LabelSelectorRequirement": {"key": "s", "operator": "s", "values": "[s]"},
    META + "Condition": {"lastTransitionTime": "t", "message": "s", "observedGeneration": "l", "reason": "s",
                         "status": "s", "type": "s"},
    CORE + "Service": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "ServiceSpec",
                       "status": "ServiceStatus"},
    CORE + "ServiceSpec": {
        "allocateLoadBalancerNodePorts": "b", "clusterIP": "s", "clusterIPs": "[s]", "externalIPs": "[s]",
        "externalName": "s", "externalTrafficPolicy": "s", "healthCheckNodePort": "i",
        "internalTrafficPolicy": "s", "ipFamilies": "[s]", "ipFamilyPolicy": "s", "loadBalancerClass": "s",
        "loadBalancerIP": "s", "loadBalancerSourceRanges": "[s]", "ports": "[ServicePort]",
        "publishNotReadyAddresses": "b", "selector": "m", "sessionAffinity": "s", "sessionAffinityConfig": "o",
        "trafficDistribution": "s", "type": "s"},
    CORE + "ServicePort": {"appProtocol": "s", "name": "s", "nodePort": "i", "port": "i", "protocol": "s",
                           "targetPort": "ios"},
    CORE + "ServiceStatus": {"conditions": "[Condition]", "loadBalancer": "LoadBalancerStatus"},
    CORE + "LoadBalancerStatus": {"ingress": "[LoadBalancerIngress]"},
    CORE + "LoadBalancerIngress": {"hostname": "s", "ip": "s", "ipMode": "s", "ports": "[PortStatus]"},
    CORE + "PortStatus": {"error": "s", "port": "i", "protocol": "s"},
    CORE + "Pod": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "PodSpec", "status": "PodStatus"},
    CORE + "PodStatus": {
        "conditions": "[o]", "containerStatuses": "[o]", "ephemeralContainerStatuses": "[o]", "hostIP": "s",
        "hostIPs": "[HostIP]", "initContainerStatuses": "[o]", "message": "s", "nominatedNodeName": "s",
        "phase": "s", "podIP": "s", "podIPs": "[PodIP]", "qosClass": "s", "reason": "s", "resize": "s",
        "resourceClaimStatuses": "[o]", "startTime": "t"},
    CORE + "HostIP": {"ip": "s"},
    CORE + "PodIP": {"ip": "s"},
    CORE + "PodTemplateSpec": {"metadata": "ObjectMeta", "spec": "PodSpec"},
    CORE + "PodSpec": {
        "activeDeadlineSeconds": "l", "affinity": "o", "automountServiceAccountToken": "b",
        "containers": "[Container]", "dnsConfig": "o", "dnsPolicy": "s", "enableServiceLinks": "b",
        "ephemeralContainers": "[o]", "hostAliases": "[o]", "hostIPC": "b", "hostNetwork": "b", "hostPID": "b",
        "hostUsers": "b", "hostname": "s", "imagePullSecrets": "[o]", "initContainers": "[Container]",
        "nodeName": "s", "nodeSelector": "m", "os": "o", "overhead": "mq", "preemptionPolicy": "s",
        "priority": "i", "priorityClassName": "s", "readinessGates": "[o]", "resourceClaims": "[o]",
        "resources": "ResourceRequirements", "restartPolicy": "s", "runtimeClassName": "s", "schedulerName": "s",
        "schedulingGates": "[o]", "securityContext": "o", "serviceAccount": "s", "serviceAccountName": "s",
        "setHostnameAsFQDN": "b", "shareProcessNamespace": "b", "subdomain": "s",
        "terminationGracePeriodSeconds": "l", "tolerations": "[o]", "topologySpreadConstraints": "[o]",
        "volumes": "[Volume]"},
    CORE + "Container": {
        "args": "[s]", "command": "[s]", "env": "[EnvVar]", "envFrom": "[o]", "image": "s", "imagePullPolicy": "s",
        "lifecycle": "o", "livenessProbe": "o", "name": "s", "ports": "[ContainerPort]", "readinessProbe": "o",
        "resizePolicy": "[o]", "resources": "ResourceRequirements", "restartPolicy": "s", "securityContext": "o",
        "startupProbe": "o", "stdin": "b", "stdinOnce": "b", "terminationMessagePath": "s",
        "terminationMessagePolicy": "s", "tty": "b", "volumeDevices": "[o]", "volumeMounts": "[VolumeMount]",
        "workingDir": "s"},
    CORE + "ResourceRequirements": {"claims": "[o]", "limits": "mq", "requests": "mq"},
    CORE + "ContainerPort": {"containerPort": "i", "hostIP": "s", "hostPort": "i", "name": "s", "protocol": "s"},
    CORE + "EnvVar": {"name": "s", "value": "s", "valueFrom": "o"},
    CORE + "VolumeMount": {"mountPath": "s", "mountPropagation": "s", "name": "s", "readOnly": "b",
                           "recursiveReadOnly": "s", "subPath": "s", "subPathExpr": "s"},
    CORE + "Volume": {"name": "s", **{src: "o" for src in (
        "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
        "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs",
        "hostPath", "image", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume",
        "projected", "quobyte", "rbd", "scaleIO", "secret", "storageos", "vsphereVolume")}},
    CORE + "Namespace": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "NamespaceSpec",
                         "status": "NamespaceStatus"},
    CORE + "NamespaceSpec": {"finalizers": "[s]"},
    CORE + "NamespaceStatus": {"conditions": "[o]", "phase": "s"},
    CORE + "Node": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "NodeSpec", "status": "NodeStatus"},
    CORE + "NodeStatus": {
        "addresses": "[NodeAddress]", "allocatable": "mq", "capacity": "mq", "conditions": "[o]", "config": "o",
        "daemonEndpoints": "o", "features": "o", "images": "[o]", "nodeInfo": "o", "phase": "s",
        "runtimeHandlers": "[o]", "volumesAttached": "[o]", "volumesInUse": "[s]"},
    CORE + "NodeAddress": {"address": "s", "type": "s"},
    CORE + "NodeSpec": {"configSource": "o", "externalID": "s", "podCIDR": "s", "podCIDRs": "[s]",
                        "providerID": "s", "taints": "[o]", "unschedulable": "b"},
    CORE + "ConfigMap": {"apiVersion": "s", "binaryData": "m", "data": "m", "immutable": "b", "kind": "s",
                         "metadata": "ObjectMeta"},
    CORE + "Secret": {"apiVersion": "s", "data": "m", "immutable": "b", "kind": "s", "metadata": "ObjectMeta",
                      "stringData": "m", "type": "s"},
    CORE + "Endpoints": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "subsets": "[o]"},
    CORE + "Event": {
        "action": "s", "apiVersion": "s", "count": "i", "eventTime": "t", "firstTimestamp": "t",
        "involvedObject": "o", "kind": "s", "lastTimestamp": "t", "message": "s", "metadata": "ObjectMeta",
        "reason": "s", "related": "o", "reportingComponent": "s", "reportingInstance": "s", "series": "o",
        "source": "o", "type": "s"},
    APPS + "Deployment": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "DeploymentSpec",
                          "status": "DeploymentStatus"},
    APPS + "DeploymentSpec": {"minReadySeconds": "i", "paused": "b", "progressDeadlineSeconds": "i", "replicas": "i",
                              "revisionHistoryLimit": "i", "selector": "LabelSelector",
                              "strategy": "DeploymentStrategy", "template": "PodTemplateSpec"},
    APPS + "DeploymentStrategy": {"rollingUpdate": "RollingUpdateDeployment", "type": "s"},
    APPS + "RollingUpdateDeployment": {"maxSurge": "ios", "maxUnavailable": "ios"},
    APPS + "DeploymentStatus": {"availableReplicas": "i", "collisionCount": "i", "conditions": "[o]",
                                "observedGeneration": "l", "readyReplicas": "i", "replicas": "i",
                                "terminatingReplicas": "i", "unavailableReplicas": "i", "updatedReplicas": "i"},
    APPS + "ReplicaSet": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "ReplicaSetSpec",
                          "status": "ReplicaSetStatus"},
    APPS + "ReplicaSetSpec": {"minReadySeconds": "i", "replicas": "i", "selector": "LabelSelector",
                              "template": "PodTemplateSpec"},
    APPS + "ReplicaSetStatus": {"availableReplicas": "i", "conditions": "[o]", "fullyLabeledReplicas": "i",
                                "observedGeneration": "l", "readyReplicas": "i", "replicas": "i",
                                "terminatingReplicas": "i"},
    APPS + "DaemonSet": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "DaemonSetSpec",
                         "status": "DaemonSetStatus"},
    APPS + "DaemonSetSpec": {"minReadySeconds": "i", "revisionHistoryLimit": "i", "selector": "LabelSelector",
                             "template": "PodTemplateSpec", "updateStrategy": "DaemonSetUpdateStrategy"},
    APPS + "DaemonSetUpdateStrategy": {"rollingUpdate": "RollingUpdateDaemonSet", "type": "s"},
    APPS + "RollingUpdateDaemonSet": {"maxSurge": "ios", "maxUnavailable": "ios"},
    APPS + "DaemonSetStatus": {"collisionCount": "i", "conditions": "[o]", "currentNumberScheduled": "i",
                               "desiredNumberScheduled": "i", "numberAvailable": "i", "numberMisscheduled": "i",
                               "numberReady": "i", "numberUnavailable": "i", "observedGeneration": "l",
                               "updatedNumberScheduled": "i"},
    DISCOVERY + "EndpointSlice": {"addressType": "s", "apiVersion": "s", "endpoints": "[Endpoint]", "kind": "s",
                                  "metadata": "ObjectMeta", "ports": "[EndpointPort]"},
    DISCOVERY + "Endpoint": {"addresses": "[s]", "conditions": "o", "deprecatedTopology": "m", "hints": "o",
                             "hostname": "s", "nodeName": "s", "targetRef": "o", "zone": "s"},
    DISCOVERY + "EndpointPort": {"appProtocol": "s", "name": "s", "port": "i", "protocol": "s"},
    COORDINATION + "Lease": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "LeaseSpec"},
    COORDINATION + "LeaseSpec": {"acquireTime": "t", "holderIdentity": "s", "leaseDurationSeconds": "i",
                                 "leaseTransitions": "i", "preferredHolder": "s", "renewTime": "t",
                                 "strategy": "s"},
    NETWORKING + "ServiceCIDR": {"apiVersion": "s", "kind": "s", "metadata": "ObjectMeta", "spec": "ServiceCIDRSpec",
                                 "status": "ServiceCIDRStatus"},
    NETWORKING + "ServiceCIDRSpec": {"cidrs": "[s]"},
    NETWORKING + "ServiceCIDRStatus": {"conditions": "[Condition]"},
}

# Short name -> definition name (the short names above are unique across packages).
_FULL: dict[str, str] = {name.rsplit(".", 1)[1]: name for name in _TYPE_FIELDS}

# The Go type of each definition, for the patch metadata table in patch.py.
_PATCH_TYPE = {"ObjectMeta": "ObjectMeta", "PodTemplateSpec": "PodTemplateSpec", "PodSpec": "PodSpec",
               "Container": "Container", "Volume": "Volume", "ServiceSpec": "ServiceSpec",
               "ServiceStatus": "ServiceStatus", "NodeSpec": "NodeSpec", "NamespaceStatus": "NamespaceStatus",
               "DeploymentSpec": "DeploymentSpec", "DeploymentStatus": "DeploymentStatus",
               "ReplicaSetSpec": "ReplicaSetSpec", "ReplicaSetStatus": "ReplicaSetStatus",
               "DaemonSetSpec": "DaemonSetSpec", "DaemonSetStatus": "DaemonSetStatus"}


# (group, version, kind, plural, namespaced, definition) for every served kind
KINDS: tuple[tuple[str, str, str, str, bool, str], ...] = (
    ("", "v1", "Namespace", "namespaces", False, CORE + "Namespace"),
    ("", "v1", "Node", "nodes", False, CORE + "Node"),
    ("", "v1", "Pod", "pods", True, CORE + "Pod"),
    ("", "v1", "Service", "services", True, CORE + "Service"),
    ("", "v1", "Endpoints", "endpoints", True, CORE + "Endpoints"),
    ("", "v1", "ConfigMap", "configmaps", True, CORE + "ConfigMap"),
    ("", "v1", "Secret", "secrets", True, CORE + "Secret"),
    ("", "v1", "Event", "events", True, CORE + "Event"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True, DISCOVERY + "EndpointSlice"),
    ("apps", "v1", "Deployment", "deployments", True, APPS + "Deployment"),
    ("apps", "v1", "ReplicaSet", "replicasets", True, APPS + "ReplicaSet"),
    ("apps", "v1", "DaemonSet", "daemonsets", True, APPS + "DaemonSet"),
    ("coordination.k8s.io", "v1", "Lease", "leases", True, COORDINATION + "Lease"),
    ("networking.k8s.io", "v1", "ServiceCIDR", "servicecidrs", False, NETWORKING + "ServiceCIDR"),
)

# What `kubectl explain KIND` prints first (our own wording).
_KIND_DOCS: dict[str, str] = {
    "Namespace": "Namespace gives a scope to names; deleting one deletes what it holds.",
    "Node": "Node is a worker in the cluster: here a network namespace with its own bridge and pod CIDR.",
    "Pod": "Pod is a group of containers sharing one network namespace, scheduled onto a node.",
    "Service": "Service gives a stable virtual IP, ports and a DNS name to the pods its selector matches; "
               "kproxy programs the nodes so that traffic to it reaches those pods.",
    "Endpoints": "Endpoints lists the addresses and ports behind a Service (legacy form of EndpointSlice).",
    "ConfigMap": "ConfigMap holds non-secret configuration data as key-value pairs.",
    "Secret": "Secret holds sensitive data; data values are base64-encoded.",
    "Event": "Event reports something that happened to an object.",
    "EndpointSlice": "EndpointSlice lists a subset of the endpoints behind a Service, with their conditions.",
    "Deployment": "Deployment declares a replicated, rolling-updated set of pods through ReplicaSets.",
    "ReplicaSet": "ReplicaSet keeps a number of identical pods running.",
    "DaemonSet": "DaemonSet runs one copy of a pod on every node its selector and template allow.",
    "Lease": "Lease records who holds a lock and until when (node heartbeats, leader election).",
    "ServiceCIDR": "ServiceCIDR is a range (one CIDR per IP family) that Service ClusterIPs are allocated from; "
                   "kproxy's nftables mode drops traffic to its addresses that no Service has.",
}

RESOURCE_DEFINITION: dict[str, str] = {
    (f"{plural}.{group}" if group else plural): definition for group, _, _, plural, _, definition in KINDS}


# --- schema generation -----------------------------------------------------------------------------

def _int_or_string(v3: bool, v2_format: str) -> Obj:
    if v3:
        return {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    return {"type": "string", "format": v2_format}


def _field_schema(spec: str, ref_prefix: str, v3: bool) -> Obj:
    if spec.startswith("["):
        return {"type": "array", "items": _field_schema(spec[1:-1], ref_prefix, v3)}
    simple: dict[str, Obj] = {
        "s": {"type": "string"}, "i": {"type": "integer", "format": "int32"},
        "l": {"type": "integer", "format": "int64"}, "b": {"type": "boolean"},
        "t": {"type": "string", "format": "date-time"},
        "m": {"type": "object", "additionalProperties": {"type": "string"}},
    }
    if spec in simple:
        return dict(simple[spec])
    if spec == "ios":
        return _int_or_string(v3, "int-or-string")
    if spec == "mq":
        return {"type": "object", "additionalProperties": _int_or_string(v3, "quantity")}
    if spec == "o":
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True} if v3 else {"type": "object"}
    return {"$ref": ref_prefix + _FULL[spec]}


def _patch_meta_for(definition: str) -> dict[str, FieldMeta]:
    short = definition.rsplit(".", 1)[1]
    return PATCH_META.get(_PATCH_TYPE.get(short, ""), {})


def _definition(name: str, ref_prefix: str, v3: bool) -> Obj:
    props: Obj = {}
    patch_meta = _patch_meta_for(name)
    for field, spec in sorted(_TYPE_FIELDS[name].items()):
        schema = _field_schema(spec, ref_prefix, v3)
        fmeta = patch_meta.get(field)
        if fmeta is not None:
            if fmeta.strategy:
                schema["x-kubernetes-patch-strategy"] = fmeta.strategy
            if fmeta.merge_key:
                schema["x-kubernetes-patch-merge-key"] = fmeta.merge_key
            if fmeta.list_keys:
                schema["x-kubernetes-list-type"] = "map"
                schema["x-kubernetes-list-map-keys"] = list(fmeta.list_keys)
        props[field] = schema
    out: Obj = {"type": "object", "properties": props}
    gvks = [{"group": g, "version": v, "kind": k} for g, v, k, _, _, d in KINDS if d == name]
    if gvks:
        out["x-kubernetes-group-version-kind"] = gvks
        out["description"] = _KIND_DOCS.get(gvks[0]["kind"], "")
    return out


def _definitions(names: list[str], ref_prefix: str, v3: bool) -> Obj:
    """The named definitions and everything they reference."""
    wanted: list[str] = []
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.append(name)
        for spec in _TYPE_FIELDS[name].values():
            inner = spec.strip("[]")
            if inner in _FULL:
                todo.append(_FULL[inner])
    return {name: _definition(name, ref_prefix, v3) for name in sorted(wanted)}


# --- operations --------------------------------------------------------------------------------------

_FIELD_VALIDATION_DOC = (
    'fieldValidation instructs the server on how to handle objects in the request (POST/PUT/PATCH) containing '
    'unknown or duplicate fields. Valid values are: - Ignore: This will ignore any unknown fields that are silently '
    'dropped from the object, and will ignore all but the last duplicate field that the decoder encounters. This is '
    'the default behavior prior to v1.23. - Warn: This will send a warning via the standard warning response header '
    'for each unknown field that is dropped from the object, and for each duplicate field that is encountered. The '
    'request will still succeed if there are no other errors, and will only persist the last of any duplicate '
    'fields. This is the default in v1.23+ - Strict: This will fail the request with a BadRequest error if any '
    'unknown fields would be dropped from the object, or if any duplicate fields are present. The error returned '
    'from the server will contain all unknown and duplicate fields encountered.')

_WRITE_PARAMS: list[tuple[str, str]] = [
    ("dryRun", "When present, indicates that modifications should not be persisted."),
    ("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."),
    ("fieldValidation", _FIELD_VALIDATION_DOC),
]


def _query_param(name: str, description: str, v3: bool, typ: str = "string") -> Obj:
    if v3:
        return {"name": name, "in": "query", "description": description, "schema": {"type": typ,
                                                                                   "uniqueItems": True}}
    return {"name": name, "in": "query", "description": description, "type": typ, "uniqueItems": True}


def _operation(verb: str, action: str, kind: tuple[str, str, str, str, bool, str], v3: bool, op_id: str,
               body: bool, patch: bool = False) -> Obj:
    group, version, kind_name, _, _, definition = kind
    ref = ("#/components/schemas/" if v3 else "#/definitions/") + definition
    params: list[Obj] = []
    if verb in ("post", "put", "patch"):
        params += [_query_param(n, d, v3) for n, d in _WRITE_PARAMS]
    if patch:
        params.append(_query_param("force", "Force is going to \"force\" Apply requests.", v3, "boolean"))
    op: Obj = {
        "description": f"{action} the specified {kind_name}",
        "operationId": op_id,
        "tags": [f"{group.split('.')[0] if group else 'core'}_{version}"],
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": group, "kind": kind_name, "version": version},
        "parameters": params,
    }
    ok: Obj = {"description": "OK"}
    if v3:
        ok["content"] = {"application/json": {"schema": {"$ref": ref}}}
        if body:
            types = ["application/apply-patch+yaml", "application/json-patch+json",
                     "application/merge-patch+json"] if patch else ["*/*"]
            body_schema: Obj = {"$ref": "#/components/schemas/" + META + "Patch"} if patch else {"$ref": ref}
            op["requestBody"] = {"content": {t: {"schema": body_schema} for t in types}, "required": True}
    else:
        ok["schema"] = {"$ref": ref}
        if body:
            op["parameters"].insert(0, {"name": "body", "in": "body", "required": True,
                                        "schema": {"type": "object"} if patch else {"$ref": ref}})
            if patch:
                op["consumes"] = ["application/json-patch+json", "application/merge-patch+json",
                                  "application/apply-patch+yaml"]
    op["responses"] = {"200": ok, "401": {"description": "Unauthorized"}}
    if verb == "post":
        op["responses"]["201"] = ok
    return op


def _path_param(name: str, v3: bool) -> Obj:
    if v3:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "uniqueItems": True}}
    return {"name": name, "in": "path", "required": True, "type": "string", "uniqueItems": True}


def _paths_for(kind: tuple[str, str, str, str, bool, str], v3: bool) -> Obj:
    group, version, kind_name, plural, namespaced, _ = kind
    root = f"/apis/{group}/{version}" if group else f"/api/{version}"
    ns = "/namespaces/{namespace}" if namespaced else ""
    go_group = "".join(p.capitalize() for p in group.split(".")[0:1]) if group else "Core"
    ident = f"{go_group}{version.capitalize()}{'Namespaced' if namespaced else ''}{kind_name}"
    ns_params = [_path_param("namespace", v3)] if namespaced else []
    collection: Obj = {
        "get": _operation("get", "list", kind, v3, f"list{ident}", False),
        "post": _operation("post", "post", kind, v3, f"create{ident}", True),
        "parameters": ns_params,
    }
    item: Obj = {
        "get": _operation("get", "get", kind, v3, f"read{ident}", False),
        "put": _operation("put", "put", kind, v3, f"replace{ident}", True),
        "patch": _operation("patch", "patch", kind, v3, f"patch{ident}", True, patch=True),
        "delete": _operation("delete", "delete", kind, v3, f"delete{ident}", False),
        "parameters": [_path_param("name", v3), *ns_params],
    }
    return {f"{root}{ns}/{plural}": collection, f"{root}{ns}/{plural}/{{name}}": item}


def _patch_definition(v3: bool) -> Obj:
    return {"type": "object", "description": "Patch is provided to give a concrete name and type to the "
                                             "Kubernetes PATCH request body."}


# --- documents ---------------------------------------------------------------------------------------

def _info() -> Obj:
    return {"title": "Kubernetes", "version": KUBERNETES_VERSION}


def openapi_v2() -> dict[str, Any]:
    """Swagger 2.0 JSON for every served kind (what `kubectl get --raw /openapi/v2` shows)."""
    return copy.deepcopy(_v2())


@functools.lru_cache(maxsize=1)
def _v2() -> dict[str, Any]:
    paths: Obj = {}
    for kind in KINDS:
        paths.update(_paths_for(kind, False))
    definitions = _definitions([k[5] for k in KINDS], "#/definitions/", False)
    definitions[META + "Patch"] = _patch_definition(False)
    return {"swagger": "2.0", "info": _info(), "paths": paths, "definitions": definitions}


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _parse_gv(group_version: str) -> tuple[str, str] | None:
    parts = [p for p in group_version.split("?", 1)[0].strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) == 2:
        return "", parts[1]
    if parts[:1] == ["apis"] and len(parts) == 3:
        return parts[1], parts[2]
    if len(parts) == 1:
        return "", parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    return None


def openapi_v3_group(group_version: str) -> dict[str, Any] | None:
    """The OpenAPI 3.0 document of one group-version ("api/v1", "apis/apps/v1"; "v1", "apps/v1" too)."""
    parsed = _parse_gv(group_version)
    doc = _v3_group(parsed) if parsed is not None else None
    return copy.deepcopy(doc) if doc is not None else None


@functools.lru_cache(maxsize=16)
def _v3_group(parsed: tuple[str, str]) -> dict[str, Any] | None:
    kinds = [k for k in KINDS if (k[0], k[1]) == parsed]
    if not kinds:
        return None
    paths: Obj = {}
    for kind in kinds:
        paths.update(_paths_for(kind, True))
    schemas = _definitions([k[5] for k in kinds], "#/components/schemas/", True)
    schemas[META + "Patch"] = _patch_definition(True)
    return {"openapi": "3.0.0", "info": _info(), "paths": paths, "components": {"schemas": schemas}}


def openapi_v3_index() -> dict[str, Any]:
    """/openapi/v3: each group-version with a content-hashed URL (clients cache by it)."""
    return copy.deepcopy(_v3_index())


@functools.lru_cache(maxsize=1)
def _v3_index() -> dict[str, Any]:
    paths: Obj = {}
    for group, version in dict.fromkeys((k[0], k[1]) for k in KINDS):
        gv = _gv_path(group, version)
        doc = _v3_group((group, version))
        digest = hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()
        paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}?hash={digest}"}
    return {"paths": paths}


# --- protobuf /openapi/v2 ----------------------------------------------------------------------------

OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (strings and embedded messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def openapi_v2_protobuf() -> bytes:
    """A gnostic openapi_v2.Document: swagger "2.0", info, empty paths and no definitions.

    Field numbers from google/gnostic openapiv2/OpenAPIv2.proto: Document.swagger=1, info=2,
    paths=8; Info.title=1, version=2.
    """
    info = _field(1, b"Kubernetes") + _field(2, KUBERNETES_VERSION.encode())
    return _field(1, b"2.0") + _field(2, info) + _field(8, b"")


# --- unknown fields (fieldValidation) ----------------------------------------------------------------

def unknown_fields(resource: str, obj: Any, *, drop: bool = False) -> list[str]:
    """Paths of the fields in obj that the published schema does not declare (strict decoding);
    drop=True also deletes them from obj."""
    definition = RESOURCE_DEFINITION.get(resource)
    if definition is None or not isinstance(obj, dict):
        return []
    found: list[str] = []
    _walk(obj, definition, "", found, drop)
    return found


def _walk(value: Any, definition: str, path: str, found: list[str], drop: bool) -> None:
    if not isinstance(value, dict):
        return
    fields = _TYPE_FIELDS[definition]
    unknown: list[str] = []
    for key, sub in value.items():
        here = f"{path}.{key}" if path else str(key)
        spec = fields.get(key)
        if spec is None:
            found.append(here)
            unknown.append(key)
            continue
        inner = spec.strip("[]")
        if inner not in _FULL:
            continue
        if spec.startswith("[") and isinstance(sub, list):
            for i, element in enumerate(sub):
                _walk(element, _FULL[inner], f"{here}[{i}]", found, drop)
        elif not spec.startswith("["):
            _walk(sub, _FULL[inner], here, found, drop)
    if drop:
        for key in unknown:
            del value[key]


# --- JSON types (decoding) ---------------------------------------------------------------------------

_GO_SCALAR = {"s": "string", "t": "string", "i": "int32", "l": "int64", "b": "bool"}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {json.dumps(value)}" if isinstance(value, float) else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _go_type(spec: str) -> str:
    if spec.startswith("["):
        inner = spec[1:-1]
        return "[]" + (_go_type(inner) if inner in _GO_SCALAR or inner not in _FULL else "v1." + inner)
    if spec in _GO_SCALAR:
        return _GO_SCALAR[spec]
    if spec == "ios":
        return "intstr.IntOrString"
    if spec == "m":
        return "map[string]string"
    if spec == "mq":
        return "v1.ResourceList"
    if spec == "o":
        return "interface {}"
    return "v1." + spec


def _type_ok(value: Any, spec: str) -> bool:
    if value is None or spec == "o":
        return True
    if spec.startswith("["):
        return isinstance(value, list)
    if spec in ("s", "t"):
        return isinstance(value, str)
    if spec in ("i", "l"):
        return isinstance(value, int) and not isinstance(value, bool)
    if spec == "b":
        return isinstance(value, bool)
    if spec == "ios":
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    return isinstance(value, dict)  # m, mq and object types


def type_error(resource: str, obj: Any) -> str | None:
    """The first value of the wrong JSON type, in encoding/json's words, or None.

    e.g. 'json: cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int32'
    """
    definition = RESOURCE_DEFINITION.get(resource)
    if definition is None or not isinstance(obj, dict):
        return None
    return _first_type_error(obj, definition, "")


def _first_type_error(value: dict[str, Any], definition: str, path: str) -> str | None:
    struct = definition.rsplit(".", 1)[1]
    for key, sub in value.items():
        spec = _TYPE_FIELDS[definition].get(key)
        if spec is None:
            continue
        here = f"{path}.{key}" if path else key
        bad: Any = None if _type_ok(sub, spec) else sub
        go_type = ""  # named only for an error: every create walks its whole body here
        if bad is None and spec == "m" and isinstance(sub, dict):
            bad = next((v for v in sub.values() if v is not None and not isinstance(v, str)), None)
            go_type = "string"
        if bad is not None:
            return (f"json: cannot unmarshal {_json_kind(bad)} into Go struct field {struct}.{here} of type "
                    f"{go_type or _go_type(spec)}")
        inner = spec.strip("[]")
        if spec.startswith("[") and inner not in _FULL and isinstance(sub, list):
            # Elements of a scalar list decode into typed values too (ipFamilies: [1] is a decode
            # error, 400, as upstream's; null decodes to "" and is left to validation).
            wrong = next((e for e in sub if not _type_ok(e, inner)), None)
            if wrong is not None:
                return (f"json: cannot unmarshal {_json_kind(wrong)} into Go struct field {struct}.{here} of type "
                        f"{_go_type(inner)}")
        if inner not in _FULL or sub is None:
            continue
        for element in (sub if spec.startswith("[") else [sub]):
            if not isinstance(element, dict):
                if element is None:
                    continue
                return (f"json: cannot unmarshal {_json_kind(element)} into Go struct field {struct}.{here} of type "
                        f"v1.{inner}")
            found = _first_type_error(element, _FULL[inner], here)
            if found:
                return found
    return None

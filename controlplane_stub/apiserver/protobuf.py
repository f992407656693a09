"""Decode Kubernetes protobuf request bodies (application/vnd.kubernetes.protobuf) into JSON dicts.

kubectl's typed commands (create namespace|configmap|secret|service|deployment, ...) send their
object as protobuf. The wire form is the "k8s\\0" magic, then a runtime.Unknown envelope
(typeMeta{apiVersion, kind}, raw) whose raw bytes are the typed message. This module knows the field
numbers of the kinds those commands create (from k8s.io/api generated.proto) and turns them into the
object's JSON form. Unknown field numbers are skipped. gogo-protobuf writes non-pointer fields even
when they hold their zero value, so zero scalars and empty messages are dropped, as JSON's omitempty
would, except for pointer fields whose zero is meaningful (KEEP_ZERO).
"""
from __future__ import annotations

import base64
import datetime
from typing import Any

from .errors import StatusError

MAGIC = b"k8s\x00"

# field kinds: s string, b bytes, i varint int, B bool, m message (sub-schema name), ios IntOrString,
# time meta.v1.Time, q resource.Quantity, map:K:V with K/V in s/b/q
Field = tuple[str, str, bool]  # (json name, kind, repeated)

_META = "ObjectMeta"
SCHEMAS: dict[str, dict[int, Field]] = {
    "ObjectMeta": {1: ("name", "s", False), 2: ("generateName", "s", False), 3: ("namespace", "s", False),
                   5: ("uid", "s", False), 6: ("resourceVersion", "s", False), 7: ("generation", "i", False),
                   8: ("creationTimestamp", "time", False), 11: ("labels", "map:s:s", False),
                   12: ("annotations", "map:s:s", False), 13: ("ownerReferences", "m:OwnerReference", True),
                   14: ("finalizers", "s", True)},
    "OwnerReference": {1: ("kind", "s", False), 3: ("name", "s", False), 4: ("uid", "s", False),
                       5: ("apiVersion", "s", False), 6: ("controller", "B", False),
                       7: ("blockOwnerDeletion", "B", False)},
    "LabelSelector": {1: ("matchLabels", "map:s:s", False), 2: ("matchExpressions", "m:LabelSelectorRequirement", True)},
    "LabelSelectorRequirement": {1: ("key", "s", False), 2: ("operator", "s", False), 3: ("values", "s", True)},
    "Namespace": {1: ("metadata", "m:ObjectMeta", False), 2: ("spec", "m:NamespaceSpec", False)},
    "NamespaceSpec": {1: ("finalizers", "s", True)},
    "ConfigMap": {1: ("metadata", "m:ObjectMeta", False), 2: ("data", "map:s:s", False),
                  3: ("binaryData", "map:s:b", False), 4: ("immutable", "B", False)},
    "Secret": {1: ("metadata", "m:ObjectMeta", False), 2: ("data", "map:s:b", False), 3: ("type", "s", False),
               4: ("stringData", "map:s:s", False), 5: ("immutable", "B", False)},
    "Service": {1: ("metadata", "m:ObjectMeta", False), 2: ("spec", "m:ServiceSpec", False)},
    "ServiceSpec": {1: ("ports", "m:ServicePort", True), 2: ("selector", "map:s:s", False),
                    3: ("clusterIP", "s", False), 4: ("type", "s", False), 5: ("externalIPs", "s", True),
                    7: ("sessionAffinity", "s", False), 8: ("loadBalancerIP", "s", False),
                    9: ("loadBalancerSourceRanges", "s", True), 10: ("externalName", "s", False),
                    11: ("externalTrafficPolicy", "s", False), 12: ("healthCheckNodePort", "i", False),
                    13: ("publishNotReadyAddresses", "B", False), 17: ("ipFamilyPolicy", "s", False),
                    18: ("clusterIPs", "s", True), 19: ("ipFamilies", "s", True),
                    20: ("allocateLoadBalancerNodePorts", "B", False), 21: ("loadBalancerClass", "s", False),
                    22: ("internalTrafficPolicy", "s", False)},
    "ServicePort": {1: ("name", "s", False), 2: ("protocol", "s", False), 3: ("port", "i", False),
                    4: ("targetPort", "ios", False), 5: ("nodePort", "i", False), 6: ("appProtocol", "s", False)},
    "Deployment": {1: ("metadata", "m:ObjectMeta", False), 2: ("spec", "m:DeploymentSpec", False)},
    "DeploymentSpec": {1: ("replicas", "i", False), 2: ("selector", "m:LabelSelector", False),
                       3: ("template", "m:PodTemplateSpec", False), 4: ("strategy", "m:DeploymentStrategy", False),
                       5: ("minReadySeconds", "i", False), 6: ("revisionHistoryLimit", "i", False),
                       7: ("paused", "B", False), 9: ("progressDeadlineSeconds", "i", False)},
    "DeploymentStrategy": {1: ("type", "s", False), 2: ("rollingUpdate", "m:RollingUpdateDeployment", False)},
    "RollingUpdateDeployment": {1: ("maxUnavailable", "ios", False), 2: ("maxSurge", "ios", False)},
    "PodTemplateSpec": {1: ("metadata", "m:ObjectMeta", False), 2: ("spec", "m:PodSpec", False)},
    "Pod": {1: ("metadata", "m:ObjectMeta", False), 2: ("spec", "m:PodSpec", False)},
    "PodSpec": {2: ("containers", "m:Container", True), 3: ("restartPolicy", "s", False),
                4: ("terminationGracePeriodSeconds", "i", False), 6: ("dnsPolicy", "s", False),
                7: ("nodeSelector", "map:s:s", False), 8: ("serviceAccountName", "s", False),
                10: ("nodeName", "s", False), 11: ("hostNetwork", "B", False), 16: ("hostname", "s", False),
                17: ("subdomain", "s", False), 19: ("schedulerName", "s", False),
                20: ("initContainers", "m:Container", True), 24: ("priorityClassName", "s", False)},
    "Container": {1: ("name", "s", False), 2: ("image", "s", False), 3: ("command", "s", True),
                  4: ("args", "s", True), 5: ("workingDir", "s", False), 6: ("ports", "m:ContainerPort", True),
                  7: ("env", "m:EnvVar", True), 8: ("resources", "m:ResourceRequirements", False),
                  13: ("terminationMessagePath", "s", False), 14: ("imagePullPolicy", "s", False),
                  16: ("stdin", "B", False), 17: ("stdinOnce", "B", False), 18: ("tty", "B", False),
                  20: ("terminationMessagePolicy", "s", False)},
    "ContainerPort": {1: ("name", "s", False), 2: ("hostPort", "i", False), 3: ("containerPort", "i", False),
                      4: ("protocol", "s", False), 5: ("hostIP", "s", False)},
    "EnvVar": {1: ("name", "s", False), 2: ("value", "s", False)},
    "ResourceRequirements": {1: ("limits", "map:s:q", False), 2: ("requests", "map:s:q", False)},
    # kubectl auth can-i (authorization/v1 generated.proto)
    "SelfSubjectAccessReview": {1: ("metadata", "m:ObjectMeta", False),
                                2: ("spec", "m:SelfSubjectAccessReviewSpec", False)},
    # kubectl auth can-i --list (authorization/v1 generated.proto)
    "SelfSubjectRulesReview": {1: ("metadata", "m:ObjectMeta", False),
                               2: ("spec", "m:SelfSubjectRulesReviewSpec", False)},
    "SelfSubjectRulesReviewSpec": {1: ("namespace", "s", False)},
    "SelfSubjectAccessReviewSpec": {1: ("resourceAttributes", "m:ResourceAttributes", False),
                                    2: ("nonResourceAttributes", "m:NonResourceAttributes", False)},
    "ResourceAttributes": {1: ("namespace", "s", False), 2: ("verb", "s", False), 3: ("group", "s", False),
                           4: ("version", "s", False), 5: ("resource", "s", False),
                           6: ("subresource", "s", False), 7: ("name", "s", False)},
    "NonResourceAttributes": {1: ("path", "s", False), 2: ("verb", "s", False)},
    # kubectl create serviceaccount|role|clusterrole|rolebinding|clusterrolebinding (core/v1, rbac/v1)
    "ServiceAccount": {1: ("metadata", "m:ObjectMeta", False), 2: ("secrets", "m:ObjectReference", True),
                       3: ("imagePullSecrets", "m:LocalObjectReference", True),
                       4: ("automountServiceAccountToken", "B", False)},
    "ObjectReference": {1: ("kind", "s", False), 2: ("namespace", "s", False), 3: ("name", "s", False),
                        4: ("uid", "s", False), 5: ("apiVersion", "s", False)},
    "LocalObjectReference": {1: ("name", "s", False)},
    "Role": {1: ("metadata", "m:ObjectMeta", False), 2: ("rules", "m:PolicyRule", True)},
    "ClusterRole": {1: ("metadata", "m:ObjectMeta", False), 2: ("rules", "m:PolicyRule", True),
                    3: ("aggregationRule", "m:AggregationRule", False)},
    "AggregationRule": {1: ("clusterRoleSelectors", "m:LabelSelector", True)},
    "PolicyRule": {1: ("verbs", "s", True), 2: ("apiGroups", "s", True), 3: ("resources", "s", True),
                   4: ("resourceNames", "s", True), 5: ("nonResourceURLs", "s", True)},
    "RoleBinding": {1: ("metadata", "m:ObjectMeta", False), 2: ("subjects", "m:Subject", True),
                    3: ("roleRef", "m:RoleRef", False)},
    "ClusterRoleBinding": {1: ("metadata", "m:ObjectMeta", False), 2: ("subjects", "m:Subject", True),
                           3: ("roleRef", "m:RoleRef", False)},
    "SelfSubjectReview": {1: ("metadata", "m:ObjectMeta", False)},
    "Subject": {1: ("kind", "s", False), 2: ("apiGroup", "s", False), 3: ("name", "s", False),
                4: ("namespace", "s", False)},
    "RoleRef": {1: ("apiGroup", "s", False), 2: ("kind", "s", False), 3: ("name", "s", False)},
    # kubectl create token (authentication/v1 generated.proto)
    "TokenRequest": {1: ("metadata", "m:ObjectMeta", False), 2: ("spec", "m:TokenRequestSpec", False)},
    "TokenRequestSpec": {1: ("audiences", "s", True), 3: ("boundObjectRef", "m:BoundObjectReference", False),
                         4: ("expirationSeconds", "i", False)},
    "BoundObjectReference": {1: ("kind", "s", False), 2: ("apiVersion", "s", False), 3: ("name", "s", False),
                             4: ("uid", "s", False)},
}

# (group/version, kind) -> top-level schema
KINDS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "Namespace", ("v1", "ConfigMap"): "ConfigMap", ("v1", "Secret"): "Secret",
    ("v1", "Service"): "Service", ("v1", "Pod"): "Pod", ("apps/v1", "Deployment"): "Deployment",
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"): "SelfSubjectAccessReview",
    ("authorization.k8s.io/v1", "SelfSubjectRulesReview"): "SelfSubjectRulesReview",
    ("authentication.k8s.io/v1", "TokenRequest"): "TokenRequest",
    ("v1", "ServiceAccount"): "ServiceAccount",
    ("authentication.k8s.io/v1", "SelfSubjectReview"): "SelfSubjectReview",
    ("rbac.authorization.k8s.io/v1", "Role"): "Role", ("rbac.authorization.k8s.io/v1", "ClusterRole"): "ClusterRole",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "ClusterRoleBinding",
}

# Pointer fields: present means set, even at zero.
KEEP_ZERO = {("TokenRequestSpec", "expirationSeconds"), ("ServiceAccount", "automountServiceAccountToken"),
             ("DeploymentSpec", "replicas"), ("DeploymentSpec", "revisionHistoryLimit"),
             ("DeploymentSpec", "progressDeadlineSeconds"), ("PodSpec", "terminationGracePeriodSeconds"),
             ("ConfigMap", "immutable"), ("Secret", "immutable"),
             ("ServiceSpec", "allocateLoadBalancerNodePorts"), ("ServiceSpec", "publishNotReadyAddresses")}


class _Reader:
    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf, self.pos, self.end = buf, pos, len(buf) if end is None else end

    def varint(self) -> int:
        shift = result = 0
        while True:
            if self.pos >= self.end:
                raise ValueError("truncated varint")
            b = self.buf[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(self) -> Any:
        """Yields (field number, wire type, value) with value an int or a bytes slice."""
        while self.pos < self.end:
            tag = self.varint()
            num, wt = tag >> 3, tag & 7
            if wt == 0:
                yield num, wt, self.varint()
            elif wt == 2:
                n = self.varint()
                if self.pos + n > self.end:
                    raise ValueError("truncated length-delimited field")
                yield num, wt, self.buf[self.pos:self.pos + n]
                self.pos += n
            elif wt == 1:
                self.pos += 8
            elif wt == 5:
                self.pos += 4
            else:
                raise ValueError(f"unsupported wire type {wt}")


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _scalar(kind: str, wt: int, raw: Any) -> Any:
    if kind == "s":
        return bytes(raw).decode()
    if kind == "b":
        return base64.b64encode(bytes(raw)).decode()
    if kind == "i":
        return _signed(raw)
    if kind == "B":
        return bool(raw)
    if kind == "q":  # resource.Quantity { string string = 1 }
        return next((bytes(v).decode() for n, _, v in _Reader(bytes(raw)).fields() if n == 1), "")
    if kind == "ios":  # intstr.IntOrString { type = 1, intVal = 2, strVal = 3 }
        t, iv, sv = 0, 0, ""
        for n, _, v in _Reader(bytes(raw)).fields():
            if n == 1:
                t = v
            elif n == 2:
                iv = _signed(v)
            elif n == 3:
                sv = bytes(v).decode()
        return sv if t == 1 else iv
    if kind == "time":  # meta.v1.Time { seconds = 1, nanos = 2 }
        secs = next((_signed(v) for n, _, v in _Reader(bytes(raw)).fields() if n == 1), 0)
        if not secs:
            return None
        return datetime.datetime.fromtimestamp(secs, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    raise ValueError(f"unknown field kind {kind}")


def decode_message(schema: str, data: bytes) -> dict[str, Any]:
    fields = SCHEMAS[schema]
    out: dict[str, Any] = {}
    for num, wt, raw in _Reader(data).fields():
        spec = fields.get(num)
        if spec is None:
            continue
        name, kind, repeated = spec
        if kind.startswith("map:"):
            _, kk, vk = kind.split(":")
            key, val = "", _scalar(vk, 2, b"")
            for n, w, v in _Reader(bytes(raw)).fields():
                if n == 1:
                    key = _scalar(kk, w, v)
                elif n == 2:
                    val = _scalar(vk, w, v)
            out.setdefault(name, {})[key] = val
            continue
        if kind.startswith("m:"):
            value: Any = decode_message(kind[2:], bytes(raw))
        elif repeated and wt == 2 and kind in ("i", "B"):  # packed scalars
            r = _Reader(bytes(raw))
            packed = out.setdefault(name, [])
            while r.pos < r.end:
                packed.append(_scalar(kind, 0, r.varint()))
            continue
        else:
            value = _scalar(kind, wt, raw)
        if repeated:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    # omitempty: drop zero values gogo wrote for non-pointer fields
    for name in list(out):
        v = out[name]
        if (schema, name) in KEEP_ZERO:
            continue
        if v is None or v == "" or v is False or v == {} or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
            del out[name]
    return out


def decode_object(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded Kubernetes object; 415 for kinds not known here."""
    if not body.startswith(MAGIC):
        raise StatusError(400, "BadRequest", "protobuf body does not start with the k8s magic number")
    api_version = kind = ""
    raw = b""
    try:
        for num, _, val in _Reader(body, len(MAGIC)).fields():
            if num == 1:
                for n, _, v in _Reader(bytes(val)).fields():
                    if n == 1:
                        api_version = bytes(v).decode()
                    elif n == 2:
                        kind = bytes(v).decode()
            elif num == 2:
                raw = bytes(val)
        schema = KINDS.get((api_version, kind))
        if schema is None:
            raise StatusError(415, "UnsupportedMediaType",
                              f"protobuf bodies are supported for {', '.join(k for _, k in KINDS)} only, not "
                              f"{api_version} {kind}: send application/json")
        obj = decode_message(schema, raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StatusError(400, "BadRequest", f"error decoding protobuf {kind or 'object'}: {e}") from None
    return {"apiVersion": api_version, "kind": kind, **obj}

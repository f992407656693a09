"""Validation as kube-apiserver does it, with its field paths and message texts.

The rules and texts follow upstream's pkg/apis/{core,apps,discovery,coordination,networking}/validation and
apimachinery's util/validation; a 422 Status lists every problem found as details.causes, each
{"reason": "FieldValue...", "message": ErrorBody, "field": path}, exactly like the real server,
so kubectl prints the same lines for the same mistakes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..errors import StatusError
from .apps import _validate_deployment, _validate_replicaset, _validate_selector_update, validate_daemonset
from .cluster import _validate_event, _validate_lease, _validate_namespace
from .configdata import _immutable_data, _validate_configmap, _validate_secret, _validate_secret_update
from .endpoints import _validate_endpoints, _validate_endpointslice
from .fielderrors import FieldErrors, Obj
from .meta import _obj, _str, validate_object_meta, validate_object_meta_update
from .names import is_dns1123_subdomain
from .networking import validate_service_cidr, validate_service_cidr_update
from .nodes import _validate_node, _validate_node_update
from .pods import QUANTITY_ERR, _validate_pod, _validate_pod_update, bad_quantity
from .rbacobjects import (
    validate_binding_update,
    validate_cluster_role,
    validate_cluster_role_binding,
    validate_role,
    validate_role_binding,
)
from .services import _validate_service, _validate_service_update, externally_accessible

# What other modules import from the package (allocators.py, defaults.py, tests).
__all__ = ["FieldErrors", "decode_check", "externally_accessible", "strict_decoding_error", "unknown_fields",
           "validate_create", "validate_update"]

# --- dispatch --------------------------------------------------------------------------------------

Validator = Callable[[FieldErrors, Obj], None]
UpdateValidator = Callable[[FieldErrors, Obj, Obj], None]

# resource id -> (Kind, API group for the Status, create validator)
_CREATE: dict[str, tuple[str, str, Validator]] = {
    "services": ("Service", "", _validate_service),
    "pods": ("Pod", "", _validate_pod),
    "namespaces": ("Namespace", "", _validate_namespace),
    "nodes": ("Node", "", _validate_node),
    "configmaps": ("ConfigMap", "", _validate_configmap),
    "secrets": ("Secret", "", _validate_secret),
    "endpoints": ("Endpoints", "", _validate_endpoints),
    "events": ("Event", "", _validate_event),
    "endpointslices.discovery.k8s.io": ("EndpointSlice", "discovery.k8s.io", _validate_endpointslice),
    "deployments.apps": ("Deployment", "apps", _validate_deployment),
    "replicasets.apps": ("ReplicaSet", "apps", _validate_replicaset),
    "daemonsets.apps": ("DaemonSet", "apps", validate_daemonset),
    "leases.coordination.k8s.io": ("Lease", "coordination.k8s.io", _validate_lease),
    "servicecidrs.networking.k8s.io": ("ServiceCIDR", "networking.k8s.io", validate_service_cidr),
    "roles.rbac.authorization.k8s.io": ("Role", "rbac.authorization.k8s.io", validate_role),
    "clusterroles.rbac.authorization.k8s.io": ("ClusterRole", "rbac.authorization.k8s.io", validate_cluster_role),
    "rolebindings.rbac.authorization.k8s.io": ("RoleBinding", "rbac.authorization.k8s.io", validate_role_binding),
    "clusterrolebindings.rbac.authorization.k8s.io": ("ClusterRoleBinding", "rbac.authorization.k8s.io",
                                                      validate_cluster_role_binding),
}

_UPDATE: dict[str, UpdateValidator] = {
    "servicecidrs.networking.k8s.io": validate_service_cidr_update,
    "rolebindings.rbac.authorization.k8s.io": validate_binding_update,
    "clusterrolebindings.rbac.authorization.k8s.io": validate_binding_update,
    "nodes": _validate_node_update,
    "services": _validate_service_update,
    "pods": _validate_pod_update,
    "deployments.apps": _validate_selector_update,
    "replicasets.apps": _validate_selector_update,
    "daemonsets.apps": _validate_selector_update,
    "configmaps": lambda errs, obj, old: _immutable_data(errs, obj, old, ("data", "binaryData")),
    "secrets": _validate_secret_update,
    "endpointslices.discovery.k8s.io": lambda errs, obj, old: (
        errs.invalid("addressType", obj.get("addressType"), "field is immutable")
        if old.get("addressType") and obj.get("addressType") != old.get("addressType") else None),
}


def _kind_and_name(resource: str, obj: Obj) -> tuple[str, str, str]:
    kind, group, _ = _CREATE.get(resource, (str(obj.get("kind", "")), "", None))
    meta = _obj(obj.get("metadata"))
    name = _str(meta.get("name")) or _str(meta.get("generateName"))
    return kind, name, group


def validate_create(resource: str, obj: dict[str, Any]) -> None:
    """Raise a 422 Invalid StatusError listing every problem of a new object."""
    errs = FieldErrors()
    entry = _CREATE.get(resource)
    if entry is None:
        validate_object_meta(errs, obj.get("metadata"), True, is_dns1123_subdomain)
    else:
        entry[2](errs, obj)
    kind, name, group = _kind_and_name(resource, obj)
    errs.raise_if_any(kind, name, group)


def validate_update(resource: str, obj: dict[str, Any], old: dict[str, Any]) -> None:
    """validate_create's rules plus what may not change (immutable fields)."""
    errs = FieldErrors()
    validate_object_meta_update(errs, obj.get("metadata"), old.get("metadata"))
    entry = _CREATE.get(resource)
    if entry is not None:
        # As kube-apiserver: a Service update that leaves its status as it was is not checked against
        # that status (ValidateServiceUpdate has no status rules; ValidateServiceStatusUpdate has),
        # so `type: LoadBalancer -> ClusterIP` is allowed and the LB controller then clears the status.
        kept = resource == "services" and obj.get("status") == old.get("status")
        entry[2](errs, {k: v for k, v in obj.items() if k != "status"} if kept else obj)
    updater = _UPDATE.get(resource)
    if updater is not None:
        updater(errs, obj, old)
    kind, name, group = _kind_and_name(resource, obj)
    errs.raise_if_any(kind, name, group)


class _Schema:
    """The OpenAPI walkers this package calls (openapi imports patch, which imports this package: the
    import waits for the first call; found once, not by an import statement on every create)."""

    def __init__(self) -> None:
        from ..openapi import type_error, unknown_fields

        self.type_error: Callable[[str, Any], str | None] = type_error
        self.unknown_fields: Callable[..., list[str]] = unknown_fields


@functools.cache
def _schema() -> _Schema:
    return _Schema()


# --- fieldValidation: unknown fields ---------------------------------------------------------------


def unknown_fields(resource: str, obj: dict[str, Any], *, drop: bool = False) -> list[str]:
    """Fields of obj the published OpenAPI schema does not declare, as dotted paths with [i] indexes;
    drop=True also removes them from obj (a typed decoder has nowhere to put them).

    For ?fieldValidation=Strict (raise strict_decoding_error) and Warn (one warning per field,
    with the text `unknown field "<path>"`); Ignore drops them without a word.
    """
    found: list[str] = _schema().unknown_fields(resource, obj, drop=drop)
    return found


def strict_decoding_error(kind: str, version: str, problems: list[str]) -> StatusError:
    """The 400 the real server answers under fieldValidation=Strict; problems are the decoder's
    texts ('unknown field "spec.x"', 'duplicate field "metadata.name"')."""
    return StatusError(400, "BadRequest", f'{kind} in version "{version}" cannot be handled as a {kind}: strict '
                       f'decoding error: {", ".join(problems)}')


def decode_check(resource: str, obj: dict[str, Any]) -> None:
    """What the real server's JSON decoding rejects (400) before defaulting and validation."""
    found = _schema().type_error(resource, obj)
    if found is None:
        spec = _obj(obj.get("spec"))
        pod_spec = spec if resource == "pods" else _obj(_obj(spec.get("template")).get("spec"))
        if resource not in ("pods", "deployments.apps", "replicasets.apps", "daemonsets.apps") or not bad_quantity(pod_spec):
            return
        found = QUANTITY_ERR
    kind = _str(obj.get("kind")) or _CREATE.get(resource, ("",))[0]
    version = _str(obj.get("apiVersion")).rsplit("/", 1)[-1] or "v1"
    raise StatusError(400, "BadRequest", f'{kind} in version "{version}" cannot be handled as a {kind}: {found}')

"""The one place the core calls the semantics modules (semantics_contract.md).

Each module is written separately; until one exists the core keeps working with a minimal stand-in
here (documented per function), so the server never depends on landing order.
"""
from __future__ import annotations

import importlib
import json
from types import ModuleType
from typing import Any, Protocol

from .errors import StatusError, invalid


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"controlplane_stub.apiserver.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"controlplane_stub.apiserver.{name}":
            raise
        return None


_defaults = _load("defaults")
_validation = _load("validation")
_allocators = _load("allocators")
_patch = _load("patch")
_tables = _load("tables")
_openapi = _load("openapi")


def available() -> dict[str, bool]:
    return {n: m is not None for n, m in (("defaults", _defaults), ("validation", _validation),
                                          ("allocators", _allocators), ("patch", _patch),
                                          ("tables", _tables), ("openapi", _openapi))}


def apply_defaults(resource: str, obj: dict[str, Any], *, decode_checked: bool = False) -> None:
    if _defaults is not None:
        _defaults.apply_defaults(resource, obj, decode_checked=decode_checked)


def validate_create(resource: str, obj: dict[str, Any]) -> None:
    if _validation is not None:
        _validation.validate_create(resource, obj)
        return
    # Stand-in: the one check without which nothing can be stored.
    meta = obj.get("metadata") or {}
    if not meta.get("name"):
        raise invalid(obj.get("kind", ""), "", [{"reason": "FieldValueRequired", "field": "metadata.name",
                                                   "message": "Required value: name or generateName is required"}])


def validate_update(resource: str, obj: dict[str, Any], old: dict[str, Any]) -> None:
    if _validation is not None:
        _validation.validate_update(resource, obj, old)


class Allocator(Protocol):
    def load(self, existing_services: Any) -> None: ...
    def assign(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None: ...
    def release(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        """Free what obj holds beyond old (everything when old is None); old's values stay taken."""

    def first_ip(self) -> str | None: ...
    def reserve_for(self, ip: str, namespace: str, name: str, *, held_by_owner: bool) -> bool: ...


class _NoAllocator:
    """Stand-in until allocators.py lands: allocates nothing."""

    def load(self, existing_services: Any) -> None:
        pass

    def assign(self, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        pass

    def release(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        pass

    def first_ip(self) -> str | None:
        return None  # no range: the kubernetes Service cannot get its ClusterIP here

    def reserve_for(self, ip: str, namespace: str, name: str, *, held_by_owner: bool) -> bool:
        return False


def service_allocator(cidrs: list[str], node_port_range: tuple[int, int]) -> Allocator:
    if _allocators is None:
        return _NoAllocator()
    alloc: Allocator = _allocators.ServiceAllocator(cidrs, node_port_range)
    return alloc


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (stand-in for patch.py; also used for strategic merge)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


def apply_patch(content_type: str, current: dict[str, Any], body: bytes, resource: str,
                duplicates: list[str] | None = None) -> dict[str, Any]:
    if _patch is not None:
        out: dict[str, Any] = _patch.apply_patch(content_type, current, body, resource, duplicates)
        return out
    if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise StatusError(400, "BadRequest", f"error decoding patch: {e}") from None
        merged: dict[str, Any] = _merge_patch(current, doc)
        return merged
    raise StatusError(415, "UnsupportedMediaType", f"the server does not support patch type {content_type!r} yet")


def server_side_apply(current: dict[str, Any] | None, applied: dict[str, Any], field_manager: str,
                      force: bool) -> dict[str, Any]:
    if _patch is not None:
        out: dict[str, Any] = _patch.server_side_apply(current, applied, field_manager, force)
        return out
    merged: dict[str, Any] = _merge_patch(current or {}, applied)
    return merged


def to_table(resource: str, objects: list[dict[str, Any]], include_object: str = "Metadata") -> dict[str, Any]:
    if _tables is not None:
        out: dict[str, Any] = _tables.to_table(resource, objects, include_object)
        return out
    rows = []
    for o in objects:
        meta = o.get("metadata") or {}
        partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
        rows.append({"cells": [meta.get("name", ""), meta.get("creationTimestamp", "")],
                     "object": o if include_object == "Object" else (None if include_object == "None" else partial)})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {},
            "columnDefinitions": [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0},
                                  {"name": "Created At", "type": "date", "format": "", "description": "",
                                   "priority": 0}],
            "rows": rows}


def openapi_v2() -> dict[str, Any]:
    if _openapi is not None:
        out: dict[str, Any] = _openapi.openapi_v2()
        return out
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": {}, "definitions": {}}


OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"


def openapi_v2_protobuf() -> bytes | None:
    """The v2 document as gnostic protobuf (what kubectl's OpenAPI getter asks for), if available."""
    if _openapi is not None and hasattr(_openapi, "openapi_v2_protobuf"):
        out: bytes = _openapi.openapi_v2_protobuf()
        return out
    return None


def unknown_fields(resource: str, obj: dict[str, Any], *, drop: bool = False) -> list[str]:
    """Dotted paths of fields the schema does not declare ([] when validation.py cannot tell);
    drop=True also removes them from obj."""
    if _validation is not None and hasattr(_validation, "unknown_fields"):
        out: list[str] = _validation.unknown_fields(resource, obj, drop=drop)
        return out
    return []


def strict_decoding_error(kind: str, version: str, problems: list[str]) -> StatusError:
    """problems: 'unknown field "spec.x"', 'duplicate field "metadata.name"', ..."""
    if _validation is not None and hasattr(_validation, "strict_decoding_error"):
        err: StatusError = _validation.strict_decoding_error(kind, version, problems)
        return err
    return StatusError(400, "BadRequest", f'{kind} in version "{version}" cannot be handled as a {kind}: strict '
                       f'decoding error: {", ".join(problems)}')


def openapi_v3_index() -> dict[str, Any] | None:
    if _openapi is not None:
        out: dict[str, Any] = _openapi.openapi_v3_index()
        return out
    from .resources import BY_GROUP_VERSION

    paths = {}
    for group, version in BY_GROUP_VERSION:
        gv = f"apis/{group}/{version}" if group else f"api/{version}"
        paths[gv] = {"serverRelativeURL": f"/openapi/v3/{gv}"}
    return {"paths": paths}


def openapi_v3_group(group_version: str) -> dict[str, Any] | None:
    if _openapi is not None:
        out: dict[str, Any] | None = _openapi.openapi_v3_group(group_version)
        return out
    return _minimal_v3_group(group_version)


def _minimal_v3_group(group_version: str) -> dict[str, Any] | None:
    """Stand-in for openapi.py: only what kubectl reads to learn that the server validates fields
    itself (a PATCH operation per kind with the fieldValidation parameter), so that kubectl leaves
    validation to the server instead of downloading schemas."""
    from .resources import BY_GROUP_VERSION

    parts = group_version.strip("/").split("/")
    if parts[0] == "api" and len(parts) == 2:
        key = ("", parts[1])
    elif parts[0] == "apis" and len(parts) == 3:
        key = (parts[1], parts[2])
    else:
        return None
    table = BY_GROUP_VERSION.get(key)
    if table is None:
        return None
    paths: dict[str, Any] = {}
    for r in table.values():
        base = f"/{group_version.strip('/')}/" + ("namespaces/{namespace}/" if r.namespaced else "")
        paths[base + r.plural + "/{name}"] = {"patch": {
            "operationId": f"patch{r.kind}",
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                           {"name": "fieldManager", "in": "query", "schema": {"type": "string"}}],
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "responses": {"200": {"description": "OK"}},
        }}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths,
            "components": {"schemas": {}}}

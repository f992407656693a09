"""PATCH bodies as kube-apiserver applies them, and a small server-side apply.

- application/merge-patch+json         RFC 7386
- application/json-patch+json          RFC 6902 (add, remove, replace, move, copy, test)
- application/strategic-merge-patch+json  what kubectl apply/edit/scale/label/annotate/set image send:
  lists merge by the API's patchMergeKey (containers by name, ports by containerPort/port, env by
  name, ...), with the $patch, $retainKeys, $deleteFromPrimitiveList/ and $setElementOrder/ directives
- application/apply-patch+yaml         server_side_apply(): merge onto the live object with the same
  list keys, record managedFields, delete what the manager stopped applying, 409 on conflicts with
  another applier unless force.

Errors follow upstream's patch.go: an undecodable patch is 400 BadRequest, a JSON patch operation
that does not apply is 422, an unknown content type is 415.
"""
from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass
from typing import Any

from . import bodies
from .errors import StatusError

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, APPLY_PATCH)


# --- patch metadata: the patchStrategy/patchMergeKey struct tags of k8s.io/api ----------------------

@dataclass(frozen=True, slots=True)
class FieldMeta:
    """How one field merges: strategy "merge" (list merge / primitive union), "retainKeys", both, or "".

    merge_key names the list element key for strategic merge; list_keys the element identity for
    server-side apply (x-kubernetes-list-map-keys); type_name the element/field type for recursion.
    """

    strategy: str = ""
    merge_key: str = ""
    type_name: str = ""
    list_keys: tuple[str, ...] = ()


def _m(key: str, type_name: str = "", list_keys: tuple[str, ...] = (), strategy: str = "merge") -> FieldMeta:
    return FieldMeta(strategy, key, type_name, list_keys or ((key,) if key else ()))


def _t(type_name: str, strategy: str = "") -> FieldMeta:
    return FieldMeta(strategy, "", type_name)


# type name -> field -> FieldMeta; fields not listed replace wholesale (atomic) when they are lists.
PATCH_META: dict[str, dict[str, FieldMeta]] = {
    "ObjectMeta": {
        "finalizers": FieldMeta("merge"),
        "ownerReferences": _m("uid"),
    },
    "PodTemplateSpec": {"metadata": _t("ObjectMeta"), "spec": _t("PodSpec")},
    "PodSpec": {
        "containers": _m("name", "Container"),
        "initContainers": _m("name", "Container"),
        "ephemeralContainers": _m("name", "Container"),
        "volumes": FieldMeta("merge,retainKeys", "name", "Volume", ("name",)),
        "imagePullSecrets": _m("name"),
        "hostAliases": _m("ip"),
        "topologySpreadConstraints": _m("topologyKey", "", ("topologyKey", "whenUnsatisfiable")),
        "resourceClaims": FieldMeta("merge,retainKeys", "name", "", ("name",)),
        "schedulingGates": _m("name"),
        "readinessGates": FieldMeta(),
    },
    "Container": {
        "ports": _m("containerPort", "", ("containerPort", "protocol")),
        "env": _m("name"),
        "volumeMounts": _m("mountPath"),
        "volumeDevices": _m("devicePath"),
    },
    "Volume": {},
    "PodStatus": {
        "conditions": _m("type"),
        "podIPs": _m("ip"),
        "hostIPs": _m("ip"),
    },
    "ServiceSpec": {"ports": _m("port", "", ("port", "protocol"))},
    "ServiceStatus": {"conditions": _m("type")},
    "NodeSpec": {"podCIDRs": FieldMeta("merge")},
    "NodeStatus": {"conditions": _m("type"), "addresses": _m("type")},
    "NamespaceStatus": {"conditions": _m("type")},
    "DeploymentSpec": {"template": _t("PodTemplateSpec"), "strategy": _t("", "retainKeys")},
    "DeploymentStatus": {"conditions": _m("type")},
    "ReplicaSetSpec": {"template": _t("PodTemplateSpec")},
    "ReplicaSetStatus": {"conditions": _m("type")},
    "DaemonSetSpec": {"template": _t("PodTemplateSpec"), "updateStrategy": _t("", "retainKeys")},
    "DaemonSetStatus": {"conditions": _m("type")},
}

_ROOT_FIELDS = {
    "pods": ("PodSpec", "PodStatus"),
    "services": ("ServiceSpec", "ServiceStatus"),
    "nodes": ("NodeSpec", "NodeStatus"),
    "namespaces": ("", "NamespaceStatus"),
    "deployments.apps": ("DeploymentSpec", "DeploymentStatus"),
    "replicasets.apps": ("ReplicaSetSpec", "ReplicaSetStatus"),
    "daemonsets.apps": ("DaemonSetSpec", "DaemonSetStatus"),
}


def root_type(resource: str) -> dict[str, FieldMeta]:
    """The top-level FieldMeta map of a resource's objects."""
    fields = {"metadata": _t("ObjectMeta")}
    spec, status = _ROOT_FIELDS.get(resource, ("", ""))
    if spec:
        fields["spec"] = _t(spec)
    if status:
        fields["status"] = _t(status)
    return fields


def _sub(meta: dict[str, FieldMeta] | None, key: str) -> FieldMeta:
    if meta is None:
        return FieldMeta()
    return meta.get(key, FieldMeta())


def _type(name: str) -> dict[str, FieldMeta] | None:
    return PATCH_META.get(name) if name else None


# --- decoding ----------------------------------------------------------------------------------------

def _decode(body: bytes, duplicates: list[str] | None = None) -> Any:
    decoded = bodies.decode_json(body, "error decoding patch")
    if duplicates is not None:
        duplicates.extend(decoded.duplicates)
    return decoded.obj


def apply_patch(content_type: str, current: dict[str, Any], body: bytes, resource: str,
                duplicates: list[str] | None = None) -> dict[str, Any]:
    """The object after applying a PATCH body of the given content type to current (not modified).
    The body's duplicate keys are added to duplicates (fieldValidation)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == MERGE_PATCH:
        doc = _decode(body, duplicates)
        result = json_merge_patch(current, doc)
        if not isinstance(result, dict):
            raise StatusError(400, "BadRequest", "Invalid JSON Patch")
        return result
    if media == JSON_PATCH:
        return json_patch(current, _decode(body))
    if media == STRATEGIC_MERGE_PATCH:
        doc = _decode(body, duplicates)
        if not isinstance(doc, dict):
            raise StatusError(400, "BadRequest", "error decoding patch: a strategic merge patch must be a JSON object")
        return strategic_merge_patch(current, doc, resource)
    raise StatusError(
        415, "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"{', '.join(PATCH_TYPES)}")


# --- RFC 7386 --------------------------------------------------------------------------------------

def json_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


# --- RFC 6902 --------------------------------------------------------------------------------------

class _PatchFailed(Exception):
    pass


def _unprocessable(message: str) -> StatusError:
    # Upstream answers with NewGenericServerResponse(422, ...): the operation's error is the cause.
    return StatusError(422, "Invalid", "the server rejected our request due to an error in our request",
                       causes=[{"reason": "UnexpectedServerResponse", "message": message}])


def _pointer(path: Any) -> list[str]:
    if not isinstance(path, str) or (path and not path.startswith("/")):
        raise StatusError(400, "BadRequest", f"invalid JSON pointer {path!r}: must be empty or start with '/'")
    if not path:
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container: list[Any], token: str, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise _PatchFailed(f"invalid array index {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise _PatchFailed(f"array index out of bounds: {index}")
    return index


def _resolve(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise _PatchFailed("missing value")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, False)]
        else:
            raise _PatchFailed("missing value")
    return node


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, True), value)
    else:
        raise _PatchFailed("missing value")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise _PatchFailed("cannot remove the whole document")
    parent = _resolve(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _PatchFailed("missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, False))
    raise _PatchFailed("missing value")


def _encoded_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))


def json_patch(current: Obj, ops: Any) -> Obj:
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise StatusError(400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc: Any = copy.deepcopy(current)
    copied = 0  # bytes duplicated by "copy" ops: each may double the document, so they are capped
    for op in ops:
        kind = op.get("op")
        path = op.get("path")
        tokens = _pointer(path)
        try:
            if kind == "add":
                if "value" not in op:
                    raise StatusError(400, "BadRequest", f"add operation has no value: {path}")
                doc = _add(doc, tokens, copy.deepcopy(op["value"]))
            elif kind == "remove":
                _remove(doc, tokens)
            elif kind == "replace":
                if "value" not in op:
                    raise StatusError(400, "BadRequest", f"replace operation has no value: {path}")
                _resolve(doc, tokens)
                if tokens:
                    _remove(doc, tokens)
                doc = _add(doc, tokens, copy.deepcopy(op["value"]))
            elif kind in ("move", "copy"):
                src = _pointer(op.get("from"))
                if kind == "move" and tokens[: len(src)] == src and len(tokens) > len(src):
                    raise _PatchFailed("a location cannot be moved into one of its children")
                if kind == "copy":
                    copied += _encoded_size(_resolve(doc, src))
                    if copied > bodies.MAX_REQUEST_BYTES:
                        raise StatusError(413, "RequestEntityTooLarge", "the JSON patch's copy operations exceed "
                                          f"the request size limit of {bodies.MAX_REQUEST_BYTES} bytes")
                value = _remove(doc, src) if kind == "move" else copy.deepcopy(_resolve(doc, src))
                doc = _add(doc, tokens, value)
            elif kind == "test":
                if _resolve(doc, tokens) != op.get("value"):
                    raise _PatchFailed("test failed")
            else:
                raise StatusError(400, "BadRequest", f"Unexpected kind: {kind}")
        except _PatchFailed as e:
            if str(e) == "test failed":
                raise _unprocessable(f"testing value {path} failed: test failed") from None
            where = f"from path: {json.dumps(op.get('from'))}" if kind in ("move", "copy") else \
                f"path: {json.dumps(path)}"
            raise _unprocessable(f"{kind} operation does not apply: doc is missing {where}: {e}") from None
    if not isinstance(doc, dict):
        raise _unprocessable("the patched document is not a JSON object")
    return doc


# --- strategic merge patch -------------------------------------------------------------------------

_DIRECTIVE = "$patch"
_RETAIN_KEYS = "$retainKeys"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"
_SET_ORDER = "$setElementOrder/"


def strategic_merge_patch(current: Obj, patch: Obj, resource: str) -> Obj:
    result = _merge_map(copy.deepcopy(current), copy.deepcopy(patch), root_type(resource))
    return result


def _bad(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def _merge_map(original: Obj, patch: Obj, meta: dict[str, FieldMeta] | None) -> Obj:
    directive = patch.pop(_DIRECTIVE, None)
    if directive == "replace":
        replaced: Obj = _strip(patch)
        return replaced
    if directive == "delete":
        return {}
    if directive is not None:
        raise _bad(f"Unable to merge: unknown patch type: {directive} in map: {json.dumps(patch)}")
    retain = patch.pop(_RETAIN_KEYS, None)
    if retain is not None:
        if not isinstance(retain, list):
            raise _bad(f"{_RETAIN_KEYS} must be a list, got {json.dumps(retain)}")
        for key in list(original):
            if key not in retain:
                del original[key]
    orders: dict[str, list[Any]] = {}
    for key in [k for k in patch if isinstance(k, str) and k.startswith("$")]:
        value = patch.pop(key)
        if key.startswith(_DELETE_PRIMITIVE):
            field = key[len(_DELETE_PRIMITIVE):]
            if isinstance(original.get(field), list) and isinstance(value, list):
                original[field] = [v for v in original[field] if v not in value]
        elif key.startswith(_SET_ORDER):
            if isinstance(value, list):
                orders[key[len(_SET_ORDER):]] = value
        else:
            raise _bad(f"Unable to merge: unknown directive {key}")
    for key, value in patch.items():
        fmeta = _sub(meta, key)
        if value is None:
            original.pop(key, None)
            continue
        existing = original.get(key)
        if isinstance(value, dict):
            if value.get(_DIRECTIVE) == "delete":
                original.pop(key, None)
                continue
            base = existing if isinstance(existing, dict) else {}
            original[key] = _merge_map(base, value, _type(fmeta.type_name))
        elif isinstance(value, list) and "merge" in fmeta.strategy.split(","):
            original[key] = _merge_list(existing if isinstance(existing, list) else [], value, fmeta)
        else:
            original[key] = _strip(value)
    for key, order in orders.items():
        if isinstance(original.get(key), list):
            original[key] = _set_order(original[key], order, _sub(meta, key).merge_key)
    return original


def _strip(value: Any) -> Any:
    """A patch value stored as is: directives removed, nulls in maps dropped."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if not (isinstance(k, str) and k.startswith("$")) and v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value if not (isinstance(v, dict) and v.get(_DIRECTIVE) is not None)]
    return value


def _merge_list(original: list[Any], patch: list[Any], fmeta: FieldMeta) -> list[Any]:
    if any(isinstance(e, dict) and e.get(_DIRECTIVE) == "replace" for e in patch):
        return [_strip(e) for e in patch if not (isinstance(e, dict) and _DIRECTIVE in e)]
    key = fmeta.merge_key
    if not key:
        # A merging list of primitives: union, keeping the original order.
        result = list(original)
        for e in patch:
            if isinstance(e, dict) and _DIRECTIVE in e:
                continue
            if e not in result:
                result.append(e)
        return result
    result = [e for e in original]
    sub = _type(fmeta.type_name)
    for element in patch:
        if not isinstance(element, dict):
            raise _bad(f"Unable to merge: list element {json.dumps(element)} is not a map with merge key {key}")
        if element.get(_DIRECTIVE) == "delete":
            result = [e for e in result if not (isinstance(e, dict) and e.get(key) == element.get(key))]
            continue
        if key not in element:
            raise _bad(f"map: {json.dumps(element)} does not contain declared merge key: {key}")
        for i, existing in enumerate(result):
            if isinstance(existing, dict) and existing.get(key) == element[key]:
                result[i] = _merge_map(existing, element, sub)
                break
        else:
            result.append(_merge_map({}, element, sub))
    return result


def _set_order(items: list[Any], order: list[Any], merge_key: str) -> list[Any]:
    """$setElementOrder: the listed elements take the listed order in the slots they occupy."""
    def ident(e: Any) -> Any:
        return json.dumps(e.get(merge_key), sort_keys=True) if merge_key and isinstance(e, dict) else \
            json.dumps(e, sort_keys=True)

    rank = {ident(e): i for i, e in enumerate(order)}
    ordered = sorted((e for e in items if ident(e) in rank), key=lambda e: rank[ident(e)])
    it = iter(ordered)
    return [next(it) if ident(e) in rank else e for e in items]


# --- server-side apply -----------------------------------------------------------------------------

FieldPath = tuple[str, ...]


def _element_key(element: Any, fmeta: FieldMeta) -> str | None:
    if fmeta.list_keys and isinstance(element, dict):
        ident = {}
        for k in fmeta.list_keys:
            value = element.get(k)
            if value is None and k == "protocol":
                value = "TCP"  # the defaulted key part, as the server sees it after defaulting
            ident[k] = value
        return "k:" + json.dumps(ident, separators=(",", ":"), sort_keys=True)
    if fmeta.strategy and not fmeta.merge_key and not isinstance(element, (dict, list)):
        return "v:" + json.dumps(element)
    return None


def field_set(obj: Any, meta: dict[str, FieldMeta] | None, prefix: FieldPath = ()) -> set[FieldPath]:
    """The leaf paths an applied configuration sets, in FieldsV1 element syntax (f:, k:, v:)."""
    paths: set[FieldPath] = set()
    if not isinstance(obj, dict):
        return paths
    for key, value in obj.items():
        if prefix == () and key in ("apiVersion", "kind"):
            continue
        if prefix == ("f:metadata",) and key not in ("labels", "annotations", "finalizers", "ownerReferences"):
            continue  # name, namespace and friends identify the object; nobody owns them
        fmeta = _sub(meta, key)
        path = prefix + (f"f:{key}",)
        if isinstance(value, dict) and value:
            paths |= field_set(value, _type(fmeta.type_name), path)
        elif isinstance(value, list) and value and all(_element_key(e, fmeta) for e in value):
            # Keyed (or set) lists: each element is owned on its own, by its key.
            for element in value:
                epath = path + (str(_element_key(element, fmeta)),)
                paths.add(epath + (".",))
                if isinstance(element, dict):
                    paths |= field_set(element, _type(fmeta.type_name), epath)
        else:
            paths.add(path)
    return paths


def fields_v1(paths: set[FieldPath]) -> Obj:
    tree: Obj = {}
    for path in sorted(paths):
        node = tree
        for part in path:
            node = node.setdefault(part, {})
    return tree


def paths_of(tree: Any, prefix: FieldPath = ()) -> set[FieldPath]:
    paths: set[FieldPath] = set()
    if not isinstance(tree, dict):
        return paths
    for key, sub in tree.items():
        if key == ".":
            paths.add(prefix + (".",))
        elif isinstance(sub, dict) and sub:
            paths |= paths_of(sub, prefix + (key,))
        else:
            paths.add(prefix + (key,))
    return paths


def _get_path(obj: Any, path: FieldPath, meta: dict[str, FieldMeta] | None) -> tuple[bool, Any]:
    """The value at a FieldsV1 path (found, value)."""
    node = obj
    fmeta = FieldMeta()
    for part in path:
        if part == ".":
            return True, node
        if part.startswith("f:"):
            if not isinstance(node, dict) or part[2:] not in node:
                return False, None
            fmeta = _sub(meta, part[2:])
            node = node[part[2:]]
            meta = _type(fmeta.type_name) if isinstance(node, dict) else meta
        else:
            if not isinstance(node, list):
                return False, None
            match = [e for e in node if _element_key(e, fmeta) == part]
            if not match:
                return False, None
            node = match[0]
            meta = _type(fmeta.type_name)
    return True, node


def _delete_path(obj: Any, path: FieldPath, meta: dict[str, FieldMeta] | None) -> None:
    parts = [p for p in path if p != "."]
    node = obj
    fmeta = FieldMeta()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.startswith("f:"):
            if not isinstance(node, dict) or part[2:] not in node:
                return
            if last:
                del node[part[2:]]
                return
            fmeta = _sub(meta, part[2:])
            node = node[part[2:]]
            meta = _type(fmeta.type_name) if isinstance(node, dict) else meta
        else:
            if not isinstance(node, list):
                return
            if last:
                node[:] = [e for e in node if _element_key(e, fmeta) != part]
                return
            match = [e for e in node if _element_key(e, fmeta) == part]
            if not match:
                return
            node = match[0]
            meta = _type(fmeta.type_name)


def _apply_merge(current: Any, applied: Any, meta: dict[str, FieldMeta] | None) -> Any:
    """Merge an applied configuration onto the live object: maps recurse, keyed lists merge by key."""
    if not isinstance(applied, dict) or not isinstance(current, dict):
        return copy.deepcopy(applied)
    result = dict(current)
    for key, value in applied.items():
        fmeta = _sub(meta, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = _apply_merge(current.get(key, {}), value, _type(fmeta.type_name))
        elif isinstance(value, list) and isinstance(current.get(key), list) and fmeta.list_keys:
            live = list(current[key])
            for element in value:
                ekey = _element_key(element, fmeta)
                for i, existing in enumerate(live):
                    if ekey is not None and _element_key(existing, fmeta) == ekey:
                        live[i] = _apply_merge(existing, element, _type(fmeta.type_name))
                        break
                else:
                    live.append(copy.deepcopy(element))
            result[key] = live
        elif isinstance(value, list) and isinstance(current.get(key), list) and fmeta.strategy == "merge":
            result[key] = current[key] + [v for v in value if v not in current[key]]
        else:
            result[key] = copy.deepcopy(value)
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resource_for(obj: Obj) -> str:
    api_version = str(obj.get("apiVersion", ""))
    kind = str(obj.get("kind", ""))
    plural = {"Endpoints": "endpoints"}.get(kind, kind.lower() + "s")
    group = api_version.split("/", 1)[0] if "/" in api_version else ""
    return f"{plural}.{group}" if group else plural


def server_side_apply(current: dict[str, Any] | None, applied: dict[str, Any], field_manager: str,
                      force: bool) -> dict[str, Any]:
    """Create-or-update for `kubectl apply --server-side`.

    Ownership is tracked per manager in metadata.managedFields (FieldsV1): the applier owns what it
    applies; a field it applied before and no longer applies is removed unless another manager owns
    it; a field another *applier* owns with a different value is a 409 Conflict unless force, which
    moves ownership. Writes that are not applies are not recorded by this server, so they never
    conflict.
    """
    if not field_manager:
        raise StatusError(400, "BadRequest", "PATCH, application/apply-patch+yaml requires fieldManager to be set")
    if not isinstance(applied, dict):
        raise StatusError(400, "BadRequest", "error decoding patch: the applied configuration must be an object")
    meta = root_type(_resource_for(applied))
    api_version = str(applied.get("apiVersion", ""))
    applied_paths = field_set(applied, meta)
    if current is None:
        created = copy.deepcopy(applied)
        created.setdefault("metadata", {})["managedFields"] = [_entry(field_manager, api_version, applied_paths)]
        return created
    managers = [m for m in (current.get("metadata") or {}).get("managedFields") or [] if isinstance(m, dict)]
    mine_before: set[FieldPath] = set()
    others: list[tuple[Obj, set[FieldPath]]] = []
    for entry in managers:
        paths = paths_of(entry.get("fieldsV1"))
        if entry.get("manager") == field_manager and entry.get("operation") == "Apply":
            mine_before = paths
        else:
            others.append((entry, paths))
    conflicts: list[tuple[str, FieldPath, str]] = []
    for entry, paths in others:
        if entry.get("operation") != "Apply":
            continue
        for path in sorted(applied_paths & paths):
            if path[-1] == ".":
                continue
            found, live = _get_path(current, path, meta)
            _, wanted = _get_path(applied, path, meta)
            if found and live != wanted:
                conflicts.append((str(entry.get("manager")), path, str(entry.get("apiVersion", ""))))
    if conflicts and not force:
        causes = [{"reason": "FieldManagerConflict", "message": f'conflict with "{m}" using {v}',
                   "field": _dotted(p)} for m, p, v in conflicts]
        plural = "conflict" if len(conflicts) == 1 else "conflicts"
        lines = "\n".join(f'- {c["message"]}: {c["field"]}' for c in causes) if len(conflicts) > 1 else \
            f'{causes[0]["message"]}: {causes[0]["field"]}'
        raise StatusError(409, "Conflict", f"Apply failed with {len(conflicts)} {plural}: {lines}",
                          kind=str(applied.get("kind", "")), name=str((applied.get("metadata") or {}).get("name", "")),
                          causes=causes)
    result: Obj = _apply_merge(current, applied, meta)
    owned_by_others = set().union(*(paths for _, paths in others)) if others else set()
    # Whole elements go before their fields: the key fields are what identify an element.
    pruned = sorted(mine_before - applied_paths - owned_by_others, key=lambda p: len(p) - (p[-1] == "."))
    for path in pruned:
        _delete_path(result, path, meta)
    # A list or map emptied by pruning goes too, unless someone still sets something under it.
    still_set = {p[:i] for p in applied_paths | owned_by_others for i in range(1, len(p) + 1)}
    parents = {p[:i] for p in pruned for i in range(1, len(p)) if p[i - 1] != "."}
    for parent in sorted(parents - still_set, key=len, reverse=True):
        found, value = _get_path(result, parent, meta)
        if found and value in ({}, []):
            _delete_path(result, parent, meta)
    new_managers: list[Obj] = []
    for entry, paths in others:
        # Forcing takes over only the conflicting fields; equal values stay co-owned.
        lost = {p for m, p, _ in conflicts if m == entry.get("manager")}
        if force and lost and entry.get("operation") == "Apply":
            paths = paths - lost
            if not paths:
                continue
            entry = dict(entry, fieldsV1=fields_v1(paths))
        new_managers.append(entry)
    new_managers.insert(0, _entry(field_manager, api_version, applied_paths))
    result.setdefault("metadata", {})["managedFields"] = new_managers
    return result


def _entry(manager: str, api_version: str, paths: set[FieldPath]) -> Obj:
    return {"manager": manager, "operation": "Apply", "apiVersion": api_version, "time": _now(),
            "fieldsType": "FieldsV1", "fieldsV1": fields_v1(paths)}


def _dotted(path: FieldPath) -> str:
    out = ""
    for part in path:
        if part.startswith("f:"):
            out += "." + part[2:]
        elif part.startswith(("k:", "v:")):
            out += f"[{part[2:]}]"
    return out

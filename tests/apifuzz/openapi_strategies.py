"""Hypothesis strategies for API requests, built from the OpenAPI v2 document a server serves.

Every operation of the document (list, create, get, replace, patch, delete per kind) becomes a
request: path parameters, query parameters and a body drawn from the operation's schema. Values
are a mix of what a well-meaning client sends (names, IPs, ports, enum words the schemas leave as
plain strings), so that requests reach validation and storage, and of hostile variants: wrong JSON
types, unknown fields, boundary and out-of-range integers, control characters and unicode.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import yaml
from hypothesis import strategies as st

Schema = dict[str, Any]

# Words Kubernetes objects use in string fields the schema types only as "string".
WORDS = ["TCP", "UDP", "SCTP", "ClusterIP", "NodePort", "LoadBalancer", "ExternalName", "None", "ClientIP",
         "Cluster", "Local", "IPv4", "IPv6", "FQDN", "SingleStack", "PreferDualStack", "RequireDualStack",
         "Always", "IfNotPresent", "Never", "Running", "Pending", "True", "False", "Unknown", "Ready",
         "NoSchedule", "NoExecute", "Opaque", "kubernetes.io/tls", "RollingUpdate", "Recreate", "VIP", "Proxy",
         "InternalIP", "Hostname", "Normal", "Warning", "In", "NotIn", "Exists", "web", "app", "a", "x-1",
         "kube-system", "default", "fuzz", "http", "25%", "1", "100m", "1Gi", "-1", "10.96.0.10", "10.96.0.1",
         "10.244.1.5", "192.0.2.1", "2001:db8::1", "::1", "0.0.0.0", "10.0.0.0/8", "fe80::1%eth0",
         "10.0.0.1\n-A INPUT -j ACCEPT", "a\"b", "example.com", "a.b.c", "2024-01-01T00:00:00Z", "dg==", ""]
HOSTILE_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
INT_EDGES = [0, 1, -1, 80, 443, 5000, 30080, 32767, 65535, 65536, 2**31 - 1, 2**31, -(2**31), 2**53,
             2**63 - 1, -(2**63)]


# Strategies are built once, at import: building one (and its first validation) costs far more
# than drawing from it.
NAMES = st.builds(lambda head, tail: head + tail, st.sampled_from("abcfmwxz"),
                  st.text(alphabet="abc-019", max_size=6).map(lambda t: t.strip("-")))
STRINGS = st.one_of(st.sampled_from(WORDS), st.sampled_from(WORDS), NAMES, NAMES, HOSTILE_TEXT)
INTEGERS = st.one_of(st.sampled_from(INT_EDGES), st.integers(-5, 70000), st.integers(-(2**63), 2**63 - 1))
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, st.floats(allow_nan=False, allow_infinity=False), STRINGS)
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(STRINGS, inner, max_size=3)),
                        max_leaves=4)


def _name_text() -> st.SearchStrategy[str]:
    return NAMES


def strings() -> st.SearchStrategy[str]:
    return STRINGS


def integers() -> st.SearchStrategy[int]:
    return INTEGERS


def any_json(max_leaves: int = 4) -> st.SearchStrategy[Any]:
    return ANY_JSON


class SchemaStrategies:
    """Strategies for the definitions of one OpenAPI v2 document."""

    def __init__(self, doc: Schema) -> None:
        self.doc = doc
        self.definitions: dict[str, Schema] = doc["definitions"]
        self._cache: dict[str, st.SearchStrategy[Any]] = {}

    def for_schema(self, schema: Schema, depth: int = 0) -> st.SearchStrategy[Any]:
        typed = self._typed(schema, depth)
        # One value in ~100 has the wrong type or shape (the decoder's error paths); more would make
        # nearly every object a 400 and leave validation and storage unexplored.
        return st.one_of(*([typed] * 99), ANY_JSON)

    def _typed(self, schema: Schema, depth: int) -> st.SearchStrategy[Any]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            if depth > 4:
                return st.just({})
            key = f"{name}@{depth}"
            if key not in self._cache:
                self._cache[key] = st.deferred(lambda: self._object(self.definitions[name], depth + 1))
            return self._cache[key]
        kind = schema.get("type")
        fmt = schema.get("format", "")
        if fmt == "int-or-string":
            return st.one_of(integers(), strings())
        if kind == "string":
            return strings()
        if kind == "integer":
            return integers()
        if kind == "number":
            return st.floats(allow_nan=False, allow_infinity=False)
        if kind == "boolean":
            return st.booleans()
        if kind == "array":
            return st.lists(self.for_schema(schema.get("items", {}), depth + 1), max_size=3)
        if kind == "object" or "properties" in schema:
            return self._object(schema, depth + 1)
        return any_json()

    def _object(self, schema: Schema, depth: int) -> st.SearchStrategy[Any]:
        props = schema.get("properties")
        if props:
            fields = {k: self.for_schema(v, depth) for k, v in props.items() if k not in ("apiVersion", "kind")}
            # A few fields per object (drawing every optional field of a PodSpec costs hypothesis
            # hundreds of choices per request), always with metadata and spec when there are.
            chosen = st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)
            always = sorted({"metadata", "spec"} & fields.keys())

            @st.composite
            def some_fields(draw: st.DrawFn) -> dict[str, Any]:
                keys = always + [k for k in draw(chosen) if k not in always]
                return {k: draw(fields[k]) for k in keys}

            base = some_fields()
            # Now and then a field no schema declares (dropped under Warn/Ignore, 400 under Strict).
            return st.one_of(*([base] * 9), st.builds(lambda d, k, v: {**d, k: v}, base, STRINGS, ANY_JSON))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return st.dictionaries(st.one_of(NAMES, STRINGS), self.for_schema(extra, depth), max_size=3)
        return ANY_JSON

    def definition(self, name: str) -> st.SearchStrategy[Any]:
        """The strategy for one definition's objects, built once (building strategies is slow)."""
        key = "object:" + name
        if key not in self._cache:
            self._cache[key] = self._object(self.definitions[name], 0)
        return self._cache[key]

    def partial(self, name: str) -> st.SearchStrategy[Any]:
        key = "partial:" + name
        if key not in self._cache:
            self._cache[key] = self.for_schema(self.definitions[name])
        return self._cache[key]


def with_metadata(obj: Any, name: str, namespace: str | None) -> Any:
    """Mostly a usable name and namespace, so that requests get past the name checks."""
    if not isinstance(obj, dict):
        return obj
    meta = obj.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["name"] = name
    if namespace is not None:
        meta["namespace"] = namespace
    for server_owned in ("resourceVersion", "uid", "managedFields"):
        meta.pop(server_owned, None)
    obj["metadata"] = meta
    return obj


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # with {namespace} and {name}
    definition: str | None  # body schema (create/replace) or the kind's definition (patch)
    action: str


def operations(doc: Schema) -> list[Operation]:
    ops: list[Operation] = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters" or not isinstance(op, dict):
                continue
            ref = None
            for param in op.get("parameters", []):
                if param.get("in") == "body" and "$ref" in param.get("schema", {}):
                    ref = param["schema"]["$ref"].rsplit("/", 1)[1]
            action = op.get("x-kubernetes-action", method)
            if action == "patch" or ref is None:
                ref = _kind_definition(doc, op)
            ops.append(Operation(method.upper(), path, ref, action))
            if path.endswith("/{name}") and method in ("put", "patch") and _has_status(ref):
                ops.append(Operation(method.upper(), path + "/status", ref, action + "-status"))
    return ops


def _has_status(definition: str | None) -> bool:
    return definition is not None and definition.rsplit(".", 1)[1] in (
        "Service", "Pod", "Node", "Deployment", "ReplicaSet", "Namespace")


def _kind_definition(doc: Schema, op: Schema) -> str | None:
    gvk = op.get("x-kubernetes-group-version-kind") or {}
    for name in doc["definitions"]:
        if name.rsplit(".", 1)[1] == gvk.get("kind") and f".{gvk.get('version')}." in name:
            return name
    return None


PATCH_TYPES = ["application/merge-patch+json", "application/strategic-merge-patch+json",
               "application/json-patch+json", "application/apply-patch+yaml"]
POINTERS = st.lists(st.sampled_from(["spec", "metadata", "status", "labels", "ports", "0", "-", "name",
                                     "clusterIP", "data", "~1", "~0", "x"]), max_size=4).map(
    lambda parts: "/" + "/".join(parts))
JSON_PATCH = st.lists(st.one_of(
    st.fixed_dictionaries({"op": st.sampled_from(["add", "remove", "replace", "move", "copy", "test", "bad"]),
                           "path": st.one_of(POINTERS, STRINGS)},
                          optional={"value": ANY_JSON, "from": POINTERS}),
    ANY_JSON), max_size=4)
LIST_PARAMS = st.one_of(st.just({}), st.fixed_dictionaries({}, optional={
    key: st.one_of(st.sampled_from(values), HOSTILE_TEXT) for key, values in (
        ("labelSelector", ["app=web", "a in (b,c)", "!x", "a=", "==", "a,b=c", "\x00"]),
        ("fieldSelector", ["metadata.name=f-1", "spec.nodeName=n", "bad.field=x", "a"]),
        ("limit", ["1", "0", "-1", "x", "99999999999999999999"]),
        ("resourceVersion", ["0", "1", "", "x", "99999999"]),
        ("resourceVersionMatch", ["NotOlderThan", "Exact", "x"]),
        ("continue", ["x", "eyJydiI6MX0", ""]))}))
WRITE_PARAMS = st.one_of(*([st.just({})] * 4), st.fixed_dictionaries({}, optional={
    "fieldValidation": st.sampled_from(["Strict", "Strict", "Warn", "Ignore", "strict", ""]),
    "dryRun": st.sampled_from(["All", "All", "x"])}))
DELETE_OPTIONS = st.one_of(st.none(), st.none(), st.none(), st.fixed_dictionaries({}, optional={
    "propagationPolicy": st.sampled_from(["Orphan", "Background", "Foreground", "x"]),
    "gracePeriodSeconds": st.one_of(INTEGERS, STRINGS),
    "preconditions": ANY_JSON, "dryRun": st.sampled_from([["All"], [], "x"])}))
OBJECT_NAMES = st.one_of(st.sampled_from(["f-1", "f-2", "f-3"]), NAMES)


class RequestStrategy:
    """Draws (method, path, body, content type, query) for the operations of one document."""

    def __init__(self, doc: Schema, namespace: str) -> None:
        self.strategies = SchemaStrategies(doc)
        self.ops = operations(doc)
        self.namespace = namespace
        self.op = st.sampled_from(self.ops)
        self.url_namespace = st.one_of(*([st.just(namespace)] * 8), NAMES, HOSTILE_TEXT.filter(bool))
        self.keep_meta = st.integers(0, 7)
        self.json_or_yaml = st.sampled_from(["application/json", "application/json", "application/yaml"])
        self.patch_type = st.sampled_from(PATCH_TYPES)
        self.managers = st.sampled_from(["fuzz", "", "x" * 200])
        self.force = st.booleans()
        for op in self.ops:  # build every definition's strategy now, not during the campaign
            if op.definition:
                self.strategies.definition(op.definition)
                self.strategies.partial(op.definition)

    def draw(self, draw: st.DrawFn) -> tuple[str, str, bytes | None, str | None, dict[str, str]]:
        op = draw(self.op)
        name = draw(OBJECT_NAMES)
        url_ns = draw(self.url_namespace)
        path = op.path.replace("{namespace}", quote(url_ns, safe="")).replace("{name}", quote(name, safe=""))
        obj_ns = url_ns if "{namespace}" in op.path else None
        body: bytes | None = None
        ctype: str | None = "application/json"
        if op.action in ("list", "get"):
            return op.method, path, None, None, draw(LIST_PARAMS)
        params: dict[str, str] = draw(WRITE_PARAMS)
        if op.action in ("post", "put", "put-status") and op.definition:
            obj = draw(self.strategies.definition(op.definition))
            if draw(self.keep_meta):
                obj = with_metadata(obj, name, obj_ns)
            ctype = draw(self.json_or_yaml)
            body = yaml.safe_dump(obj).encode() if ctype == "application/yaml" else json.dumps(obj).encode()
        elif op.action.startswith("patch") and op.definition:
            ctype = draw(self.patch_type)
            if ctype == "application/json-patch+json":
                body = json.dumps(draw(JSON_PATCH)).encode()
            elif ctype == "application/apply-patch+yaml":
                obj = with_metadata(draw(self.strategies.definition(op.definition)), name, obj_ns)
                if isinstance(obj, dict):
                    obj.setdefault("apiVersion", _api_version(op.path))
                    obj.setdefault("kind", op.definition.rsplit(".", 1)[1])
                body = yaml.safe_dump(obj).encode()
                params["fieldManager"] = draw(self.managers)
                if draw(self.force):
                    params["force"] = "true"
            else:
                body = json.dumps(draw(self.strategies.partial(op.definition))).encode()
        elif op.action == "delete":
            opts = draw(DELETE_OPTIONS)
            body = None if opts is None else json.dumps(opts).encode()
        return op.method, path, body, ctype, params


def _api_version(path: str) -> str:
    parts = path.strip("/").split("/")
    return parts[1] if parts[0] == "api" else f"{parts[1]}/{parts[2]}"



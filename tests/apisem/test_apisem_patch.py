from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.patch import apply_patch, json_merge_patch, server_side_apply

SMP = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
JSONP = "application/json-patch+json"


def deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}, "finalizers": ["a", "b"]},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [
                        {"name": "web", "image": "web:1", "ports": [{"containerPort": 5000, "protocol": "TCP"},
                                                                   {"containerPort": 80, "protocol": "TCP"}],
                         "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                        {"name": "sidecar", "image": "side:1", "args": ["--x"]},
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }


def smp(obj: dict[str, Any], patch: Any, resource: str = "deployments.apps") -> dict[str, Any]:
    return apply_patch(SMP, obj, json.dumps(patch).encode(), resource)


@pytest.mark.timeout(10)
def test_set_image_merges_containers_by_name() -> None:
    current = deployment()
    out = smp(current, {"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "side:2"}]}}}})
    containers = out["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["web", "sidecar"]
    assert containers[1] == {"name": "sidecar", "image": "side:2", "args": ["--x"]}
    assert containers[0] == current["spec"]["template"]["spec"]["containers"][0]
    assert current["spec"]["template"]["spec"]["containers"][1]["image"] == "side:1"  # input untouched


@pytest.mark.timeout(10)
def test_kubectl_apply_three_way_patch() -> None:
    # What kubectl apply sends after an edit: replicas changed, port 80 and env B removed, order pinned.
    patch = {
        "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "spec": {"replicas": 2, "template": {"spec": {
            "$setElementOrder/containers": [{"name": "sidecar"}, {"name": "web"}],
            "containers": [{"name": "web",
                            "$setElementOrder/ports": [{"containerPort": 5000}],
                            "ports": [{"$patch": "delete", "containerPort": 80}],
                            "env": [{"$patch": "delete", "name": "B"}, {"name": "C", "value": "3"}]}]}}},
    }
    out = smp(deployment(), patch)
    assert out["spec"]["replicas"] == 2
    assert out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] == "{}"
    containers = out["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["sidecar", "web"]
    web = containers[1]
    assert web["ports"] == [{"containerPort": 5000, "protocol": "TCP"}]
    assert web["env"] == [{"name": "A", "value": "1"}, {"name": "C", "value": "3"}]


@pytest.mark.timeout(10)
def test_directives_retain_keys_replace_delete_primitive() -> None:
    out = smp(deployment(), {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}},
                             "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "labels": {"app": None}}})
    assert out["spec"]["strategy"] == {"type": "Recreate"}
    assert out["metadata"]["finalizers"] == ["b"] and out["metadata"]["labels"] == {}
    out = smp(deployment(), {"spec": {"template": {"spec": {"volumes": [{"$patch": "replace"},
                                                                      {"name": "cfg", "configMap": {"name": "c"}}]}}}})
    assert out["spec"]["template"]["spec"]["volumes"] == [{"name": "cfg", "configMap": {"name": "c"}}]
    out = smp(deployment(), {"spec": {"selector": {"$patch": "replace", "matchLabels": {"x": "y"}}}})
    assert out["spec"]["selector"] == {"matchLabels": {"x": "y"}}
    out = smp(deployment(), {"metadata": {"finalizers": ["c", "a"]}})
    assert out["metadata"]["finalizers"] == ["a", "b", "c"]  # merging primitive list: union
    # Lists without a merge key are replaced, like upstream (args are atomic).
    out = smp(deployment(), {"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "args": ["--y"]}]}}}})
    assert out["spec"]["template"]["spec"]["containers"][1]["args"] == ["--y"]


@pytest.mark.timeout(10)
def test_service_ports_merge_by_port() -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"ports": [{"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 443}]}}
    out = smp(svc, {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}, "services")
    assert out["spec"]["ports"] == [{"name": "a", "port": 80, "nodePort": 30080, "targetPort": 8080},
                                    {"name": "b", "port": 443}]
    # The same patch as a JSON merge patch replaces the whole list.
    out = apply_patch(MERGE, svc, b'{"spec":{"ports":[{"port":80}]}}', "services")
    assert out["spec"]["ports"] == [{"port": 80}]


@pytest.mark.timeout(10)
def test_bad_patches() -> None:
    with pytest.raises(StatusError) as info:
        apply_patch(SMP, deployment(), b"{not json", "deployments.apps")
    assert info.value.code == 400 and info.value.reason == "BadRequest"
    with pytest.raises(StatusError) as info:
        smp(deployment(), {"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}})
    assert info.value.code == 400 and "does not contain declared merge key: name" in info.value.message
    with pytest.raises(StatusError) as info:
        apply_patch("application/xml", deployment(), b"<x/>", "deployments.apps")
    assert info.value.code == 415 and info.value.reason == "UnsupportedMediaType"


@pytest.mark.timeout(10)
def test_json_patch_operations() -> None:
    ops = [
        {"op": "test", "path": "/spec/replicas", "value": 4},
        {"op": "replace", "path": "/spec/replicas", "value": 5},
        {"op": "add", "path": "/metadata/labels/tier~1role", "value": "web"},
        {"op": "remove", "path": "/metadata/finalizers/0"},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "z"},
        {"op": "copy", "from": "/metadata/labels/app", "path": "/metadata/annotations"},
        {"op": "move", "from": "/spec/template/spec/containers/1", "path": "/spec/template/spec/containers/0"},
    ]
    out = apply_patch(JSONP, deployment(), json.dumps(ops).encode(), "deployments.apps")
    assert out["spec"]["replicas"] == 5
    assert out["metadata"]["labels"] == {"app": "web", "tier/role": "web"}
    assert out["metadata"]["finalizers"] == ["b", "z"]
    assert out["metadata"]["annotations"] == "web"
    assert [c["name"] for c in out["spec"]["template"]["spec"]["containers"]] == ["sidecar", "web"]


@pytest.mark.parametrize("ops,message", [
    ([{"op": "test", "path": "/spec/replicas", "value": 3}], "testing value /spec/replicas failed: test failed"),
    ([{"op": "remove", "path": "/metadata/labels/nope"}],
     'remove operation does not apply: doc is missing path: "/metadata/labels/nope": missing value'),
    ([{"op": "replace", "path": "/spec/nope/x", "value": 1}],
     'replace operation does not apply: doc is missing path: "/spec/nope/x": missing value'),
])
@pytest.mark.timeout(10)
def test_json_patch_failures_are_422(ops: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(StatusError) as info:
        apply_patch(JSONP, deployment(), json.dumps(ops).encode(), "deployments.apps")
    assert info.value.code == 422 and info.value.causes[0]["message"] == message


@pytest.mark.timeout(10)
def test_json_patch_malformed_is_400() -> None:
    for body in (b'{"op": "add"}', b'[{"op": "jump", "path": "/a"}]', b'[{"op": "add", "path": "a", "value": 1}]'):
        with pytest.raises(StatusError) as info:
            apply_patch(JSONP, deployment(), body, "deployments.apps")
        assert info.value.code == 400, body


json_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab", max_size=2)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text("abc", min_size=1, max_size=2), inner, max_size=3), max_leaves=12)
json_objects = st.dictionaries(st.text("abc", min_size=1, max_size=2), json_values, max_size=4)


def _no_nulls_in_maps(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _no_nulls_in_maps(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_no_nulls_in_maps(x) for x in v]
    return v


def create_merge_patch(a: Any, b: Any) -> Any:
    """The RFC 7386 patch that turns a into b (b has no null map values)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return b
    patch: dict[str, Any] = {k: None for k in a if k not in b}
    for k, v in b.items():
        if k not in a:
            patch[k] = v
        elif a[k] != v:
            patch[k] = create_merge_patch(a[k], v)
    return patch


@settings(max_examples=40, deadline=None)
@given(json_objects, json_objects)
@pytest.mark.timeout(30)
def test_merge_patch_round_trip(a: dict[str, Any], b: dict[str, Any]) -> None:
    a, b = _no_nulls_in_maps(a), _no_nulls_in_maps(b)
    patch = create_merge_patch(a, b)
    assert json_merge_patch(a, patch) == b
    # A strategic merge patch without directives or merge keys behaves the same on unknown kinds.
    assert apply_patch(SMP, a, json.dumps(patch).encode(), "configmaps") == b


@settings(max_examples=30, deadline=None)
@given(json_objects, json_objects)
@pytest.mark.timeout(30)
def test_json_patch_replace_root_fields_round_trip(a: dict[str, Any], b: dict[str, Any]) -> None:
    ops = [{"op": "remove", "path": "/" + k.replace("~", "~0").replace("/", "~1")} for k in a if k not in b]
    ops += [{"op": "add", "path": "/" + k.replace("~", "~0").replace("/", "~1"), "value": v} for k, v in b.items()]
    assert apply_patch(JSONP, a, json.dumps(ops).encode(), "configmaps") == b


@pytest.mark.timeout(10)
def test_server_side_apply_create_update_prune_conflict() -> None:
    applied = deployment()
    del applied["metadata"]["finalizers"]
    created = server_side_apply(None, applied, "kubectl", False)
    mf = created["metadata"]["managedFields"]
    assert mf[0]["manager"] == "kubectl" and mf[0]["operation"] == "Apply" and mf[0]["fieldsType"] == "FieldsV1"
    fields = mf[0]["fieldsV1"]
    assert "f:replicas" in fields["f:spec"]
    web = fields["f:spec"]["f:template"]["f:spec"]["f:containers"]['k:{"name":"web"}']
    assert "." in web and 'k:{"containerPort":5000,"protocol":"TCP"}' in web["f:ports"]

    # Re-apply without the sidecar and the env list: both are pruned, the rest stays.
    second = copy.deepcopy(applied)
    containers = second["spec"]["template"]["spec"]["containers"]
    del containers[1]
    del containers[0]["env"]
    second["spec"]["replicas"] = 2
    updated = server_side_apply(created, second, "kubectl", False)
    got = updated["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in got] == ["web"] and "env" not in got[0]
    assert updated["spec"]["replicas"] == 2

    # Another applier wanting a different replica count conflicts, unless it forces.
    other = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
             "spec": {"replicas": 7}}
    with pytest.raises(StatusError) as info:
        server_side_apply(updated, other, "hpa", False)
    assert info.value.code == 409 and info.value.reason == "Conflict"
    assert info.value.causes == [{"reason": "FieldManagerConflict", "message": 'conflict with "kubectl" using apps/v1',
                                  "field": ".spec.replicas"}]
    assert info.value.message == 'Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: .spec.replicas'
    forced = server_side_apply(updated, other, "hpa", True)
    assert forced["spec"]["replicas"] == 7
    owners = {m["manager"]: m["fieldsV1"] for m in forced["metadata"]["managedFields"]}
    assert "f:replicas" in owners["hpa"]["f:spec"] and "f:replicas" not in owners["kubectl"]["f:spec"]
    assert "f:template" in owners["kubectl"]["f:spec"]  # only the conflicting field changed hands
    # hpa co-applies the template with equal values (no conflict); when it stops applying it, kubectl
    # still owns the template, so nothing is pruned.
    shared = copy.deepcopy(other)
    shared["spec"]["template"] = copy.deepcopy(second["spec"]["template"])
    co = server_side_apply(forced, shared, "hpa", False)
    left = copy.deepcopy(shared)
    del left["spec"]["template"]
    after = server_side_apply(co, left, "hpa", False)
    assert after["spec"]["template"] == co["spec"]["template"] and after["spec"]["replicas"] == 7
    # Same value is no conflict.
    same = copy.deepcopy(other)
    same["spec"]["replicas"] = 2
    assert server_side_apply(updated, same, "hpa", False)["spec"]["replicas"] == 2

"""RBAC objects are validated as kube-apiserver's pkg/apis/rbac/validation does (422 with field
paths), with the v1 defaults (subject and roleRef apiGroups); roleRef is immutable. The same rules
through a live server and kubectl are in tests/deploy (the manifests) and test_satokens.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane_stub.apiserver.defaults import apply_defaults
from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.validation import validate_create, validate_update

G = "rbac.authorization.k8s.io"
ROLE, CROLE, RB, CRB = (f"{p}.{G}" for p in ("roles", "clusterroles", "rolebindings", "clusterrolebindings"))


def role(rules: Any, ns: str | None = "team", name: str = "r") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns:
        meta["namespace"] = ns
    return {"apiVersion": f"{G}/v1", "kind": "Role" if ns else "ClusterRole", "metadata": meta, "rules": rules}


def binding(ref: Any, subjects: Any, ns: str | None = "team") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "b"}
    if ns:
        meta["namespace"] = ns
    obj = {"apiVersion": f"{G}/v1", "kind": "RoleBinding" if ns else "ClusterRoleBinding", "metadata": meta,
           "roleRef": ref, "subjects": subjects}
    return obj


REF = {"apiGroup": G, "kind": "ClusterRole", "name": "view"}
USER = {"kind": "User", "name": "alice", "apiGroup": G}

# (resource, object, [(field, reason)]) -- [] means valid
CASES: list[tuple[str, str, dict[str, Any], list[tuple[str, str]]]] = [
    ("ok role", ROLE, role([{"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}]), []),
    ("ok cluster role with URLs", CROLE, role([{"verbs": ["get"], "nonResourceURLs": ["/healthz"]}], None), []),
    ("no verbs", ROLE, role([{"verbs": [], "apiGroups": [""], "resources": ["pods"]}]),
     [("rules[0].verbs", "FieldValueRequired")]),
    ("no apiGroups", ROLE, role([{"verbs": ["get"], "resources": ["pods"]}]),
     [("rules[0].apiGroups", "FieldValueRequired")]),
    ("no resources", CROLE, role([{"verbs": ["get"], "apiGroups": [""]}], None),
     [("rules[0].resources", "FieldValueRequired")]),
    ("nothing at all", ROLE, role([{}]), [("rules[0].verbs", "FieldValueRequired"),
                                          ("rules[0].apiGroups", "FieldValueRequired"),
                                          ("rules[0].resources", "FieldValueRequired")]),
    ("URLs in a Role", ROLE, role([{"verbs": ["get"], "nonResourceURLs": ["/x"]}]),
     [("rules[0].nonResourceURLs", "FieldValueInvalid")]),
    ("URLs mixed with resources", CROLE,
     role([{"verbs": ["get"], "nonResourceURLs": ["/x"], "resources": ["pods"]}], None),
     [("rules[0].nonResourceURLs", "FieldValueInvalid")]),
    ("role without namespace", ROLE, {**role([]), "metadata": {"name": "r"}},
     [("metadata.namespace", "FieldValueRequired")]),
    ("name with a slash", CROLE, role([], None, name="a/b"), [("metadata.name", "FieldValueInvalid")]),
    ("name ..", CROLE, role([], None, name=".."), [("metadata.name", "FieldValueInvalid")]),
    ("name with colons is fine", CROLE, role([], None, name="system:coredns"), []),
    ("empty aggregation", CROLE, {**role([], None), "aggregationRule": {"clusterRoleSelectors": []}},
     [("aggregationRule.clusterRoleSelectors", "FieldValueRequired")]),
    ("ok binding", RB, binding(REF, [USER]), []),
    ("ok binding to a Role", RB, binding({**REF, "kind": "Role"}, [USER]), []),
    ("cluster binding to a Role", CRB, binding({**REF, "kind": "Role"}, [USER], None),
     [("roleRef.kind", "FieldValueNotSupported")]),
    ("roleRef group", RB, binding({**REF, "apiGroup": "apps"}, [USER]),
     [("roleRef.apiGroup", "FieldValueNotSupported")]),
    ("roleRef kind", RB, binding({**REF, "kind": "Group"}, [USER]), [("roleRef.kind", "FieldValueNotSupported")]),
    ("roleRef name", RB, binding({**REF, "name": ""}, [USER]), [("roleRef.name", "FieldValueRequired")]),
    ("no roleRef", RB, binding(None, [USER]), [("roleRef.kind", "FieldValueNotSupported"),
                                             ("roleRef.name", "FieldValueRequired")]),
    ("subject kind", RB, binding(REF, [{"kind": "Robot", "name": "x"}]),
     [("subjects[0].kind", "FieldValueNotSupported")]),
    ("subject name", RB, binding(REF, [{"kind": "User", "name": ""}]), [("subjects[0].name", "FieldValueRequired")]),
    ("user apiGroup", RB, binding(REF, [{"kind": "User", "name": "u", "apiGroup": "x"}]),
     [("subjects[0].apiGroup", "FieldValueNotSupported")]),
    ("SA with apiGroup", RB, binding(REF, [{"kind": "ServiceAccount", "name": "sa", "apiGroup": G}]),
     [("subjects[0].apiGroup", "FieldValueNotSupported")]),
    ("SA bad name", RB, binding(REF, [{"kind": "ServiceAccount", "name": "Bad_Name"}]),
     [("subjects[0].name", "FieldValueInvalid")]),
    ("SA without namespace in a RoleBinding", RB, binding(REF, [{"kind": "ServiceAccount", "name": "sa"}]), []),
    ("SA without namespace in a ClusterRoleBinding", CRB,
     binding(REF, [{"kind": "ServiceAccount", "name": "sa"}], None), [("subjects[0].namespace", "FieldValueRequired")]),
]


def causes(resource: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        apply_defaults(resource, obj)
        validate_create(resource, obj)
    except StatusError as e:
        assert e.code == 422 and e.reason == "Invalid"
        return [(c["field"], c["reason"]) for c in e.causes]
    return []


@pytest.mark.parametrize(("why", "resource", "obj", "want"), CASES, ids=[c[0] for c in CASES])
def test_rbac_validation(why: str, resource: str, obj: dict[str, Any], want: list[tuple[str, str]]) -> None:
    assert causes(resource, obj) == want


def test_v1_defaults_fill_subject_and_role_ref_groups() -> None:
    obj = binding({"kind": "ClusterRole", "name": "view"}, [{"kind": "User", "name": "u"},
                                                            {"kind": "Group", "name": "g"},
                                                            {"kind": "ServiceAccount", "name": "s"}])
    apply_defaults(RB, obj)
    assert obj["roleRef"]["apiGroup"] == G
    assert [s.get("apiGroup") for s in obj["subjects"]] == [G, G, None]


def test_role_ref_is_immutable() -> None:
    old = binding(REF, [USER])
    validate_update(RB, binding(REF, [USER, {**USER, "name": "bob"}]), old)  # subjects may change
    with pytest.raises(StatusError) as e:
        validate_update(RB, binding({**REF, "name": "edit"}, [USER]), old)
    assert e.value.causes == [{"reason": "FieldValueInvalid", "field": "roleRef",
                               "message": 'Invalid value: rbac.RoleRef{APIGroup:"rbac.authorization.k8s.io", '
                                          'Kind:"ClusterRole", Name:"edit"}: cannot change roleRef'}]


_any = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(
                        ["verbs", "apiGroups", "resources", "nonResourceURLs", "kind", "name", "apiGroup",
                         "namespace", "resourceNames"]), c, max_size=4)), max_leaves=6)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([ROLE, CROLE, RB, CRB]), st.dictionaries(
    st.sampled_from(["rules", "roleRef", "subjects", "aggregationRule"]), _any, max_size=3))
def test_any_shape_is_valid_or_a_422(resource: str, body: dict[str, Any]) -> None:
    """Whatever passed the decoder's type check is either valid or a 422 naming fields: never a crash."""
    obj = {"metadata": {"name": "x", "namespace": "ns"} if resource in (ROLE, RB) else {"name": "x"}, **body}
    for c in causes(resource, obj):
        assert c[0] and c[1].startswith("FieldValue")

"""rbac.authorization.k8s.io/v1 Roles, ClusterRoles, RoleBindings and ClusterRoleBindings, as
upstream's pkg/apis/rbac/validation (and the v1 defaults of pkg/apis/rbac/v1/defaults.go).
"""
from __future__ import annotations

from typing import Any

from .fielderrors import FieldErrors, GoValue, Obj, go_quote
from .meta import _dicts, _obj, _str, validate_label_selector, validate_object_meta
from .names import is_dns1123_subdomain

GROUP = "rbac.authorization.k8s.io"


def rbac_name(name: str) -> list[str]:
    """ValidateRBACName: any path segment name (path.IsValidPathSegmentName)."""
    if name in (".", ".."):
        return [f"may not be '{name}'"]
    return [f"may not contain '{c}'" for c in ("/", "%") if c in name]


def default_binding(obj: Obj) -> None:
    """SetDefaults_RoleBinding/ClusterRoleBinding and SetDefaults_Subject."""
    if obj.get("roleRef") is None:  # a Go struct: absent is its zero value, then defaulted
        obj["roleRef"] = {}
    ref = obj["roleRef"]
    if isinstance(ref, dict) and not ref.get("apiGroup"):
        ref["apiGroup"] = GROUP
    for s in _dicts(obj.get("subjects")):
        if not s.get("apiGroup") and s.get("kind") in ("User", "Group"):
            s["apiGroup"] = GROUP


def _strings(errs: FieldErrors, rule: Obj, key: str, path: str) -> list[str]:
    value = rule.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        errs.invalid(f"{path}.{key}", value, "must be a list of strings")
        return []
    return value


def _validate_rule(errs: FieldErrors, rule: Any, namespaced: bool, path: str) -> None:
    if not isinstance(rule, dict):
        errs.invalid(path, rule, "must be an object")
        return
    verbs = _strings(errs, rule, "verbs", path)
    groups = _strings(errs, rule, "apiGroups", path)
    resources = _strings(errs, rule, "resources", path)
    names = _strings(errs, rule, "resourceNames", path)
    urls = _strings(errs, rule, "nonResourceURLs", path)
    if not verbs:
        errs.required(f"{path}.verbs", "verbs must contain at least one value")
    if urls:
        if namespaced:
            errs.invalid(f"{path}.nonResourceURLs", urls, "namespaced rules cannot apply to non-resource URLs")
        if groups or resources or names:
            errs.invalid(f"{path}.nonResourceURLs", urls,
                         "rules cannot apply to both regular resources and non-resource URLs")
        return
    if not groups:
        errs.required(f"{path}.apiGroups", "resource rules must supply at least one api group")
    if not resources:
        errs.required(f"{path}.resources", "resource rules must supply at least one resource")


def _validate_rules(errs: FieldErrors, obj: Obj, namespaced: bool) -> None:
    rules = obj.get("rules")
    if rules is None:
        return
    if not isinstance(rules, list):
        errs.invalid("rules", rules, "must be a list")
        return
    for i, rule in enumerate(rules):
        _validate_rule(errs, rule, namespaced, f"rules[{i}]")


def validate_role(errs: FieldErrors, role: Obj) -> None:
    validate_object_meta(errs, role.get("metadata"), True, rbac_name)
    _validate_rules(errs, role, True)


def validate_cluster_role(errs: FieldErrors, role: Obj) -> None:
    validate_object_meta(errs, role.get("metadata"), False, rbac_name)
    _validate_rules(errs, role, False)
    agg = role.get("aggregationRule")
    if agg is not None:
        selectors = _obj(agg).get("clusterRoleSelectors")
        if not isinstance(selectors, list) or not selectors:
            errs.required("aggregationRule.clusterRoleSelectors",
                          "at least one clusterRoleSelector required if aggregationRule is non-nil")
        else:
            for i, sel in enumerate(selectors):
                if isinstance(sel, dict):
                    validate_label_selector(errs, sel, f"aggregationRule.clusterRoleSelectors[{i}]")


def _validate_subject(errs: FieldErrors, s: Any, namespaced: bool, path: str) -> None:
    if not isinstance(s, dict):
        errs.invalid(path, s, "must be an object")
        return
    name, kind, group = _str(s.get("name")), s.get("kind"), _str(s.get("apiGroup"))
    if not name:
        errs.required(f"{path}.name", "")
    if kind == "ServiceAccount":
        if name:
            for msg in is_dns1123_subdomain(name):
                errs.invalid(f"{path}.name", name, msg)
        if group:
            errs.not_supported(f"{path}.apiGroup", group, ("",))
        if not namespaced and not _str(s.get("namespace")):
            errs.required(f"{path}.namespace", "")
    elif kind in ("User", "Group"):
        if group != GROUP:
            errs.not_supported(f"{path}.apiGroup", group, (GROUP,))
    else:
        errs.not_supported(f"{path}.kind", kind, ("ServiceAccount", "User", "Group"))


def _validate_binding(errs: FieldErrors, binding: Obj, namespaced: bool) -> None:
    validate_object_meta(errs, binding.get("metadata"), namespaced, rbac_name)
    ref = _obj(binding.get("roleRef"))
    if ref.get("apiGroup") != GROUP:
        errs.not_supported("roleRef.apiGroup", ref.get("apiGroup", ""), (GROUP,))
    kinds = ("Role", "ClusterRole") if namespaced else ("ClusterRole",)
    if ref.get("kind") not in kinds:
        errs.not_supported("roleRef.kind", ref.get("kind", ""), kinds)
    name = _str(ref.get("name"))
    if not name:
        errs.required("roleRef.name", "")
    else:
        for msg in rbac_name(name):
            errs.invalid("roleRef.name", name, msg)
    subjects = binding.get("subjects")
    if subjects is not None and not isinstance(subjects, list):
        errs.invalid("subjects", subjects, "must be a list")
        return
    for i, s in enumerate(subjects or []):
        _validate_subject(errs, s, namespaced, f"subjects[{i}]")


def validate_role_binding(errs: FieldErrors, binding: Obj) -> None:
    _validate_binding(errs, binding, True)


def validate_cluster_role_binding(errs: FieldErrors, binding: Obj) -> None:
    _validate_binding(errs, binding, False)


def validate_binding_update(errs: FieldErrors, binding: Obj, old: Obj) -> None:
    """ValidateRoleBindingUpdate: roleRef is immutable (a binding's grant is re-pointed by
    deleting and re-creating it, which the bind/escalate checks then see)."""
    ref, old_ref = _obj(binding.get("roleRef")), _obj(old.get("roleRef"))
    if ref != old_ref:
        text = ("rbac.RoleRef{" + ", ".join(f"{k}:{go_quote(_str(ref.get(j)))}" for k, j in
                                            (("APIGroup", "apiGroup"), ("Kind", "kind"), ("Name", "name"))) + "}")
        errs.invalid("roleRef", GoValue(text), "cannot change roleRef")

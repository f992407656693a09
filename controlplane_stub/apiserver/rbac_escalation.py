"""RBAC privilege-escalation prevention and rules reviews, as kube-apiserver's.

Behaviour read from kubernetes/pkg/registry/rbac/validation (policy_comparator.go: Covers and
BreakdownRule; rule.go: ConfirmNoEscalation, the user's rules in a namespace), rbac/escalation_check.go
(EscalationAllowed, RoleEscalationAuthorized, BindingAuthorized) and
pkg/registry/authorization/selfsubjectrulesreview.

- Writing a Role/ClusterRole is allowed when the writer is in system:masters, may `escalate`
  roles/clusterroles, or already holds every permission the role grants (in the role's namespace;
  for a ClusterRole, cluster-wide).
- Writing a RoleBinding/ClusterRoleBinding is allowed when the writer is in system:masters, may
  `bind` the referenced role (resourceName = its name), or holds every permission that role grants.
- A rule covers another when it holds each of the other's atomic rules (one verb x group x resource
  x resourceName, or one verb x nonResourceURL): verbs/apiGroups/resources by "*" or equality,
  "*/sub" covers "x/sub", a rule without resourceNames covers any name, a URL ending in "*" covers
  the URLs it prefixes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .rbac import (
    API_GROUP,
    AUTHENTICATED,
    Attributes,
    Policy,
    RBACError,
    Rule,
    parse_binding,
    parse_rule,
    url_matches,
)

MASTERS = "system:masters"


def breakdown(rule: Rule) -> list[Rule]:
    """One rule per (verb, group, resource[, name]) or (verb, URL): upstream's BreakdownRule."""
    out: list[Rule] = []
    for v in sorted(rule.verbs):
        for g in sorted(rule.api_groups):
            for r in sorted(rule.resources):
                if rule.resource_names:
                    out.extend(Rule(frozenset({v}), frozenset({g}), frozenset({r}), frozenset({n}))
                               for n in sorted(rule.resource_names))
                else:
                    out.append(Rule(frozenset({v}), frozenset({g}), frozenset({r})))
        out.extend(Rule(frozenset({v}), non_resource_urls=frozenset({u})) for u in sorted(rule.non_resource_urls))
    return out


def _resources_cover(owner: frozenset[str], wanted: frozenset[str]) -> bool:
    if "*" in owner:
        return True
    for path in wanted:
        if path in owner:
            continue
        _, slash, sub = path.partition("/")
        if not slash or "*/" + sub not in owner:
            return False
    return True


def rule_covers(owner: Rule, sub: Rule) -> bool:
    """Whether `owner` holds all of `sub` (upstream's ruleCovers)."""
    return (("*" in owner.verbs or sub.verbs <= owner.verbs)
            and ("*" in owner.api_groups or sub.api_groups <= owner.api_groups)
            and _resources_cover(owner.resources, sub.resources)
            and all(any(url_matches(o, u) for o in owner.non_resource_urls) for u in sub.non_resource_urls)
            and (not owner.resource_names or (bool(sub.resource_names) and sub.resource_names <= owner.resource_names)))


def uncovered(owner: Iterable[Rule], wanted: Iterable[Rule]) -> list[Rule]:
    """The atomic rules of `wanted` that no rule of `owner` covers (empty: owner covers wanted)."""
    owned = list(owner)
    return [a for w in wanted for a in breakdown(w) if not any(rule_covers(o, a) for o in owned)]


def rules_for(policy: Policy, user: str, groups: frozenset[str], namespace: str) -> list[Rule]:
    """Every rule that applies to the user in `namespace` ("" : cluster-wide rules only)."""
    return [r for b in policy.bindings_for(user, groups, namespace) for r in policy.rules_of(b)]


def _fmt(r: Rule) -> str:
    def q(xs: frozenset[str]) -> str:
        return "[" + " ".join(f'"{x}"' for x in sorted(xs)) + "]"
    parts = []
    if r.api_groups or r.resources:
        parts += [f"APIGroups:{q(r.api_groups)}", f"Resources:{q(r.resources)}"]
    if r.resource_names:
        parts.append(f"ResourceNames:{q(r.resource_names)}")
    if r.non_resource_urls:
        parts.append(f"NonResourceURLs:{q(r.non_resource_urls)}")
    parts.append(f"Verbs:{q(r.verbs)}")
    return "{" + ", ".join(parts) + "}"


def escalation_error(policy: Policy, user: str, groups: frozenset[str], namespace: str,
                     wanted: Iterable[Rule]) -> str:
    """"" when the user holds every wanted rule in `namespace`, else upstream's message."""
    missing = uncovered(rules_for(policy, user, groups, namespace), wanted)
    if not missing:
        return ""
    shown = "\n".join(_fmt(r) for r in missing[:20])
    more = f"\n... and {len(missing) - 20} more" if len(missing) > 20 else ""
    shown_groups = "[" + " ".join(f'"{g}"' for g in sorted(groups | {AUTHENTICATED})) + "]"
    return (f'user "{user}" (groups={shown_groups}) is attempting to grant RBAC '
            f"permissions not currently held:\n{shown}{more}")


def check_write(policy: Policy, user: str, groups: frozenset[str], plural: str, namespace: str,
                obj: Mapping[str, Any]) -> str:
    """"" when `user` may write this Role/ClusterRole/RoleBinding/ClusterRoleBinding, else why not.

    A body that does not parse is left to validation (it answers 422): "" here."""
    if MASTERS in groups:
        return ""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str):
        return ""
    try:
        if plural in ("roles", "clusterroles"):
            if policy.authorize(Attributes(user, groups, "escalate", namespace, API_GROUP, plural, name=name))[0]:
                return ""
            rules = obj.get("rules")
            wanted = [parse_rule(r, plural) for r in (rules if isinstance(rules, list) else [])]
            return escalation_error(policy, user, groups, namespace, wanted)
        if plural in ("rolebindings", "clusterrolebindings"):
            b = parse_binding(obj, name, namespace)
            # As upstream: `bind` is asked in the binding's namespace, for a ClusterRole too.
            role_plural = "roles" if b.role_kind == "Role" else "clusterroles"
            if policy.authorize(Attributes(user, groups, "bind", namespace, API_GROUP, role_plural,
                                           name=b.role_name))[0]:
                return ""
            return escalation_error(policy, user, groups, namespace, policy.rules_of(b))
    except RBACError:
        return ""
    return ""


def rules_review(policy: Policy, user: str, groups: frozenset[str], body: object) -> dict[str, Any]:
    """A SelfSubjectRulesReview (authorization.k8s.io/v1) for the requesting user, as kubectl auth
    can-i --list sends it; RBACError for a body that is not one."""
    if not isinstance(body, Mapping) or body.get("kind") != "SelfSubjectRulesReview":
        raise RBACError("expected a SelfSubjectRulesReview")
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise RBACError("spec: Required value")
    ns = spec.get("namespace", "")
    if not isinstance(ns, str) or len(ns) > 63:
        raise RBACError("spec.namespace: expected a string of at most 63 characters")
    resource, non_resource = [], []
    for r in rules_for(policy, user, groups, ns):
        if r.non_resource_urls:
            non_resource.append({"verbs": sorted(r.verbs), "nonResourceURLs": sorted(r.non_resource_urls)})
        else:
            rr: dict[str, Any] = {"verbs": sorted(r.verbs), "apiGroups": sorted(r.api_groups),
                                  "resources": sorted(r.resources)}
            if r.resource_names:
                rr["resourceNames"] = sorted(r.resource_names)
            resource.append(rr)
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
            "metadata": {"creationTimestamp": None}, "spec": {"namespace": ns} if ns else {},
            "status": {"resourceRules": resource, "nonResourceRules": non_resource, "incomplete": False}}

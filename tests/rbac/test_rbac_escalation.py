"""RBAC escalation prevention's rule coverage (controlplane_stub/apiserver/rbac_escalation.py),
as upstream's pkg/registry/rbac/validation Covers: unit and property tests. The API tests with
kubectl as a limited user are in test_rbac.py (they share its live server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane_stub.apiserver import rbac
from controlplane_stub.apiserver.rbac_escalation import breakdown, check_write, rule_covers, rules_review, uncovered


def R(verbs: str, groups: str = "", resources: str = "", names: str = "", urls: str = "") -> rbac.Rule:
    def s(x: str) -> frozenset[str]:
        return frozenset(x.split(",")) if x else frozenset()
    return rbac.Rule(s(verbs), frozenset(groups.split(",")) if resources else frozenset(), s(resources), s(names),
                     s(urls))


@pytest.mark.parametrize("owner,wanted,covered", [
    (R("*", "*", "*"), R("get,list", "apps", "deployments"), True),
    (R("get", "", "pods"), R("get,list", "", "pods"), False),
    (R("get", "", "pods"), R("get", "apps", "pods"), False),
    (R("get", "", "*/scale"), R("get", "", "deployments/scale"), True),
    (R("get", "", "*/scale"), R("get", "", "deployments"), False),
    (R("get", "", "pods"), R("get", "", "pods/log"), False),
    (R("get", "", "pods", names="a,b"), R("get", "", "pods", names="a"), True),
    (R("get", "", "pods", names="a"), R("get", "", "pods"), False),  # names cover no "any name"
    (R("get", "", "pods"), R("get", "", "pods", names="a"), True),
    (R("get", urls="/api/*"), R("get", urls="/api/v1"), True),
    (R("get", urls="/api"), R("get", urls="/apis"), False),
    (R("get", urls="*"), R("get", urls="/healthz"), True),
    (R("get", "*", "*"), R("get", urls="/healthz"), False),  # resources never cover URLs
])
def test_rule_coverage_table(owner: rbac.Rule, wanted: rbac.Rule, covered: bool) -> None:
    assert (not uncovered([owner], [wanted])) is covered


def test_breakdown_is_one_rule_per_verb_group_resource_name() -> None:
    parts = breakdown(R("get,list", "a,b", "x,y", names="n"))
    assert len(parts) == 8 and all(len(p.verbs) == len(p.api_groups) == len(p.resources) == 1 for p in parts)


_words = st.sampled_from(["get", "list", "pods", "pods/log", "*", "*/log", "apps", "", "a", "b"])
_sets = st.frozensets(_words, max_size=3)
_urls = st.frozensets(st.sampled_from(["/api", "/api/*", "/healthz", "*", "/apis/x"]), min_size=1, max_size=3)
_resource_rules = st.builds(rbac.Rule, st.frozensets(_words, min_size=1, max_size=3), _sets,
                            st.frozensets(_words, min_size=1, max_size=3), _sets)
_url_rules = st.builds(lambda v, u: rbac.Rule(v, non_resource_urls=u), st.frozensets(_words, min_size=1), _urls)
_rules = st.lists(st.one_of(_resource_rules, _url_rules), max_size=4)


@given(_rules, st.data())
def test_a_rule_set_covers_itself_and_its_subsets(rules: list[rbac.Rule], data: st.DataObject) -> None:
    assert uncovered(rules, rules) == []
    subset = data.draw(st.lists(st.sampled_from(rules), max_size=len(rules)) if rules else st.just([]))
    assert uncovered(rules, subset) == []
    # Each atomic rule is covered by the rule it came from, and breaking down loses nothing.
    for r in rules:
        assert all(rule_covers(r, a) for a in breakdown(r))
        assert uncovered(breakdown(r), [r]) == []


@given(_rules, _rules)
def test_coverage_is_per_atomic_rule(owner: list[rbac.Rule], wanted: list[rbac.Rule]) -> None:
    missing = uncovered(owner, wanted)
    assert uncovered(owner, missing) == missing  # what is missing stays missing
    assert uncovered([*owner, *missing], wanted) == []  # and adding it covers everything


def _policy() -> rbac.Policy:
    p = rbac.bootstrap_policy()
    for obj in [
        {"kind": "RoleBinding", "metadata": {"name": "alice-admin", "namespace": "team"},
         "roleRef": {"apiGroup": rbac.API_GROUP, "kind": "ClusterRole", "name": "admin"},
         "subjects": [{"kind": "User", "name": "alice"}]},
        {"kind": "ClusterRole", "metadata": {"name": "bind-view"},
         "rules": [{"verbs": ["bind"], "apiGroups": [rbac.API_GROUP], "resources": ["clusterroles"],
                    "resourceNames": ["cluster-admin"]}]},
        {"kind": "ClusterRoleBinding", "metadata": {"name": "bob-bind"},
         "roleRef": {"apiGroup": rbac.API_GROUP, "kind": "ClusterRole", "name": "bind-view"},
         "subjects": [{"kind": "User", "name": "bob"}]},
    ]:
        p.add(obj)
    return p


def _role(*rules: dict[str, list[str]]) -> dict[str, object]:
    return {"kind": "Role", "metadata": {"name": "r", "namespace": "team"}, "rules": list(rules)}


def _binding(role_kind: str, role: str) -> dict[str, object]:
    return {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "team"},
            "roleRef": {"apiGroup": rbac.API_GROUP, "kind": role_kind, "name": role},
            "subjects": [{"kind": "User", "name": "carol"}]}


def test_writes_are_allowed_only_within_what_the_writer_holds() -> None:
    p, no = _policy(), frozenset[str]()
    pods = {"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}
    nodes = {"verbs": ["get"], "apiGroups": [""], "resources": ["nodes"]}
    assert check_write(p, "alice", no, "roles", "team", _role(pods)) == ""
    why = check_write(p, "alice", no, "roles", "team", _role(pods, nodes))
    assert "attempting to grant RBAC permissions not currently held" in why and '"nodes"' in why
    assert "pods" not in why.split("held:")[1]  # only what is missing is listed
    assert check_write(p, "alice", no, "roles", "other", _role(pods)) != ""  # held in team only
    assert check_write(p, "alice", no, "rolebindings", "team", _binding("ClusterRole", "view")) == ""
    assert "not currently held" in check_write(p, "alice", no, "rolebindings", "team",
                                               _binding("ClusterRole", "cluster-admin"))
    # `bind` on the role (its name) lets bob bind what he does not hold; no other role.
    assert check_write(p, "bob", no, "rolebindings", "team", _binding("ClusterRole", "cluster-admin")) == ""
    assert check_write(p, "bob", no, "rolebindings", "team", _binding("ClusterRole", "view")) != ""
    assert check_write(p, "root", frozenset({"system:masters"}), "clusterroles", "",
                       {"kind": "ClusterRole", "metadata": {"name": "x"}, "rules": [nodes]}) == ""


def test_rules_review_lists_the_users_rules_in_a_namespace() -> None:
    p = _policy()
    review = rules_review(p, "alice", frozenset(), {"kind": "SelfSubjectRulesReview",
                                                     "spec": {"namespace": "team"}})
    status = review["status"]
    assert status["incomplete"] is False
    assert any("pods" in r["resources"] and "delete" in r["verbs"] for r in status["resourceRules"])
    assert any("/healthz" in r["nonResourceURLs"] for r in status["nonResourceRules"])
    elsewhere = rules_review(p, "alice", frozenset(), {"kind": "SelfSubjectRulesReview", "spec": {"namespace": "x"}})
    assert not any("pods" in r["resources"] for r in elsewhere["status"]["resourceRules"])
    for bad in [None, {"kind": "SelfSubjectRulesReview"}, {"kind": "SelfSubjectRulesReview", "spec": {"namespace": 3}}]:
        with pytest.raises(rbac.RBACError):
            rules_review(p, "alice", frozenset(), bad)

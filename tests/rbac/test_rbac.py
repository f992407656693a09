"""RBAC as kube-apiserver evaluates it (controlplane_stub/apiserver/rbac.py): a table of
(identity, verb, resource) -> allowed/denied under the bootstrap policy of kube-apiserver
(bootstrappolicy/policy.go) and CoreDNS's manifest, and `kubectl auth can-i` against a live
kproxy-apiserver for the identities its token file can hold."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane_stub.apiserver import rbac
from controlplane_stub.apiserver.pki import write_kubeconfig
from controlplane_stub.apiserver.resources import RESOURCES
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

SA_COREDNS = "system:serviceaccount:kube-system:coredns"
SA_GROUPS = frozenset({"system:serviceaccounts", "system:serviceaccounts:kube-system"})


def binding(kind: str, name: str, role_kind: str, role: str, subject: dict[str, str],
            ns: str = "") -> dict[str, Any]:
    meta = {"name": name, **({"namespace": ns} if ns else {})}
    return {"kind": kind, "metadata": meta, "subjects": [subject],
            "roleRef": {"apiGroup": rbac.API_GROUP, "kind": role_kind, "name": role}}


# What a cluster adds to the bootstrap policy: CoreDNS's binding, and users given the user-facing
# roles in namespace "team" (RoleBindings to ClusterRoles, as upstream recommends) or cluster-wide.
EXTRA = [
    binding("ClusterRoleBinding", "system:coredns", "ClusterRole", "system:coredns",
            {"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}),
    binding("RoleBinding", "alice-view", "ClusterRole", "view", {"kind": "User", "name": "alice"}, "team"),
    binding("RoleBinding", "bob-edit", "ClusterRole", "edit", {"kind": "User", "name": "bob"}, "team"),
    binding("RoleBinding", "carol-admin", "ClusterRole", "admin", {"kind": "User", "name": "carol"}, "team"),
    binding("ClusterRoleBinding", "dave", "ClusterRole", "cluster-admin", {"kind": "User", "name": "dave"}),
    {"kind": "Role", "metadata": {"name": "one-cm", "namespace": "team"},
     "rules": [{"verbs": ["get"], "apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["app"]},
               {"verbs": ["update"], "apiGroups": ["apps"], "resources": ["*/scale"]}]},
    # A RoleBinding names its own namespace's Role: the same name elsewhere grants nothing here.
    binding("RoleBinding", "erin-cm", "Role", "one-cm", {"kind": "User", "name": "erin"}, "team"),
    binding("RoleBinding", "frank-cm", "Role", "one-cm", {"kind": "User", "name": "frank"}, "other"),
    # A ServiceAccount subject without namespace is the binding's namespace's.
    binding("RoleBinding", "sa-view", "ClusterRole", "view", {"kind": "ServiceAccount", "name": "robot"}, "team"),
]

IDS: dict[str, tuple[str, frozenset[str]]] = {
    "masters": ("admin", frozenset({"system:masters"})),
    "readonly": ("kproxy-readonly", frozenset({"system:readonly"})),
    "kube-proxy": ("system:kube-proxy", frozenset()),
    "coredns": (SA_COREDNS, SA_GROUPS),
    "alice(view@team)": ("alice", frozenset()),
    "bob(edit@team)": ("bob", frozenset()),
    "carol(admin@team)": ("carol", frozenset()),
    "dave(cluster-admin)": ("dave", frozenset()),
    "erin": ("erin", frozenset()),
    "frank": ("frank", frozenset()),
    "robot": ("system:serviceaccount:team:robot", frozenset({"system:serviceaccounts"})),
    "nobody": ("nobody", frozenset()),
}

# (identity, verb, "group/resource[/sub]" or a non-resource path, namespace, name) -> allowed
TABLE: list[tuple[str, str, str, str, str, bool]] = [
    ("masters", "delete", "/nodes", "", "n1", True),
    ("masters", "get", "/metrics", "", "", True),
    ("readonly", "list", "/nodes", "", "", True),
    ("readonly", "get", "/pods", "team", "p", True),
    ("readonly", "get", "/secrets", "team", "s", False),
    ("readonly", "create", "/configmaps", "team", "", False),
    # system:node-proxier: list/watch Services, Endpoints, EndpointSlices, get Nodes, write Events
    ("kube-proxy", "list", "/services", "", "", True),
    ("kube-proxy", "watch", "discovery.k8s.io/endpointslices", "", "", True),
    ("kube-proxy", "get", "/nodes", "", "n1", True),
    ("kube-proxy", "create", "/events", "default", "", True),
    ("kube-proxy", "patch", "events.k8s.io/events", "default", "e", True),
    ("kube-proxy", "get", "/services", "default", "s", False),
    ("kube-proxy", "update", "/services", "default", "s", False),
    ("kube-proxy", "list", "/secrets", "", "", False),
    ("kube-proxy", "list", "/pods", "", "", False),
    # system:coredns: list/watch Endpoints, Services, Pods, Namespaces, EndpointSlices
    ("coredns", "watch", "/services", "", "", True),
    ("coredns", "list", "/pods", "", "", True),
    ("coredns", "list", "discovery.k8s.io/endpointslices", "", "", True),
    ("coredns", "get", "/services", "default", "s", False),
    ("coredns", "list", "/secrets", "", "", False),
    ("coredns", "list", "/nodes", "", "", False),
    # view in team
    ("alice(view@team)", "get", "/pods", "team", "p", True),
    ("alice(view@team)", "get", "/pods/log", "team", "p", True),
    ("alice(view@team)", "list", "apps/deployments", "team", "", True),
    ("alice(view@team)", "get", "/secrets", "team", "s", False),
    ("alice(view@team)", "create", "/pods", "team", "", False),
    ("alice(view@team)", "get", "/pods", "other", "p", False),
    ("alice(view@team)", "list", "/nodes", "", "", False),
    ("alice(view@team)", "get", "/pods/exec", "team", "p", False),
    # edit in team
    ("bob(edit@team)", "create", "apps/deployments", "team", "", True),
    ("bob(edit@team)", "update", "apps/deployments/scale", "team", "d", True),
    ("bob(edit@team)", "get", "/secrets", "team", "s", True),
    ("bob(edit@team)", "create", "/pods/exec", "team", "p", True),
    ("bob(edit@team)", "create", "/endpoints", "team", "", False),  # not since 1.22 (CVE-2021-25740)
    ("bob(edit@team)", "create", "discovery.k8s.io/endpointslices", "team", "", False),
    ("bob(edit@team)", "create", "rbac.authorization.k8s.io/rolebindings", "team", "", False),
    # admin in team
    ("carol(admin@team)", "create", "rbac.authorization.k8s.io/rolebindings", "team", "", True),
    ("carol(admin@team)", "delete", "/pods", "team", "p", True),
    ("carol(admin@team)", "create", "authorization.k8s.io/localsubjectaccessreviews", "team", "", True),
    ("carol(admin@team)", "delete", "/namespaces", "", "team", False),
    ("carol(admin@team)", "list", "/nodes", "", "", False),
    ("dave(cluster-admin)", "deletecollection", "apps/replicasets", "any", "", True),
    ("dave(cluster-admin)", "get", "/logs/x", "", "", True),
    # a Role with resourceNames and */scale
    ("erin", "get", "/configmaps", "team", "app", True),
    ("erin", "get", "/configmaps", "team", "other", False),
    ("erin", "list", "/configmaps", "team", "", False),
    ("erin", "update", "apps/deployments/scale", "team", "d", True),
    ("erin", "update", "apps/deployments", "team", "d", False),
    ("frank", "get", "/configmaps", "team", "app", False),
    ("robot", "get", "/pods", "team", "p", True),
    ("robot", "get", "/pods", "other", "p", False),
    # every authenticated user: discovery, health, can-i; nothing else
    ("nobody", "create", "authorization.k8s.io/selfsubjectaccessreviews", "", "", True),
    ("nobody", "get", "/healthz", "", "", True),
    ("nobody", "get", "/apis/apps/v1", "", "", True),
    ("nobody", "get", "/metrics", "", "", False),
    ("nobody", "list", "/services", "", "", False),
]


def attrs(ident: str, verb: str, what: str, ns: str, name: str) -> rbac.Attributes:
    user, groups = IDS[ident]
    if what in ("/healthz", "/metrics", "/apis/apps/v1", "/logs/x"):
        return rbac.Attributes(user, groups, verb, path=what)
    group, _, rest = what.partition("/")
    resource, _, sub = rest.partition("/")
    return rbac.Attributes(user, groups, verb, ns, group, resource, sub, name)


@pytest.fixture(scope="module")
def policy() -> rbac.Policy:
    p = rbac.bootstrap_policy((r.group, r.plural) for r in RESOURCES)
    for obj in EXTRA:
        p.add(obj)
    return p


@pytest.mark.parametrize(("ident", "verb", "what", "ns", "name", "allowed"), TABLE,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}-{r[3]}-{r[4]}" for r in TABLE])
def test_bootstrap_policy_table(policy: rbac.Policy, ident: str, verb: str, what: str, ns: str, name: str,
                                allowed: bool) -> None:
    assert policy.authorize(attrs(ident, verb, what, ns, name))[0] is allowed


def test_remembered_decisions_are_the_policys_and_follow_added_objects() -> None:
    """Policy.authorize keeps its decisions: the same as deciding afresh, for every row of the
    table asked twice, and an object added afterwards changes them (add() forgets them)."""
    p = rbac.bootstrap_policy((r.group, r.plural) for r in RESOURCES)
    for obj in EXTRA:
        p.add(obj)
    for ident, verb, what, ns, name, allowed in TABLE * 2:
        a = attrs(ident, verb, what, ns, name)
        assert p.authorize(a) == p._decide(a) and p.authorize(a)[0] is allowed
    a = rbac.Attributes("newcomer", frozenset({"system:authenticated"}), "list", "team", "", "secrets")
    assert not p.authorize(a)[0]
    p.add(binding("RoleBinding", "newcomer-admin", "ClusterRole", "admin", {"kind": "User", "name": "newcomer"},
                  "team"))
    assert p.authorize(a)[0]


def test_bad_objects_grant_nothing_and_do_not_stop_the_others() -> None:
    good = binding("ClusterRoleBinding", "ok", "ClusterRole", "view", {"kind": "User", "name": "u"})
    bad = [
        {"kind": "ClusterRole", "metadata": {"name": "r"}, "rules": [{"verbs": ["get"]}]},
        {"kind": "ClusterRole", "metadata": {"name": "r2"}, "rules": "all"},
        {"kind": "Role", "metadata": {"name": "r3"}, "rules": []},
        binding("ClusterRoleBinding", "b", "Role", "x", {"kind": "User", "name": "u"}),
        {"kind": "ClusterRoleBinding", "metadata": {"name": "b2"}, "roleRef": {"kind": "ClusterRole"}},
        binding("ClusterRoleBinding", "b3", "ClusterRole", "cluster-admin", {"kind": "Robot", "name": "u"}),
        {"kind": "ClusterRole", "metadata": {}},
    ]
    p, errors = rbac.policy_from([*rbac.bootstrap_objects(), *bad, good])
    assert len(errors) == len(bad), errors
    assert "r" not in p.cluster_roles and "r2" not in p.cluster_roles
    assert p.authorize(rbac.Attributes("u", frozenset(), "get", "ns", "", "pods", "", "p"))[0]
    assert not p.authorize(rbac.Attributes("u", frozenset(), "delete", "ns", "", "pods", "", "p"))[0]


_word = st.sampled_from(["get", "list", "create", "*", "pods", "pods/log", "*/scale", "apps", "", "x"])


@given(st.dictionaries(st.sampled_from(["verbs", "apiGroups", "resources", "resourceNames", "nonResourceURLs",
                                        "kind", "metadata", "rules", "roleRef", "subjects"]),
                       st.one_of(st.lists(_word, max_size=3), _word, st.none(), st.integers(),
                                 st.dictionaries(st.sampled_from(["name", "kind", "apiGroup"]), _word))))
def test_any_object_parses_or_is_a_clear_error(obj: dict[str, Any]) -> None:
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        _, errors = rbac.policy_from([{**obj, "kind": kind}])
        assert len(errors) <= 1 and all(isinstance(e, str) and e for e in errors)


def test_access_review_rejects_malformed_bodies(policy: rbac.Policy) -> None:
    for body in ([], {"kind": "SelfSubjectAccessReview"}, {"kind": "SelfSubjectAccessReview", "spec": {}},
                 {"kind": "SelfSubjectAccessReview", "spec": {"resourceAttributes": {"verb": 1}}},
                 {"kind": "SelfSubjectAccessReview", "spec": {"resourceAttributes": {"verb": "get"}}}):
        with pytest.raises(rbac.RBACError):
            rbac.access_review(policy, "u", frozenset(), body)


# -- kubectl auth can-i against a live server -----------------------------------------------------

LIVE_USERS = {"kube-proxy": "system:kube-proxy", "nobody": "nobody"}


@pytest.fixture(scope="module")
def live(storage_backend: str) -> Iterator[tuple[APIServerProcess, dict[str, str]]]:
    """On SQLite, then on etcd (tests/conftest.py: storage_backend)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    d = tempfile.mkdtemp(prefix="kpt-rbac-")
    tokens = {ident: f"rbac-test-{ident}-{os.urandom(8).hex()}" for ident in LIVE_USERS}
    lines = [f'{os.urandom(16).hex()},admin,admin,"system:masters"',
             f'{os.urandom(16).hex()},kproxy-readonly,kproxy-readonly,"system:readonly"']
    lines += [f"{tokens[i]},{u},{u}" for i, u in LIVE_USERS.items()]
    with open(os.path.join(d, "tokens.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(os.path.join(d, "tokens.csv"), 0o600)
    try:
        with running_apiserver(data_dir=d) as api:
            cfgs = {"masters": api.kubeconfig, "readonly": api.readonly_kubeconfig}
            for ident, token in tokens.items():
                cfgs[ident] = os.path.join(d, f"{ident}.kubeconfig")
                write_kubeconfig(cfgs[ident], api.url, api.ca_file, token, ident)
            yield api, cfgs
    finally:
        shutil.rmtree(d, ignore_errors=True)


# The identities a token file can hold with the bootstrap bindings alone, and resources this server
# serves (kubectl can-i answers nothing useful for a resource discovery does not list).
_SERVED = {f"{r.group}/{r.plural}" for r in RESOURCES} | {"/pods/log", "/healthz", "/metrics"}
LIVE_TABLE = [r for r in TABLE if r[0] in ("masters", "readonly", "kube-proxy", "nobody") and r[2] in _SERVED]


@pytest.mark.kubectl
@pytest.mark.parametrize(("ident", "verb", "what", "ns", "name", "allowed"), LIVE_TABLE,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}-{r[3]}-{r[4]}" for r in LIVE_TABLE])
def test_kubectl_auth_can_i(live: tuple[APIServerProcess, dict[str, str]], ident: str, verb: str, what: str,
                            ns: str, name: str, allowed: bool) -> None:
    _, cfgs = live
    if what in ("/healthz", "/metrics", "/apis/apps/v1"):
        target = [what]
    else:
        group, _, rest = what.partition("/")
        resource, _, sub = rest.partition("/")
        target = [f"{resource}.{group}" if group else resource] + ([f"--subresource={sub}"] if sub else [])
        if name:
            target[0] += f"/{name}"
    ns_flag = ["-n", ns] if ns else []
    r = subprocess.run(["kubectl", "--kubeconfig", cfgs[ident], "auth", "can-i", verb, *target, *ns_flag],
                       capture_output=True, text=True, timeout=30, check=False)
    # can-i prints yes/no and exits 0/1; anything else is an error talking to the server.
    assert (r.stdout.strip(), r.returncode) == (("yes", 0) if allowed else ("no", 1)), r.stderr


@pytest.mark.kubectl
def test_bindings_applied_with_kubectl_take_effect(live: tuple[APIServerProcess, dict[str, str]]) -> None:
    """A RoleBinding to `view` and a Role of one's own, applied with kubectl as admin, grant
    'nobody' exactly that in that namespace; deleting the binding takes it back."""
    _, cfgs = live

    def kubectl(*args: str, who: str = "masters", stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", "--kubeconfig", cfgs[who], *args], input=stdin, capture_output=True,
                              text=True, timeout=30, check=False)

    def can_i(*args: str) -> str:
        return kubectl("auth", "can-i", *args, who="nobody").stdout.strip()

    def eventually(want: str, *args: str) -> None:
        deadline = time.monotonic() + 10
        while can_i(*args) != want and time.monotonic() < deadline:
            time.sleep(0.2)
        assert can_i(*args) == want, args

    assert kubectl("create", "namespace", "rbac-team").returncode == 0
    assert can_i("get", "pods", "-n", "rbac-team") == "no"
    manifest = """
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: nobody-view, namespace: rbac-team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: nobody}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cm-writer, namespace: rbac-team}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [create], resourceNames: []}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: nobody-cm, namespace: rbac-team}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-writer}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: nobody}]
"""
    r = kubectl("apply", "-f", "-", stdin=manifest)
    assert r.returncode == 0, r.stderr
    eventually("yes", "get", "pods", "-n", "rbac-team")
    assert can_i("get", "pods", "-n", "default") == "no"
    assert can_i("get", "secrets", "-n", "rbac-team") == "no"
    assert can_i("create", "configmaps", "-n", "rbac-team") == "yes"
    assert can_i("delete", "configmaps", "-n", "rbac-team") == "no"
    # The real request, not only the review: the server enforces the same answer.
    r = kubectl("create", "configmap", "x", "-n", "rbac-team", who="nobody")
    assert r.returncode == 0, r.stderr
    r = kubectl("get", "secrets", "-n", "rbac-team", who="nobody")
    assert r.returncode != 0 and "forbidden" in r.stderr.lower()
    assert kubectl("delete", "rolebinding", "nobody-view", "-n", "rbac-team").returncode == 0
    eventually("no", "get", "pods", "-n", "rbac-team")


def _kubectl(cfgs: dict[str, str], *args: str, who: str = "masters", stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", cfgs[who], *args], input=stdin, capture_output=True,
                          text=True, timeout=30, check=False)


_ROLE = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {name}, namespace: esc-team}}
rules: [{{apiGroups: [""], resources: {resources}, verbs: [get]}}]
"""
_BINDING = """
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {name}, namespace: esc-team}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]
"""


@pytest.mark.kubectl
def test_a_limited_user_cannot_grant_what_it_does_not_hold(live: tuple[APIServerProcess, dict[str, str]]) -> None:
    """Upstream's escalation prevention with kubectl as a limited user ('kube-proxy', `admin` of
    one namespace): a Role or RoleBinding within what it holds is written, one beyond is refused
    (403 "attempting to grant RBAC permissions not currently held") by create, apply and patch;
    `bind` on cluster-admin (by name) lets it bind that role."""
    _, cfgs = live

    def apply(manifest: str) -> subprocess.CompletedProcess[str]:
        return _kubectl(cfgs, "apply", "-f", "-", who="kube-proxy", stdin=manifest)

    assert _kubectl(cfgs, "create", "namespace", "esc-team").returncode == 0
    r = _kubectl(cfgs, "apply", "-f", "-", stdin=_BINDING.format(name="kp-admin", role="admin", user="system:kube-proxy"))
    assert r.returncode == 0, r.stderr
    r = apply(_ROLE.format(name="cm-reader", resources="[configmaps]"))
    assert r.returncode == 0, r.stderr
    # get nodes: held cluster-wide (system:node-proxier), so grantable in any namespace.
    r = apply(_ROLE.format(name="node-reader", resources="[nodes]"))
    assert r.returncode == 0, r.stderr
    r = apply(_ROLE.format(name="pv-reader", resources="[configmaps, persistentvolumes]"))
    assert r.returncode != 0 and "attempting to grant RBAC permissions not currently held" in r.stderr, r.stderr
    assert 'Resources:["persistentvolumes"]' in r.stderr and "configmaps" not in r.stderr.split("held:")[1] and "(Forbidden)" in r.stderr
    r = _kubectl(cfgs, "create", "role", "sneaky", "-n", "esc-team", "--verb=*", "--resource=*", who="kube-proxy")
    assert r.returncode != 0 and "not currently held" in r.stderr
    # A patch that would widen a held Role is refused too, and changes nothing.
    r = _kubectl(cfgs, "patch", "role", "cm-reader", "-n", "esc-team", "--type=json", "-p",
                 '[{"op":"add","path":"/rules/0/resources/-","value":"secrets/x"},'
                 '{"op":"add","path":"/rules/-","value":{"apiGroups":["*"],"resources":["*"],"verbs":["*"]}}]',
                 who="kube-proxy")
    assert r.returncode != 0 and "not currently held" in r.stderr, r.stderr
    got = _kubectl(cfgs, "get", "role", "cm-reader", "-n", "esc-team", "-o", "jsonpath={.rules}")
    assert "*" not in got.stdout and "configmaps" in got.stdout
    # Bindings: to a role it holds (view, within admin) yes; to cluster-admin no...
    assert apply(_BINDING.format(name="b-view", role="view", user="x")).returncode == 0
    r = apply(_BINDING.format(name="b-root", role="cluster-admin", user="x"))
    assert r.returncode != 0 and "not currently held" in r.stderr
    # ... until it may `bind` that role by name.
    grant = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: bind-cluster-admin}
rules: [{apiGroups: [rbac.authorization.k8s.io], resources: [clusterroles], verbs: [bind], resourceNames: [cluster-admin]}]
""" + "---" + _BINDING.format(name="kp-bind", role="bind-cluster-admin", user="system:kube-proxy")
    assert _kubectl(cfgs, "apply", "-f", "-", stdin=grant).returncode == 0
    r = apply(_BINDING.format(name="b-root", role="cluster-admin", user="x"))
    assert r.returncode == 0, r.stderr
    # The admin (system:masters) may write anything.
    r = _kubectl(cfgs, "create", "role", "anything", "-n", "esc-team", "--verb=*", "--resource=*")
    assert r.returncode == 0, r.stderr


@pytest.mark.kubectl
def test_kubectl_auth_can_i_list(live: tuple[APIServerProcess, dict[str, str]]) -> None:
    """kubectl auth can-i --list (a SelfSubjectRulesReview): the limited user's rules in the
    namespace asked, the admin's `*.*`; kubectl auth can-i (a SelfSubjectAccessReview) agrees."""
    _, cfgs = live
    r = _kubectl(cfgs, "auth", "can-i", "--list", "-n", "kube-system", who="kube-proxy")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["Resources", "Non-Resource"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "[list watch]" in rows["services"] and "[get list watch]" in rows["nodes"]
    assert "endpointslices.discovery.k8s.io" in rows and "secrets" not in rows
    assert "selfsubjectrulesreviews.authorization.k8s.io" in rows
    assert any("/healthz" in line for line in lines)
    r = _kubectl(cfgs, "auth", "can-i", "--list", "-n", "default")
    assert r.returncode == 0 and any(line.split()[0] == "*.*" for line in r.stdout.splitlines()[1:]), r.stdout
    for verb, what, want in [("list", "services", "yes"), ("delete", "services", "no"), ("get", "secrets", "no")]:
        got = _kubectl(cfgs, "auth", "can-i", verb, what, "-n", "default", who="kube-proxy").stdout.strip()
        assert got == want, (verb, what)


def test_the_stored_policy_is_rebuilt_only_when_rbac_objects_change(tmp_path: Any) -> None:
    """StoredPolicy follows the store's events (a real SQLite store): writes of other objects cost
    no rebuild; a RoleBinding's create and delete take effect on the very next call."""
    import asyncio

    from controlplane_stub.store.sqlite import SQLiteStore

    async def run() -> None:
        store = SQLiteStore(str(tmp_path / "db.sqlite"))
        try:
            policy = rbac.StoredPolicy(store, ())
            alice = rbac.Attributes("alice", frozenset(), "list", "team", "", "pods")
            assert not policy.current().authorize(alice)[0]
            built = policy.rebuilds
            for i in range(50):
                await store.create(f"/registry/configmaps/team/c{i}", {"kind": "ConfigMap",
                                                                       "metadata": {"name": f"c{i}"}})
                assert not policy.current().authorize(alice)[0]
            assert policy.rebuilds == built  # no RBAC object changed: no rebuild
            key = f"/registry/rolebindings.{rbac.API_GROUP}/team/alice"
            await store.create(key, binding("RoleBinding", "alice", "ClusterRole", "view",
                                            {"kind": "User", "name": "alice"}, "team"))
            assert policy.current().authorize(alice)[0]
            assert policy.rebuilds == built + 1
            await store.delete(key)
            assert not policy.current().authorize(alice)[0]
            assert policy.rebuilds == built + 2
        finally:
            await store.close()

    asyncio.run(run())

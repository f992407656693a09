"""RBAC (rbac.authorization.k8s.io/v1) evaluated as kube-apiserver's RBAC authorizer does.

Behaviour read from kubernetes/plugin/pkg/auth/authorizer/rbac (rbac.go, rule matching in
pkg/apis/rbac/v1/evaluation_helpers.go) and the bootstrap policy in
plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go (the roles node components and users
get); system:coredns is the ClusterRole of CoreDNS's own deployment manifest.

- A request is allowed when any rule reachable from a binding that applies to the user allows it:
  ClusterRoleBindings everywhere, RoleBindings only in their namespace (a RoleBinding may point at
  a ClusterRole: its rules then apply in that namespace only). There is no deny.
- A rule matches a resource request on verb, API group, resource ("pods", "pods/log", "*",
  "*/scale") and, when it lists resourceNames, the object's name; a non-resource request ("/healthz")
  on verb and nonResourceURLs ("/healthz", "/api/*").
- A ServiceAccount subject is the user system:serviceaccount:NS:NAME (NS defaults to the
  RoleBinding's namespace).

Objects are parsed into these types before use: a malformed Role or binding is reported and
skipped (it grants nothing), never half-applied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..store.base import Event, Store

log = logging.getLogger("kproxy.apiserver.rbac")

API_GROUP = "rbac.authorization.k8s.io"
SA_PREFIX = "system:serviceaccount:"
AUTHENTICATED = "system:authenticated"

READ = ("get", "list", "watch")
WRITE = ("create", "delete", "deletecollection", "patch", "update")


class RBACError(ValueError):
    """An RBAC object that does not parse: it grants nothing (the message says why)."""


def url_matches(pattern: str, path: str) -> bool:
    """A nonResourceURLs entry against a path (or a narrower entry): equal, or a trailing-`*`
    prefix (upstream trims every trailing `*`, so `*` alone matches all). The authorizer and the
    escalation check's coverage both use it, so they cannot disagree."""
    return pattern == path or (pattern.endswith("*") and path.startswith(pattern.rstrip("*")))


@dataclass(frozen=True, slots=True)
class Rule:
    verbs: frozenset[str]
    api_groups: frozenset[str] = frozenset()
    resources: frozenset[str] = frozenset()
    resource_names: frozenset[str] = frozenset()
    non_resource_urls: frozenset[str] = frozenset()

    def allows(self, a: Attributes) -> bool:
        if "*" not in self.verbs and a.verb not in self.verbs:
            return False
        if not a.resource_request:
            return any(url_matches(u, a.path) for u in self.non_resource_urls)
        if "*" not in self.api_groups and a.api_group not in self.api_groups:
            return False
        combined = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
        if not any(r == "*" or r == combined or (a.subresource and r == "*/" + a.subresource)
                   for r in self.resources):
            return False
        return not self.resource_names or a.name in self.resource_names


@dataclass(frozen=True, slots=True)
class Subject:
    kind: str  # User, Group, ServiceAccount
    name: str
    namespace: str = ""

    def applies_to(self, user: str, groups: frozenset[str], binding_namespace: str) -> bool:
        if self.kind == "User":
            return user == self.name
        if self.kind == "Group":
            return self.name in groups
        ns = self.namespace or binding_namespace
        return bool(ns) and user == f"{SA_PREFIX}{ns}:{self.name}"


@dataclass(frozen=True, slots=True)
class Binding:
    name: str
    namespace: str  # "" for a ClusterRoleBinding
    role_kind: str  # Role or ClusterRole
    role_name: str
    subjects: tuple[Subject, ...]


@dataclass(frozen=True, slots=True)
class Attributes:
    """One request as the authorizer sees it (k8s.io/apiserver authorizer.Attributes)."""

    user: str
    groups: frozenset[str]
    verb: str
    namespace: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""  # for a non-resource request

    @property
    def resource_request(self) -> bool:
        return bool(self.resource)


DECISIONS_KEPT = 4096  # a policy's cached decisions, at most


@dataclass
class Policy:
    """Roles and bindings; `authorize` answers (allowed, reason) as upstream's RBAC authorizer."""

    cluster_roles: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    roles: dict[tuple[str, str], tuple[Rule, ...]] = field(default_factory=dict)  # (ns, name)
    cluster_bindings: list[Binding] = field(default_factory=list)
    bindings: dict[str, list[Binding]] = field(default_factory=dict)  # ns -> RoleBindings
    # Decisions already made by this policy (a policy is not changed once it serves requests: a
    # change of the stored RBAC objects builds a new one). Every request is authorized, and
    # scanning the bindings was ~2% of the API server's CPU per create (bench/README.md etcd).
    _decisions: dict[Attributes, tuple[bool, str]] = field(default_factory=dict, compare=False, repr=False)

    def rules_of(self, b: Binding) -> tuple[Rule, ...]:
        if b.role_kind == "ClusterRole":
            return self.cluster_roles.get(b.role_name, ())
        return self.roles.get((b.namespace, b.role_name), ())

    def bindings_for(self, user: str, groups: frozenset[str], namespace: str) -> Iterator[Binding]:
        """The bindings whose subjects include the user, ClusterRoleBindings first, then the
        RoleBindings of `namespace` ("" : cluster-wide ones only)."""
        groups = groups | {AUTHENTICATED}
        candidates: Iterable[Binding] = self.cluster_bindings
        if namespace:
            candidates = [*self.cluster_bindings, *self.bindings.get(namespace, ())]
        for b in candidates:
            if any(s.applies_to(user, groups, b.namespace) for s in b.subjects):
                yield b

    def authorize(self, a: Attributes) -> tuple[bool, str]:
        known = self._decisions.get(a)
        if known is not None:
            return known
        decision = self._decide(a)
        if len(self._decisions) >= DECISIONS_KEPT:  # names and users vary without bound: start over
            self._decisions.clear()
        self._decisions[a] = decision
        return decision

    def _decide(self, a: Attributes) -> tuple[bool, str]:
        for b in self.bindings_for(a.user, a.groups, a.namespace):
            if any(r.allows(a) for r in self.rules_of(b)):
                kind = "RoleBinding" if b.namespace else "ClusterRoleBinding"
                return True, f'RBAC: allowed by {kind} "{b.name}" of {b.role_kind} "{b.role_name}" to User "{a.user}"'
        return False, ""

    def add(self, obj: Mapping[str, Any]) -> None:
        """Adds one parsed Role, ClusterRole, RoleBinding or ClusterRoleBinding (RBACError if bad)."""
        self._decisions.clear()
        kind = obj.get("kind")
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
            raise RBACError(f"{kind}: metadata.name is required")
        name, ns = str(meta["name"]), str(meta.get("namespace") or "")
        if kind in ("Role", "ClusterRole"):
            rules = tuple(parse_rule(r, f"{kind} {name}") for r in _list(obj.get("rules"), f"{kind} {name}: rules"))
            if kind == "ClusterRole":
                self.cluster_roles[name] = rules
            else:
                if not ns:
                    raise RBACError(f"Role {name}: metadata.namespace is required")
                self.roles[(ns, name)] = rules
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            b = parse_binding(obj, name, ns if kind == "RoleBinding" else "")
            if kind == "RoleBinding":
                if not ns:
                    raise RBACError(f"RoleBinding {name}: metadata.namespace is required")
                self.bindings.setdefault(ns, []).append(b)
            else:
                self.cluster_bindings.append(b)
        else:
            raise RBACError(f"not an RBAC kind: {kind!r}")


def _list(v: object, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise RBACError(f"{what}: expected a list")
    return v


def _strings(v: object, what: str) -> frozenset[str]:
    items = _list(v, what)
    if not all(isinstance(s, str) for s in items):
        raise RBACError(f"{what}: expected a list of strings")
    return frozenset(items)


def parse_rule(r: object, where: str) -> Rule:
    if not isinstance(r, Mapping):
        raise RBACError(f"{where}: a rule must be a mapping")
    rule = Rule(
        verbs=_strings(r.get("verbs"), f"{where}: verbs"),
        api_groups=_strings(r.get("apiGroups"), f"{where}: apiGroups"),
        resources=_strings(r.get("resources"), f"{where}: resources"),
        resource_names=_strings(r.get("resourceNames"), f"{where}: resourceNames"),
        non_resource_urls=_strings(r.get("nonResourceURLs"), f"{where}: nonResourceURLs"),
    )
    # As upstream's validation: a rule is for resources or for non-resource URLs, never both.
    if not rule.verbs:
        raise RBACError(f"{where}: verbs: Required value")
    if rule.non_resource_urls and (rule.resources or rule.api_groups):
        raise RBACError(f"{where}: nonResourceURLs: may not be mixed with resources")
    if not rule.non_resource_urls and not rule.resources:
        raise RBACError(f"{where}: resources: Required value")
    return rule


def parse_binding(obj: Mapping[str, Any], name: str, ns: str) -> Binding:
    where = f"{obj.get('kind')} {name}"
    ref = obj.get("roleRef")
    if not isinstance(ref, Mapping) or ref.get("apiGroup") != API_GROUP:
        raise RBACError(f"{where}: roleRef.apiGroup must be {API_GROUP}")
    if ref.get("kind") not in ("Role", "ClusterRole") or (ref.get("kind") == "Role" and not ns):
        raise RBACError(f"{where}: roleRef.kind: Unsupported value: {ref.get('kind')!r}")
    if not isinstance(ref.get("name"), str) or not ref["name"]:
        raise RBACError(f"{where}: roleRef.name: Required value")
    subjects: list[Subject] = []
    for s in _list(obj.get("subjects"), f"{where}: subjects"):
        if not isinstance(s, Mapping) or s.get("kind") not in ("User", "Group", "ServiceAccount"):
            raise RBACError(f"{where}: subjects: kind must be User, Group or ServiceAccount")
        if not isinstance(s.get("name"), str) or not s["name"]:
            raise RBACError(f"{where}: subjects: name: Required value")
        subjects.append(Subject(str(s["kind"]), str(s["name"]), str(s.get("namespace") or "")))
    return Binding(name, ns, str(ref["kind"]), str(ref["name"]), tuple(subjects))


# -- the bootstrap policy --------------------------------------------------------------------------


def _r(verbs: Iterable[str], groups: Iterable[str], resources: Iterable[str]) -> dict[str, Any]:
    return {"verbs": list(verbs), "apiGroups": list(groups), "resources": list(resources)}


_EVENTS = _r(("create", "update", "patch"), ("", "events.k8s.io"), ("events",))

# view: reads in a namespace, Secrets excepted (upstream's system:aggregate-to-view, for the groups
# served here and the usual workload groups).
_VIEW = [
    _r(READ, ("",), ("configmaps", "endpoints", "persistentvolumeclaims", "persistentvolumeclaims/status",
                     "pods", "replicationcontrollers", "replicationcontrollers/scale", "serviceaccounts",
                     "services", "services/status")),
    _r(READ, ("",), ("bindings", "events", "limitranges", "namespaces/status", "pods/log", "pods/status",
                     "replicationcontrollers/status", "resourcequotas", "resourcequotas/status")),
    _r(READ, ("",), ("namespaces",)),
    _r(READ, ("discovery.k8s.io",), ("endpointslices",)),
    _r(READ, ("apps",), ("controllerrevisions", "daemonsets", "daemonsets/status", "deployments",
                         "deployments/scale", "deployments/status", "replicasets", "replicasets/scale",
                         "replicasets/status", "statefulsets", "statefulsets/scale", "statefulsets/status")),
    _r(READ, ("autoscaling",), ("horizontalpodautoscalers", "horizontalpodautoscalers/status")),
    _r(READ, ("batch",), ("cronjobs", "cronjobs/status", "jobs", "jobs/status")),
    _r(READ, ("policy",), ("poddisruptionbudgets", "poddisruptionbudgets/status")),
    _r(READ, ("networking.k8s.io",), ("ingresses", "ingresses/status", "networkpolicies")),
]
# edit adds writes (upstream's system:aggregate-to-edit; since 1.22 not Endpoints/EndpointSlices).
_EDIT = [
    _r(("create", "delete", "deletecollection", "patch", "update"), ("",),
       ("pods", "pods/attach", "pods/proxy", "pods/exec", "pods/portforward")),
    _r(("create",), ("",), ("pods/eviction",)),
    _r(READ, ("",), ("pods/attach", "pods/proxy", "pods/exec", "pods/portforward", "secrets",
                     "services/proxy")),
    _r(("impersonate",), ("",), ("serviceaccounts",)),
    _r(WRITE, ("",), ("configmaps", "events", "persistentvolumeclaims", "replicationcontrollers",
                      "replicationcontrollers/scale", "secrets", "serviceaccounts", "services",
                      "services/proxy")),
    _r(("create",), ("",), ("serviceaccounts/token",)),
    _r(WRITE, ("apps",), ("daemonsets", "deployments", "deployments/rollback", "deployments/scale",
                          "replicasets", "replicasets/scale", "statefulsets", "statefulsets/scale")),
    _r(WRITE, ("autoscaling",), ("horizontalpodautoscalers",)),
    _r(WRITE, ("batch",), ("cronjobs", "jobs")),
    _r(WRITE, ("policy",), ("poddisruptionbudgets",)),
    _r(WRITE, ("networking.k8s.io",), ("ingresses", "networkpolicies")),
    _r(READ + WRITE, ("coordination.k8s.io",), ("leases",)),
]
# admin adds the namespace's own RBAC (upstream's system:aggregate-to-admin).
_ADMIN = [
    _r(("create",), ("authorization.k8s.io",), ("localsubjectaccessreviews",)),
    _r(READ + WRITE, (API_GROUP,), ("rolebindings", "roles")),
]

BOOTSTRAP_CLUSTER_ROLES: dict[str, list[dict[str, Any]]] = {
    "cluster-admin": [_r(("*",), ("*",), ("*",)), {"verbs": ["*"], "nonResourceURLs": ["*"]}],
    "admin": _VIEW + _EDIT + _ADMIN,
    "edit": _VIEW + _EDIT,
    "view": _VIEW,
    # kube-proxy: upstream's system:node-proxier.
    "system:node-proxier": [
        _r(("list", "watch"), ("",), ("services", "endpoints")),
        _r(READ, ("",), ("nodes",)),
        _EVENTS,
        _r(("list", "watch"), ("discovery.k8s.io",), ("endpointslices",)),
        _r(("list", "watch"), ("networking.k8s.io",), ("servicecidrs",)),  # the nftables mode's drop rule
    ],
    # The cluster DNS: CoreDNS's system:coredns (its deployment manifest).
    "system:coredns": [
        _r(("list", "watch"), ("",), ("endpoints", "services", "pods", "namespaces")),
        _r(("list", "watch"), ("discovery.k8s.io",), ("endpointslices",)),
    ],
    # kproxy-cluster's controller process (controlplane_stub/controllers: endpointslice/endpoints,
    # deployment, replicaset, scheduler, loadbalancer, node lifecycle, gc) as one identity: upstream
    # splits these over per-controller ServiceAccounts (system:controller:*); what they write here.
    "system:kube-controller-manager": [
        _r(READ, ("",), ("pods", "services", "nodes", "endpoints", "namespaces")),
        _r(READ, ("apps",), ("deployments", "replicasets", "daemonsets")),
        _r(READ, ("discovery.k8s.io",), ("endpointslices",)),
        _r(READ, ("coordination.k8s.io",), ("leases",)),
        _r(("create", "delete", "patch", "update"), ("",), ("pods", "endpoints")),
        _r(("create",), ("",), ("pods/binding",)),
        _r(("patch", "update"), ("",), ("pods/status", "services/status", "nodes", "nodes/status")),
        _r(("create", "delete", "patch", "update"), ("apps",), ("replicasets",)),
        _r(("patch", "update"), ("apps",), ("deployments", "deployments/status", "replicasets/status",
                                            "daemonsets/status")),
        _r(("create", "delete", "patch", "update"), ("discovery.k8s.io",), ("endpointslices",)),
        _EVENTS,
    ],
    # The node agents: upstream's system:node as far as this agent uses it (register and heartbeat
    # its Node and Lease, run and report its pods). Without upstream's Node authorizer any node
    # could write another's objects: kproxy-apiserver has only RBAC.
    "system:node": [
        _r(("get", "list", "watch", "create", "patch", "update"), ("",), ("nodes",)),
        _r(("patch", "update"), ("",), ("nodes/status", "pods/status")),
        _r(("get", "list", "watch", "delete"), ("",), ("pods",)),
        _r(("get", "list", "watch", "create", "update", "patch", "delete"), ("coordination.k8s.io",), ("leases",)),
        _EVENTS,
    ],
    "system:basic-user": [
        _r(("create",), ("authorization.k8s.io",), ("selfsubjectaccessreviews", "selfsubjectrulesreviews")),
        _r(("create",), ("authentication.k8s.io",), ("selfsubjectreviews",)),
    ],
    "system:discovery": [
        {"verbs": ["get"], "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                                                "/openapi", "/openapi/*", "/readyz", "/version", "/version/"]},
    ],
    "system:public-info-viewer": [
        {"verbs": ["get"], "nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"]},
    ],
}

# (binding name, role, subject kind, subject name): upstream's bootstrap ClusterRoleBindings, and
# kproxy-apiserver's read-only identity as `view` (cluster-wide: a ClusterRoleBinding).
BOOTSTRAP_CLUSTER_BINDINGS: tuple[tuple[str, str, str, str], ...] = (
    ("cluster-admin", "cluster-admin", "Group", "system:masters"),
    ("system:node-proxier", "system:node-proxier", "User", "system:kube-proxy"),
    ("system:kube-controller-manager", "system:kube-controller-manager", "User", "system:kube-controller-manager"),
    # Upstream leaves this binding empty (the Node authorizer decides); here RBAC alone does.
    ("system:node", "system:node", "Group", "system:nodes"),
    ("system:basic-user", "system:basic-user", "Group", AUTHENTICATED),
    ("system:discovery", "system:discovery", "Group", AUTHENTICATED),
    ("system:public-info-viewer", "system:public-info-viewer", "Group", AUTHENTICATED),
    ("kproxy:readonly-view", "view", "Group", "system:readonly"),
)


def bootstrap_objects() -> list[dict[str, Any]]:
    """The bootstrap ClusterRoles and ClusterRoleBindings as API objects."""
    meta = {"labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
            "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}}
    out: list[dict[str, Any]] = []
    for name, rules in BOOTSTRAP_CLUSTER_ROLES.items():
        out.append({"apiVersion": f"{API_GROUP}/v1", "kind": "ClusterRole",
                    "metadata": {"name": name, **meta}, "rules": rules})
    for name, role, kind, subject in BOOTSTRAP_CLUSTER_BINDINGS:
        s: dict[str, str] = {"kind": kind, "name": subject}
        if kind != "ServiceAccount":
            s["apiGroup"] = API_GROUP
        out.append({"apiVersion": f"{API_GROUP}/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": name, **meta},
                    "roleRef": {"apiGroup": API_GROUP, "kind": "ClusterRole", "name": role},
                    "subjects": [s]})
    return out


def policy_from(objects: Iterable[Mapping[str, Any]]) -> tuple[Policy, list[str]]:
    """A Policy from RBAC objects; the errors of the objects it skipped (one bad object never
    stops the others)."""
    p, errors = Policy(), []
    for obj in objects:
        try:
            p.add(obj)
        except RBACError as e:
            errors.append(str(e))
    return p, errors


def bootstrap_policy(served: Iterable[tuple[str, str]] = ()) -> Policy:
    """The bootstrap policy; with `served` ((group, plural) of the resources served), also the
    read-only identity's role over them."""
    objs = bootstrap_objects()
    served = list(served)
    if served:
        objs.append(readonly_role(served))
        objs.append({"kind": "ClusterRoleBinding", "metadata": {"name": "kproxy:readonly"},
                     "roleRef": {"apiGroup": API_GROUP, "kind": "ClusterRole", "name": "kproxy:readonly"},
                     "subjects": [{"kind": "Group", "name": "system:readonly", "apiGroup": API_GROUP}]})
    p, errors = policy_from(objs)
    if errors:  # the bootstrap policy is ours: an error here is a bug
        raise RBACError("; ".join(errors))
    return p


def readonly_role(resources: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """kproxy-apiserver's read-only identity: `view`, and also reads of the cluster-scoped and
    node-side resources served here (nodes, leases...), still never Secrets."""
    rules = [_r(READ, (g,), (p,)) for g, p in resources if p != "secrets"]
    return {"apiVersion": f"{API_GROUP}/v1", "kind": "ClusterRole", "metadata": {"name": "kproxy:readonly"},
            "rules": rules}


def _field(spec: Mapping[str, Any], key: str, where: str) -> str:
    v = spec.get(key, "")
    if not isinstance(v, str) or len(v) > 253:
        raise RBACError(f"{where}.{key}: expected a string of at most 253 characters")
    return v


def access_review(policy: Policy, user: str, groups: frozenset[str], body: object) -> dict[str, Any]:
    """A SelfSubjectAccessReview (authorization.k8s.io/v1) answered for the requesting user, as
    kubectl auth can-i sends it; RBACError for a body that is not one."""
    if not isinstance(body, Mapping) or body.get("kind") != "SelfSubjectAccessReview":
        raise RBACError("expected a SelfSubjectAccessReview")
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise RBACError("spec: Required value")
    ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
    if (ra is None) == (nra is None):
        raise RBACError("spec: exactly one of resourceAttributes or nonResourceAttributes must be specified")
    if isinstance(ra, Mapping):
        w = "spec.resourceAttributes"
        a = Attributes(user, groups, _field(ra, "verb", w), _field(ra, "namespace", w), _field(ra, "group", w),
                       _field(ra, "resource", w), _field(ra, "subresource", w), _field(ra, "name", w))
        if not a.resource:
            raise RBACError(f"{w}.resource: Required value")
    elif isinstance(nra, Mapping):
        a = Attributes(user, groups, _field(nra, "verb", "spec.nonResourceAttributes"),
                       path=_field(nra, "path", "spec.nonResourceAttributes"))
    else:
        raise RBACError("spec: the attributes must be a mapping")
    allowed, reason = policy.authorize(a)
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "metadata": {"creationTimestamp": None}, "spec": dict(spec),
            "status": {"allowed": allowed, "reason": reason} if reason else {"allowed": allowed}}


_STORED = ("clusterroles", "clusterrolebindings", "roles", "rolebindings")
STORED_PREFIXES = tuple(f"/registry/{plural}.{API_GROUP}/" for plural in _STORED)


class StoredPolicy:
    """The bootstrap policy plus the Roles and bindings in the store, rebuilt on the first request
    after one of them changed (never for writes of other objects).

    The store tells it (an event observer on the RBAC keys), so the policy follows the store's
    own state: a write through this server is observed before it is acknowledged (its writer's
    next request is authorized with it), and on etcd a write through another API server as soon
    as this server's mirror has it, typically within milliseconds (kube-apiserver's authorizer
    reads its informers and lags likewise)."""

    def __init__(self, store: Store, served: Iterable[tuple[str, str]]) -> None:
        self.store, self.served = store, list(served)
        self.policy = bootstrap_policy(self.served)
        self.rebuilds = 0
        self._dirty, self._epoch = True, store.epoch
        self._reported: set[str] = set()
        store.event_observers.append(self._observe)

    def _observe(self, ev: Event) -> None:
        if ev.key.startswith(STORED_PREFIXES):
            self._dirty = True

    def current(self) -> Policy:
        if not self._dirty and self._epoch == self.store.epoch:
            return self.policy
        self._dirty, self._epoch = False, self.store.epoch
        self.rebuilds += 1
        stored: list[Mapping[str, Any]] = []
        for prefix in STORED_PREFIXES:
            stored.extend(json.loads(raw) for _, raw in self.store.list(prefix).items)
        policy, errors = policy_from([*bootstrap_objects(), *stored])
        if self.served:
            base = bootstrap_policy(self.served)
            policy.cluster_roles.update({k: v for k, v in base.cluster_roles.items() if k not in policy.cluster_roles})
            policy.cluster_bindings.extend(b for b in base.cluster_bindings if b.name == "kproxy:readonly")
        for e in errors:
            if e not in self._reported:  # once per bad object, not per request
                self._reported.add(e)
                log.warning("event=rbac_object_skipped error=%r", e)
        self.policy = policy
        return policy

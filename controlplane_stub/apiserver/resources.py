"""The resources this API server serves, with the discovery facts kubectl and clients rely on."""
from __future__ import annotations

from dataclasses import dataclass, field

_ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True, slots=True)
class Resource:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()  # "status", "scale"
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = _ALL_VERBS
    # metadata.generation counts spec changes (the real server does this for these kinds).
    has_generation: bool = False
    singular: str = field(default="")

    @property
    def id(self) -> str:
        """The id the semantics modules use: "plural" (core) or "plural.group"."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    def key(self, namespace: str, name: str) -> str:
        return f"/registry/{self.id}/{namespace}/{name}" if self.namespaced else f"/registry/{self.id}/{name}"

    def prefix(self, namespace: str = "") -> str:
        return f"/registry/{self.id}/{namespace}/" if self.namespaced and namespace else f"/registry/{self.id}/"


RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "Namespace", "namespaces", False, ("ns",), ("status",)),
    Resource("", "v1", "Node", "nodes", False, ("no",), ("status",)),
    Resource("", "v1", "Pod", "pods", True, ("po",), ("status", "binding"), ("all",)),
    Resource("", "v1", "Service", "services", True, ("svc",), ("status",), ("all",)),
    Resource("", "v1", "Endpoints", "endpoints", True, ("ep",), singular="endpoints"),
    Resource("", "v1", "ConfigMap", "configmaps", True, ("cm",)),
    Resource("", "v1", "Secret", "secrets", True),
    Resource("", "v1", "Event", "events", True, ("ev",)),
    Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True),
    Resource("apps", "v1", "Deployment", "deployments", True, ("deploy",), ("status", "scale"), ("all",),
             has_generation=True),
    Resource("apps", "v1", "ReplicaSet", "replicasets", True, ("rs",), ("status", "scale"), ("all",),
             has_generation=True),
    Resource("apps", "v1", "DaemonSet", "daemonsets", True, ("ds",), ("status",), ("all",), has_generation=True),
    Resource("coordination.k8s.io", "v1", "Lease", "leases", True),
    # The ranges ClusterIPs come from (GA in 1.33; servicecidrs.py keeps the default one and Ready).
    Resource("networking.k8s.io", "v1", "ServiceCIDR", "servicecidrs", False, (), ("status",)),
    Resource("", "v1", "ServiceAccount", "serviceaccounts", True, ("sa",), ("token",)),
    # RBAC objects (rbac.py evaluates them)
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
    Resource("rbac.authorization.k8s.io", "v1", "Role", "roles", True),
    Resource("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True),
)

# (group, version) -> {plural: Resource}
BY_GROUP_VERSION: dict[tuple[str, str], dict[str, Resource]] = {}
for _r in RESOURCES:
    BY_GROUP_VERSION.setdefault((_r.group, _r.version), {})[_r.plural] = _r

BY_ID: dict[str, Resource] = {r.id: r for r in RESOURCES}

# Groups in the order /apis lists them (preferred version first: there is only one each).
GROUPS: tuple[str, ...] = ("apps", "discovery.k8s.io", "coordination.k8s.io", "rbac.authorization.k8s.io",
                           "networking.k8s.io")

# What a delete cascades to without a garbage collector: owner kind -> dependents' resources.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "Deployment": ("replicasets.apps",),
    "ReplicaSet": ("pods",),
    "DaemonSet": ("pods",),
    "Service": ("endpointslices.discovery.k8s.io",),
}

"""Discovery documents (/version, /api, /apis, /api/v1, /apis/G/V) built from resources.py.

kubectl 1.32 asks for aggregated discovery first (Accept: ...as=APIGroupDiscoveryList) and gets it
(aggregated() below); other clients get the legacy documents.
"""
from __future__ import annotations

import hashlib
from typing import Any

from .resources import BY_GROUP_VERSION, GROUPS, Resource

KUBE_VERSION = "v1.32.0"


def version() -> dict[str, str]:
    return {
        "major": "1",
        "minor": "32",
        "gitVersion": KUBE_VERSION + "+kproxy",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def api_versions(address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}] if address else [],
    }


def _group_doc(group: str) -> dict[str, Any]:
    versions = sorted(v for (g, v) in BY_GROUP_VERSION if g == group)
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}


def api_group_list() -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group_doc(g) for g in GROUPS]}


def api_group(group: str) -> dict[str, Any] | None:
    if group not in GROUPS:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(group)}


def _storage_hash(r: Resource) -> str:
    return hashlib.sha256(f"{r.group}/{r.version}/{r.kind}".encode()).digest()[:8].hex()


def _entries(r: Resource) -> list[dict[str, Any]]:
    main: dict[str, Any] = {
        "name": r.plural,
        "singularName": r.singular_name,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": list(r.verbs),
        "storageVersionHash": _storage_hash(r),
    }
    if r.short_names:
        main["shortNames"] = list(r.short_names)
    if r.categories:
        main["categories"] = list(r.categories)
    out = [main]
    for sub in r.subresources:
        if sub == "binding":
            out.append({"name": f"{r.plural}/binding", "singularName": "", "namespaced": r.namespaced,
                        "kind": "Binding", "verbs": ["create"]})
        elif sub == "scale":
            out.append({"name": f"{r.plural}/scale", "singularName": "", "namespaced": r.namespaced,
                        "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]})
        elif sub == "token":
            out.append({"name": f"{r.plural}/token", "singularName": "", "namespaced": r.namespaced,
                        "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest",
                        "verbs": ["create"]})
        else:
            out.append({"name": f"{r.plural}/{sub}", "singularName": "", "namespaced": r.namespaced,
                        "kind": r.kind, "verbs": ["get", "patch", "update"]})
    return out


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    table = BY_GROUP_VERSION.get((group, version))
    if table is None:
        return None
    resources: list[dict[str, Any]] = []
    for r in table.values():
        resources.extend(_entries(r))
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


# Aggregated discovery (apidiscovery.k8s.io/v2): kubectl 1.26+ asks for it first and then needs two
# requests (/api, /apis) instead of one per group-version.
AGGREGATED_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def wants_aggregated(accept: str) -> bool:
    """True when the first acceptable type the client lists is the v2 aggregated document."""
    for part in accept.split(","):
        params = {p.strip() for p in part.split(";")[1:]}
        if {"g=apidiscovery.k8s.io", "v=v2", "as=APIGroupDiscoveryList"} <= params:
            return True
        if part.strip().startswith("application/json") and not params:
            return False
    return False


def _resource_v2(r: Resource) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": "Namespaced" if r.namespaced else "Cluster",
        "singularResource": r.singular_name,
        "verbs": list(r.verbs),
    }
    if r.short_names:
        doc["shortNames"] = list(r.short_names)
    if r.categories:
        doc["categories"] = list(r.categories)
    subs = []
    for sub in r.subresources:
        if sub == "scale":
            subs.append({"subresource": "scale", "responseKind": {"group": "autoscaling", "version": "v1",
                                                                  "kind": "Scale"},
                         "verbs": ["get", "patch", "update"]})
        elif sub == "binding":
            subs.append({"subresource": "binding", "responseKind": {"group": "", "version": "v1", "kind": "Binding"},
                         "verbs": ["create"]})
        elif sub == "token":
            subs.append({"subresource": "token", "responseKind": {"group": "authentication.k8s.io", "version": "v1",
                                                                  "kind": "TokenRequest"}, "verbs": ["create"]})
        else:
            subs.append({"subresource": sub, "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
                         "verbs": ["get", "patch", "update"]})
    if subs:
        doc["subresources"] = subs
    return doc


def aggregated(core: bool) -> dict[str, Any]:
    """The APIGroupDiscoveryList for /api (core=True) or /apis."""
    groups = [""] if core else list(GROUPS)
    items = []
    for g in groups:
        versions = [{"version": v, "resources": [_resource_v2(r) for r in BY_GROUP_VERSION[(g, v)].values()],
                     "freshness": "Current"}
                    for (gg, v) in sorted(BY_GROUP_VERSION) if gg == g]
        items.append({"metadata": {"name": g, "creationTimestamp": None}, "versions": versions})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}

"""Service dual-stack fields: ipFamilyPolicy and ipFamilies defaulted and checked as kube-apiserver's
service REST does before it allocates ClusterIPs (initIPFamilyFields).

Pure: init_ip_families() reads the Service spec being written (and the stored one on update) and the
cluster's configured families (from --service-cluster-ip-range, primary first), sets
spec.ipFamilyPolicy and spec.ipFamilies, trims spec.clusterIPs on a SingleStack downgrade, or
raises the real server's 422. The allocator then allocates one ClusterIP per listed family, so an
upgrade to PreferDualStack/RequireDualStack gains a secondary IP and a downgrade releases it.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from .validation import FieldErrors
from .validation.services import validate_cluster_ips_related

Obj = dict[str, Any]
IP_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


def family_of(ip: str) -> str | None:
    try:
        return "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"
    except ValueError:
        return None


def _other(family: str) -> str:
    return "IPv6" if family == "IPv4" else "IPv4"


def _strs(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _ips(spec: Obj) -> list[str]:
    ips = _strs(spec.get("clusterIPs"))
    if ips:
        return ips
    ip = spec.get("clusterIP")
    return [ip] if isinstance(ip, str) and ip else []


def _type(spec: Obj) -> str:
    t = spec.get("type")
    return t if isinstance(t, str) and t else "ClusterIP"


def _unchanged_prefer_dual_stack(spec: Obj, old: Obj | None) -> bool:
    """A PreferDualStack Service written back as it was: not upgraded or downgraded because the
    cluster's families changed since (upstream isMatchingPreferDualStackClusterIPFields)."""
    if old is None or spec.get("ipFamilyPolicy") is None:
        return False
    if _type(spec) != _type(old) or _type(spec) not in IP_SERVICE_TYPES:
        return False
    if spec.get("ipFamilyPolicy") != "PreferDualStack" or old.get("ipFamilyPolicy") != "PreferDualStack":
        return False
    return _ips(spec) == _ips(old) and _strs(spec.get("ipFamilies")) == _strs(old.get("ipFamilies"))


def init_ip_families(spec: Obj, old: Obj | None, configured: list[str], name: str) -> None:
    """Default and check spec.ipFamilyPolicy / spec.ipFamilies in place (spec is not ExternalName).

    configured: the cluster's service IP families, primary (the default family) first.
    Raises StatusError 422 with upstream's field errors.
    """
    if _unchanged_prefer_dual_stack(spec, old):
        return
    ips = _ips(spec)
    headless_selectorless = ips[:1] == ["None"] and not spec.get("selector")
    if spec.get("ipFamilyPolicy") is None:
        if old is not None and old.get("ipFamilyPolicy") is not None:
            spec["ipFamilyPolicy"] = old["ipFamilyPolicy"]  # PUT/PATCH without a policy keeps it
        elif headless_selectorless:
            spec["ipFamilyPolicy"] = "RequireDualStack"  # its endpoints may be of any family
        else:
            spec["ipFamilyPolicy"] = "SingleStack"  # never switch stacks without being asked
    validate_cluster_ips_related(spec, name)
    policy = spec["ipFamilyPolicy"]
    families = _strs(spec.get("ipFamilies"))
    errs = FieldErrors()
    if old is not None:
        old_ips, old_families = _ips(old), _strs(old.get("ipFamilies"))
        if policy == "SingleStack":
            # Asking for SingleStack while leaving the values as they were means: drop the secondary.
            if ips == old_ips and len(ips) > 1:
                ips = ips[:1]
                spec["clusterIPs"] = ips
            if families == old_families and len(families) > 1:
                families = families[:1]
        else:
            if ips and len(ips) < len(old_ips):
                errs.invalid("spec.ipFamilyPolicy", policy, "must be 'SingleStack' to release the secondary cluster IP")
            if families and len(families) < len(old_families):
                errs.invalid("spec.ipFamilyPolicy", policy, "must be 'SingleStack' to release the secondary IP family")
    if policy == "SingleStack":
        if len(ips) == 2:
            errs.invalid("spec.ipFamilyPolicy", policy,
                         "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified")
        if len(families) == 2:
            errs.invalid("spec.ipFamilyPolicy", policy,
                         "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified")
    # ipFamilies follow the clusterIPs the client chose (validation already matched the two).
    for i, ip in enumerate(ips):
        fam = family_of(ip)
        if ip == "None" or fam is None:
            break
        if i >= len(families):
            if fam in configured:
                families.append(fam)
            else:
                errs.invalid(f"spec.clusterIPs[{i}]", ips, f"{fam} is not configured on this cluster")
    errs.raise_if_any("Service", name)
    if headless_selectorless:
        # No ClusterIP to allocate, so any family goes, even one the cluster has no range for.
        families = families or [configured[0]]
        if len(families) < 2 and policy != "SingleStack":
            families.append(_other(families[0]))
        spec["ipFamilies"] = families
        return
    if policy == "RequireDualStack" and len(configured) < 2:
        errs.invalid("spec.ipFamilyPolicy", policy, "this cluster is not configured for dual-stack services")
    for i, fam in enumerate(families):
        if fam not in configured:
            errs.invalid(f"spec.ipFamilies[{i}]", fam, "not configured on this cluster")
    errs.raise_if_any("Service", name)
    families = families or [configured[0]]
    if policy != "SingleStack" and len(families) == 1 and len(configured) == 2:
        families.append(_other(families[0]))
    spec["ipFamilies"] = families

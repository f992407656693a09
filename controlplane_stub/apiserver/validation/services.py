"""Services: spec (types, ports, cluster IPs, traffic policies) and what may not change.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from .fielderrors import FieldErrors, GoValue, Obj, go_quote
from .meta import (
    _dicts,
    _label_name,
    _list,
    _obj,
    _str,
    _validate_protocol,
    validate_condition_reason,
    validate_conditions,
    validate_labels,
    validate_object_meta,
)
from .names import (
    IP_ERR,
    IPAddress,
    is_dns1035_label,
    is_dns1123_subdomain,
    is_qualified_name,
    is_valid_ip,
    is_valid_port_name,
    is_valid_port_num,
    parse_cidr,
    parse_ip,
)

# --- services --------------------------------------------------------------------------------------

SERVICE_TYPES = ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort")


def _service_port_key(protocol: str, port: Any, node_port: Any = 0) -> GoValue:
    return GoValue(
        f'core.ServicePort{{Name:"", Protocol:{go_quote(protocol)}, AppProtocol:(*string)(nil), Port:{port}, '
        f'TargetPort:intstr.IntOrString{{Type:0, IntVal:0, StrVal:""}}, NodePort:{node_port}}}')


def externally_accessible(spec: Obj) -> bool:
    """apiservice.ExternallyAccessible: reachable from outside through node ports, LBs or external IPs."""
    svc_type = spec.get("type")
    return svc_type in ("NodePort", "LoadBalancer") or (svc_type == "ClusterIP" and bool(spec.get("externalIPs")))


def _is_headless(spec: Obj) -> bool:
    return spec.get("clusterIP") == "None"


def _validate_service(errs: FieldErrors, svc: Obj) -> None:
    validate_object_meta(errs, svc.get("metadata"), True, is_dns1035_label)
    _validate_service_status(errs, _obj(svc.get("status")), _obj(svc.get("spec")))
    spec = svc.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec", "")
        return
    svc_type = spec.get("type")
    ports = _list(spec.get("ports"))
    if not svc_type:
        errs.required("spec.type", "")
    elif svc_type not in SERVICE_TYPES:
        errs.not_supported("spec.type", svc_type, SERVICE_TYPES)
    if not ports and not _is_headless(spec) and svc_type != "ExternalName":
        errs.required("spec.ports", "")
    cluster_ips = _list(spec.get("clusterIPs"))
    if svc_type == "ExternalName":
        if spec.get("clusterIP") or cluster_ips:
            errs.forbidden("spec.clusterIPs", "may not be set for ExternalName services")
        if spec.get("ipFamilies"):
            errs.forbidden("spec.ipFamilies", "may not be set for ExternalName services")
        if spec.get("ipFamilyPolicy"):
            errs.forbidden("spec.ipFamilyPolicy", "may not be set for ExternalName services")
        cname = _str(spec.get("externalName")).removesuffix(".")
        if cname:
            for msg in is_dns1123_subdomain(cname):
                errs.invalid("spec.externalName", cname, msg)
        else:
            errs.required("spec.externalName", "")
    elif svc_type in ("NodePort", "LoadBalancer") and _is_headless(spec):
        errs.invalid("spec.clusterIPs[0]", "None", f"may not be set to 'None' for {svc_type} services")
    _validate_cluster_ips(errs, spec)
    require_name = len(ports) > 1
    names: set[str] = set()
    for i, port in enumerate(_dicts(ports)):
        pp = f"spec.ports[{i}]"
        _label_name(errs, f"{pp}.name", _str(port.get("name")), names, require_name)
        for msg in is_valid_port_num(port.get("port")):
            errs.invalid(f"{pp}.port", port.get("port"), msg)
        _validate_protocol(errs, port.get("protocol"), f"{pp}.protocol")
        target = port.get("targetPort")
        if isinstance(target, str):
            for msg in is_valid_port_name(target):
                errs.invalid(f"{pp}.targetPort", target, msg)
        elif target is not None:
            for msg in is_valid_port_num(target):
                errs.invalid(f"{pp}.targetPort", target, msg)
        if port.get("appProtocol"):
            for msg in is_qualified_name(_str(port["appProtocol"])):
                errs.invalid(f"{pp}.appProtocol", port["appProtocol"], msg)
        if svc_type == "ClusterIP" and port.get("nodePort"):
            errs.forbidden(f"{pp}.nodePort", "may not be used when `type` is 'ClusterIP'")
        node_port = port.get("nodePort")
        if node_port and svc_type in ("NodePort", "LoadBalancer"):
            for msg in is_valid_port_num(node_port):
                errs.invalid(f"{pp}.nodePort", node_port, msg)
    seen: set[tuple[Any, Any]] = set()
    seen_node: set[tuple[Any, Any]] = set()
    for i, port in enumerate(_dicts(ports)):
        key = (port.get("protocol"), port.get("port"))
        if key in seen:
            errs.duplicate(f"spec.ports[{i}]", _service_port_key(_str(key[0]), key[1]))
        seen.add(key)
        if port.get("nodePort"):
            nkey = (port.get("protocol"), port.get("nodePort"))
            if nkey in seen_node:
                errs.duplicate(f"spec.ports[{i}].nodePort", port["nodePort"])
            seen_node.add(nkey)
    validate_labels(errs, spec.get("selector"), "spec.selector")
    affinity = spec.get("sessionAffinity")
    if not affinity:
        errs.required("spec.sessionAffinity", "")
    elif affinity not in ("ClientIP", "None"):
        errs.not_supported("spec.sessionAffinity", affinity, ("ClientIP", "None"))
    elif affinity == "ClientIP":
        timeout = (((spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}).get("timeoutSeconds"))
        if not isinstance(timeout, int) or not 0 < timeout <= 86400:
            errs.invalid("spec.sessionAffinityConfig.clientIP.timeoutSeconds", timeout,
                         "must be greater than 0 and less than 86400")
    elif spec.get("sessionAffinityConfig"):
        errs.forbidden("spec.sessionAffinityConfig", "must not be set when session affinity is None")
    etp = spec.get("externalTrafficPolicy")
    if externally_accessible(spec):
        if not etp:
            errs.required("spec.externalTrafficPolicy", "")
        elif etp not in ("Cluster", "Local"):
            errs.not_supported("spec.externalTrafficPolicy", etp, ("Cluster", "Local"))
    elif etp:
        errs.invalid("spec.externalTrafficPolicy", etp, "may only be set for externally-accessible services")
    hc = spec.get("healthCheckNodePort")
    if hc:
        if svc_type != "LoadBalancer":
            errs.invalid("spec.healthCheckNodePort", hc, "may only be set when `type` is 'LoadBalancer'")
        if etp != "Local":
            errs.invalid("spec.healthCheckNodePort", hc, "may only be set when `externalTrafficPolicy` is 'Local'")
    itp = spec.get("internalTrafficPolicy")
    if itp is not None and itp not in ("Cluster", "Local"):
        errs.not_supported("spec.internalTrafficPolicy", itp, ("Cluster", "Local"))
    # Topology-aware routing (GA in 1.33): the EndpointSlice controller hints endpoints for their zone.
    td = spec.get("trafficDistribution")
    if td is not None and td != "PreferClose":
        errs.not_supported("spec.trafficDistribution", td, ("PreferClose",))
    for i, ip in enumerate(_list(spec.get("externalIPs"))):
        msgs = is_valid_ip(_str(ip)) or _special_ip(parse_ip(ip))
        for msg in msgs:
            errs.invalid(f"spec.externalIPs[{i}]", ip, msg)
    _validate_load_balancer_fields(errs, spec)


_LINK_LOCAL_MULTICAST = (ipaddress.ip_network("224.0.0.0/24"), ipaddress.ip_network("ff02::/16"))


def _special_ip(ip: IPAddress | None) -> list[str]:
    """ValidateNonSpecialIP: an external IP a node would otherwise take for its own traffic."""
    if ip is None:
        return []
    if ip.is_unspecified:
        return ["may not be unspecified (0.0.0.0 or ::)"]
    if ip.is_loopback:
        return ["may not be in the loopback range (127.0.0.0/8, ::1/128)"]
    if ip.is_link_local:
        return ["may not be in the link-local range (169.254.0.0/16, fe80::/10)"]
    if any(ip in net for net in _LINK_LOCAL_MULTICAST if net.version == ip.version):
        return ["may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)"]
    return []


def _validate_load_balancer_fields(errs: FieldErrors, spec: Obj) -> None:
    is_lb = spec.get("type") == "LoadBalancer"
    ranges = _list(spec.get("loadBalancerSourceRanges"))
    if ranges and not is_lb:
        errs.forbidden("spec.loadBalancerSourceRanges", "may only be used when `type` is 'LoadBalancer'")
    for i, value in enumerate(ranges):
        # Upstream trims the spaces around each range; node proxies must do the same.
        if parse_cidr(value.strip() if isinstance(value, str) else value) is None:
            errs.invalid(f"spec.loadBalancerSourceRanges[{i}]", value,
                         "must be a list of IP ranges. For example, 10.240.0.0/24,10.250.0.0/24 ")
    lb_class = spec.get("loadBalancerClass")
    if lb_class is not None:
        if not is_lb:
            errs.forbidden("spec.loadBalancerClass", "may only be used when `type` is 'LoadBalancer'")
        for msg in is_qualified_name(_str(lb_class)):
            errs.invalid("spec.loadBalancerClass", lb_class, msg)


def _validate_cluster_ips(errs: FieldErrors, spec: Obj) -> None:
    if spec.get("type") == "ExternalName":
        return
    cluster_ip = _str(spec.get("clusterIP"))
    ips = _list(spec.get("clusterIPs"))
    if cluster_ip:
        if not ips:
            errs.required("spec.clusterIPs", "")
        elif ips[0] != cluster_ip:
            errs.invalid("spec.clusterIPs", ips, "first value must match `clusterIP`")
    elif ips:
        errs.invalid("spec.clusterIPs", ips, "must be empty when `clusterIP` is not specified")
    families = spec.get("ipFamilies") or []
    for i, fam in enumerate(families):
        if fam not in ("IPv4", "IPv6"):
            errs.not_supported(f"spec.ipFamilies[{i}]", fam, ("IPv4", "IPv6"))
        if fam in families[:i]:
            errs.duplicate(f"spec.ipFamilies[{i}]", fam)
    policy = spec.get("ipFamilyPolicy")
    policies = ("PreferDualStack", "RequireDualStack", "SingleStack")
    if policy is not None and policy not in policies:
        errs.not_supported("spec.ipFamilyPolicy", policy, policies)
    bad = False
    for i, ip in enumerate(ips):
        if i == 0 and ip == "None":
            if len(ips) > 1:
                bad = True
                errs.invalid("spec.clusterIPs", ips, "'None' must be the first and only value")
            continue
        msgs = is_valid_ip(_str(ip))
        bad = bad or bool(msgs)
        for msg in msgs:
            errs.invalid(f"spec.clusterIPs[{i}]", ip, msg)
    if len(ips) > 2:
        errs.invalid("spec.clusterIPs", ips, "may only hold up to 2 values")
    if bad:
        return
    versions = [ip.version for ip in map(parse_ip, ips) if ip is not None]  # all valid here unless "None"
    if len(ips) == 2 and ips[0] != "None" and versions[0] == versions[1]:
        errs.invalid("spec.clusterIPs", ips, "may specify no more than one IP for each IP family")
    if ips and ips[0] != "None":
        for i, version in enumerate(versions[: len(families)]):
            ip = ips[i]
            if families[i] == "IPv4" and version == 6:
                errs.invalid(f"spec.clusterIPs[{i}]", ip, f"expected an IPv4 value as indicated by `ipFamilies[{i}]`")
            if families[i] == "IPv6" and version == 4:
                errs.invalid(f"spec.clusterIPs[{i}]", ip, f"expected an IPv6 value as indicated by `ipFamilies[{i}]`")


def validate_cluster_ips_related(spec: Obj, name: str) -> None:
    """The loose check the service REST runs before defaulting families and allocating
    (ValidateServiceClusterIPsRelatedFields), so that a family/IP mismatch is reported as such and
    not as an allocation failure. Raises the 422."""
    errs = FieldErrors()
    _validate_cluster_ips(errs, spec)
    errs.raise_if_any("Service", name)


def _validate_service_update(errs: FieldErrors, svc: Obj, old: Obj) -> None:
    spec = _obj(svc.get("spec"))
    old_spec = _obj(old.get("spec"))
    if (old_spec.get("type") == "LoadBalancer" and spec.get("type") == "LoadBalancer"
            and spec.get("loadBalancerClass") != old_spec.get("loadBalancerClass")):
        errs.invalid("spec.loadBalancerClass", spec.get("loadBalancerClass"), "may not change once set")
    if spec.get("type") == "ExternalName" or old_spec.get("type") == "ExternalName":
        return
    new_ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    old_ips = old_spec.get("clusterIPs") or ([old_spec["clusterIP"]] if old_spec.get("clusterIP") else [])
    # An update that leaves clusterIP out keeps the allocated one (the allocator patches it back in).
    if not new_ips or not old_ips:
        return
    for i, ip in enumerate(old_ips[: len(new_ips)]):
        if ip != new_ips[i]:
            errs.invalid(f"spec.clusterIPs[{i}]", new_ips, "may not change once set")
    if spec.get("ipFamilies") and old_spec.get("ipFamilies") and spec["ipFamilies"][0] != old_spec["ipFamilies"][0]:
        errs.invalid("spec.ipFamilies[0]", spec["ipFamilies"][0], "may not change once set")


# --- status (ValidateServiceStatusUpdate; a create starts with an empty status) -------------------

IP_MODES = ("Proxy", "VIP")


def _validate_service_status(errs: FieldErrors, status: Obj, spec: Obj) -> None:
    """status.loadBalancer.ingress: what node proxies write into the kernel (ip) must be an IP."""
    ingress = _list(_obj(status.get("loadBalancer")).get("ingress"))
    if ingress and spec.get("type") != "LoadBalancer":
        errs.forbidden("status.loadBalancer.ingress", "may only be used when `spec.type` is 'LoadBalancer'")
    for i, point in enumerate(_dicts(ingress)):
        ip_path = f"status.loadBalancer.ingress[{i}]"
        ip = point.get("ip")
        if ip:
            for msg in is_valid_ip(_str(ip)) if isinstance(ip, str) else [IP_ERR]:
                errs.invalid(f"{ip_path}.ip", ip, msg)
        mode = point.get("ipMode")
        if mode is not None:
            if not ip:
                errs.forbidden(f"{ip_path}.ipMode", "may not be specified when `ip` is empty")
            elif mode not in IP_MODES:
                errs.not_supported(f"{ip_path}.ipMode", mode, IP_MODES)
        hostname = point.get("hostname")
        if hostname:
            for msg in is_dns1123_subdomain(_str(hostname)):
                errs.invalid(f"{ip_path}.hostname", hostname, msg)
            if parse_ip(hostname) is not None:
                errs.invalid(f"{ip_path}.hostname", hostname, "must be a DNS name, not an IP address")
        for j, port in enumerate(_dicts(point.get("ports"))):
            pp = f"{ip_path}.ports[{j}]"
            for msg in is_valid_port_num(port.get("port")):
                errs.invalid(f"{pp}.port", port.get("port"), msg)
            _validate_protocol(errs, port.get("protocol"), f"{pp}.protocol")
            if port.get("error") is not None:
                validate_condition_reason(errs, port["error"], f"{pp}.error")
    validate_conditions(errs, status.get("conditions"), "status.conditions")

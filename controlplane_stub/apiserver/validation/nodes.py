"""Nodes (upstream ValidateNode / ValidateNodeUpdate): pod CIDRs, taints, resource quantities in
status, and what may not change once set (podCIDRs, providerID)."""
from __future__ import annotations

from .fielderrors import FieldErrors, GoValue, Obj, go_quote
from .meta import _dicts, _list, _obj, _str, validate_object_meta
from .names import is_dns1123_subdomain, is_label_value, is_qualified_name, parse_cidr
from .pods import parse_quantity

TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def _validate_node(errs: FieldErrors, node: Obj) -> None:
    validate_object_meta(errs, node.get("metadata"), False, is_dns1123_subdomain)
    spec = _obj(node.get("spec"))
    cidrs = _list(spec.get("podCIDRs"))
    families: list[int] = []
    for i, cidr in enumerate(cidrs):
        net = parse_cidr(cidr)
        if net is None:
            errs.invalid(f"spec.podCIDRs[{i}]", cidr, "must be a valid CIDR")
            continue
        families.append(net.version)
        if cidr in cidrs[:i]:
            errs.duplicate(f"spec.podCIDRs[{i}]", cidr)
    if len(cidrs) > 2 or (len(families) == 2 and families[0] == families[1]):
        errs.invalid("spec.podCIDRs", cidrs, "may specify no more than one CIDR for each IP family")
    if spec.get("podCIDR") and cidrs and spec["podCIDR"] != cidrs[0]:
        errs.invalid("spec.podCIDR", spec["podCIDR"], "must match the first entry of `podCIDRs`")
    taints_seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(_dicts(spec.get("taints"))):
        tp = f"metadata.taints[{i}]"  # sic: upstream reports spec.taints under this path
        for msg in is_qualified_name(_str(taint.get("key"))):
            errs.invalid(f"{tp}.key", _str(taint.get("key")), msg)
        if taint.get("value"):
            for msg in is_label_value(_str(taint["value"])):
                errs.invalid(f"{tp}.value", taint["value"], msg)
        effect = taint.get("effect")
        if not effect:
            errs.required(f"{tp}.effect", "")
        elif effect not in TAINT_EFFECTS:
            errs.not_supported(f"{tp}.effect", effect, TAINT_EFFECTS)
        key = (_str(taint.get("key")), _str(effect))
        if key in taints_seen:
            errs.duplicate(tp, GoValue(f"core.Taint{{Key:{go_quote(key[0])}, Effect:{go_quote(key[1])}}}"))
        taints_seen.add(key)
    status = _obj(node.get("status"))
    for field in ("capacity", "allocatable"):
        for name, value in _obj(status.get(field)).items():
            path = f"status.{field}.{name}"
            for msg in is_qualified_name(name):
                errs.invalid(path, name, msg)
            quantity = parse_quantity(value)
            if quantity is None:
                errs.invalid(path, value, "must be a valid quantity")
            elif quantity < 0:
                errs.invalid(path, str(value), "must be greater than or equal to 0")
    seen: list[object] = []
    for i, address in enumerate(_list(status.get("addresses"))):
        if address in seen:
            errs.duplicate(f"status.addresses[{i}]", address)
        seen.append(address)


def _validate_node_update(errs: FieldErrors, node: Obj, old: Obj) -> None:
    spec, old_spec = _obj(node.get("spec")), _obj(old.get("spec"))
    old_cidrs = _list(old_spec.get("podCIDRs"))
    # The node IPAM controller may set podCIDRs once; after that they stay.
    if old_cidrs and _list(spec.get("podCIDRs")) != old_cidrs:
        errs.forbidden("spec.podCIDRs", 'node updates may not change podCIDR except from "" to valid')
    if old_spec.get("providerID") and spec.get("providerID") != old_spec["providerID"]:
        errs.forbidden("spec.providerID", 'node updates may not change providerID except from "" to valid')

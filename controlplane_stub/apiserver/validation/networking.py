"""networking.k8s.io/v1 ServiceCIDR, as upstream's pkg/apis/networking/validation (1.33).

spec.cidrs: one or two CIDRs, each by apimachinery's current IsValidCIDR (strict: no leading
zeros, no IPv4-mapped IPv6, no bits past the prefix, canonical text), two only of different
families. Updates: the CIDRs may not change, except that a single-family ServiceCIDR may gain a
CIDR of the other family (kubernetes#131261: the default ServiceCIDR turning dual-stack).
"""
from __future__ import annotations

import ipaddress
from typing import Any

from .fielderrors import FieldErrors, GoValue, Obj, go_quote
from .meta import _obj, validate_object_meta
from .names import is_dns1123_subdomain

CIDRS = "spec.cidrs"
IMMUTABLE = "field is immutable"
CIDR_ERR = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _sloppy(value: str) -> IPNetwork | None:
    """What Go's netutils.ParseCIDRSloppy accepts: ParseCIDR plus leading zeros in IPv4 octets
    and in the prefix length; the network (host bits cleared), or None."""
    addr, sep, plen = value.partition("/")
    if not sep or not plen.isascii() or not plen.isdigit() or "%" in addr:
        return None
    if ":" not in addr:
        octets = addr.split(".")
        if len(octets) != 4 or not all(o.isascii() and o.isdigit() and len(o) <= 3 for o in octets):
            return None
        addr = ".".join(str(int(o)) for o in octets)
    try:
        return ipaddress.ip_network(f"{addr}/{int(plen)}", strict=False)
    except ValueError:
        return None


def cidr_errors(value: Any) -> list[str]:
    """apimachinery's IsValidCIDR (1.33): the messages for value, empty when it is valid."""
    net = _sloppy(value) if isinstance(value, str) else None
    if net is None:
        return [CIDR_ERR]
    addr, _, plen = value.partition("/")
    try:
        exact = ipaddress.ip_network(value, strict=False) if plen == str(int(plen)) else None
    except ValueError:
        exact = None
    if exact is None:  # ParseCIDRSloppy took it, netip.ParsePrefix does not: leading zeros
        return ["must not have leading 0s in IP or prefix length"]
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        return ["must not have an IPv4-mapped IPv6 address"]
    if ipaddress.ip_address(addr) != net.network_address:
        return ["must not have bits set beyond the prefix length"]
    if value != str(net):
        return [f"must be in canonical form ({go_quote(str(net))})"]
    return []


def family_of_cidr(value: Any) -> int:
    """4 or 6 for a CIDR Go's parser takes, 0 (IPFamilyUnknown) otherwise."""
    net = _sloppy(value) if isinstance(value, str) else None
    return net.version if net is not None else 0


def _cidrs(obj: Obj) -> Any:
    return _obj(obj.get("spec")).get("cidrs")


def _spec_text(cidrs: list[Any]) -> GoValue:
    # field.Invalid(path, *ServiceCIDRSpec, ...) prints the dereferenced struct with %#v.
    items = ", ".join(go_quote(c) if isinstance(c, str) else str(c) for c in cidrs)
    return GoValue(f"networking.ServiceCIDRSpec{{CIDRs:[]string{{{items}}}}}")


def _validate_spec(errs: FieldErrors, cidrs: Any) -> None:
    if not isinstance(cidrs, list) or not cidrs:
        errs.required(CIDRS, "at least one CIDR required")
        return
    if len(cidrs) > 2:
        errs.invalid(CIDRS, _spec_text(cidrs), "may only hold up to 2 values")
        return
    for i, cidr in enumerate(cidrs):
        for msg in cidr_errors(cidr):
            errs.invalid(f"{CIDRS}[{i}]", cidr, msg)
    if len(cidrs) == 2 and family_of_cidr(cidrs[0]) == family_of_cidr(cidrs[1]) != 0:
        errs.invalid(CIDRS, cidrs, "may specify no more than one IP for each IP family, i.e 192.168.0.0/24 and "
                                   "2001:db8::/64")


def validate_service_cidr(errs: FieldErrors, obj: Obj) -> None:
    validate_object_meta(errs, obj.get("metadata"), False, is_dns1123_subdomain)
    _validate_spec(errs, _cidrs(obj))


def validate_service_cidr_update(errs: FieldErrors, obj: Obj, old: Obj) -> None:
    """What may change of spec.cidrs (validate_service_cidr has checked the new value itself)."""
    new_cidrs, old_cidrs = _cidrs(obj), _cidrs(old)
    new = new_cidrs if isinstance(new_cidrs, list) else []
    prev = old_cidrs if isinstance(old_cidrs, list) else []
    if len(new) == len(prev):
        for i, (was, now) in enumerate(zip(prev, new)):
            if was != now:
                errs.invalid(f"{CIDRS}[{i}]", now, IMMUTABLE)
    elif len(prev) == 1 and len(new) == 2:
        if new[0] != prev[0]:
            errs.invalid(f"{CIDRS}[0]", new[0], IMMUTABLE)
    else:
        errs.invalid(CIDRS, new, IMMUTABLE)

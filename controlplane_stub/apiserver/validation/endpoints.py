"""Endpoints (core/v1) and EndpointSlices (discovery.k8s.io/v1).
"""
from __future__ import annotations

from .fielderrors import FieldErrors, Obj
from .meta import (
    _dicts,
    _label_name,
    _list,
    _obj,
    _str,
    _validate_protocol,
    validate_labels,
    validate_object_meta,
)
from .names import (
    is_dns1123_label,
    is_dns1123_subdomain,
    is_qualified_name,
    is_valid_ip,
    is_valid_port_num,
    parse_ip,
)


def _validate_endpoints(errs: FieldErrors, ep: Obj) -> None:
    validate_object_meta(errs, ep.get("metadata"), True, is_dns1123_subdomain)
    for i, subset in enumerate(_dicts(ep.get("subsets"))):
        sp = f"subsets[{i}]"
        addrs = _dicts(subset.get("addresses"))
        not_ready = _dicts(subset.get("notReadyAddresses"))
        if not addrs and not not_ready:
            errs.required(sp, "must specify `addresses` or `notReadyAddresses`")
        for fname, lst in (("addresses", addrs), ("notReadyAddresses", not_ready)):
            for j, addr in enumerate(lst):
                for msg in is_valid_ip(_str(addr.get("ip"))):
                    errs.invalid(f"{sp}.{fname}[{j}].ip", _str(addr.get("ip")), msg)
                if addr.get("hostname"):
                    for msg in is_dns1123_label(_str(addr["hostname"])):
                        errs.invalid(f"{sp}.{fname}[{j}].hostname", addr["hostname"], msg)
        ports = _dicts(subset.get("ports"))
        for j, port in enumerate(ports):
            pp = f"{sp}.ports[{j}]"
            _label_name(errs, f"{pp}.name", _str(port.get("name")), None, len(ports) > 1)
            for msg in is_valid_port_num(port.get("port")):
                errs.invalid(f"{pp}.port", port.get("port"), msg)
            _validate_protocol(errs, port.get("protocol"), f"{pp}.protocol")


ADDRESS_TYPES = ("FQDN", "IPv4", "IPv6")
MAX_PORTS = 20000  # discovery/validation's maxPorts
MAX_ZONE_HINTS = 8


def _validate_endpointslice(errs: FieldErrors, eps: Obj) -> None:
    validate_object_meta(errs, eps.get("metadata"), True, is_dns1123_subdomain)
    addr_type = eps.get("addressType")
    endpoints = _dicts(eps.get("endpoints"))
    if len(endpoints) > 1000:
        errs.too_many("endpoints", len(endpoints), 1000)
        endpoints = []
    for i, endpoint in enumerate(endpoints):
        ap = f"endpoints[{i}].addresses"
        addresses = _list(endpoint.get("addresses"))
        if not addresses:
            errs.required(ap, "must contain at least 1 address")
        elif len(addresses) > 100:
            errs.too_many(ap, len(addresses), 100)
        for j, address in enumerate(addresses):
            address = _str(address)
            if addr_type in ("IPv4", "IPv6"):
                parsed = parse_ip(address)
                ok = parsed is not None and parsed.version == (4 if addr_type == "IPv4" else 6)
                if not ok:
                    errs.invalid(f"{ap}[{j}]", address, f"must be a valid {addr_type} address")
            elif addr_type == "FQDN":
                for msg in is_dns1123_subdomain(address):
                    errs.invalid(f"{ap}[{j}]", address, msg)
        if endpoint.get("nodeName"):
            for msg in is_dns1123_subdomain(_str(endpoint["nodeName"])):
                errs.invalid(f"endpoints[{i}].nodeName", endpoint["nodeName"], msg)
        if endpoint.get("hostname"):
            for msg in is_dns1123_label(_str(endpoint["hostname"])):
                errs.invalid(f"endpoints[{i}].hostname", endpoint["hostname"], msg)
        validate_labels(errs, endpoint.get("deprecatedTopology"), f"endpoints[{i}].deprecatedTopology")
        zones = _list(_obj(endpoint.get("hints")).get("forZones"))
        if len(zones) > MAX_ZONE_HINTS:
            errs.too_many(f"endpoints[{i}].hints.forZones", len(zones), MAX_ZONE_HINTS)
        for j, zone in enumerate(_dicts(zones)):
            if not zone.get("name"):
                errs.required(f"endpoints[{i}].hints.forZones[{j}].name", "")
        ref = endpoint.get("targetRef")
        if isinstance(ref, dict) and ref.get("namespace"):
            for msg in is_dns1123_label(_str(ref["namespace"])):
                errs.invalid(f"endpoints[{i}].targetRef.namespace", ref["namespace"], msg)
    ports = _dicts(eps.get("ports"))
    if len(ports) > MAX_PORTS:
        errs.too_many("ports", len(ports), MAX_PORTS)
        ports = []
    names: set[str] = set()
    for i, port in enumerate(ports):
        pp = f"ports[{i}]"
        name = _str(port.get("name"))
        if name:
            for msg in is_dns1123_label(name):
                errs.invalid(f"{pp}.name", name, msg)
        if name in names:
            errs.duplicate(f"{pp}.name", name)
        names.add(name)
        _validate_protocol(errs, port.get("protocol"), f"{pp}.protocol")
        if port.get("port") is not None and not (isinstance(port["port"], int) and 0 <= port["port"] <= 65535):
            errs.invalid(f"{pp}.port", port["port"], "must be between 0 and 65535, inclusive")
        if port.get("appProtocol"):
            for msg in is_qualified_name(_str(port["appProtocol"])):
                errs.invalid(f"{pp}.appProtocol", port["appProtocol"], msg)
    if not addr_type:
        errs.required("addressType", "")
    elif addr_type not in ADDRESS_TYPES:
        errs.not_supported("addressType", addr_type, ADDRESS_TYPES)

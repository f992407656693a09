"""Pods and pod templates (core/v1 validation of PodSpec, containers, probes, resources).
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from .fielderrors import FieldErrors, Obj
from .meta import (
    _dicts,
    _label_name,
    _obj,
    _str,
    _validate_protocol,
    validate_annotations,
    validate_labels,
    validate_object_meta,
)
from .names import (
    IP_ERR,
    is_dns1123_label,
    is_dns1123_subdomain,
    is_env_var_name,
    is_qualified_name,
    is_valid_ip,
    is_valid_port_name,
    is_valid_port_num,
    parse_ip,
)

_VOLUME_SOURCES = frozenset((
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs", "iscsi",
    "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "projected",
    "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral", "image"))


_QUANTITY_RE = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
QUANTITY_ERR = "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
_SUFFIXES = {"": 0, "n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def parse_quantity(value: Any) -> Decimal | None:
    """A resource.Quantity ("100m", "1Gi", "1e3", 2) as a Decimal, or None when it does not parse."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    match = _QUANTITY_RE.match(value)
    if match is None:
        return None
    number, suffix = match.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation:
        return None
    try:
        if suffix in _SUFFIXES:
            return amount.scaleb(_SUFFIXES[suffix])
        if suffix in _BINARY:
            return amount * Decimal(2 ** _BINARY[suffix])
        # A decimal exponent of more than a few digits is out of any Quantity's range (and would
        # make Decimal work hard): not a quantity.
        if suffix[:1] in ("e", "E") and re.fullmatch(r"[eE][-+]?[0-9]{1,4}", suffix):
            return amount.scaleb(int(suffix[1:]))
    except ArithmeticError:  # decimal.Overflow and friends
        return None
    return None


def _resources(container: Obj) -> tuple[Obj, Obj]:
    resources = _obj(container.get("resources"))
    return _obj(resources.get("limits")), _obj(resources.get("requests"))


def _validate_resources(errs: FieldErrors, container: Obj, path: str) -> None:
    limits, requests = _resources(container)
    for kind, values in (("limits", limits), ("requests", requests)):
        for name, value in values.items():
            quantity = parse_quantity(value)
            if quantity is not None and quantity < 0:
                errs.invalid(f"{path}.resources.{kind}[{name}]", str(value), "must be greater than or equal to 0")
    for name, value in requests.items():
        req, lim = parse_quantity(value), parse_quantity(limits.get(name))
        if req is not None and lim is not None and req > lim:
            errs.invalid(f"{path}.resources.requests", str(value),
                         f"must be less than or equal to {name} limit of {limits[name]}")


def bad_quantity(spec: Any) -> bool:
    """Whether a pod spec carries a resource quantity that does not parse (a decode error upstream)."""
    for key in ("containers", "initContainers"):
        for container in _dicts(_obj(spec).get(key)):
            limits, requests = _resources(container)
            if any(parse_quantity(v) is None for v in (*limits.values(), *requests.values())):
                return True
    return False


def _validate_container_ports(errs: FieldErrors, ports: Any, path: str) -> None:
    names: set[str] = set()
    for i, port in enumerate(_dicts(ports)):
        pp = f"{path}[{i}]"
        name = _str(port.get("name"))
        if name:
            msgs = is_valid_port_name(name)
            for msg in msgs:
                errs.invalid(f"{pp}.name", name, msg)
            if not msgs:
                if name in names:
                    errs.duplicate(f"{pp}.name", name)
                names.add(name)
        cport = port.get("containerPort")
        if not cport:
            errs.required(f"{pp}.containerPort", "")
        else:
            for msg in is_valid_port_num(cport):
                errs.invalid(f"{pp}.containerPort", cport, msg)
        if port.get("hostPort"):
            for msg in is_valid_port_num(port["hostPort"]):
                errs.invalid(f"{pp}.hostPort", port["hostPort"], msg)
        _validate_protocol(errs, port.get("protocol"), f"{pp}.protocol")


_PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")


def _validate_probe(errs: FieldErrors, probe: Any, path: str) -> None:
    if not isinstance(probe, dict):
        return
    handlers = [h for h in _PROBE_HANDLERS if probe.get(h) is not None]
    if not handlers:
        errs.required(path, "must specify a handler type")
    elif len(handlers) > 1:
        errs.forbidden(f"{path}.{handlers[1]}", "may not specify more than 1 handler type")
    for handler in ("httpGet", "tcpSocket"):
        if handler not in handlers:
            continue
        port = _obj(probe.get(handler)).get("port")
        for msg in is_valid_port_name(port) if isinstance(port, str) else is_valid_port_num(port):
            errs.invalid(f"{path}.{handler}.port", port, msg)
    if "exec" in handlers and not _obj(probe.get("exec")).get("command"):
        errs.required(f"{path}.exec.command", "")
    for key in ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold"):
        value = probe.get(key)
        if isinstance(value, int) and value < 0:
            errs.invalid(f"{path}.{key}", value, "must be greater than or equal to 0")
    if path.endswith(("livenessProbe", "startupProbe")) and probe.get("successThreshold") not in (None, 1):
        errs.invalid(f"{path}.successThreshold", probe["successThreshold"], "must be 1")


def _validate_containers(errs: FieldErrors, containers: Any, path: str, volumes: set[str], names: set[str],
                         required: bool) -> None:
    if not isinstance(containers, list) or not containers:
        if required:
            errs.required(path, "")
        return
    for i, c in enumerate(_dicts(containers)):
        cp = f"{path}[{i}]"
        _label_name(errs, f"{cp}.name", _str(c.get("name")), names, True)
        image = _str(c.get("image"))
        if not image:
            errs.required(f"{cp}.image", "")
        elif image != image.strip():
            errs.invalid(f"{cp}.image", image, "must not have leading or trailing whitespace")
        policy = c.get("imagePullPolicy")
        if policy is not None and policy not in ("Always", "IfNotPresent", "Never"):
            errs.not_supported(f"{cp}.imagePullPolicy", policy, ("Always", "IfNotPresent", "Never"))
        _validate_container_ports(errs, c.get("ports"), f"{cp}.ports")
        _validate_resources(errs, c, cp)
        for j, env in enumerate(_dicts(c.get("env"))):
            ename = _str(env.get("name"))
            if not ename:
                errs.required(f"{cp}.env[{j}].name", "")
            else:
                for msg in is_env_var_name(ename):
                    errs.invalid(f"{cp}.env[{j}].name", ename, msg)
            value_from = env.get("valueFrom")
            if isinstance(value_from, dict):
                sources = [k for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")
                           if value_from.get(k) is not None]
                if len(sources) > 1:
                    errs.invalid(f"{cp}.env[{j}].valueFrom", "",
                                 "may not have more than one field specified at a time")
                elif not sources:
                    errs.invalid(f"{cp}.env[{j}].valueFrom", "", "must specify one of: `fieldRef`, "
                                 "`resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`")
                if env.get("value"):
                    errs.invalid(f"{cp}.env[{j}].valueFrom", "", "may not be specified when `value` is not empty")
        for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
            _validate_probe(errs, c.get(probe_name), f"{cp}.{probe_name}")
        mount_paths: set[str] = set()
        for j, mount in enumerate(_dicts(c.get("volumeMounts"))):
            mp = f"{cp}.volumeMounts[{j}]"
            mname = _str(mount.get("name"))
            if not mname:
                errs.required(f"{mp}.name", "")
            elif mname not in volumes:
                errs.not_found(f"{mp}.name", mname)
            mpath = _str(mount.get("mountPath"))
            if not mpath:
                errs.required(f"{mp}.mountPath", "")
            elif mpath in mount_paths:
                errs.invalid(f"{mp}.mountPath", mpath, "must be unique")
            mount_paths.add(mpath)


def validate_pod_spec(errs: FieldErrors, spec: Any, path: str) -> None:
    if not isinstance(spec, dict):
        errs.required(path, "")
        return
    volumes: set[str] = set()
    for i, vol in enumerate(_dicts(spec.get("volumes"))):
        vp = f"{path}.volumes[{i}]"
        _label_name(errs, f"{vp}.name", _str(vol.get("name")), volumes, True)
        sources = [k for k in vol if k in _VOLUME_SOURCES]
        if not sources:
            errs.required(vp, "must specify a volume type")
        elif len(sources) > 1:
            errs.forbidden(f"{vp}.{sources[1]}", "may not specify more than 1 volume type")
    names: set[str] = set()
    _validate_containers(errs, spec.get("containers"), f"{path}.containers", volumes, names, True)
    _validate_containers(errs, spec.get("initContainers"), f"{path}.initContainers", volumes, names, False)
    restart = spec.get("restartPolicy")
    if not restart:
        errs.required(f"{path}.restartPolicy", "")
    elif restart not in ("Always", "OnFailure", "Never"):
        errs.not_supported(f"{path}.restartPolicy", restart, ("Always", "OnFailure", "Never"))
    dns = spec.get("dnsPolicy")
    dns_policies = ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None")
    if not dns:
        errs.required(f"{path}.dnsPolicy", "")
    elif dns not in dns_policies:
        errs.not_supported(f"{path}.dnsPolicy", dns, dns_policies)
    validate_labels(errs, spec.get("nodeSelector"), f"{path}.nodeSelector")
    for key in ("activeDeadlineSeconds",):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            errs.invalid(f"{path}.{key}", value, "must be between 1 and 2147483647, inclusive")
    node_name = spec.get("nodeName")
    if node_name:
        for msg in is_dns1123_subdomain(_str(node_name)):
            errs.invalid(f"{path}.nodeName", node_name, msg)
    hostname = spec.get("hostname")
    if hostname:
        for msg in is_dns1123_label(_str(hostname)):
            errs.invalid(f"{path}.hostname", hostname, msg)
    subdomain = spec.get("subdomain")
    if subdomain:
        for msg in is_dns1123_label(_str(subdomain)):
            errs.invalid(f"{path}.subdomain", subdomain, msg)


def validate_pod_template(errs: FieldErrors, template: Any, path: str) -> None:
    if not isinstance(template, dict):
        errs.required(path, "")
        return
    meta = _obj(template.get("metadata"))
    validate_labels(errs, meta.get("labels"), f"{path}.metadata.labels")
    validate_annotations(errs, meta.get("annotations"), f"{path}.metadata.annotations")
    validate_pod_spec(errs, template.get("spec"), f"{path}.spec")


def _validate_pod(errs: FieldErrors, pod: Obj) -> None:
    validate_object_meta(errs, pod.get("metadata"), True, is_dns1123_subdomain)
    validate_pod_spec(errs, pod.get("spec"), "spec")
    _validate_pod_status(errs, _obj(pod.get("status")))


def _validate_ip_list(errs: FieldErrors, entries: Any, path: str) -> None:
    """status.podIPs / status.hostIPs: valid IPs, no repeats, at most one per family."""
    items = _dicts(entries)
    versions: list[int] = []
    for i, entry in enumerate(items):
        ip = entry.get("ip")
        parsed = parse_ip(ip)
        if parsed is None:
            errs.invalid(f"{path}[{i}].ip" if path.endswith("IPs") else path, ip, IP_ERR)
            continue
        if any(other.get("ip") == ip for other in items[:i]):
            errs.duplicate(f"{path}[{i}]", ip)
        versions.append(parsed.version)
    if len(items) > 2 or (len(versions) == 2 and versions[0] == versions[1]):
        errs.invalid(path, [e.get("ip") for e in items], "may specify no more than one IP for each IP family")


def _validate_pod_status(errs: FieldErrors, status: Obj) -> None:
    """What node agents write (ValidatePodStatusUpdate): IPs that proxies and the DNS hand out."""
    for single, plural in (("podIP", "podIPs"), ("hostIP", "hostIPs")):
        value = status.get(single)
        if value:
            for msg in is_valid_ip(_str(value)) if isinstance(value, str) else [IP_ERR]:
                errs.invalid(f"status.{single}", value, msg)
        _validate_ip_list(errs, status.get(plural), f"status.{plural}")
        first = _dicts(status.get(plural))[:1]
        if value and first and first[0].get("ip") != value:
            errs.invalid(f"status.{plural}[0].ip", first[0].get("ip"), f"must match `status.{single}`")
    nominated = status.get("nominatedNodeName")
    if nominated:
        for msg in is_dns1123_subdomain(_str(nominated)):
            errs.invalid("status.nominatedNodeName", nominated, msg)
    for i, cond in enumerate(_dicts(status.get("conditions"))):
        ctype = _str(cond.get("type"))
        if not ctype:
            errs.required(f"status.conditions[{i}].type", "")
        for msg in is_qualified_name(ctype) if ctype else []:
            errs.invalid(f"status.conditions[{i}].type", ctype, msg)


_POD_MUTABLE_MSG = ("pod updates may not change fields other than `spec.containers[*].image`,"
                    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
                    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
                    "(allow it to be set to 1 if it was previously negative)")


def _pod_spec_fingerprint(spec: Any, old_node: str) -> Any:
    """The spec with the fields an update may change blanked out."""
    if not isinstance(spec, dict):
        return spec
    spec = json.loads(json.dumps(spec))
    for key in ("containers", "initContainers"):
        for c in _dicts(spec.get(key)):
            c.pop("image", None)
    spec.pop("activeDeadlineSeconds", None)
    spec.pop("tolerations", None)
    # Binding a pod sets nodeName once; this server's scheduler may do it with an update.
    if not old_node:
        spec.pop("nodeName", None)
    return spec


def _validate_pod_update(errs: FieldErrors, pod: Obj, old: Obj) -> None:
    old_spec = _obj(old.get("spec"))
    old_node = _str(old_spec.get("nodeName"))
    if _pod_spec_fingerprint(pod.get("spec"), old_node) != _pod_spec_fingerprint(old_spec, old_node):
        errs.forbidden("spec", _POD_MUTABLE_MSG)

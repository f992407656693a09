"""Validation as kube-apiserver does it, with its field paths and message texts.

The rules and texts follow upstream's pkg/apis/{core,apps,discovery,coordination}/validation and
apimachinery's util/validation; a 422 Status lists every problem found as details.causes, each
{"reason": "FieldValue...", "message": ErrorBody, "field": path}, exactly like the real server,
so kubectl prints the same lines for the same mistakes.
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import StatusError, invalid

Obj = dict[str, Any]

# --- Go-style rendering of bad values (field.Error.ErrorBody) ------------------------------------


def go_quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def go_repr(value: Any) -> str:
    """The value as Go's fmt prints it in field errors (%q for strings, %#v for the rest)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return go_quote(value)
    if isinstance(value, dict):
        if all(isinstance(v, str) for v in value.values()):
            items = ", ".join(f"{go_quote(k)}:{go_quote(v)}" for k, v in sorted(value.items()))
            return "map[string]string{" + items + "}"
        items = ", ".join(f"{go_quote(k)}:{_go_iface(v)}" for k, v in sorted(value.items()))
        return "map[string]interface {}{" + items + "}"
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return "[]string{" + ", ".join(go_quote(v) for v in value) + "}"
        return "[]interface {}{" + ", ".join(_go_iface(v) for v in value) + "}"
    return str(value)


def _go_iface(value: Any) -> str:
    if isinstance(value, dict):
        return go_repr(value)
    if isinstance(value, list):
        return go_repr(value)
    return go_repr(value)


class GoValue:
    """A value whose Go rendering is given verbatim (struct dumps such as core.ServicePort{...})."""

    def __init__(self, text: str) -> None:
        self.text = text


class FieldErrors:
    """Collects causes the way field.ErrorList does."""

    def __init__(self) -> None:
        self.causes: list[dict[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.causes)

    def _add(self, reason: str, path: str, body: str) -> None:
        self.causes.append({"reason": reason, "message": body, "field": path})

    @staticmethod
    def _value(value: Any) -> str:
        return value.text if isinstance(value, GoValue) else go_repr(value)

    def required(self, path: str, detail: str = "") -> None:
        self._add("FieldValueRequired", path, "Required value" + (f": {detail}" if detail else ""))

    def invalid(self, path: str, value: Any, detail: str) -> None:
        body = f"Invalid value: {self._value(value)}" + (f": {detail}" if detail else "")
        self._add("FieldValueInvalid", path, body)

    def not_supported(self, path: str, value: Any, supported: Iterable[str]) -> None:
        quoted = ", ".join(go_quote(s) for s in supported)
        body = f"Unsupported value: {self._value(value)}"
        if quoted:
            body += f": supported values: {quoted}"
        self._add("FieldValueNotSupported", path, body)

    def duplicate(self, path: str, value: Any) -> None:
        self._add("FieldValueDuplicate", path, f"Duplicate value: {self._value(value)}")

    def forbidden(self, path: str, detail: str) -> None:
        self._add("FieldValueForbidden", path, "Forbidden" + (f": {detail}" if detail else ""))

    def not_found(self, path: str, value: Any) -> None:
        self._add("FieldValueNotFound", path, f"Not found: {self._value(value)}")

    def too_long(self, path: str, max_len: int) -> None:
        self._add("FieldValueTooLong", path, f"Too long: may not be more than {max_len} bytes")

    def too_many(self, path: str, actual: int, max_items: int) -> None:
        self._add("FieldValueTooMany", path, f"Too many: {actual}: must have at most {max_items} items")

    def raise_if_any(self, kind: str, name: str, group: str = "") -> None:
        if self.causes:
            raise invalid(kind, name, self.causes, group)


# --- apimachinery's string checks (each returns the list of messages) ----------------------------

_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + "(\\." + _DNS1123_LABEL_FMT + ")*"
_DNS1035_LABEL_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE_FMT = "(" + _QUALIFIED_NAME_FMT + ")?"
_CONFIG_KEY_FMT = "[-._a-zA-Z0-9]+"
_ENV_VAR_FMT = "[-._a-zA-Z][-._a-zA-Z0-9]*"

_RE = {fmt: re.compile("^" + fmt + "$") for fmt in (
    _DNS1123_LABEL_FMT, _DNS1123_SUBDOMAIN_FMT, _DNS1035_LABEL_FMT, _QUALIFIED_NAME_FMT,
    _LABEL_VALUE_FMT, _CONFIG_KEY_FMT, _ENV_VAR_FMT)}


def regex_error(msg: str, fmt: str, *examples: str) -> str:
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    return msg + " (e.g. " + " or ".join(f"'{e}', " for e in examples) + f"regex used for validation is '{fmt}')"


def max_len_error(n: int) -> str:
    return f"must be no more than {n} characters"


DNS1035_LABEL_ERR = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                     "alphabetic character, and end with an alphanumeric character")
DNS1123_LABEL_ERR = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
                     "must start and end with an alphanumeric character")
DNS1123_SUBDOMAIN_ERR = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                         "'.', and must start and end with an alphanumeric character")
QUALIFIED_NAME_ERR = ("must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                      "alphanumeric character")
LABEL_VALUE_ERR = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                   "and must start and end with an alphanumeric character")
CONFIG_KEY_ERR = "a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
ENV_VAR_ERR = ("a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', "
               "and must not start with a digit")
PORT_RANGE_ERR = "must be between 1 and 65535, inclusive"
IP_ERR = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"


def is_dns1035_label(value: str) -> list[str]:
    errs = [max_len_error(63)] if len(value) > 63 else []
    if not _RE[_DNS1035_LABEL_FMT].match(value):
        errs.append(regex_error(DNS1035_LABEL_ERR, _DNS1035_LABEL_FMT, "my-name", "abc-123"))
    return errs


def is_dns1123_label(value: str) -> list[str]:
    errs = [max_len_error(63)] if len(value) > 63 else []
    if not _RE[_DNS1123_LABEL_FMT].match(value):
        errs.append(regex_error(DNS1123_LABEL_ERR, _DNS1123_LABEL_FMT, "my-name", "123-abc"))
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    errs = [max_len_error(253)] if len(value) > 253 else []
    if not _RE[_DNS1123_SUBDOMAIN_FMT].match(value):
        errs.append(regex_error(DNS1123_SUBDOMAIN_ERR, _DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errs


def is_qualified_name(value: str) -> list[str]:
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return ["a qualified name " + regex_error(QUALIFIED_NAME_ERR, _QUALIFIED_NAME_FMT, "MyName", "my.name",
                                                   "123-abc")
                + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part " + max_len_error(63))
    if not _RE[_QUALIFIED_NAME_FMT].match(name):
        errs.append("name part " + regex_error(QUALIFIED_NAME_ERR, _QUALIFIED_NAME_FMT, "MyName", "my.name",
                                               "123-abc"))
    return errs


def is_label_value(value: str) -> list[str]:
    errs = [max_len_error(63)] if len(value) > 63 else []
    if not _RE[_LABEL_VALUE_FMT].match(value):
        errs.append(regex_error(LABEL_VALUE_ERR, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return errs


def is_config_map_key(value: str) -> list[str]:
    errs = [max_len_error(253)] if len(value) > 253 else []
    if not _RE[_CONFIG_KEY_FMT].match(value):
        errs.append(regex_error(CONFIG_KEY_ERR, _CONFIG_KEY_FMT, "key.name", "KEY_NAME", "key-name"))
    if value == ".":
        errs.append("must not be '.'")
    elif value == "..":
        errs.append("must not be '..'")
    elif value.startswith(".."):
        errs.append("must not start with '..'")
    return errs


def is_env_var_name(value: str) -> list[str]:
    if _RE[_ENV_VAR_FMT].match(value):
        return []
    return [regex_error(ENV_VAR_ERR, _ENV_VAR_FMT, "my.env-name", "MY_ENV.NAME", "MyEnvName1")]


def is_valid_port_num(port: Any) -> list[str]:
    return [] if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535 else [PORT_RANGE_ERR]


def is_valid_port_name(port: str) -> list[str]:
    """IANA_SVC_NAME (RFC 6335): what a named targetPort or containerPort name must be."""
    errs = [max_len_error(15)] if len(port) > 15 else []
    if not re.fullmatch(r"[-a-z0-9]+", port):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search(r"[a-z]", port):
        errs.append("must contain at least one letter (a-z)")
    if "--" in port:
        errs.append("must not contain consecutive hyphens")
    if port and (port[0] == "-" or port[-1] == "-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def is_valid_ip(value: str) -> list[str]:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return [IP_ERR]
    return []


# --- shared object-level checks -------------------------------------------------------------------

NameFn = Callable[[str], list[str]]


def _mask_trailing_dash(name: str) -> str:
    return name[:-1] + "a" if len(name) > 1 and name.endswith("-") else name


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _obj(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dicts(value: Any) -> list[Obj]:
    return [v if isinstance(v, dict) else {} for v in value] if isinstance(value, list) else []


def validate_labels(errs: FieldErrors, labels: Any, path: str) -> None:
    if not isinstance(labels, dict):
        return
    for key, value in labels.items():
        for msg in is_qualified_name(str(key)):
            errs.invalid(path, key, msg)
        if not isinstance(value, str):
            errs.invalid(path, value, "must be a string")
            continue
        for msg in is_label_value(value):
            errs.invalid(path, value, msg)


def validate_annotations(errs: FieldErrors, annotations: Any, path: str) -> None:
    if not isinstance(annotations, dict):
        return
    total = 0
    for key, value in annotations.items():
        for msg in is_qualified_name(str(key).lower()):
            errs.invalid(path, key, msg)
        total += len(str(key)) + len(str(value))
    if total > 256 * 1024:
        errs.too_long(path, 256 * 1024)


def validate_object_meta(errs: FieldErrors, meta: Any, namespaced: bool, name_fn: NameFn | None) -> None:
    if not isinstance(meta, dict):
        errs.required("metadata", "")
        return
    name = _str(meta.get("name"))
    generate = _str(meta.get("generateName"))
    if name_fn is not None:
        if generate:
            for msg in name_fn(_mask_trailing_dash(generate)):
                errs.invalid("metadata.generateName", generate, msg)
        if not name:
            errs.required("metadata.name", "name or generateName is required")
        else:
            for msg in name_fn(name):
                errs.invalid("metadata.name", name, msg)
    elif not name:
        errs.required("metadata.name", "name or generateName is required")
    namespace = _str(meta.get("namespace"))
    if namespaced:
        if not namespace:
            errs.required("metadata.namespace", "")
        else:
            for msg in is_dns1123_label(namespace):
                errs.invalid("metadata.namespace", namespace, msg)
    elif namespace:
        errs.forbidden("metadata.namespace", "not allowed on this type")
    validate_labels(errs, meta.get("labels"), "metadata.labels")
    validate_annotations(errs, meta.get("annotations"), "metadata.annotations")
    for i, ref in enumerate(_dicts(meta.get("ownerReferences"))):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not ref.get(key):
                errs.invalid(f"metadata.ownerReferences[{i}].{key}" if key != "apiVersion"
                             else f"metadata.ownerReferences[{i}].apiVersion", ref.get(key, ""),
                             f"{key} must not be empty" if key != "apiVersion" else "version must not be empty")


def validate_object_meta_update(errs: FieldErrors, meta: Any, old_meta: Any) -> None:
    if not isinstance(meta, dict) or not isinstance(old_meta, dict):
        return
    for key in ("name", "namespace", "uid", "creationTimestamp"):
        old_value = old_meta.get(key)
        new_value = meta.get(key)
        if old_value and new_value and old_value != new_value:
            errs.invalid(f"metadata.{key}", new_value, "field is immutable")


# --- label selectors -------------------------------------------------------------------------------

_SELECTOR_OPS = ("In", "NotIn", "Exists", "DoesNotExist")


def label_selector_go(sel: Any) -> GoValue:
    """%#v of a metav1.LabelSelector, as the immutable-selector error prints it."""
    if not isinstance(sel, dict):
        return GoValue("(*v1.LabelSelector)(nil)")
    labels = sel.get("matchLabels")
    ml = go_repr(labels) if isinstance(labels, dict) and labels else "map[string]string(nil)"
    exprs = sel.get("matchExpressions")
    if isinstance(exprs, list) and exprs:
        parts = []
        for e in _dicts(exprs):
            values = e.get("values")
            vals = go_repr(values) if isinstance(values, list) and values else "[]string(nil)"
            parts.append(f'v1.LabelSelectorRequirement{{Key:{go_quote(_str(e.get("key")))}, '
                         f'Operator:{go_quote(_str(e.get("operator")))}, Values:{vals}}}')
        me = "[]v1.LabelSelectorRequirement{" + ", ".join(parts) + "}"
    else:
        me = "[]v1.LabelSelectorRequirement(nil)"
    return GoValue(f"v1.LabelSelector{{MatchLabels:{ml}, MatchExpressions:{me}}}")


def validate_label_selector(errs: FieldErrors, sel: Obj, path: str) -> None:
    validate_labels(errs, sel.get("matchLabels"), f"{path}.matchLabels")
    for i, expr in enumerate(_dicts(sel.get("matchExpressions"))):
        ep = f"{path}.matchExpressions[{i}]"
        op = expr.get("operator")
        values = expr.get("values") or []
        if op in ("In", "NotIn"):
            if not values:
                errs.required(f"{ep}.values", "must be specified when `operator` is 'In' or 'NotIn'")
        elif op in ("Exists", "DoesNotExist"):
            if values:
                errs.forbidden(f"{ep}.values", "may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
        else:
            errs.invalid(f"{ep}.operator", op, "not a valid selector operator")
        for msg in is_qualified_name(_str(expr.get("key"))):
            errs.invalid(f"{ep}.key", _str(expr.get("key")), msg)


def selector_matches(sel: Any, labels: Any) -> bool:
    """metav1.LabelSelectorAsSelector(sel).Matches(labels); a nil selector matches nothing."""
    if not isinstance(sel, dict):
        return False
    labels = labels if isinstance(labels, dict) else {}
    for key, value in (sel.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in _dicts(sel.get("matchExpressions")):
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --- pods ------------------------------------------------------------------------------------------

PROTOCOLS = ("SCTP", "TCP", "UDP")
_VOLUME_SOURCES = frozenset((
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret", "nfs", "iscsi",
    "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "downwardAPI", "fc",
    "azureFile", "configMap", "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "projected",
    "portworxVolume", "scaleIO", "storageos", "csi", "ephemeral", "image"))


def _label_name(errs: FieldErrors, path: str, name: str, seen: set[str] | None, required: bool) -> None:
    """A list element's name: required (when asked), a DNS-1123 label, unique within seen."""
    if not name:
        if required:
            errs.required(path, "")
        return
    for msg in is_dns1123_label(name):
        errs.invalid(path, name, msg)
    if seen is not None:
        if name in seen:
            errs.duplicate(path, name)
        seen.add(name)


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
    if suffix in _SUFFIXES:
        return amount.scaleb(_SUFFIXES[suffix])
    if suffix in _BINARY:
        return amount * Decimal(2 ** _BINARY[suffix])
    if suffix[:1] in ("e", "E") and re.fullmatch(r"[eE][-+]?[0-9]+", suffix):
        return amount.scaleb(int(suffix[1:]))
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


def _validate_protocol(errs: FieldErrors, protocol: Any, path: str) -> None:
    if not protocol:
        errs.required(path, "")
    elif protocol not in PROTOCOLS:
        errs.not_supported(path, protocol, PROTOCOLS)


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
    for i, ip in enumerate(spec.get("externalIPs") or []):
        for msg in is_valid_ip(_str(ip)):
            errs.invalid(f"spec.externalIPs[{i}]", ip, msg)


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
    if len(ips) == 2 and ips[0] != "None":
        if ipaddress.ip_address(ips[0]).version == ipaddress.ip_address(ips[1]).version:
            errs.invalid("spec.clusterIPs", ips, "may specify no more than one IP for each IP family")
    if ips and ips[0] != "None":
        for i, ip in enumerate(ips[: len(families)]):
            version = ipaddress.ip_address(ip).version
            if families[i] == "IPv4" and version == 6:
                errs.invalid(f"spec.clusterIPs[{i}]", ip, f"expected an IPv4 value as indicated by `ipFamilies[{i}]`")
            if families[i] == "IPv6" and version == 4:
                errs.invalid(f"spec.clusterIPs[{i}]", ip, f"expected an IPv6 value as indicated by `ipFamilies[{i}]`")


def _validate_service_update(errs: FieldErrors, svc: Obj, old: Obj) -> None:
    spec = _obj(svc.get("spec"))
    old_spec = _obj(old.get("spec"))
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


# --- apps: deployments and replicasets -------------------------------------------------------------


def _nonnegative(errs: FieldErrors, spec: Obj, key: str, path: str) -> None:
    value = spec.get(key)
    if value is not None and (not isinstance(value, int) or value < 0):
        errs.invalid(f"{path}.{key}", value, "must be greater than or equal to 0")


def _validate_selector_and_template(errs: FieldErrors, spec: Obj, what: str) -> None:
    sel = spec.get("selector")
    if not isinstance(sel, dict):
        errs.required("spec.selector", "")
    else:
        validate_label_selector(errs, sel, "spec.selector")
        if not sel.get("matchLabels") and not sel.get("matchExpressions"):
            errs.invalid("spec.selector", label_selector_go(sel), f"empty selector is invalid for {what}")
    template = spec.get("template")
    if not isinstance(template, dict):
        errs.required("spec.template", "")
        return
    meta = _obj(template.get("metadata"))
    labels = meta.get("labels")
    empty_selector = isinstance(sel, dict) and not sel.get("matchLabels") and not sel.get("matchExpressions")
    if not empty_selector and not selector_matches(sel, labels):
        shown: Any = labels if isinstance(labels, dict) and labels else GoValue("map[string]string(nil)")
        errs.invalid("spec.template.metadata.labels", shown, "`selector` does not match template `labels`")
    validate_pod_template(errs, template, "spec.template")
    tspec = _obj(template.get("spec"))
    restart = tspec.get("restartPolicy")
    if restart and restart != "Always":
        errs.not_supported("spec.template.spec.restartPolicy", restart, ("Always",))
    if tspec.get("activeDeadlineSeconds") is not None:
        errs.forbidden("spec.template.spec.activeDeadlineSeconds",
                       "activeDeadlineSeconds in ReplicaSet is not Supported")


def _int_or_percent(value: Any) -> tuple[int, bool] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, False
    if isinstance(value, str) and re.fullmatch(r"[0-9]+%", value):
        return int(value[:-1]), True
    return None


def _validate_strategy(errs: FieldErrors, strategy: Any) -> None:
    if not isinstance(strategy, dict):
        return
    stype = strategy.get("type")
    if not stype:
        errs.required("spec.strategy.type", "")
    elif stype not in ("Recreate", "RollingUpdate"):
        errs.not_supported("spec.strategy.type", stype, ("Recreate", "RollingUpdate"))
    rolling = strategy.get("rollingUpdate")
    if stype == "Recreate" and rolling is not None:
        errs.forbidden("spec.strategy.rollingUpdate", "may not be specified when strategy `type` is 'Recreate'")
    if stype == "RollingUpdate" and isinstance(rolling, dict):
        parsed = {}
        for key in ("maxUnavailable", "maxSurge"):
            value = rolling.get(key)
            path = f"spec.strategy.rollingUpdate.{key}"
            if value is None:
                continue
            p = _int_or_percent(value)
            if p is None:
                errs.invalid(path, value, "a valid percent string must be a numeric string followed by an ending '%' "
                                          "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')")
                continue
            if p[0] < 0:
                errs.invalid(path, value, "must be greater than or equal to 0")
            if p[1] and p[0] > 100:
                errs.invalid(path, value, "must not be greater than 100%")
            parsed[key] = p[0]
        if parsed.get("maxUnavailable") == 0 and parsed.get("maxSurge") == 0:
            errs.invalid("spec.strategy.rollingUpdate.maxUnavailable", rolling.get("maxUnavailable"),
                         "may not be 0 when `maxSurge` is 0")


def _validate_deployment(errs: FieldErrors, deploy: Obj) -> None:
    validate_object_meta(errs, deploy.get("metadata"), True, is_dns1123_subdomain)
    spec = deploy.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec", "")
        return
    for key in ("replicas", "minReadySeconds", "revisionHistoryLimit"):
        _nonnegative(errs, spec, key, "spec")
    _validate_selector_and_template(errs, spec, "deployment")
    _validate_strategy(errs, spec.get("strategy"))
    pds = spec.get("progressDeadlineSeconds")
    if pds is not None:
        if not isinstance(pds, int) or pds < 0:
            errs.invalid("spec.progressDeadlineSeconds", pds, "must be greater than or equal to 0")
        elif pds <= (spec.get("minReadySeconds") or 0):
            errs.invalid("spec.progressDeadlineSeconds", pds, "must be greater than minReadySeconds")


def _validate_replicaset(errs: FieldErrors, rs: Obj) -> None:
    validate_object_meta(errs, rs.get("metadata"), True, is_dns1123_subdomain)
    spec = rs.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec", "")
        return
    for key in ("replicas", "minReadySeconds"):
        _nonnegative(errs, spec, key, "spec")
    _validate_selector_and_template(errs, spec, "deployment")


def _validate_selector_update(errs: FieldErrors, obj: Obj, old: Obj) -> None:
    sel = (obj.get("spec") or {}).get("selector")
    old_sel = (old.get("spec") or {}).get("selector")
    if old_sel is not None and sel != old_sel:
        errs.invalid("spec.selector", label_selector_go(sel), "field is immutable")


# --- the rest of core/v1 and friends ---------------------------------------------------------------


def _validate_namespace(errs: FieldErrors, ns: Obj) -> None:
    validate_object_meta(errs, ns.get("metadata"), False, is_dns1123_label)
    for i, fin in enumerate((ns.get("spec") or {}).get("finalizers") or []):
        for msg in is_qualified_name(_str(fin)):
            errs.invalid(f"spec.finalizers[{i}]", fin, msg)


def _validate_node(errs: FieldErrors, node: Obj) -> None:
    validate_object_meta(errs, node.get("metadata"), False, is_dns1123_subdomain)
    spec = _obj(node.get("spec"))
    for i, cidr in enumerate(spec.get("podCIDRs") or []):
        try:
            ipaddress.ip_network(_str(cidr), strict=False)
        except ValueError:
            errs.invalid(f"spec.podCIDRs[{i}]", spec.get("podCIDRs"), "must be valid CIDR")
    taints_seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(_dicts(spec.get("taints"))):
        tp = f"metadata.taints[{i}]"
        for msg in is_qualified_name(_str(taint.get("key"))):
            errs.invalid(f"{tp}.key", _str(taint.get("key")), msg)
        effect = taint.get("effect")
        effects = ("NoSchedule", "PreferNoSchedule", "NoExecute")
        if not effect:
            errs.required(f"{tp}.effect", "")
        elif effect not in effects:
            errs.not_supported(f"{tp}.effect", effect, effects)
        key = (_str(taint.get("key")), _str(effect))
        if key in taints_seen:
            errs.duplicate(tp, GoValue(f"core.Taint{{Key:{go_quote(key[0])}, Effect:{go_quote(key[1])}}}"))
        taints_seen.add(key)


def _validate_data_keys(errs: FieldErrors, obj: Obj, fields: tuple[str, ...]) -> None:
    seen: dict[str, str] = {}
    for fname in fields:
        data = obj.get(fname)
        if not isinstance(data, dict):
            continue
        for key in data:
            for msg in is_config_map_key(key):
                errs.invalid(f"{fname}[{key}]", key, msg)
            if key in seen:
                errs.invalid(f"{fname}[{key}]", key, f"duplicate of key present in {seen[key]}")
            seen[key] = fname


def _immutable_data(errs: FieldErrors, obj: Obj, old: Obj, fields: tuple[str, ...]) -> None:
    if old.get("immutable") is not True:
        return
    if obj.get("immutable") is not True:
        errs.forbidden("immutable", "field is immutable when `immutable` is set")
    for fname in fields:
        if (obj.get(fname) or {}) != (old.get(fname) or {}):
            errs.forbidden(fname, "field is immutable when `immutable` is set")


def _validate_configmap(errs: FieldErrors, cm: Obj) -> None:
    validate_object_meta(errs, cm.get("metadata"), True, is_dns1123_subdomain)
    _validate_data_keys(errs, cm, ("data", "binaryData"))
    size = sum(len(k) + len(str(v)) for f in ("data", "binaryData") for k, v in (cm.get(f) or {}).items())
    if size > 1024 * 1024:
        errs.too_long("", 1024 * 1024)


_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def base64_error_offset(value: str) -> int | None:
    """Where Go's base64.StdEncoding gives up on value ("illegal base64 data at input byte N")."""
    body = value.rstrip("=")
    padding = len(value) - len(body)
    for i, ch in enumerate(body):
        if ch not in _B64:
            return i
    if padding > 2 or len(value) % 4:
        return len(value) - len(value) % 4 if len(value) % 4 else len(body)
    if padding and len(body) % 4 == 1:
        return len(body)
    return None


def _decode_secret_data(secret: Obj) -> None:
    """Secret.data values are base64; a bad one fails decoding (400) before validation."""
    for value in _obj(secret.get("data")).values():
        offset = base64_error_offset(value) if isinstance(value, str) else 0
        if offset is not None:
            raise StatusError(
                400, "BadRequest",
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data at input byte {offset}')


def _validate_secret(errs: FieldErrors, secret: Obj) -> None:
    _decode_secret_data(secret)
    validate_object_meta(errs, secret.get("metadata"), True, is_dns1123_subdomain)
    _validate_data_keys(errs, secret, ("data", "stringData"))
    stype = secret.get("type")
    if stype == "kubernetes.io/tls":
        for key in ("tls.crt", "tls.key"):
            if key not in (secret.get("data") or {}) and key not in (secret.get("stringData") or {}):
                errs.required(f"data[{key}]", "")
    elif stype == "kubernetes.io/dockerconfigjson":
        if ".dockerconfigjson" not in (secret.get("data") or {}) and ".dockerconfigjson" not in (
                secret.get("stringData") or {}):
            errs.required("data[.dockerconfigjson]", "")


def _validate_secret_update(errs: FieldErrors, secret: Obj, old: Obj) -> None:
    if secret.get("type", "Opaque") != old.get("type", "Opaque"):
        errs.invalid("type", secret.get("type"), "field is immutable")
    _immutable_data(errs, secret, old, ("data",))


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
                try:
                    parsed = ipaddress.ip_address(address)
                    ok = parsed.version == (4 if addr_type == "IPv4" else 6)
                except ValueError:
                    ok = False
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
    names: set[str] = set()
    for i, port in enumerate(_dicts(eps.get("ports"))):
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


def _validate_lease(errs: FieldErrors, lease: Obj) -> None:
    validate_object_meta(errs, lease.get("metadata"), True, is_dns1123_subdomain)
    spec = _obj(lease.get("spec"))
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        errs.invalid("spec.leaseDurationSeconds", duration, "must be greater than 0")
    transitions = spec.get("leaseTransitions")
    if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
        errs.invalid("spec.leaseTransitions", transitions, "must be greater than or equal to 0")


def _validate_event(errs: FieldErrors, event: Obj) -> None:
    validate_object_meta(errs, event.get("metadata"), True, is_dns1123_subdomain)
    involved = _obj(event.get("involvedObject"))
    ns = _str((event.get("metadata") or {}).get("namespace"))
    ins = _str(involved.get("namespace"))
    # Events about cluster-scoped objects live in "default" (or nowhere); others beside their object.
    if (not ins and ns not in ("", "default")) or (ins and ins != ns):
        errs.invalid("involvedObject.namespace", ins, "does not match event.namespace")
    etype = event.get("type")
    if etype and etype not in ("Normal", "Warning"):
        errs.not_supported("type", etype, ("Normal", "Warning"))


# --- dispatch --------------------------------------------------------------------------------------

Validator = Callable[[FieldErrors, Obj], None]
UpdateValidator = Callable[[FieldErrors, Obj, Obj], None]

# resource id -> (Kind, API group for the Status, create validator)
_CREATE: dict[str, tuple[str, str, Validator]] = {
    "services": ("Service", "", _validate_service),
    "pods": ("Pod", "", _validate_pod),
    "namespaces": ("Namespace", "", _validate_namespace),
    "nodes": ("Node", "", _validate_node),
    "configmaps": ("ConfigMap", "", _validate_configmap),
    "secrets": ("Secret", "", _validate_secret),
    "endpoints": ("Endpoints", "", _validate_endpoints),
    "events": ("Event", "", _validate_event),
    "endpointslices.discovery.k8s.io": ("EndpointSlice", "discovery.k8s.io", _validate_endpointslice),
    "deployments.apps": ("Deployment", "apps", _validate_deployment),
    "replicasets.apps": ("ReplicaSet", "apps", _validate_replicaset),
    "leases.coordination.k8s.io": ("Lease", "coordination.k8s.io", _validate_lease),
}

_UPDATE: dict[str, UpdateValidator] = {
    "services": _validate_service_update,
    "pods": _validate_pod_update,
    "deployments.apps": _validate_selector_update,
    "replicasets.apps": _validate_selector_update,
    "configmaps": lambda errs, obj, old: _immutable_data(errs, obj, old, ("data", "binaryData")),
    "secrets": _validate_secret_update,
    "endpointslices.discovery.k8s.io": lambda errs, obj, old: (
        errs.invalid("addressType", obj.get("addressType"), "field is immutable")
        if old.get("addressType") and obj.get("addressType") != old.get("addressType") else None),
}


def _kind_and_name(resource: str, obj: Obj) -> tuple[str, str, str]:
    kind, group, _ = _CREATE.get(resource, (str(obj.get("kind", "")), "", None))
    meta = _obj(obj.get("metadata"))
    name = _str(meta.get("name")) or _str(meta.get("generateName"))
    return kind, name, group


def validate_create(resource: str, obj: dict[str, Any]) -> None:
    """Raise a 422 Invalid StatusError listing every problem of a new object."""
    errs = FieldErrors()
    entry = _CREATE.get(resource)
    if entry is None:
        validate_object_meta(errs, obj.get("metadata"), True, is_dns1123_subdomain)
    else:
        entry[2](errs, obj)
    kind, name, group = _kind_and_name(resource, obj)
    errs.raise_if_any(kind, name, group)


def validate_update(resource: str, obj: dict[str, Any], old: dict[str, Any]) -> None:
    """validate_create's rules plus what may not change (immutable fields)."""
    errs = FieldErrors()
    validate_object_meta_update(errs, obj.get("metadata"), old.get("metadata"))
    entry = _CREATE.get(resource)
    if entry is not None:
        entry[2](errs, obj)
    updater = _UPDATE.get(resource)
    if updater is not None:
        updater(errs, obj, old)
    kind, name, group = _kind_and_name(resource, obj)
    errs.raise_if_any(kind, name, group)


# --- fieldValidation: unknown fields ---------------------------------------------------------------


def unknown_fields(resource: str, obj: dict[str, Any]) -> list[str]:
    """Fields of obj the published OpenAPI schema does not declare, as dotted paths with [i] indexes.

    For ?fieldValidation=Strict (raise strict_decoding_error) and Warn (one warning per field,
    with the text `unknown field "<path>"`); Ignore skips the check.
    """
    from .openapi import unknown_fields as schema_unknown_fields  # openapi imports patch; keep it lazy

    return schema_unknown_fields(resource, obj)


def strict_decoding_error(kind: str, version: str, fields: list[str]) -> StatusError:
    """The 400 the real server answers for unknown fields under fieldValidation=Strict."""
    listed = ", ".join(f'unknown field "{f}"' for f in fields)
    return StatusError(400, "BadRequest",
                       f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {listed}')



def decode_check(resource: str, obj: dict[str, Any]) -> None:
    """What the real server's JSON decoding rejects (400) before defaulting and validation."""
    from .openapi import type_error  # openapi imports patch; keep it lazy

    found = type_error(resource, obj)
    if found is None:
        spec = _obj(obj.get("spec"))
        pod_spec = spec if resource == "pods" else _obj(_obj(spec.get("template")).get("spec"))
        if resource not in ("pods", "deployments.apps", "replicasets.apps") or not bad_quantity(pod_spec):
            return
        found = QUANTITY_ERR
    kind = _str(obj.get("kind")) or _CREATE.get(resource, ("",))[0]
    version = _str(obj.get("apiVersion")).rsplit("/", 1)[-1] or "v1"
    raise StatusError(400, "BadRequest", f'{kind} in version "{version}" cannot be handled as a {kind}: {found}')

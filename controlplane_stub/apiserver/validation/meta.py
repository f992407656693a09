"""Object-level checks every kind shares: ObjectMeta, labels, annotations, label selectors, named ports.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .fielderrors import FieldErrors, GoValue, Obj, go_quote, go_repr
from .names import is_dns1123_label, is_label_value, is_qualified_name

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


# --- pods ------------------------------------------------------------------------------------------

PROTOCOLS = ("SCTP", "TCP", "UDP")


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


def _validate_protocol(errs: FieldErrors, protocol: Any, path: str) -> None:
    if not protocol:
        errs.required(path, "")
    elif protocol not in PROTOCOLS:
        errs.not_supported(path, protocol, PROTOCOLS)


# --- metav1.Condition lists (ValidateConditions) -----------------------------------------------

_CONDITION_STATUSES = ("False", "True", "Unknown")
_REASON_RE = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
_REASON_FMT = "[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?"


def validate_condition_reason(errs: FieldErrors, reason: Any, path: str, max_len: int = 1024) -> None:
    text = _str(reason)
    if len(text) > max_len:
        errs.too_long(path, max_len)
    elif not _REASON_RE.match(text):
        errs.invalid(path, reason, "a condition reason must start with alphabetic character, optionally followed "
                     "by a string of alphanumeric characters or '_,:', and must end with an alphanumeric character "
                     f"or '_' (e.g. 'my_name',  or 'MY_NAME',  or 'MyName',  or 'ReasonA,ReasonB',  or "
                     f"'ReasonA:ReasonB', regex used for validation is '{_REASON_FMT}')")


def validate_conditions(errs: FieldErrors, conditions: Any, path: str) -> None:
    seen: set[str] = set()
    for i, cond in enumerate(_dicts(conditions)):
        cp = f"{path}[{i}]"
        ctype = _str(cond.get("type"))
        if not ctype:
            errs.required(f"{cp}.type", "must be set")
        else:
            for msg in is_qualified_name(ctype):
                errs.invalid(f"{cp}.type", ctype, msg)
            if ctype in seen:
                errs.duplicate(f"{cp}.type", ctype)
            seen.add(ctype)
        status = cond.get("status")
        if status not in _CONDITION_STATUSES:
            errs.not_supported(f"{cp}.status", status, _CONDITION_STATUSES)
        generation = cond.get("observedGeneration")
        if isinstance(generation, int) and generation < 0:
            errs.invalid(f"{cp}.observedGeneration", generation, "must be greater than or equal to zero")
        if not cond.get("lastTransitionTime"):
            errs.required(f"{cp}.lastTransitionTime", "must be set")
        if not cond.get("reason"):
            errs.required(f"{cp}.reason", "must be set")
        else:
            validate_condition_reason(errs, cond["reason"], f"{cp}.reason")
        if len(_str(cond.get("message"))) > 32768:
            errs.too_long(f"{cp}.message", 32768)

"""labelSelector and fieldSelector parsing and matching, with the real server's syntax and errors."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import bad_request

Matcher = Callable[[dict[str, Any]], bool]

# key: optional DNS-subdomain prefix and a name segment; value: <= 63 chars of [A-Za-z0-9_.-].
_KEY = r"(?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE = r"(?:[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_KEY_RE = re.compile(_KEY + r"\Z")
_VALUE_RE = re.compile(_VALUE + r"\Z")


def _split_top(s: str) -> list[str]:
    """Split on commas outside parentheses (set-based requirements contain commas)."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _check_key(key: str, selector: str) -> None:
    if not _KEY_RE.match(key) or len(key.split("/")[-1]) > 63:
        raise bad_request(f'unable to parse requirement: invalid label key "{key}": in selector "{selector}"')


def _check_value(value: str, selector: str) -> None:
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise bad_request(f'unable to parse requirement: invalid label value: "{value}": in selector "{selector}"')


def _in(key: str, values: set[str], positive: bool) -> Matcher:
    def match(labels: dict[str, Any]) -> bool:
        return (labels.get(key) in values) == positive
    return match


def _equals(key: str, value: str, positive: bool) -> Matcher:
    def match(labels: dict[str, Any]) -> bool:
        return (labels.get(key) == value) == positive
    return match


def _exists(key: str, positive: bool) -> Matcher:
    def match(labels: dict[str, Any]) -> bool:
        return (key in labels) == positive
    return match


def _field_equals(path: tuple[str, ...], value: str, positive: bool) -> Matcher:
    def match(obj: dict[str, Any]) -> bool:
        return (_field(obj, path) == value) == positive
    return match


_SET_RE = re.compile(r"^(\S+)\s+(in|notin)\s*\((.*)\)$")


def parse_label_selector(selector: str) -> Matcher | None:
    """Returns a predicate over an object's labels dict, or None for "everything"."""
    if not selector.strip():
        return None
    reqs: list[Matcher] = []
    for term in _split_top(selector):
        m = _SET_RE.match(term)
        if m:
            key, op, vals = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            _check_key(key, selector)
            for v in vals:
                _check_value(v, selector)
            reqs.append(_in(key, vals, op == "in"))
            continue
        for op in ("!=", "==", "="):
            if op in term:
                key, _, value = term.partition(op)
                key, value = key.strip(), value.strip()
                _check_key(key, selector)
                _check_value(value, selector)
                reqs.append(_equals(key, value, op != "!="))
                break
        else:
            if term.startswith("!"):
                key = term[1:].strip()
                _check_key(key, selector)
                reqs.append(_exists(key, False))
            else:
                _check_key(term, selector)
                reqs.append(_exists(term, True))
    return lambda labels: all(r(labels) for r in reqs)


# Fields every resource supports plus the per-kind ones clients use (kubelet, kproxy, kubectl).
_FIELD_PATHS: dict[str, tuple[str, ...]] = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
    "spec.nodeName": ("spec", "nodeName"),
    "status.phase": ("status", "phase"),
    "spec.unschedulable": ("spec", "unschedulable"),
    "involvedObject.name": ("involvedObject", "name"),
    "involvedObject.kind": ("involvedObject", "kind"),
    "involvedObject.namespace": ("involvedObject", "namespace"),
    # kubectl describe pins the uid too, so events of an earlier object of the same name stay out.
    "involvedObject.uid": ("involvedObject", "uid"),
    "involvedObject.apiVersion": ("involvedObject", "apiVersion"),
    "involvedObject.resourceVersion": ("involvedObject", "resourceVersion"),
    "involvedObject.fieldPath": ("involvedObject", "fieldPath"),
    "reason": ("reason",),
    "reportingComponent": ("reportingComponent",),
    "source": ("source", "component"),
    "type": ("type",),
    "spec.serviceName": ("spec", "serviceName"),
}


def _field(obj: dict[str, Any], path: tuple[str, ...]) -> str:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(p)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(selector: str, kind: str) -> tuple[Matcher | None, str]:
    """Returns (predicate over the whole object or None, the exact metadata.name if pinned)."""
    if not selector.strip():
        return None, ""
    reqs: list[Matcher] = []
    pinned_name = ""
    for term in _split_top(selector):
        for op in ("!=", "==", "="):
            if op in term:
                field, _, value = term.partition(op)
                field, value = field.strip(), value.strip()
                break
        else:
            raise bad_request(f'invalid selector: \'{selector}\'; can\'t understand \'{term}\'')
        path = _FIELD_PATHS.get(field)
        if path is None:
            raise bad_request(f'field label not supported: {field}')
        if op != "!=" and field == "metadata.name":
            pinned_name = value
        reqs.append(_field_equals(path, value, op != "!="))
    return (lambda obj: all(r(obj) for r in reqs)), pinned_name


def object_matcher(label_selector: str, field_selector: str, kind: str) -> tuple[Matcher | None, str]:
    """One predicate over whole objects for both selectors (None when both are empty)."""
    lm = parse_label_selector(label_selector)
    fm, name = parse_field_selector(field_selector, kind)
    if lm is None and fm is None:
        return None, name
    if fm is None:
        assert lm is not None
        return (lambda o: lm((o.get("metadata") or {}).get("labels") or {})), name
    if lm is None:
        return fm, name
    return (lambda o: lm((o.get("metadata") or {}).get("labels") or {}) and fm(o)), name

"""Field errors as kube-apiserver reports them: field.ErrorList's reasons and Go's rendering of bad values.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..errors import invalid

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

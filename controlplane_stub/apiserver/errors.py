"""Kubernetes Status errors: every failed API request is answered with one of these."""
from __future__ import annotations

from typing import Any


class StatusError(Exception):
    """An API failure that renders as a meta/v1 Status object.

    reason is Kubernetes' StatusReason (NotFound, AlreadyExists, Conflict, Invalid, BadRequest,
    MethodNotAllowed, UnsupportedMediaType, Unauthorized, Forbidden, Expired, Gone, InternalError).
    """

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        kind: str = "",
        name: str = "",
        group: str = "",
        causes: list[dict[str, str]] | None = None,
        retry_after: int = 0,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.kind = kind
        self.name = name
        self.group = group
        self.causes = causes or []
        self.retry_after = retry_after

    def to_status(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        if self.name:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = self.causes
        if self.retry_after:
            details["retryAfterSeconds"] = self.retry_after
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if details:
            status["details"] = details
        return status


def not_found(kind_plural: str, name: str, group: str = "") -> StatusError:
    resource = f"{kind_plural}.{group}" if group else kind_plural
    return StatusError(404, "NotFound", f'{resource} "{name}" not found', kind=kind_plural, name=name, group=group)


def already_exists(kind_plural: str, name: str, group: str = "") -> StatusError:
    resource = f"{kind_plural}.{group}" if group else kind_plural
    return StatusError(
        409, "AlreadyExists", f'{resource} "{name}" already exists', kind=kind_plural, name=name, group=group
    )


def conflict(kind_plural: str, name: str, detail: str, group: str = "") -> StatusError:
    resource = f"{kind_plural}.{group}" if group else kind_plural
    return StatusError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": {detail}',
        kind=kind_plural,
        name=name,
        group=group,
    )


def invalid(kind: str, name: str, causes: list[dict[str, str]], group: str = "") -> StatusError:
    """422 Invalid with the real server's message shape: Kind "name" is invalid: field: msg, ..."""
    lines = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    unique = list(dict.fromkeys(lines))
    # Like utilerrors.Aggregate: one error prints bare, several print as "[a, b]".
    parts = unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"
    gk = f"{kind}.{group}" if group else kind
    return StatusError(
        422, "Invalid", f'{gk} "{name}" is invalid' + (f": {parts}" if unique else ""), kind=kind, name=name, group=group, causes=causes
    )


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def gone(message: str) -> StatusError:
    return StatusError(410, "Expired", message)

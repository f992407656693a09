"""Generic wire shapes of the Kubernetes API, for msgspec to decode straight into trimmed types.

Consumers (kproxy, kdns) declare their own trimmed object Structs with a `metadata: ObjectMeta`
field (or a subclass of it); these generics wrap them as lists and watch events. Only declared
fields are ever materialized: msgspec skips everything else while parsing (shared/DESIGN.md §2-3).
Field names are Python snake_case; `rename="camel"` maps them to the API's camelCase.
"""
from __future__ import annotations

from typing import Generic, TypeVar

import msgspec


class ObjectMeta(msgspec.Struct, rename="camel", gc=False):
    """metav1.ObjectMeta, trimmed to what controllers and proxies use (annotations excluded:
    they can be large, e.g. kubectl's last-applied-configuration; see AnnotatedObjectMeta)."""

    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    generation: int = 0
    labels: dict[str, str] = {}
    deletion_timestamp: str | None = None


class AnnotatedObjectMeta(ObjectMeta, rename="camel", gc=False):
    """ObjectMeta with annotations, for types that need one (EndpointSlice trigger times)."""

    annotations: dict[str, str] = {}


class ListMeta(msgspec.Struct, rename="camel", gc=False):
    resource_version: str = ""
    # `continue` is a Python keyword; the field is renamed explicitly.
    continue_: str = msgspec.field(default="", name="continue")
    remaining_item_count: int | None = None


T = TypeVar("T")  # a trimmed Struct, or dict[str, Any] for whole objects


class ObjectList(msgspec.Struct, Generic[T], rename="camel"):
    """Any `...List` response: items of the caller's trimmed type plus ListMeta."""

    metadata: ListMeta = msgspec.field(default_factory=ListMeta)
    items: list[T] | None = None  # the API may send null for an empty list


class WatchEvent(msgspec.Struct, Generic[T]):
    """One line of a watch stream with the object decoded as T (not usable for ERROR events,
    whose object is a Status; the Reflector decodes in two steps for that reason)."""

    type: str
    object: T


class RawWatchEvent(msgspec.Struct):
    """First decoding step of a watch line: the object is kept as raw bytes until `type` says
    what it is (T for ADDED/MODIFIED/DELETED, BookmarkObject for BOOKMARK, Status for ERROR)."""

    type: str
    object: msgspec.Raw


class BookmarkObject(msgspec.Struct, gc=False):
    """A BOOKMARK event's object: only metadata.resourceVersion is meaningful."""

    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)


class StatusCause(msgspec.Struct, gc=False):
    reason: str = ""
    message: str = ""
    field: str = ""


class StatusDetails(msgspec.Struct, rename="camel", gc=False):
    name: str = ""
    group: str = ""
    kind: str = ""
    causes: list[StatusCause] = []
    retry_after_seconds: int = 0


class Status(msgspec.Struct, gc=False):
    """metav1.Status: what the API server sends for errors (HTTP bodies and watch ERROR events)."""

    kind: str = "Status"
    status: str = ""
    message: str = ""
    reason: str = ""
    code: int = 0
    details: StatusDetails | None = None


def decode_status(body: bytes, http_code: int) -> Status:
    """Best-effort Status from an error body; a non-Status body (a proxy's HTML page) becomes
    a Status carrying the HTTP code and the start of the body."""
    try:
        status = msgspec.json.decode(body, type=Status)
        if status.kind == "Status":
            if not status.code:
                status.code = http_code
            return status
    except msgspec.DecodeError:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return Status(status="Failure", message=text or f"HTTP {http_code}", code=http_code)

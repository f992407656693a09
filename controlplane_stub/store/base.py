"""The storage interface the API server is written against.

It is shaped like etcd v3 so that an etcd backend fits behind it unchanged:
- keys are strings under "/registry/<resource>/<namespace>/<name>", listed by prefix;
- one global revision counts every write; each object records the revision of its last write
  (etcd's mod_revision) as metadata.resourceVersion;
- create/update/delete are compare-and-swap on that revision (etcd Txn with a mod_revision compare);
- reads can be pinned to an older revision as long as it has not been compacted (etcd's "rev");
- watch delivers every event after a revision, in revision order, or fails with Compacted when that
  revision is older than what the backend still remembers (etcd: ErrCompacted -> 410 Gone).

Values are Kubernetes objects as JSON dicts. The backend sets metadata.resourceVersion itself (it is
the only party that knows the revision of a write); an etcd backend would do what kube-apiserver
does: store the object without it and inject the mod_revision when decoding.
"""
from __future__ import annotations

import abc
import asyncio
import builtins
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

Obj = dict[str, Any]
log = logging.getLogger("kproxy.apiserver.store")

# Every store key starts with it (the docstring's "/registry/..."); etcd3 can put its own prefix in its place.
API_PREFIX = "/registry"


def resolve(fut: asyncio.Future[None]) -> None:
    """Wake whoever awaits fut, unless it is done already (woken, timed out or cancelled): the one
    callback for a waiter's timer and for the event that ends its wait."""
    if not fut.done():
        fut.set_result(None)


class StoreError(Exception):
    pass


class KeyExists(StoreError):
    """create() of a key that is already there."""


class KeyNotFound(StoreError):
    """update()/delete() of a key that is not there."""


class RevisionConflict(StoreError):
    """The compare part of a compare-and-swap failed: the object changed since expected_revision."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(f"{key}: expected revision {expected}, found {actual}")
        self.expected = expected
        self.actual = actual


class Compacted(StoreError):
    """The requested revision is older than the oldest one the backend still remembers."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(f"revision {requested} has been compacted (oldest available is {compacted + 1})")
        self.requested = requested
        self.compacted = compacted


class FutureRevision(StoreError):
    """A read pinned to a revision the store has not reached yet."""


def event_line(type_: str, value: bytes) -> bytes:
    """One watch event on the wire: {"type":TYPE,"object":VALUE} and a newline."""
    return b'{"type":"' + type_.encode() + b'","object":' + value + b"}\n"


class Event:
    """One write as watchers see it.

    line is the watch wire encoding ({"type":..,"object":..}\\n) made once when the event is created
    and shared by every watcher, however many there are. The event keeps only encoded bytes (the
    window holds thousands of events); obj and prev are decoded on demand, for selector matching.
    """

    __slots__ = ("key", "line", "prev_value", "revision", "type", "value")

    def __init__(self, revision: int, type_: str, key: str, value: bytes, prev_value: bytes | None,
                 line: bytes | None = None) -> None:
        self.revision = revision
        self.type = type_  # ADDED | MODIFIED | DELETED
        self.key = key
        self.value = value  # the stored encoding of the object after this write
        self.prev_value = prev_value  # ... and before it (None for ADDED)
        self.line = line if line is not None else event_line(type_, value)

    @property
    def obj(self) -> Obj:
        out: Obj = msgspec.json.decode(self.value)
        return out

    @property
    def prev(self) -> Obj | None:
        if self.prev_value is None:
            return None
        out: Obj = msgspec.json.decode(self.prev_value)
        return out

    def __repr__(self) -> str:
        return f"Event({self.revision}, {self.type}, {self.key})"


@dataclass(slots=True)
class ListResult:
    revision: int
    # (key, encoded JSON value): lists of thousands of objects are served by concatenating stored
    # bytes, decoding only when a selector must look inside.
    items: list[tuple[str, bytes]]
    more: bool = False  # limit was reached and there are keys after the last one returned


class Store(abc.ABC):
    """A revisioned key/value store for Kubernetes objects (see module doc)."""

    def __init__(self) -> None:
        # Called with every event the store applies: its own writes before they are acknowledged
        # and, on etcd, other API servers' writes when the mirror's watch delivers them.
        self.event_observers: builtins.list[Callable[[Event], None]] = []
        # Bumped when the current state was replaced without events (etcd's mirror relisted after
        # a compaction): what observers derived from events must be derived again.
        self.epoch = 0

    def notify(self, ev: Event) -> None:
        for observe in self.event_observers:
            try:
                observe(ev)
            except Exception:  # one observer's bug must not stop the store applying events
                log.exception("event=store_observer_failed key=%s", ev.key)

    @property
    @abc.abstractmethod
    def revision(self) -> int:
        """The current global revision (the last committed write)."""

    @property
    @abc.abstractmethod
    def compacted_revision(self) -> int:
        """Revisions <= this can no longer be read or watched from."""

    @abc.abstractmethod
    def get(self, key: str) -> Obj | None: ...

    @abc.abstractmethod
    def list(self, prefix: str, *, start_after: str = "", limit: int = 0, revision: int = 0) -> ListResult:
        """Objects whose key starts with prefix, in key order, optionally at an older revision."""

    # Writes are coroutines: a backend acknowledges a write only once it is durable, and may commit
    # writes that arrive together in one transaction (group commit) while the event loop serves reads.

    @abc.abstractmethod
    async def create(self, key: str, obj: Obj) -> Obj:
        """Store obj at key (KeyExists if present); returns obj with its resourceVersion set."""

    @abc.abstractmethod
    async def update(self, key: str, obj: Obj, expected_revision: int = 0) -> Obj:
        """Replace key's value; expected_revision 0 means unconditional (else RevisionConflict)."""

    @abc.abstractmethod
    async def delete(self, key: str, expected_revision: int = 0) -> Obj:
        """Delete key; returns the last value with the deletion revision as its resourceVersion."""

    @abc.abstractmethod
    def events_since(self, since_revision: int, max_events: int = 1000) -> builtins.list[Event]:
        """Up to max_events events with revision > since_revision, in revision order.

        Raises Compacted when events after since_revision are no longer remembered.
        """

    @abc.abstractmethod
    async def wait_for_events(self, after_revision: int, timeout: float, watchers: int = 1) -> bool:
        """Wait until revision > after_revision or timeout; True when new events exist.

        watchers: how many watch streams this wait serves (the watch hub's pump writes to many); a
        backend may batch wake-ups by it."""

    async def watch(self, prefix: str, since_revision: int) -> AsyncIterator[Event]:
        """Events after since_revision for keys under prefix, then live ones, until cancelled."""
        cursor = since_revision
        while True:
            events = self.events_since(cursor)
            for ev in events:
                cursor = ev.revision
                if ev.key.startswith(prefix):
                    yield ev
            if not events:
                await self.wait_for_events(cursor, 3600.0)

    def wake_watchers(self) -> None:
        """Make every wait_for_events() return now (used at shutdown to end watch streams)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the backend."""

    def close_sync(self) -> None:
        """Release what close() did not (it was not reached: the loop stopped first); safe after close()."""

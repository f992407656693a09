"""A keyed cache fed by a Reflector that reports changes as (old, new) pairs.

replace() after a relist diffs the new set against the cache, so handlers see exactly the
objects that appeared, changed or vanished while the watch was down (client-go's DeltaFIFO
Replace + Sync, without the queue: handlers run inline on the event loop).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)

# (old, new): old None for an add, new None for a delete.
Handler = Callable[["T | None", "T | None"], None]


def object_key(item: msgspec.Struct) -> str:
    """namespace/name (or name for cluster-scoped objects), client-go's MetaNamespaceKeyFunc.
    Interned: a store keeps it as long as the object exists, and a Service's key is also the key
    its EndpointSlices name (kproxy.server), one string instead of two per Service."""
    meta = getattr(item, "metadata", None)
    ns: str = getattr(meta, "namespace", "")
    name: str = getattr(meta, "name", "")
    return sys.intern(f"{ns}/{name}") if ns else name


class Informer(Generic[T]):
    """Implements ReflectorStore[T]; call handlers with (old, new) for every effective change."""

    def __init__(self, handler: Callable[[T | None, T | None], None] | None = None) -> None:
        self._items: dict[str, T] = {}
        self._handlers: list[Callable[[T | None, T | None], None]] = []
        if handler is not None:
            self._handlers.append(handler)
        self.resource_version = ""

    def add_handler(self, handler: Callable[[T | None, T | None], None]) -> None:
        self._handlers.append(handler)

    def _notify(self, old: T | None, new: T | None) -> None:
        for h in self._handlers:
            h(old, new)

    def replace(self, items: list[T], resource_version: str) -> None:
        fresh = {object_key(i): i for i in items}
        old_items = self._items
        self._items = fresh
        self.resource_version = resource_version
        for key, old in old_items.items():
            if key not in fresh:
                self._notify(old, None)
        for key, new in fresh.items():
            self._notify(old_items.get(key), new)

    def apply(self, event_type: str, item: T) -> None:
        key = object_key(item)
        old = self._items.get(key)
        if event_type == "DELETED":
            if key in self._items:
                del self._items[key]
            self._notify(old, None)
        else:
            self._items[key] = item
            self._notify(old, item)

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def keys(self) -> list[str]:
        return list(self._items)


class SummaryStore(Generic[T]):
    """A ReflectorStore that keeps only key -> a short summary string per object, not the
    objects: for consumers that turn each object into their own records at once (kproxy's
    trackers), holding 10,000 decoded EndpointSlices as well would double the memory.

    handler(key, old_summary, item): old_summary None for a new key; item None for a delete
    (including objects that vanished while the watch was down, found at relist)."""

    def __init__(self, handler: Callable[[str, str | None, T | None], None],
                 summary: Callable[[T], str] = lambda _: "") -> None:
        self._handler = handler
        self._summary = summary
        self._keys: dict[str, str] = {}
        self._listed: dict[str, str] = {}  # keys seen by the (re)list in progress
        self.resource_version = ""

    def replace(self, items: list[T], resource_version: str) -> None:
        self.begin_replace()
        self.replace_page(items)
        self.end_replace(resource_version)

    # PagedReflectorStore: the Reflector hands a list over page by page.
    def begin_replace(self) -> None:
        self._listed = {}

    def replace_page(self, items: list[T]) -> None:
        for item in items:
            key = object_key(item)
            summary = self._listed[key] = self._summary(item)
            old = self._keys.get(key)
            self._keys[key] = summary
            self._handler(key, old, item)

    def end_replace(self, resource_version: str) -> None:
        # Objects that vanished while we were not watching: deleted last, once the whole
        # snapshot is known.
        for key, summary in self._keys.items():
            if key not in self._listed:
                self._handler(key, summary, None)
        self._keys, self._listed = self._listed, {}
        self.resource_version = resource_version

    def apply(self, event_type: str, item: T) -> None:
        key = object_key(item)
        old = self._keys.get(key)
        if event_type == "DELETED":
            self._keys.pop(key, None)
            self._handler(key, old, None)
        else:
            self._keys[key] = self._summary(item)
            self._handler(key, old, item)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

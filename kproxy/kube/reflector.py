"""List+watch of one resource into a store, as client-go's Reflector (shared/DESIGN.md §3.1).

run(): a paginated consistent list handed to store.replace(), then a watch from the list's
resourceVersion with bookmarks; every event goes to store.apply(). A watch that ends (server
timeout, disconnect, 5xx) resumes from the last resourceVersion seen, after an exponential,
capped, jittered backoff when it failed; 410 Gone ("too old resource version", or an expired
continue token) relists. Objects are decoded straight into the caller's trimmed type (a msgspec
Struct), or into plain dicts (item_type dict) for a consumer that writes whole objects
back, as the control plane's controllers do. A store may be asynchronous: what its replace() and
apply() return is awaited before the next event is read.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import msgspec

from kproxy.kube.client import ApiClient, ApiError
from kproxy.kube.types import BookmarkObject, ListMeta, ObjectList, RawWatchEvent, Status

log = logging.getLogger("kproxy.reflector")

T = TypeVar("T")


class ReflectorStore(Protocol[T]):
    def replace(self, items: list[T], resource_version: str) -> Awaitable[None] | None:
        """After every (re)list: the complete current set."""

    def apply(self, event_type: str, item: T) -> Awaitable[None] | None:
        """One watch event: ADDED, MODIFIED or DELETED."""


@runtime_checkable
class PagedReflectorStore(Protocol[T]):
    """Optional extension of ReflectorStore: a store that takes a (re)list page by page, so the
    decoded objects of one page can be dropped before the next is fetched (at 10,000
    EndpointSlices, holding them all for one replace() is the process's memory peak).
    begin_replace(), replace_page() per page (all pages are one consistent snapshot), then
    end_replace(rv) once the list completed; a list that fails midway is simply begun again."""

    def begin_replace(self) -> None: ...

    def replace_page(self, items: list[T]) -> None: ...

    def end_replace(self, resource_version: str) -> None: ...


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; a fresh list is needed."""


class Backoff:
    """Exponential backoff, capped and jittered like client-go's (0.8 s doubling to 30 s,
    up to +100 % jitter); reset once things went well for `reset_after` seconds."""

    def __init__(self, initial: float = 0.8, cap: float = 30.0, factor: float = 2.0,
                 jitter: float = 1.0, reset_after: float = 120.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.initial, self.cap, self.factor, self.jitter = initial, cap, factor, jitter
        self.reset_after = reset_after
        self._rand = rand
        self._next = initial
        self._last_failure = float("-inf")

    def next_delay(self, now: float) -> float:
        if now - self._last_failure > self.reset_after:
            self._next = self.initial
        self._last_failure = now
        base = self._next
        self._next = min(self._next * self.factor, self.cap)
        return min(base * (1.0 + self.jitter * self._rand()), self.cap * (1.0 + self.jitter))

    def reset(self) -> None:
        self._next = self.initial


class _Identity(msgspec.Struct, rename="camel", gc=False):
    name: str = ""
    namespace: str = ""
    resource_version: str = ""


class _IdentityOnly(msgspec.Struct, gc=False):
    """What is read of an object that does not decode: just enough to key it."""

    metadata: _Identity = msgspec.field(default_factory=_Identity)


class _RawList(msgspec.Struct):
    metadata: ListMeta = msgspec.field(default_factory=ListMeta)
    items: list[msgspec.Raw] | None = None


# Errors after which a watch/list is retried from the last resourceVersion (the client's
# ProtocolError, a cut connection, is a ConnectionError).
_RETRYABLE = (asyncio.TimeoutError, ConnectionError, OSError, msgspec.DecodeError)


class Reflector(Generic[T]):
    def __init__(self, client: ApiClient, path: str, item_type: type[T], store: ReflectorStore[T], *,
                 label_selector: str = "", field_selector: str = "", page_size: int = 500,
                 bookmarks: bool = True, name: str = "",
                 min_watch_timeout: float = 300.0, backoff: Backoff | None = None,
                 on_undecodable: Callable[[], None] | None = None,
                 resume_from: str = "") -> None:
        """resume_from: a resourceVersion to watch from at once, without a first list (one the
        caller kept; a 410 relists as usual)."""
        self.client = client
        self.path = path
        self.item_type = item_type
        self.store = store
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.bookmarks = bookmarks
        self.name = name or path
        self.min_watch_timeout = min_watch_timeout
        self.backoff = backoff or Backoff()
        self.last_resource_version = resume_from
        self.lists = 0  # completed lists, for tests and logs
        self.undecodable = 0  # objects replaced by their identity stand-in
        self._on_undecodable = on_undecodable
        self._synced = asyncio.Event()
        self._list_decoder = msgspec.json.Decoder(ObjectList[item_type])  # type: ignore[valid-type]
        self._raw_list_decoder = msgspec.json.Decoder(_RawList)
        self._identity_decoder = msgspec.json.Decoder(_IdentityOnly)
        self._item_decoder = msgspec.json.Decoder(item_type)
        self._event_decoder = msgspec.json.Decoder(RawWatchEvent)
        self._bookmark_decoder = msgspec.json.Decoder(BookmarkObject)
        self._status_decoder = msgspec.json.Decoder(Status)

    def has_synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def _selectors(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        return params

    async def run(self) -> None:
        need_list = not self.last_resource_version
        gone_streak = 0  # 410s with no event in between: back off instead of relisting hot
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                if await self._watch():
                    gone_streak = 0
            except asyncio.CancelledError:
                raise
            except (Gone, ApiError, *_RETRYABLE) as err:
                if isinstance(err, Gone) or (isinstance(err, ApiError) and err.code == 410):
                    need_list = True
                    log.info("relisting reflector=%s reason=%s", self.name, err)
                    gone_streak += 1
                    if gone_streak == 1:
                        continue
                await self._sleep_backoff(err)

    async def _sleep_backoff(self, err: BaseException) -> None:
        delay = self.backoff.next_delay(time.monotonic())
        log.warning('reflector=%s error="%s: %s" retry_in=%.2fs resourceVersion=%s',
                    self.name, type(err).__name__, str(err) or "-", delay, self.last_resource_version)
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        # No resourceVersion: a consistent (quorum) read, paginated with limit/continue. An
        # expired continue token is a 410 and restarts the whole list.
        paged = self.store if isinstance(self.store, PagedReflectorStore) else None
        items: list[T] = []
        params = self._selectors()
        params["limit"] = str(self.page_size)
        rv = ""
        if paged is not None:
            paged.begin_replace()
        while True:
            body = await self.client.get(self.path, params)
            page = self._decode_list(body)
            del body
            if page.items:
                if paged is not None:
                    paged.replace_page(page.items)
                else:
                    items.extend(page.items)
            rv = page.metadata.resource_version
            if not page.metadata.continue_:
                break
            params["continue"] = page.metadata.continue_
            del page
        self.last_resource_version = rv
        if paged is not None:
            paged.end_replace(rv)
        elif (done := self.store.replace(items, rv)) is not None:
            await done
        self.lists += 1
        self._synced.set()

    async def _watch(self) -> int:
        """One watch request; returns how many events it delivered."""
        params = self._selectors()
        params["resourceVersion"] = self.last_resource_version
        # client-go picks a random timeout in [min, 2*min) so watches don't all end together.
        timeout_s = int(self.min_watch_timeout * (1.0 + random.random()))
        params["timeoutSeconds"] = str(timeout_s)
        if self.bookmarks:
            params["allowWatchBookmarks"] = "true"
        started = time.monotonic()
        events = 0
        async for line in self.client.watch(self.path, params, read_timeout=timeout_s + 30.0):
            try:
                ev = self._event_decoder.decode(line)
            except msgspec.DecodeError as err:
                # Not even a watch event: nothing in it can be applied, the stream goes on.
                log.warning("reflector=%s skipping a watch line that is not an event: %s", self.name, err)
                self._count_undecodable()
                continue
            events += 1
            if ev.type in ("ADDED", "MODIFIED", "DELETED"):
                item = self._decode_item(ev.object)
                if item is None:
                    continue
                rv = _resource_version(item)
                if (done := self.store.apply(ev.type, item)) is not None:
                    await done
                if rv:
                    self.last_resource_version = rv
            elif ev.type == "BOOKMARK":
                try:
                    rv = self._bookmark_decoder.decode(ev.object).metadata.resource_version
                except msgspec.DecodeError:
                    rv = ""  # a bookmark only saves a relist; a broken one is ignored
                if rv:
                    self.last_resource_version = rv
            elif ev.type == "ERROR":
                status = self._status_decoder.decode(ev.object)
                if status.code == 410 or status.reason in ("Expired", "Gone"):
                    raise Gone(status.message or "resourceVersion too old")
                raise ApiError(status, "WATCH", self.path)
            else:
                log.warning("reflector=%s unknown watch event type=%s", self.name, ev.type)
        if events:
            self.backoff.reset()
        elif time.monotonic() - started < 1.0:
            # A stream closed at once with nothing in it is a failure, not a timeout: back off
            # instead of spinning on a server that keeps hanging up.
            raise ConnectionError("watch closed immediately without events")
        return events

    def _decode_list(self, body: bytes) -> ObjectList[T]:
        try:
            return self._list_decoder.decode(body)
        except msgspec.ValidationError:
            pass  # valid JSON, some item of the wrong shape: decode item by item below
        raw = self._raw_list_decoder.decode(body)
        items = [item for item in (self._decode_item(r) for r in raw.items or ()) if item is not None]
        return ObjectList(metadata=raw.metadata, items=items)

    def _decode_item(self, raw: msgspec.Raw) -> T | None:
        """The object as T; if it does not decode, its identity stand-in (see the module
        docstring); None (skipped, logged) if not even its metadata can be read."""
        try:
            return self._item_decoder.decode(raw)
        except msgspec.DecodeError as err:
            error = str(err)
        self._count_undecodable()
        try:
            ident = self._identity_decoder.decode(raw).metadata
            stand_in = self._item_decoder.decode(msgspec.json.encode(_IdentityOnly(ident)))
        except msgspec.DecodeError:
            log.warning("reflector=%s skipping an object whose metadata cannot be read: %s", self.name, error)
            return None
        log.warning("reflector=%s object=%r resourceVersion=%s cannot be decoded, skipping its content: %s",
                    self.name, _short(f"{ident.namespace}/{ident.name}" if ident.namespace else ident.name),
                    _short(ident.resource_version), error)
        return stand_in

    def _count_undecodable(self) -> None:
        self.undecodable += 1
        if self._on_undecodable is not None:
            self._on_undecodable()


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resource_version(item: object) -> str:
    if isinstance(item, dict):
        meta: Any = item.get("metadata")
        rv = meta.get("resourceVersion", "") if isinstance(meta, dict) else ""
    else:
        rv = getattr(getattr(item, "metadata", None), "resource_version", "")
    return rv if isinstance(rv, str) else ""

"""Watch streams: initial state, replay from the event window, live events, bookmarks, timeouts.

Each stream keeps only a cursor (the last revision it has looked at). Events are read from the
store's shared window and written as their pre-encoded line; a line is re-encoded only when a
selector turns a MODIFIED into ADDED/DELETED for this watcher (the object entered/left its view).

Fan-out: a stream that has caught up and needs no per-watcher encoding (no selector, no Table)
goes "live": its task sleeps and one pump task writes each batch of new events to every live
stream's transport directly, the HTTP chunk built once per (cursor, prefix, name) and shared by
all of them (upstream's watch cache encodes an event once per format likewise). Waking 50 tasks
per batch, each with its own read of the window, join, chunk framing and writer bookkeeping, was
the top of the profile (bench/README.md, etcd). The pump writes chunks of about limits.SEND_PIECE
(a burst goes out in several rounds) and only while the transport's buffer is below
limits.SEND_HIGH_WATER; otherwise (a full buffer, one event larger than a piece, Compacted, a
closed transport, a bookmark or timeout due) it hands the stream back to its task,
which goes on from the stream's cursor with the bounded, timed send() as before: a slow watcher is
still closed after --send-timeout, and order holds because only one of the two writes at a time.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import msgspec
from aiohttp import web

from ..store.base import Compacted, Event, Store, event_line, resolve
from . import limits
from .resources import Resource
from .selectors import Matcher

log = logging.getLogger("kproxy.apiserver.watch")
_encode = msgspec.json.encode
# Longest idle wait before checking whether the client has gone (handlers are not cancelled on
# disconnect, so a quiet watch notices a dead client only here or on its next write).
_IDLE_CHECK = 15.0
# Events the pump reads per cursor and round (more: it goes round again at once).
_FAN_OUT_EVENTS = 2000


class _Live:
    """A caught-up stream that the pump writes to; its task waits on `wake`."""

    __slots__ = ("cursor", "exact_key", "prefix", "transport", "wake")

    def __init__(self, cursor: int, prefix: str, exact_key: str, transport: asyncio.Transport,
                 wake: asyncio.Future[None]) -> None:
        self.cursor = cursor  # every event up to here has been written to this stream
        self.prefix = prefix
        self.exact_key = exact_key
        self.transport = transport
        self.wake = wake


@dataclass(slots=True)
class WatchRequest:
    res: Resource
    prefix: str
    exact_key: str  # watch of a single object (/watch/.../NAME or fieldSelector metadata.name=)
    matcher: Matcher | None
    resource_version: str
    send_initial_events: bool | None
    allow_bookmarks: bool
    timeout_seconds: float
    # kubectl get -w asks for meta.k8s.io Tables: then every event's object is a one-row Table
    # (value = includeObject); None for plain objects.
    table_include: str | None = None


def _error_line(code: int, reason: str, message: str) -> bytes:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
              "reason": reason, "code": code}
    return b'{"type":"ERROR","object":' + _encode(status) + b"}\n"


def _bookmark_line(res: Resource, revision: int, initial_end: bool = False) -> bytes:
    meta: dict[str, object] = {"resourceVersion": str(revision)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    obj = {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}
    return b'{"type":"BOOKMARK","object":' + _encode(obj) + b"}\n"


class WatchHub:
    def __init__(self, store: Store, bookmark_interval: float, min_request_timeout: float, *,
                 send_timeout: float = limits.DEFAULT_SEND_TIMEOUT,
                 on_slow_watcher: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.bookmark_interval = bookmark_interval
        self.min_request_timeout = min_request_timeout
        self.send_timeout = send_timeout
        self.on_slow_watcher = on_slow_watcher
        self.stopping = False
        self.active = 0
        self.terminated = 0
        self._live: dict[int, _Live] = {}
        self._pump: asyncio.Task[None] | None = None
        self.pumped = 0  # events written by the pump (all streams), for tests and metrics

    def stop(self) -> None:
        self.stopping = True
        for w in list(self._live.values()):
            self._hand_back(w)
        self.store.wake_watchers()

    # -- live streams: one pump writes each batch to all of them --------------------------------

    def _hand_back(self, w: _Live) -> None:
        self._live.pop(id(w), None)
        resolve(w.wake)

    @staticmethod
    def _chunk(evs: list[Event], prefix: str, exact: str) -> tuple[bytes, int, int, bool]:
        """The HTTP chunk of the events a stream wants, cut after about limits.SEND_PIECE bytes (never
        inside one revision: the stream's cursor is the last revision in it): (chunk, events, last
        revision, cut). A first event larger than a piece makes a larger chunk; the stream's task
        sends that one."""
        lines: list[bytes] = []
        size, last, prev = 0, evs[0].revision, -1
        for ev in evs:
            rev = ev.revision
            wanted = ev.key.startswith(prefix) and (not exact or ev.key == exact)
            if rev != prev and size and size + (len(ev.line) if wanted else 0) > limits.SEND_PIECE:
                return b"%x\r\n%b\r\n" % (size, b"".join(lines)), len(lines), last, True
            if wanted:
                lines.append(ev.line)
                size += len(ev.line)
            last = prev = rev
        # One HTTP/1.1 chunk, as aiohttp's chunked writer frames it.
        return (b"%x\r\n%b\r\n" % (size, b"".join(lines)) if lines else b""), len(lines), last, False

    def _fan_out(self) -> bool:
        """Writes the new events to every live stream; True when there is more to write at once."""
        store = self.store
        read: dict[int, list[Event]] = {}
        chunks: dict[tuple[int, str, str], tuple[bytes, int, int, bool]] = {}
        more = False
        for w in list(self._live.values()):
            transport = w.transport
            if transport.is_closing():
                self._hand_back(w)
                continue
            cursor = w.cursor
            evs = read.get(cursor)
            if evs is None:
                try:
                    evs = store.events_since(cursor, _FAN_OUT_EVENTS)
                except Compacted:
                    self._hand_back(w)  # its task answers 410
                    continue
                read[cursor] = evs
                more = more or len(evs) >= _FAN_OUT_EVENTS
            if not evs:
                continue
            k = (cursor, w.prefix, w.exact_key)
            got = chunks.get(k)
            if got is None:
                got = chunks[k] = self._chunk(evs, w.prefix, w.exact_key)
            chunk, n, last, cut = got
            if chunk:
                if len(chunk) > limits.SEND_PIECE + 16 or transport.get_write_buffer_size() >= limits.SEND_HIGH_WATER:
                    self._hand_back(w)  # its task sends in pieces, waiting (bounded) for the client
                    continue
                transport.write(chunk)
                self.pumped += n
            w.cursor = last
            more = more or cut
        return more

    async def _run_pump(self) -> None:
        try:
            while not self.stopping and self._live:
                if self._fan_out():
                    await asyncio.sleep(0)  # more to write: the clients' reads and the writers go first
                else:
                    await self.store.wait_for_events(self.store.revision, _IDLE_CHECK, len(self._live))
        except Exception:  # never leave a stream waiting on a pump that died
            log.exception("event=watch_pump_failed")
            for w in list(self._live.values()):
                self._hand_back(w)

    async def _wait_live(self, wr: WatchRequest, transport: asyncio.Transport, cursor: int, timeout: float) -> int:
        """Waits up to timeout as a live stream; returns the stream's cursor after the pump's writes."""
        try:
            if self.store.events_since(cursor, 1):
                return cursor  # events came while this stream was writing: its task sends them
        except Compacted:
            return cursor
        loop = asyncio.get_running_loop()
        w = _Live(cursor, wr.prefix, wr.exact_key, transport, loop.create_future())
        self._live[id(w)] = w
        if self._pump is None or self._pump.done():
            self._pump = loop.create_task(self._run_pump(), name="watch-pump")
        timer = loop.call_later(timeout, resolve, w.wake)
        try:
            await w.wake
        finally:
            timer.cancel()
            self._live.pop(id(w), None)
        return w.cursor

    @staticmethod
    def _encode_out(wr: WatchRequest, lines: Iterable[bytes]) -> Iterator[bytes]:
        if wr.table_include is None:
            yield from lines
            return
        from . import semantics

        for line in lines:
            ev = msgspec.json.decode(line)
            if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                table = semantics.to_table(wr.res.id, [ev["object"]], wr.table_include)
                table.setdefault("metadata", {})["resourceVersion"] = ev["object"]["metadata"].get(
                    "resourceVersion", "")
                ev["object"] = table
            yield _encode(ev) + b"\n"

    async def _send(self, resp: web.StreamResponse, wr: WatchRequest, lines: Iterable[bytes]) -> None:
        """Lines go out in pieces of about 32 KiB: never one buffer per watcher for a whole state."""
        for piece in limits.pieces(self._encode_out(wr, lines)):
            await limits.send(resp, piece, self.send_timeout)

    async def serve(self, request: web.BaseRequest, wr: WatchRequest) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                       "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        limits.cap_send_buffer(request)
        await resp.prepare(request)
        self.active += 1
        try:
            await self._stream(request, resp, wr)
        except limits.SlowClient:
            # As the watch cache's cacheWatcher: a watcher that does not keep up is closed (the
            # client relists or resumes) instead of the server buffering for it.
            self.terminated += 1
            if self.on_slow_watcher is not None:
                self.on_slow_watcher(wr.res.id)
            log.info("event=slow_watcher_closed resource=%s prefix=%s", wr.res.id, wr.prefix)
            limits.disconnect(request)
        except (ConnectionError, asyncio.CancelledError):  # the client went away (aiohttp raises bare ConnectionError)
            pass
        finally:
            self.active -= 1
        return resp

    async def _stream(self, request: web.BaseRequest, resp: web.StreamResponse, wr: WatchRequest) -> None:
        store = self.store
        timeout = wr.timeout_seconds or self.min_request_timeout * (1 + random.random())
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + self.bookmark_interval
        m = wr.matcher
        rv = wr.resource_version
        initial = wr.send_initial_events if wr.send_initial_events is not None else rv in ("", "0")
        if initial:
            cursor = store.revision
            # References to the store's values; each ADDED line is made when its piece is sent.
            items = store.list(wr.prefix).items

            def initial_lines() -> Iterator[bytes]:
                for key, value in items:
                    if wr.exact_key and key != wr.exact_key:
                        continue
                    if m is not None and not m(msgspec.json.decode(value)):
                        continue
                    yield event_line("ADDED", value)
                if wr.send_initial_events and wr.allow_bookmarks:
                    yield _bookmark_line(wr.res, cursor, initial_end=True)

            await self._send(resp, wr, initial_lines())
            del items
        else:
            try:
                cursor = int(rv)
            except ValueError:
                await self._send(resp, wr, [_error_line(400, "BadRequest", f"invalid resource version: {rv!r}")])
                return
        while not self.stopping:
            try:
                events = store.events_since(cursor, 2000)
            except Compacted as e:
                await self._send(resp, wr, [_error_line(410, "Expired",
                                                       f"too old resource version: {cursor} ({e.compacted + 1})")])
                return
            out: list[bytes] = []
            for ev in events:
                cursor = ev.revision
                if not ev.key.startswith(wr.prefix) or (wr.exact_key and ev.key != wr.exact_key):
                    continue
                if m is None:
                    out.append(ev.line)
                    continue
                now_in = m(ev.obj)
                if ev.type == "MODIFIED":
                    prev = ev.prev
                    was_in = prev is not None and m(prev)
                    if now_in and was_in:
                        out.append(ev.line)
                    elif now_in:
                        out.append(event_line("ADDED", ev.value))
                    elif was_in:
                        out.append(event_line("DELETED", ev.value))
                elif now_in:
                    out.append(ev.line)
            if out:
                await self._send(resp, wr, out)
            if events:
                continue
            now = time.monotonic()
            if now >= deadline:
                return
            if wr.allow_bookmarks and now >= next_bookmark:
                await self._send(resp, wr, [_bookmark_line(wr.res, cursor)])
                next_bookmark = now + self.bookmark_interval
            wait = min(deadline - now, _IDLE_CHECK)
            if wr.allow_bookmarks:
                wait = min(wait, max(next_bookmark - now, 0.0))
            transport = request.transport
            if m is None and wr.table_include is None and transport is not None and not transport.is_closing():
                cursor = await self._wait_live(wr, transport, cursor, wait)
            else:
                await store.wait_for_events(cursor, wait)
            transport = request.transport
            if transport is None or transport.is_closing():
                return  # the client went away while nothing was written

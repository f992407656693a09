"""The etcd3 store: kube-apiserver's storage/etcd3 semantics on a real etcd cluster.

- resourceVersion is etcd's revision: an object's is the mod_revision of its key, a list's the
  revision it was read at. Objects are stored without metadata.resourceVersion (the revision is not
  known before the write commits); it is put in when an object is read back, as upstream's versioner.
- create/update/delete are single etcd transactions: create compares create_revision == 0, update
  and delete compare mod_revision == the expected revision (or the key's existence when none is
  expected). A failed compare is KeyExists / RevisionConflict / KeyNotFound, i.e. 409 or 404, and
  nothing is written; etcd's consensus decides between API servers racing on one key.
- Every API server keeps a mirror of its prefix in memory, fed by one etcd watch (upstream's watch
  cache): gets and lists are served from it, and so is every client watch. The mirror starts at an
  older revision (up to --watch-cache-size revisions back) and replays etcd's history from there, so
  a client that resumes a watch after this server restarted gets the events it missed, not a 410.
  A write is acknowledged once etcd committed it AND the mirror has applied its revision, so the
  writer's next read on this server sees it; a failed compare first waits for the mirror to reach
  the revision etcd answered at (a watch progress request), so a retry reads the newer object.
- Events older than the window (--watch-cache-size events) or than the last compaction get
  Compacted (410 Gone); a list pinned to an older revision (continue tokens) is rebuilt from the
  window (each key's value then is its current one or the previous value of its first later event).
- Compaction as upstream's compactor: every --etcd-compaction-interval one server wins a
  compare-and-swap on the version of <prefix>/compact_rev_key and compacts etcd at the revision
  the previous round recorded, so one interval of history always survives.

The mirror is eventually consistent with etcd (a write through another API server shows up here
after the watch delivered it, typically within milliseconds); every write is linearizable, because
the compare runs inside etcd.
"""
from __future__ import annotations

import asyncio
import bisect
import builtins
import heapq
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from .base import (
    API_PREFIX,
    Compacted,
    Event,
    FutureRevision,
    KeyExists,
    KeyNotFound,
    ListResult,
    Obj,
    RevisionConflict,
    Store,
    StoreError,
    resolve,
)
from .etcd_client import (
    KV,
    Cmp,
    Delete,
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    Get,
    Op,
    Put,
    Watch,
    WatchEvent,
    cmp_create,
    cmp_mod,
    cmp_version,
    prefix_end,
)
from .sortedkeys import SortedKeys
from .window import EventWindow

log = logging.getLogger("kproxy.apiserver.etcd")
_encode = msgspec.json.encode
_decode = msgspec.json.decode

# Keys under the prefix that are not API objects (allocator reservations, API server leases, the
# compactor's key): the mirror does not hold them.
INTERNAL = ("/ranges/", "/masterleases/", "/compact_rev_key")
WRITE_WAIT = 30.0  # how long a committed write waits for the mirror before it is acknowledged anyway
SYNC_WAIT = 5.0
# Watchers are woken at most once per WAKE_DELAY seconds while events stream in: the events of
# several etcd watch responses reach each client in one write (the SQLite store batches alike,
# by group commit). 50 watchers, 32 writers, load 12: 2,763 events/s woken per turn, 6,431 with 5 ms.
# Every woken watcher costs one TLS write and syscall, the top of a profile of the 50-watcher
# fan-out, and that CPU is taken from the creates that make the events: so the delay grows with
# the watchers that will be woken, up to WAKE_DELAY_MAX (50 watchers: 25 ms; bench/README.md etcd).
WAKE_DELAY = 0.005
WAKE_DELAY_PER_WATCHER = 0.0004
WAKE_DELAY_MAX = 0.025
# A batch waits for more events only while they keep coming: when the stream pauses for WAKE_QUIET
# (or twice its recent gap between etcd watch responses, if longer), the batch goes out then, not
# at the end of the delay (the last events of a burst reached the watchers up to 25 ms late), but
# never sooner than WAKE_MIN_SHARE of the delay after the last wake-up: a stream with regular
# pauses is woken at most 1/WAKE_MIN_SHARE times as often as by the delay alone.
WAKE_QUIET = 0.002
WAKE_MIN_SHARE = 1 / 3


class ReservationConflict(StoreError):
    """A write hook's reservation key was taken by another writer (another API server's allocation)."""

    def __init__(self, key: str, taken: list[str]) -> None:
        super().__init__(f"{key}: reserved values taken by another writer: {', '.join(taken)}")
        self.taken = taken  # reservation names (keys below the prefix)


class WriteHook(Protocol):
    """Extra compares and ops committed in the same transaction as a write (the allocators keep
    their state in etcd this way: apiserver/allocators.py EtcdReservations)."""

    def ops(self, key: str, new: Obj | None, old: Obj | None) -> tuple[list[Cmp], list[Op], list[bytes]]:
        """(compares, ops, reservation keys: a failed compare on one is a ReservationConflict)."""

    def retry(self, obj: Obj, old: Obj | None, taken: list[str]) -> None:
        """Change obj so that it no longer needs the taken reservations (or raise)."""


RESERVATION_ATTEMPTS = 16


class SparseWindow(EventWindow):
    """The events watchers read, ordered by revision; unlike EventWindow's ring, revisions may have
    gaps (etcd's revision counts writes to every key, also other prefixes and the internal keys).
    wake() and wait() are EventWindow's."""

    def __init__(self, capacity: int, floor: int) -> None:  # not EventWindow.__init__: no ring
        if capacity < 1:
            raise ValueError("event window capacity must be >= 1")
        self.capacity = capacity
        self.floor = floor  # every event after this revision is held
        self._events: list[Event] = []
        self._revs: list[int] = []
        self._off = 0
        self._wakeup = asyncio.Event()
        self._wake_pending = False
        self._last_wake = float("-inf")  # loop time of the last wake_soon() wake-up
        self._last_batch = float("-inf")  # loop time of the last wake_soon() call
        self._gap = 0.0  # the recent gap between wake_soon() calls (moving average, seconds)
        self._wake_timer: asyncio.Handle | None = None  # the wake-up due (end of the delay or of this turn)
        self._quiet_timer: asyncio.TimerHandle | None = None  # the next look for a pause
        self.waiting = 0  # watch streams blocked in wait() (or served by one that is): the next wake-up writes to them

    @property
    def last(self) -> int:  # type: ignore[override]  # EventWindow's plain attribute, derived here
        return self._revs[-1] if len(self._revs) > self._off else self.floor

    @property
    def oldest_replayable(self) -> int:
        return self.floor

    def append(self, ev: Event, wake: bool = True) -> None:
        if ev.revision < self.last:
            raise ValueError(f"event window: revision {ev.revision} after {self.last}")
        self._events.append(ev)
        self._revs.append(ev.revision)
        if len(self._revs) - self._off > self.capacity:
            self.raise_floor(self._revs[self._off])
        if wake:
            self.wake()

    def wake_delay(self) -> float:
        return min(WAKE_DELAY_MAX, WAKE_DELAY + WAKE_DELAY_PER_WATCHER * self.waiting)

    def wake_soon(self) -> None:
        """At most one wake-up per wake_delay(): every watcher runs once per batch of etcd watch
        responses while events stream in, not once per event. The first events after a quiet
        wake_delay() go out at the end of this loop turn: a lone write reaches its watchers without
        waiting for a batch that is not coming; and a batch goes out when the stream pauses
        (WAKE_QUIET, WAKE_MIN_SHARE), not only at the end of the delay."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._gap += (min(now - self._last_batch, WAKE_DELAY_MAX) - self._gap) * 0.25
        self._last_batch = now
        if self._wake_pending:
            return
        self._wake_pending = True
        delay = self.wake_delay()
        due = self._last_wake + delay
        if due <= now:
            self._wake_timer = loop.call_soon(self._wake_now)
            return
        self._wake_timer = loop.call_at(due, self._wake_now)
        # The first look as early as a pause could end the batch; it looks again as long as events come.
        self._quiet_timer = loop.call_at(max(now + WAKE_QUIET, self._last_wake + delay * WAKE_MIN_SHARE),
                                         self._look_for_pause)

    def _quiet(self) -> float:
        return max(WAKE_QUIET, 2 * self._gap)

    def _look_for_pause(self) -> None:
        """While a wake-up waits for its delay: wake now if no events came for _quiet(), else look again then."""
        self._quiet_timer = None
        if not self._wake_pending:
            return
        loop = asyncio.get_running_loop()
        again = self._last_batch + self._quiet()
        if again <= loop.time():
            self._wake_now()
        else:
            self._quiet_timer = loop.call_at(again, self._look_for_pause)

    async def wait(self, after_revision: int, timeout: float, watchers: int = 1) -> bool:
        self.waiting += watchers
        try:
            return await super().wait(after_revision, timeout)
        finally:
            self.waiting -= watchers

    def _wake_now(self) -> None:
        for timer in (self._wake_timer, self._quiet_timer):
            if timer is not None:
                timer.cancel()  # (the one running now: cancelling it is a no-op)
        self._wake_timer = self._quiet_timer = None
        self._wake_pending = False
        self._last_wake = asyncio.get_running_loop().time()
        self.wake()

    def raise_floor(self, revision: int) -> None:
        """Forget events at or before revision (window size reached, or etcd compacted them)."""
        if revision <= self.floor:
            return
        self.floor = revision
        self._off = bisect.bisect_right(self._revs, revision, lo=self._off)
        if self._off > self.capacity or self._off > 4096:
            del self._events[:self._off]
            del self._revs[:self._off]
            self._off = 0

    def reset(self, floor: int) -> None:
        self._events, self._revs, self._off, self.floor = [], [], 0, floor
        self.wake()

    def since(self, since_revision: int, max_events: int = 1000) -> list[Event]:
        if since_revision < self.floor:
            raise Compacted(since_revision, self.floor)
        revs = self._revs
        i = bisect.bisect_right(revs, since_revision, lo=self._off)
        j = min(len(revs), i + max_events)
        while 0 < j < len(revs) and revs[j] == revs[j - 1]:
            j += 1  # never split one revision (a multi-key transaction) between two reads
        return self._events[i:j]


def parse_duration(text: str) -> float:
    """A Go duration as kube-apiserver's flags take it (5m, 30s, 1m30s, 500ms, 0) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    s = text.strip()
    if s in ("0", ""):
        return 0.0
    total, num, i = 0.0, "", 0
    while i < len(s):
        c = s[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if s.startswith("ms", i) else c
        if unit not in units or not num:
            raise ValueError(f"invalid duration {text!r}: want e.g. 5m, 30s, 1m30s")
        total += float(num) * units[unit]
        num, i = "", i + len(unit)
    if num:
        try:
            total += float(num)  # a bare number: seconds
        except ValueError:
            raise ValueError(f"invalid duration {text!r}") from None
    return total


class EtcdStore(Store):
    def __init__(self, client: EtcdClient, *, prefix: str = API_PREFIX, window: int = 10000,
                 compaction_interval: float = 300.0) -> None:
        super().__init__()
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.client = client
        self.prefix = prefix
        self._eprefix = (prefix + "/").encode()
        self._eend = prefix_end(self._eprefix)
        self._window_size = window
        self._compaction_interval = compaction_interval
        self._cache: dict[str, tuple[int, bytes]] = {}
        self._keys = SortedKeys()  # the cache's keys in order (lists, continue tokens)
        self._rev = 0
        self._window = SparseWindow(window, 0)
        # Writers waiting for the mirror to reach their revision, by revision (a heap): each is
        # woken once, when its revision is applied, not on every event (64 writers x every event).
        self._rev_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: Watch | None = None
        self._closed = False
        self.write_hooks: list[WriteHook] = []
        self.compactions = 0

    # -- keys ----------------------------------------------------------------------------------

    def ekey(self, key: str) -> bytes:
        """etcd key of a store key ("/registry/services/ns/name" -> PREFIX/services/ns/name)."""
        if not key.startswith(API_PREFIX + "/"):
            raise ValueError(f"store key outside {API_PREFIX}/: {key!r}")
        return (self.prefix + key[len(API_PREFIX):]).encode()

    def internal_key(self, suffix: str) -> bytes:
        return self._eprefix + suffix.encode()

    def _skey(self, ekey: bytes) -> str | None:
        rest = ekey[len(self._eprefix) - 1:].decode("utf-8", "replace")
        if rest.startswith(INTERNAL):
            return None
        return API_PREFIX + rest

    # -- start: load the mirror and follow etcd ------------------------------------------------

    async def start(self) -> None:
        head = await self.client.range(self._eprefix, self._eend, count_only=True)
        start = max(1, head.revision - self._window_size)
        try:
            kvs = await self._load(start)
        except EtcdCompacted:
            start = head.revision
            kvs = await self._load(start)
        self._install(kvs, start)
        self._tasks.append(asyncio.create_task(self._follow(), name="etcd-mirror"))
        await self._sync(head.revision, timeout=60.0)
        if self._compaction_interval > 0:
            self._tasks.append(asyncio.create_task(self._compactor(), name="etcd-compactor"))
        log.info("event=etcd_store_ready endpoints=%s prefix=%s revision=%d objects=%d replayed_from=%d",
                 ",".join(self.client.endpoints), self.prefix or "/", self._rev, len(self._cache), start)

    async def _load(self, revision: int) -> list[KV]:
        out: list[KV] = []
        key = self._eprefix
        while True:
            page = await self.client.range(key, self._eend, limit=1000, revision=revision)
            out.extend(page.kvs)
            if not page.more or not page.kvs:
                return out
            key = page.kvs[-1].key + b"\x00"

    def _install(self, kvs: list[KV], revision: int) -> None:
        cache: dict[str, tuple[int, bytes]] = {}
        for kv in kvs:
            skey = self._skey(kv.key)
            if skey is None:
                continue
            value = self._with_rv(skey, kv.value, kv.mod_revision)
            if value is not None:
                cache[skey] = (kv.mod_revision, value)
        self._cache = cache
        self._keys = SortedKeys(cache)
        self._rev = revision
        self.epoch += 1
        self._window.reset(revision)
        self._bump()

    @staticmethod
    def _with_rv(key: str, value: bytes, revision: int) -> bytes | None:
        """The stored object with metadata.resourceVersion = revision; None (logged) if it is not an object."""
        try:
            obj = _decode(value)
        except msgspec.DecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
            log.warning("event=etcd_bad_value key=%s bytes=%d (not a JSON object; skipped)", key, len(value))
            return None
        obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
        return _encode(obj)

    async def _follow(self) -> None:
        """The mirror's etcd watch, re-established from the last applied revision when it breaks."""
        backoff = 0.1
        while not self._closed:
            try:
                self._watch = self.client.watch(self._eprefix, self._eend, self._rev + 1)
                async for resp in self._watch:
                    backoff = 0.1
                    if resp.events:
                        self._apply(resp.events)
                    elif not resp.created and resp.revision > self._rev:
                        self._rev = resp.revision  # progress: every event up to here was sent
                        self._bump()
            except asyncio.CancelledError:
                raise
            except EtcdCompacted as e:
                # The mirror fell behind etcd's compaction: start over at the current revision.
                # Every client watch older than that gets 410 and relists, as upstream.
                log.warning("event=etcd_mirror_relist reason=compacted at=%d compacted=%d", self._rev,
                            e.compact_revision)
                try:
                    head = await self.client.range(self._eprefix, self._eend, count_only=True)
                    self._install(await self._load(head.revision), head.revision)
                except EtcdError as e2:
                    log.warning("event=etcd_mirror_relist_failed error=%s", e2)
                    await asyncio.sleep(backoff)
            except Exception as e:  # the member died, the stream broke: gRPC picks another member
                if self._closed:
                    return
                log.warning("event=etcd_watch_broken revision=%d error=%s", self._rev, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _apply(self, events: list[WatchEvent]) -> None:
        for we in events:
            kv = we.kv
            rev = kv.mod_revision
            skey = self._skey(kv.key)
            if skey is not None:
                ev = self._event(skey, we, rev)
                if ev is not None:
                    self._window.append(ev, wake=False)
                    self.notify(ev)
            self._rev = max(self._rev, rev)
        self._window.wake_soon()
        self._bump()

    def _event(self, skey: str, we: WatchEvent, rev: int) -> Event | None:
        cur = self._cache.get(skey)
        if we.type == "DELETE":
            if cur is None:
                return None
            obj = _decode(cur[1])
            obj["metadata"]["resourceVersion"] = str(rev)
            del self._cache[skey]
            self._keys.remove(skey)
            return Event(rev, "DELETED", skey, _encode(obj), cur[1])
        value = self._with_rv(skey, we.kv.value, rev)
        if value is None:
            return None
        if cur is None:
            self._keys.add(skey)
        self._cache[skey] = (rev, value)
        return Event(rev, "ADDED" if cur is None else "MODIFIED", skey, value, cur[1] if cur else None)

    def _bump(self) -> None:
        waiters = self._rev_waiters
        while waiters and waiters[0][0] <= self._rev:
            resolve(heapq.heappop(waiters)[2])

    async def _wait_rev(self, revision: int, timeout: float) -> bool:
        if self._rev >= revision:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter_seq += 1
        heapq.heappush(self._rev_waiters, (revision, self._waiter_seq, fut))
        # A timer that ends the wait, not asyncio.wait_for: every acknowledged write waits here, and
        # wait_for's extra future and callbacks cost twice as much (~7 vs ~3.5 us on the bench machine).
        timer = loop.call_later(timeout, resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
        return self._rev >= revision

    async def _sync(self, revision: int, timeout: float = SYNC_WAIT) -> bool:
        """Wait until the mirror has applied everything up to revision (asking etcd for a progress
        notification: with no event in our prefix at that revision nothing else would tell us)."""
        deadline = time.monotonic() + timeout
        while self._rev < revision and time.monotonic() < deadline:
            if self._watch is not None:
                try:
                    self._watch.request_progress()
                except Exception:
                    pass
            if await self._wait_rev(revision, min(0.5, max(deadline - time.monotonic(), 0.0))):
                return True
        return self._rev >= revision

    async def _compactor(self) -> None:
        key = self.internal_key("compact_rev_key")
        version, last_rev = 0, 0
        while not self._closed:
            await asyncio.sleep(self._compaction_interval)
            try:
                t = await self.client.txn([cmp_version(key, version)], [Put(key, str(last_rev).encode())], [Get(key)])
                if not t.succeeded:
                    kvs = t.responses[0][1] if t.responses else []
                    version = kvs[0].version if kvs else 0  # another API server compacted this round
                else:
                    version += 1
                    if last_rev:
                        await self.client.compact(last_rev)
                        self._window.raise_floor(last_rev)
                        self.compactions += 1
                        log.info("event=etcd_compacted revision=%d", last_rev)
                last_rev = t.revision
            except EtcdCompacted:
                last_rev = 0  # already compacted further by someone else
            except Exception as e:
                log.warning("event=etcd_compaction_failed error=%s", e)

    # -- Store: reads --------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._rev

    @property
    def compacted_revision(self) -> int:
        return self._window.floor

    def get(self, key: str) -> Obj | None:
        cur = self._cache.get(key)
        return _decode(cur[1]) if cur else None

    def get_raw(self, key: str) -> bytes | None:
        cur = self._cache.get(key)
        return cur[1] if cur else None

    def list(self, prefix: str, *, start_after: str = "", limit: int = 0, revision: int = 0) -> ListResult:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        lo = max(prefix, start_after + "\x00") if start_after else prefix
        if revision > self._rev:
            raise FutureRevision(f"revision {revision} is newer than the current revision {self._rev}")
        cache = self._cache
        if not revision or revision >= self._rev:
            # The current state: only the page's rows are made (a paged list of N objects in pages
            # of L was N/L passes over all N; client-go lists in pages of 500).
            keys = self._keys.between(lo, end, limit + 1 if limit else 0)
            more = bool(limit) and len(keys) > limit
            return ListResult(self._rev, [(k, cache[k][1]) for k in (keys[:limit] if more else keys)], more)
        if revision < self._window.floor:
            raise Compacted(revision, self._window.floor)
        state = {k: v for k in self._keys.between(lo, end) for r, v in (cache[k],) if r <= revision}
        seen: set[str] = set()
        for ev in self._window.since(revision, 1 << 62):
            k = ev.key
            if k in seen or not lo <= k < end:
                continue
            seen.add(k)
            if ev.prev_value is None:
                state.pop(k, None)
            else:
                state[k] = ev.prev_value
        rows = sorted(state.items())
        more = bool(limit) and len(rows) > limit
        return ListResult(revision, rows[:limit] if more else rows, more)

    def events_since(self, since_revision: int, max_events: int = 1000) -> builtins.list[Event]:
        return self._window.since(since_revision, max_events)

    async def wait_for_events(self, after_revision: int, timeout: float, watchers: int = 1) -> bool:
        return await self._window.wait(after_revision, timeout, watchers)

    def wake_watchers(self) -> None:
        self._window.wake()

    # -- Store: writes -------------------------------------------------------------------------

    # builtins.list: inside this class `list` is the Store's list method.
    def _hooks(self, key: str, new: Obj | None, old: Obj | None
               ) -> tuple[builtins.list[Cmp], builtins.list[Op], builtins.list[bytes]]:
        cmps: builtins.list[Cmp] = []
        ops: builtins.list[Op] = []
        reserved: builtins.list[bytes] = []
        for hook in self.write_hooks:
            c, o, r = hook.ops(key, new, old)
            cmps += c
            ops += o
            reserved += r
        return cmps, ops, reserved

    async def _conflict(self, key: str, revision: int, reserved: builtins.list[bytes],
                        kvs_of: builtins.list[builtins.list[KV]]) -> None:
        """A failed compare: raise ReservationConflict when a reservation was taken (the caller
        allocates again), once the mirror has caught up with what etcd answered."""
        await self._sync(revision)
        wanted = set(reserved)
        taken = [kvs[0].key[len(self._eprefix):].decode("utf-8", "replace")
                 for kvs in kvs_of if kvs and kvs[0].key in wanted]
        if taken:
            raise ReservationConflict(key, taken)

    async def _with_reservations(self, obj: Obj, old: Obj | None, write: Callable[[], Awaitable[Obj]]) -> Obj:
        for attempt in range(RESERVATION_ATTEMPTS):
            try:
                return await write()
            except ReservationConflict as e:
                if attempt == RESERVATION_ATTEMPTS - 1:
                    raise
                log.info("event=etcd_reservation_conflict attempt=%d taken=%s", attempt + 1, ",".join(e.taken))
                for hook in self.write_hooks:
                    hook.retry(obj, old, e.taken)
        raise AssertionError("unreachable")

    async def create(self, key: str, obj: Obj) -> Obj:
        return await self._with_reservations(obj, None, lambda: self._create(key, obj))

    async def _create(self, key: str, obj: Obj) -> Obj:
        ek = self.ekey(key)
        cmps, ops, reserved = self._hooks(key, obj, None)
        t = await self.client.txn([cmp_create(ek, 0), *cmps], [Put(ek, self._stored(obj)), *ops],
                                  [Get(ek), *(Get(k) for k in reserved)])
        if not t.succeeded:
            if t.responses and t.responses[0][1]:
                await self._sync(t.responses[0][1][0].mod_revision)
                raise KeyExists(key)
            await self._conflict(key, t.revision, reserved, [r[1] for r in t.responses[1:]])
            raise KeyExists(key)  # the key and every reservation were free: a compare we did not add
        return await self._committed(obj, t.revision)

    async def update(self, key: str, obj: Obj, expected_revision: int = 0) -> Obj:
        cur = self._cache.get(key)
        old = _decode(cur[1]) if cur is not None else None
        return await self._with_reservations(obj, old, lambda: self._update(key, obj, expected_revision))

    async def _update(self, key: str, obj: Obj, expected_revision: int) -> Obj:
        ek = self.ekey(key)
        cur = self._cache.get(key)
        if expected_revision and (cur is None or cur[0] < expected_revision):
            # The caller read a newer version through another API server: catch up first, so the
            # write hooks see the object the compare is about.
            await self._sync(expected_revision)
            cur = self._cache.get(key)
        old = _decode(cur[1]) if cur is not None else None
        if expected_revision:
            cmp = cmp_mod(ek, expected_revision)
        elif cur is not None and self.write_hooks:
            cmp = cmp_mod(ek, cur[0])  # the hooks computed against this version
        else:
            cmp = cmp_create(ek, 0, "GREATER")  # unconditional: it only has to exist
        cmps, ops, reserved = self._hooks(key, obj, old)
        t = await self.client.txn([cmp, *cmps], [Put(ek, self._stored(obj)), *ops],
                                  [Get(ek), *(Get(k) for k in reserved)])
        if not t.succeeded:
            kvs = t.responses[0][1] if t.responses else []
            if not kvs:
                await self._sync(t.revision)
                raise KeyNotFound(key)
            actual = kvs[0].mod_revision
            if cmp.target == "MOD" and actual != cmp.value:
                await self._sync(actual)
                raise RevisionConflict(key, cmp.value, actual)
            await self._conflict(key, t.revision, reserved, [r[1] for r in t.responses[1:]])
            raise RevisionConflict(key, expected_revision, actual)
        return await self._committed(obj, t.revision)

    async def delete(self, key: str, expected_revision: int = 0) -> Obj:
        ek = self.ekey(key)
        cur = self._cache.get(key)
        if self.write_hooks and (cur is None or (expected_revision and cur[0] < expected_revision)):
            # Not (yet) in the mirror: catch up with etcd first, else the hooks' keys (the Service's
            # reservations) would stay behind when it is deleted.
            await self._sync((await self.client.range(ek, count_only=True)).revision)
            cur = self._cache.get(key)
        old = _decode(cur[1]) if cur is not None else None
        cmp = cmp_mod(ek, expected_revision) if expected_revision else (
            cmp_mod(ek, cur[0]) if cur is not None and self.write_hooks else cmp_create(ek, 0, "GREATER"))
        _, ops, _ = self._hooks(key, None, old) if old is not None else ([], [], [])
        t = await self.client.txn([cmp], [Delete(ek, prev_kv=True), *ops], [Get(ek)])
        if not t.succeeded:
            kvs = t.responses[0][1] if t.responses else []
            if not kvs:
                await self._sync(t.revision)
                raise KeyNotFound(key)
            await self._sync(kvs[0].mod_revision)
            raise RevisionConflict(key, expected_revision or cmp.value, kvs[0].mod_revision)
        prev = t.responses[0][1]
        if not prev:
            raise KeyNotFound(key)
        gone: Obj = _decode(prev[0].value)
        return await self._committed(gone, t.revision)

    @staticmethod
    def _stored(obj: Obj) -> bytes:
        meta = obj.get("metadata")
        if isinstance(meta, dict) and "resourceVersion" in meta:
            meta = {k: v for k, v in meta.items() if k != "resourceVersion"}
            return _encode({**obj, "metadata": meta})
        return _encode(obj)

    async def _committed(self, obj: Obj, revision: int) -> Obj:
        obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
        if not await self._wait_rev(revision, WRITE_WAIT):
            log.warning("event=etcd_mirror_behind write_revision=%d mirror_revision=%d", revision, self._rev)
        return obj

    async def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._window.wake()
        await self.client.close()

    def close_sync(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()


def open_etcd_store(endpoints: list[str], *, ca_file: str = "", cert_file: str = "", key_file: str = "",
                    prefix: str = API_PREFIX, window: int = 10000, compaction_interval: float = 300.0) -> EtcdStore:
    client = EtcdClient(endpoints, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    return EtcdStore(client, prefix=prefix, window=window, compaction_interval=compaction_interval)


"""The default store: one SQLite database in WAL mode with synchronous=FULL.

Tables:
- objects(key, rev, value): the current value of every key (value is the object's JSON, with
  metadata.resourceVersion = rev already in it, so lists are served by joining stored bytes);
- history(rev, key, type, value, prev): one row per revision for the last `window` revisions.
  It refills the in-memory event window after a restart (so a client resuming a watch across a
  restart gets the events it missed, not a 410) and serves reads pinned to an older revision
  (continue tokens, resourceVersionMatch=Exact): the state of a key at revision R is its current
  value when it has not changed since R, otherwise the `prev` of its first change after R;
- meta: the current and the compacted revision.

A write is acknowledged after the COMMIT of its transaction returned, and COMMIT returns after the WAL
is fsynced (synchronous=FULL), so an acknowledged write survives kill -9 and power loss. Writes that
arrive while a commit runs share the next transaction (group commit). One process owns a data directory (flock).
"""
from __future__ import annotations

import asyncio
import bisect
import builtins
import fcntl
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec

from .base import (
    Compacted,
    Event,
    FutureRevision,
    KeyExists,
    KeyNotFound,
    ListResult,
    Obj,
    RevisionConflict,
    Store,
)
from .window import EventWindow

_TYPES = ("ADDED", "MODIFIED", "DELETED")
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key starting with prefix (etcd's GetPrefixRangeEnd)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(slots=True)
class _Op:
    kind: str  # create | update | delete
    key: str
    obj: Obj | None
    expected: int = 0
    future: asyncio.Future[Obj] | None = None


class SQLiteStore(Store):
    def __init__(self, path: str, *, window: int = 10000, compact_every: int = 1000) -> None:
        super().__init__()
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        # The store holds every Secret: its files are the owner's alone, whatever the umask, also
        # when they were made by an older version (SQLite gives -wal/-shm the database's mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name):
                os.chmod(name, 0o600)
        lock_fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(lock_fd, 0o600)
        self._lockfile = os.fdopen(lock_fd, "w")  # held for the store's lifetime
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise RuntimeError(f"data directory in use: {path} is locked by another kproxy-apiserver") from None
        # Two connections: the writer thread commits on _wdb while the event loop reads on _db
        # (WAL lets readers proceed during a commit; they see only committed, acknowledged data).
        self._wdb = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db = self._wdb
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=OFF")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, rev INTEGER NOT NULL, value BLOB NOT NULL)
                WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS history (rev INTEGER PRIMARY KEY, key TEXT NOT NULL, type INTEGER NOT NULL,
                value BLOB NOT NULL, prev BLOB);
            CREATE INDEX IF NOT EXISTS history_key ON history (key, rev);
            CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('compacted', 0);
            """
        )
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")
        self._pending: list[_Op] = []
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        # Current values live in memory too (like the apiserver's watch cache): gets and lists are
        # served from here; SQLite is read only at startup and for reads at an older revision.
        self._cache: dict[str, tuple[int, bytes]] = {}
        for key, rev, value in db.execute("SELECT key, rev, value FROM objects"):
            self._cache[key] = (rev, value)
        self._keys: list[str] = sorted(self._cache)
        meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        self._rev: int = meta["revision"]
        self._compacted: int = meta["compacted"]
        self._window_size = window
        self._compact_every = compact_every
        self._window = EventWindow(window, self._compacted)
        # Refill the event window from history so watches resume across restarts.
        for rev, key, typ, value, prev in db.execute(
            "SELECT rev, key, type, value, prev FROM history WHERE rev > ? ORDER BY rev", (self._compacted,)
        ):
            self._window.append(self._event(rev, _TYPES[typ], key, value, prev))
        if self._window.last != self._rev:
            # History is written in the same transaction as the revision, so this means corruption.
            raise RuntimeError(f"{path}: history ends at {self._window.last}, revision is {self._rev}")

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _event(rev: int, type_: str, key: str, value: bytes, prev: bytes | None) -> Event:
        return Event(rev, type_, key, value, prev)

    # -- group commit --------------------------------------------------------------------------
    # Writes queue up while a commit (and its fsync) runs in the writer thread; the next batch takes
    # everything queued, applies it in arrival order inside ONE transaction and fsyncs once. Each
    # write's checks (exists / expected revision) run against the state left by the writes before
    # it, so the outcome is the same as one-at-a-time commits, only with fewer fsyncs. A write is
    # acknowledged (its future resolved) and published to watchers only after COMMIT returned.

    async def _submit(self, op: _Op) -> Obj:
        if self._closed:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        op.future = loop.create_future()
        self._pending.append(op)
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_loop())
        return await asyncio.shield(op.future)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                outcomes, compacted = await loop.run_in_executor(self._executor, self._apply_batch, batch, self._rev)
            except BaseException as e:
                for op in batch:
                    if op.future is not None and not op.future.done():
                        op.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
                if not isinstance(e, Exception):
                    raise
                continue
            if compacted:
                self._compacted = compacted
            for op, out in zip(batch, outcomes):
                assert op.future is not None
                if isinstance(out, Exception):
                    if not op.future.done():
                        op.future.set_exception(out)
                    continue
                self._rev = out.revision
                self._cache_apply(out)
                self._window.append(out)
                self.notify(out)
                if not op.future.done():
                    assert op.obj is not None
                    op.future.set_result(op.obj)

    def _apply_batch(self, batch: list[_Op], rev: int) -> tuple[list[Event | Exception], int]:
        """Runs in the writer thread on the write connection."""
        db = self._wdb
        outcomes: list[Event | Exception] = []
        compacted = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in batch:
                row = db.execute("SELECT rev, value FROM objects WHERE key = ?", (op.key,)).fetchone()
                if op.kind == "create":
                    if row is not None:
                        outcomes.append(KeyExists(op.key))
                        continue
                    type_, obj, prev_value = "ADDED", op.obj, None
                else:
                    if row is None:
                        outcomes.append(KeyNotFound(op.key))
                        continue
                    if op.expected and row[0] != op.expected:
                        outcomes.append(RevisionConflict(op.key, op.expected, row[0]))
                        continue
                    prev_value = row[1]
                    if op.kind == "update":
                        type_, obj = "MODIFIED", op.obj
                    else:
                        type_, obj = "DELETED", _decode(row[1])
                assert obj is not None
                rev += 1
                obj.setdefault("metadata", {})["resourceVersion"] = str(rev)
                value = _encode(obj)
                if type_ == "DELETED":
                    db.execute("DELETE FROM objects WHERE key = ?", (op.key,))
                else:
                    db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", (op.key, rev, value))
                db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?)",
                           (rev, op.key, _TYPES.index(type_), value, prev_value))
                if op.kind == "delete":
                    op.obj = obj  # the caller gets the last state, with the deletion revision
                outcomes.append(Event(rev, type_, op.key, value, prev_value))
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
            floor = rev - self._window_size
            if floor > self._compacted + self._compact_every:
                db.execute("DELETE FROM history WHERE rev <= ?", (floor,))
                db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (floor,))
                compacted = floor
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return outcomes, compacted

    def _cache_apply(self, ev: Event) -> None:
        if ev.type == "DELETED":
            if self._cache.pop(ev.key, None) is not None:
                del self._keys[bisect.bisect_left(self._keys, ev.key)]
            return
        if ev.key not in self._cache:
            bisect.insort(self._keys, ev.key)
        self._cache[ev.key] = (ev.revision, ev.value)

    def _current(self, key: str) -> tuple[int, bytes] | None:
        return self._cache.get(key)

    def _range(self, lo: str, end: str) -> builtins.list[str]:
        keys = self._keys
        return keys[bisect.bisect_left(keys, lo):bisect.bisect_left(keys, end)]

    # -- Store ---------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._rev

    @property
    def compacted_revision(self) -> int:
        # Reads and watches are limited by what the event window still holds.
        return max(self._compacted, self._window.oldest_replayable)

    def get(self, key: str) -> Obj | None:
        cur = self._current(key)
        return _decode(cur[1]) if cur else None

    def get_raw(self, key: str) -> bytes | None:
        cur = self._current(key)
        return cur[1] if cur else None

    def list(self, prefix: str, *, start_after: str = "", limit: int = 0, revision: int = 0) -> ListResult:
        end = prefix_end(prefix)
        lo = max(prefix, start_after + "\x00") if start_after else prefix
        if revision and revision < self._rev:
            return self._list_at(prefix, end, lo, limit, revision)
        if revision > self._rev:
            raise FutureRevision(f"revision {revision} is newer than the current revision {self._rev}")
        keys = self._range(lo, end)
        more = bool(limit) and len(keys) > limit
        if more:
            keys = keys[:limit]
        cache = self._cache
        return ListResult(self._rev, [(k, cache[k][1]) for k in keys], more)

    def _list_at(self, prefix: str, end: str, lo: str, limit: int, revision: int) -> ListResult:
        if revision < self.compacted_revision:
            raise Compacted(revision, self.compacted_revision)
        db = self._db
        cache = self._cache
        state: dict[str, bytes] = {}
        for k in self._range(lo, end):
            rev, value = cache[k]
            if rev <= revision:
                state[k] = value
        # Keys written after `revision`: their value then is the prev of their first later write.
        for key, prev in db.execute(
            "SELECT h.key, h.prev FROM history h WHERE h.key >= ? AND h.key < ? AND h.rev > ? AND h.rev ="
            " (SELECT min(h2.rev) FROM history h2 WHERE h2.key = h.key AND h2.rev > ?)",
            (lo, end, revision, revision),
        ):
            if prev is None:
                state.pop(key, None)
            else:
                state[key] = prev
        rows = sorted(state.items())
        more = bool(limit) and len(rows) > limit
        return ListResult(revision, rows[:limit] if more else rows, more)

    async def create(self, key: str, obj: Obj) -> Obj:
        return await self._submit(_Op("create", key, obj))

    async def update(self, key: str, obj: Obj, expected_revision: int = 0) -> Obj:
        return await self._submit(_Op("update", key, obj, expected_revision))

    async def delete(self, key: str, expected_revision: int = 0) -> Obj:
        return await self._submit(_Op("delete", key, None, expected_revision))

    def events_since(self, since_revision: int, max_events: int = 1000) -> builtins.list[Event]:
        return self._window.since(since_revision, max_events)

    async def wait_for_events(self, after_revision: int, timeout: float, watchers: int = 1) -> bool:
        return await self._window.wait(after_revision, timeout)

    def wake_watchers(self) -> None:
        self._window.wake()

    async def close(self) -> None:
        self._closed = True
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        self.close_sync()

    def close_sync(self) -> None:
        """Release without waiting for queued writes (they were never acknowledged)."""
        if self._lockfile.closed:
            return
        try:
            self._executor.shutdown(wait=True)
            self._db.close()
            self._wdb.close()
        finally:
            self._lockfile.close()

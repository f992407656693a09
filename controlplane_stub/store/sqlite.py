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

Every write is one transaction; COMMIT returns after the WAL is fsynced (synchronous=FULL), so an
acknowledged write survives kill -9 and power loss. One process owns a data directory (flock).
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from typing import Any

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


def event_line(type_: str, value: bytes) -> bytes:
    return b'{"type":"' + type_.encode() + b'","object":' + value + b"}\n"


class SQLiteStore(Store):
    def __init__(self, path: str, *, window: int = 10000, compact_every: int = 1000) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lockfile = open(path + ".lock", "w")  # noqa: SIM115 - held for the store's lifetime
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise RuntimeError(f"data directory in use: {path} is locked by another kproxy-apiserver") from None
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db = self._db
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
        return Event(rev, type_, key, _decode(value), _decode(prev) if prev is not None else None,
                     event_line(type_, value))

    def _commit(self, key: str, type_: str, obj: Obj, prev_value: bytes | None) -> Obj:
        """Write one revision: obj (with its new resourceVersion) at key, plus history and meta."""
        rev = self._rev + 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(rev)
        value = _encode(obj)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if type_ == "DELETED":
                db.execute("DELETE FROM objects WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?)", (key, rev, value))
            db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?)",
                       (rev, key, _TYPES.index(type_), value, prev_value))
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
            compact_to = 0
            if rev % self._compact_every == 0 and rev - self._window_size > self._compacted:
                compact_to = rev - self._window_size
                db.execute("DELETE FROM history WHERE rev <= ?", (compact_to,))
                db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (compact_to,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._rev = rev
        if compact_to:
            self._compacted = compact_to
        prev = _decode(prev_value) if prev_value is not None else None
        self._window.append(Event(rev, type_, key, obj, prev, event_line(type_, value)))
        return obj

    def _current(self, key: str) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT rev, value FROM objects WHERE key = ?", (key,)).fetchone()
        return (row[0], row[1]) if row else None

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
        sql = "SELECT key, value FROM objects WHERE key >= ? AND key < ? ORDER BY key"
        args: tuple[Any, ...] = (lo, end)
        if limit:
            sql += " LIMIT ?"
            args = (lo, end, limit + 1)
        rows: list[tuple[str, bytes]] = self._db.execute(sql, args).fetchall()
        more = bool(limit) and len(rows) > limit
        return ListResult(self._rev, rows[:limit] if more else rows, more)

    def _list_at(self, prefix: str, end: str, lo: str, limit: int, revision: int) -> ListResult:
        if revision < self.compacted_revision:
            raise Compacted(revision, self.compacted_revision)
        db = self._db
        state: dict[str, bytes] = dict(
            db.execute("SELECT key, value FROM objects WHERE key >= ? AND key < ? AND rev <= ?", (lo, end, revision))
        )
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

    def create(self, key: str, obj: Obj) -> Obj:
        if self._current(key) is not None:
            raise KeyExists(key)
        return self._commit(key, "ADDED", obj, None)

    def update(self, key: str, obj: Obj, expected_revision: int = 0) -> Obj:
        cur = self._current(key)
        if cur is None:
            raise KeyNotFound(key)
        if expected_revision and cur[0] != expected_revision:
            raise RevisionConflict(key, expected_revision, cur[0])
        return self._commit(key, "MODIFIED", obj, cur[1])

    def delete(self, key: str, expected_revision: int = 0) -> Obj:
        cur = self._current(key)
        if cur is None:
            raise KeyNotFound(key)
        if expected_revision and cur[0] != expected_revision:
            raise RevisionConflict(key, expected_revision, cur[0])
        return self._commit(key, "DELETED", _decode(cur[1]), cur[1])

    def guaranteed_update(self, key: str, mutate: Callable[[Obj | None], Obj | None]) -> Obj | None:
        # Single writer in one event loop: nothing can interleave between this read and write.
        cur = self._current(key)
        new = mutate(_decode(cur[1]) if cur else None)
        if new is None:
            return self.delete(key) if cur else None
        if cur is None:
            return self._commit(key, "ADDED", new, None)
        return self._commit(key, "MODIFIED", new, cur[1])

    def events_since(self, since_revision: int, max_events: int = 1000) -> list[Event]:
        return self._window.since(since_revision, max_events)

    async def wait_for_events(self, after_revision: int, timeout: float) -> bool:
        return await self._window.wait(after_revision, timeout)

    def wake_watchers(self) -> None:
        self._window.wake()

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self._lockfile.close()

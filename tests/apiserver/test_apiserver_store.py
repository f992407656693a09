"""The SQLite store directly: revisions, compare-and-swap under group commit, history, reopen."""
from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from controlplane_stub.store.base import Compacted, KeyExists, KeyNotFound, RevisionConflict
from controlplane_stub.store.sqlite import SQLiteStore

pytestmark = pytest.mark.timeout(30)


def cm(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ns"}, "data": data}


def key(name: str) -> str:
    return f"/registry/configmaps/ns/{name}"


def names(store: SQLiteStore, revision: int = 0) -> dict[str, str]:
    import json

    return {k.rsplit("/", 1)[1]: json.loads(v)["data"].get("v", "") for k, v in
            store.list("/registry/configmaps/", revision=revision).items}


def test_revisions_and_reads_at_older_revisions(tmp_path: Any) -> None:
    async def run() -> None:
        s = SQLiteStore(str(tmp_path / "s.db"))
        try:
            a = await s.create(key("a"), cm("a", v="1"))
            assert a["metadata"]["resourceVersion"] == "1" and s.revision == 1
            await s.create(key("b"), cm("b", v="1"))
            await s.update(key("a"), cm("a", v="2"), expected_revision=1)
            gone = await s.delete(key("b"))
            assert gone["metadata"]["resourceVersion"] == "4" and gone["data"] == {"v": "1"}
            await s.create(key("c"), cm("c", v="1"))
            assert names(s) == {"a": "2", "c": "1"}
            assert names(s, 1) == {"a": "1"}
            assert names(s, 2) == {"a": "1", "b": "1"}
            assert names(s, 3) == {"a": "2", "b": "1"}
            assert names(s, 4) == {"a": "2"}
            page = s.list("/registry/configmaps/", limit=1, revision=2)
            assert [k for k, _ in page.items] == [key("a")] and page.more
            rest = s.list("/registry/configmaps/", start_after=key("a"), limit=1, revision=2)
            assert [k for k, _ in rest.items] == [key("b")] and not rest.more
            assert [e.type for e in s.events_since(0)] == ["ADDED", "ADDED", "MODIFIED", "DELETED", "ADDED"]
            assert s.events_since(2)[0].prev is not None and s.events_since(2)[0].prev["data"] == {"v": "1"}
        finally:
            await s.close()

    asyncio.run(run())


def test_compare_and_swap_holds_within_one_group_commit(tmp_path: Any) -> None:
    async def run() -> None:
        s = SQLiteStore(str(tmp_path / "s.db"))
        try:
            await s.create(key("x"), cm("x", v="0"))
            # Submitted together, so they share one transaction: exactly one may win each race.
            results = await asyncio.gather(
                s.update(key("x"), cm("x", v="1"), expected_revision=1),
                s.update(key("x"), cm("x", v="2"), expected_revision=1),
                s.create(key("y"), cm("y")),
                s.create(key("y"), cm("y")),
                s.delete(key("nope")),
                return_exceptions=True,
            )
            assert isinstance(results[0], dict) and isinstance(results[1], RevisionConflict)
            assert isinstance(results[2], dict) and isinstance(results[3], KeyExists)
            assert isinstance(results[4], KeyNotFound)
            assert s.revision == 3 and names(s) == {"x": "1", "y": ""}
            assert [e.revision for e in s.events_since(0)] == [1, 2, 3]
        finally:
            await s.close()

    asyncio.run(run())


def test_reopen_keeps_data_revision_and_watch_history(tmp_path: Any) -> None:
    path = str(tmp_path / "s.db")

    async def first() -> None:
        s = SQLiteStore(path)
        for i in range(5):
            await s.create(key(f"k{i}"), cm(f"k{i}", v=str(i)))
        with pytest.raises(RuntimeError, match="locked by another"):
            SQLiteStore(path)
        await s.close()

    async def second() -> None:
        s = SQLiteStore(path)
        try:
            assert s.revision == 5 and len(names(s)) == 5
            assert [e.key for e in s.events_since(2)] == [key("k2"), key("k3"), key("k4")]
            created = await s.create(key("k9"), cm("k9"))
            assert created["metadata"]["resourceVersion"] == "6"
        finally:
            await s.close()

    asyncio.run(first())
    asyncio.run(second())


def test_window_and_history_compaction(tmp_path: Any) -> None:
    path = str(tmp_path / "s.db")

    async def run() -> None:
        s = SQLiteStore(path, window=5, compact_every=3)
        try:
            for i in range(20):
                await s.create(key(f"k{i:02d}"), cm(f"k{i:02d}"))
            assert s.compacted_revision == 15
            with pytest.raises(Compacted):
                s.events_since(14)
            assert [e.revision for e in s.events_since(15)] == [16, 17, 18, 19, 20]
            with pytest.raises(Compacted):
                s.list("/registry/configmaps/", revision=10)
            assert len(names(s, 16)) == 16
        finally:
            await s.close()
        import sqlite3

        db = sqlite3.connect(path)
        (oldest,) = db.execute("SELECT min(rev) FROM history").fetchone()
        db.close()
        assert 10 < oldest <= 16  # history is trimmed too, keeping at least the window
        assert os.path.exists(path)

    asyncio.run(run())

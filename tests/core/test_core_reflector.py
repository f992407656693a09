"""Reflector protocol behaviour: pagination, watch, bookmarks, 410 relist, resume after a drop.

These use the scripted server from conftest.py for faults on demand; the same Reflector against
controlplane_stub's real API server is in test_core_apiserver.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kproxy.kube.client import ApiClient
from kproxy.kube.informer import Informer, SummaryStore
from kproxy.kube.kubeconfig import ClusterAccess
from kproxy.kube.reflector import Backoff, Reflector
from kproxy.kube.types import ObjectMeta

sys.path.insert(0, str(Path(__file__).parent))
from core_scripted_api import ScriptedApi, scripted_api


class ThingSpec(msgspec.Struct):
    color: str = ""


class Thing(msgspec.Struct):
    metadata: ObjectMeta
    spec: ThingSpec = msgspec.field(default_factory=ThingSpec)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.state: dict[str, str] = {}

    def replace(self, items: list[Thing], resource_version: str) -> None:
        self.calls.append(("replace", ([i.metadata.name for i in items], resource_version)))
        self.state = {i.metadata.name: i.spec.color for i in items}

    def apply(self, event_type: str, item: Thing) -> None:
        self.calls.append((event_type, item.metadata.name))
        if event_type == "DELETED":
            self.state.pop(item.metadata.name, None)
        else:
            self.state[item.metadata.name] = item.spec.color


def _reflector(api: ScriptedApi, store: Any, **kw: Any) -> tuple[ApiClient, Reflector[Thing]]:
    client = ApiClient(ClusterAccess(server=api.url))
    r: Reflector[Thing] = Reflector(client, "/api/v1/things", Thing, store, page_size=2,
                                    backoff=Backoff(initial=0.01, cap=0.05), **kw)
    return client, r


async def _until(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(client: ApiClient, r: Reflector[Thing]) -> AsyncIterator[None]:
    task = asyncio.create_task(r.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def _ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


@pytest.mark.timeout(20)
def test_paginated_list_then_watch_with_bookmark() -> None:
    async def main() -> None:
        async with scripted_api() as api:
            for n in ("a", "b", "c", "d", "e"):
                api.put(n, color=n.upper())
            list_rv = str(api.rv)
            added = api.put("f", color="F")
            api.watch_scripts = [[
                _ev("ADDED", added),
                {"type": "BOOKMARK", "object": {"kind": "Thing", "metadata": {"resourceVersion": "500"}}},
            ]]
            api.hang_after_script = True
            del api.objects["f"]
            api.rv = int(list_rv)
            rec = Recorder()
            client, r = _reflector(api, rec, label_selector="app=x", field_selector="metadata.name!=z")
            async with running(client, r):
                await _until(lambda: r.last_resource_version == "500")
                assert r.has_synced()
                # 5 objects in pages of 2: three list requests, continue tokens passed along.
                assert [c.get("continue") for c in api.list_calls] == [None, "2", "4"]
                assert all(c["labelSelector"] == "app=x" and c["limit"] == "2" for c in api.list_calls)
                assert rec.calls[0] == ("replace", (["a", "b", "c", "d", "e"], list_rv))
                assert rec.calls[1] == ("ADDED", "f")
                w = api.watch_calls[0]
                assert w["resourceVersion"] == list_rv and w["allowWatchBookmarks"] == "true"
                assert w["fieldSelector"] == "metadata.name!=z"
                assert rec.state["f"] == "F"

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_watch_410_error_event_relists_and_drop_resumes_from_last_rv() -> None:
    async def main() -> None:
        async with scripted_api() as api:
            api.put("a", color="red")
            first_rv = str(api.rv)
            b = api.put("b", color="blue")
            gate = asyncio.Event()
            api.watch_scripts = [
                [_ev("ADDED", b)],  # stream then ends: resume from b's RV, no relist
                [gate, {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                    "message": "too old resource version: 1 (2)"}}],
                "410",  # after relist, the watch request itself answers 410: relist again
            ]
            api.hang_after_script = True
            del api.objects["b"]
            api.rv = int(first_rv)
            rec = Recorder()
            client, r = _reflector(api, rec)
            async with running(client, r):
                await _until(lambda: len(api.watch_calls) >= 2)
                assert r.lists == 1
                assert api.watch_calls[1]["resourceVersion"] == b["metadata"]["resourceVersion"]
                # Meanwhile the server state changed: a relist must surface it.
                api.put("c", color="green")
                del api.objects["a"]
                gate.set()
                await _until(lambda: r.lists == 3 and len(api.watch_calls) >= 4)
                assert rec.state == {"c": "green"}
                assert api.watch_calls[3]["resourceVersion"] == str(api.rv)
                assert [c[0] for c in rec.calls] == ["replace", "ADDED", "replace", "replace"]

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_expired_continue_token_restarts_the_list() -> None:
    async def main() -> None:
        async with scripted_api() as api:
            for n in "abcde":
                api.put(n)
            api.expire_continue_once = True
            api.hang_after_script = True
            rec = Recorder()
            client, r = _reflector(api, rec)
            async with running(client, r):
                await _until(r.has_synced)
                assert [c.get("continue") for c in api.list_calls] == [None, "2", None, "2", "4"]
                assert rec.calls == [("replace", (list("abcde"), str(api.rv)))]

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_informer_diffs_a_relist_into_adds_updates_deletes() -> None:
    seen: list[tuple[str | None, str | None]] = []
    inf: Informer[Thing] = Informer(
        lambda old, new: seen.append((old.spec.color if old else None, new.spec.color if new else None)))

    def t(name: str, color: str) -> Thing:
        return Thing(ObjectMeta(name=name, namespace="ns"), ThingSpec(color))

    inf.replace([t("a", "1"), t("b", "2")], "10")
    inf.apply("MODIFIED", t("a", "3"))
    inf.replace([t("a", "3"), t("c", "4")], "20")
    assert seen == [(None, "1"), (None, "2"), ("1", "3"), ("2", None), ("3", "3"), (None, "4")]
    assert sorted(inf.keys()) == ["ns/a", "ns/c"] and inf.resource_version == "20"


def test_backoff_doubles_caps_jitters_and_resets() -> None:
    b = Backoff(initial=1.0, cap=8.0, jitter=0.5, reset_after=100.0, rand=lambda: 1.0)
    delays = [b.next_delay(now=float(i)) for i in range(6)]
    assert delays == [1.5, 3.0, 6.0, 12.0, 12.0, 12.0]
    assert b.next_delay(now=1000.0) == 1.5  # quiet for longer than reset_after


def test_summary_store_reports_relist_deletes_with_their_summary() -> None:
    seen: list[tuple[str, str | None, str | None]] = []
    st: SummaryStore[Thing] = SummaryStore(lambda k, old, new: seen.append((k, old, new.spec.color if new else None)),
                                           summary=lambda t: t.spec.color)

    def t(name: str, color: str) -> Thing:
        return Thing(ObjectMeta(name=name, namespace="ns"), ThingSpec(color))

    st.replace([t("a", "1"), t("b", "2")], "10")
    st.apply("MODIFIED", t("a", "3"))
    st.apply("DELETED", t("a", "3"))
    st.replace([t("c", "4")], "20")  # b vanished while the watch was down
    assert seen == [("ns/a", None, "1"), ("ns/b", None, "2"), ("ns/a", "1", "3"), ("ns/a", "3", None),
                    ("ns/c", None, "4"), ("ns/b", "2", None)]
    assert "ns/c" in st and len(st) == 1


@pytest.mark.timeout(20)
def test_paged_store_gets_pages_and_survives_a_restarted_list() -> None:
    async def main() -> None:
        async with scripted_api() as api:
            for n in "abcde":
                api.put(n, color=n)
            api.expire_continue_once = True
            api.hang_after_script = True
            seen: list[tuple[str, str | None, str | None]] = []
            st: SummaryStore[Thing] = SummaryStore(
                lambda k, old, new: seen.append((k, old, new.spec.color if new else None)),
                summary=lambda t: t.spec.color)
            st.replace([Thing(ObjectMeta(name="gone", namespace="default"))], "1")
            seen.clear()
            client, r = _reflector(api, st)
            async with running(client, r):
                await _until(r.has_synced)
            # Page 1 (a, b) applied, the list restarted after the 410 on the continue token,
            # then every page; the object missing from the snapshot is deleted once, at the end.
            assert [k for k, _, _ in seen] == ["default/" + x for x in "ababcde"] + ["default/gone"]
            assert seen[-1] == ("default/gone", "", None)
            assert len(st) == 5 and st.resource_version == str(api.rv)

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_5xx_on_watch_backs_off_and_resumes_from_the_same_rv() -> None:
    async def main() -> None:
        async with scripted_api() as api:
            api.put("a")
            rv = str(api.rv)
            api.watch_scripts = ["500", "500"]
            api.hang_after_script = True
            rec = Recorder()
            client, r = _reflector(api, rec)
            r.backoff = Backoff(initial=0.1, cap=0.1, jitter=0.0)
            async with running(client, r):
                await _until(lambda: len(api.watch_calls) >= 3)
            assert r.lists == 1  # a 5xx is not a reason to relist
            assert [w["resourceVersion"] for w in api.watch_calls[:3]] == [rv, rv, rv]

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_an_object_that_does_not_decode_is_skipped_and_the_watch_goes_on() -> None:
    """Issue 13: a type-wrong field made the reflector retry the same resourceVersion forever,
    so no later change (not even the object's deletion) ever applied. Now it is handed over as a
    stand-in with only its identity, and the list and the watch go on."""
    async def main() -> None:
        async with scripted_api() as api:
            api.put("a", color="A")
            bad_listed = api.put("b", color="B")
            bad_listed["spec"] = {"color": 5}  # type-wrong in the list itself
            rv = api.rv
            good = {"metadata": {"name": "c", "namespace": "default", "resourceVersion": str(rv + 1)},
                    "spec": {"color": "C"}}
            bad = {"metadata": {"name": "c", "namespace": "default", "resourceVersion": str(rv + 2)},
                   "spec": {"color": ["not", "a", "string"]}}
            fixed = {"metadata": {"name": "c", "namespace": "default", "resourceVersion": str(rv + 3)},
                     "spec": {"color": "C2"}}
            gone = {"metadata": {"name": "b", "namespace": "default", "resourceVersion": str(rv + 4)},
                    "spec": 7}
            api.watch_scripts = [[_ev("ADDED", good), _ev("MODIFIED", bad), b"not json at all",
                                  _ev("MODIFIED", fixed), _ev("DELETED", gone)]]
            api.hang_after_script = True
            rec = Recorder()
            counted: list[int] = []
            client, r = _reflector(api, rec, on_undecodable=lambda: counted.append(1))
            async with running(client, r):
                await _until(lambda: r.last_resource_version == str(rv + 4))
                assert rec.calls[0] == ("replace", (["a", "b"], str(rv)))
                # The stand-ins carry the identity and nothing else (the spec at its default).
                assert rec.state == {"a": "A", "c": "C2"}
                assert ("MODIFIED", "c") in rec.calls and ("DELETED", "b") in rec.calls
                assert r.lists == 1 and len(api.watch_calls) == 1
                assert len(counted) == r.undecodable == 4  # b listed, c modified, the garbage line, b deleted

    asyncio.run(main())


@pytest.mark.timeout(20)
def test_dict_items_an_asynchronous_store_and_a_resume_version() -> None:
    """What the control plane's informer uses: whole objects as dicts, a store whose replace()
    and apply() are coroutines (awaited in order, before the next event), and resume_from: the
    first request is a watch from that resourceVersion, no list, until a 410 asks for one."""

    class AsyncRecorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []

        async def replace(self, items: list[dict[str, Any]], resource_version: str) -> None:
            await asyncio.sleep(0.01)
            self.calls.append(("replace", sorted(i["metadata"]["name"] for i in items)))

        async def apply(self, event_type: str, item: dict[str, Any]) -> None:
            await asyncio.sleep(0.01)  # the next event waits for this one
            self.calls.append((event_type, item["spec"]))

    async def main() -> None:
        async with scripted_api() as api:
            a = api.put("a", color="red")
            b = api.put("b", color="blue")
            api.watch_scripts = [[_ev("MODIFIED", a), _ev("ADDED", b),
                                  {"type": "ERROR", "object": {"kind": "Status", "code": 410}}]]
            api.hang_after_script = True
            rec = AsyncRecorder()
            client = ApiClient(ClusterAccess(server=api.url))
            r: Reflector[dict[Any, Any]] = Reflector(client, "/api/v1/things", dict, rec,
                                                     backoff=Backoff(initial=0.01, cap=0.05), resume_from="7")
            async with running(client, r):  # type: ignore[arg-type]
                await _until(lambda: r.lists == 1)
                assert api.watch_calls[0]["resourceVersion"] == "7" and api.list_calls
                assert rec.calls == [("MODIFIED", {"color": "red"}), ("ADDED", {"color": "blue"}),
                                     ("replace", ["a", "b"])]

    asyncio.run(main())

"""Watch as clients rely on it, against a real server: replay, 410, bookmarks, fan-out, selectors."""
from __future__ import annotations

import asyncio
import json
import ssl
import time
from typing import Any

import aiohttp
import pytest
from apiserver_helpers import Client, service

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

pytestmark = pytest.mark.timeout(90)


def _ssl(api: APIServerProcess) -> ssl.SSLContext:
    assert api.ca_file
    return ssl.create_default_context(cafile=api.ca_file)


async def _collect(api: APIServerProcess, path: str, params: dict[str, str], *, count: int = 0,
                   until_type: str = "", deadline: float = 20.0, accept: str = "") -> list[dict[str, Any]]:
    """Read watch events until `count` non-bookmark events, an event of until_type, EOF or the deadline."""
    events: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {api.token}"}
    if accept:
        headers["Accept"] = accept
    async with aiohttp.ClientSession() as s:
        async with s.get(api.url + path, params={"watch": "true", **params}, headers=headers, ssl=_ssl(api),
                         timeout=aiohttp.ClientTimeout(total=deadline)) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/json")
            async for raw in r.content:
                ev = json.loads(raw)
                events.append(ev)
                if until_type and ev["type"] == until_type:
                    break
                if count and sum(e["type"] != "BOOKMARK" for e in events) >= count:
                    break
    return events


def _watch(api: APIServerProcess, path: str, **kw: Any) -> list[dict[str, Any]]:
    params = kw.pop("params", {})
    return asyncio.run(_collect(api, path, params, **kw))


def test_table_watch_for_kubectl_get_w(apiserver: APIServerProcess, admin: Client, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/services"
    admin.post(base, service("tw"))
    events = _watch(apiserver, base, count=1,
                    accept="application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
    table = events[0]["object"]
    assert events[0]["type"] == "ADDED" and table["kind"] == "Table"
    assert table["rows"][0]["cells"][0] == "tw" and table["metadata"]["resourceVersion"]
    assert [c["name"] for c in table["columnDefinitions"]][:2] == ["Name", "Type"]


def _names(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events if e["type"] != "BOOKMARK"]


def test_initial_state_then_live_events(apiserver: APIServerProcess, admin: Client, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/services"
    admin.post(base, service("one"))

    async def scenario() -> list[dict[str, Any]]:
        task = asyncio.create_task(_collect(apiserver, base, {}, count=4))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(admin.post, base, service("two"))
        await asyncio.to_thread(admin.patch, f"{base}/two", {"metadata": {"labels": {"x": "y"}}})
        await asyncio.to_thread(admin.delete, f"{base}/one")
        return await task

    events = asyncio.run(scenario())
    assert _names(events) == [("ADDED", "one"), ("ADDED", "two"), ("MODIFIED", "two"), ("DELETED", "one")]
    revs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert revs == sorted(revs) and len(set(revs)) == 4
    assert events[2]["object"]["metadata"]["labels"] == {"x": "y"}


def test_resume_from_version_replays_missed_events(apiserver: APIServerProcess, admin: Client,
                                                   namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    rvs = []
    for n in ("a", "b", "c"):
        rvs.append(admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": n}})[1]
                   ["metadata"]["resourceVersion"])
    admin.delete(f"{base}/a")
    events = _watch(apiserver, base, params={"resourceVersion": rvs[0]}, count=3)
    assert _names(events) == [("ADDED", "b"), ("ADDED", "c"), ("DELETED", "a")]
    # the legacy /watch/ path and a single-object watch
    events = _watch(apiserver, f"/api/v1/watch/namespaces/{namespace}/configmaps/c",
                    params={"resourceVersion": rvs[0]}, count=1)
    assert _names(events) == [("ADDED", "c")]


def test_label_selector_watch_sees_objects_enter_and_leave(apiserver: APIServerProcess, admin: Client,
                                                           namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/services"
    rv = admin.get(base)[1]["metadata"]["resourceVersion"]
    admin.post(base, service("s", labels={"team": "a"}))
    admin.patch(f"{base}/s", {"metadata": {"labels": {"team": "b"}}})
    admin.patch(f"{base}/s", {"metadata": {"labels": {"team": "a"}}})
    events = _watch(apiserver, base, params={"resourceVersion": rv, "labelSelector": "team=a"}, count=3)
    assert _names(events) == [("ADDED", "s"), ("DELETED", "s"), ("ADDED", "s")]


def test_bookmarks_and_initial_events_end(apiserver: APIServerProcess, admin: Client, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    current = admin.get(base)[1]["metadata"]["resourceVersion"]
    events = _watch(apiserver, base, params={"resourceVersion": current, "allowWatchBookmarks": "true"},
                    until_type="BOOKMARK", deadline=10)
    assert events[-1]["type"] == "BOOKMARK"
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) >= int(current)
    assert events[-1]["object"]["kind"] == "ConfigMap"
    events = _watch(apiserver, base, params={"sendInitialEvents": "true", "allowWatchBookmarks": "true",
                                             "resourceVersionMatch": "NotOlderThan"}, until_type="BOOKMARK")
    assert _names(events) == [("ADDED", "x")]
    assert events[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}
    code, _ = admin.get(base, watch="true", sendInitialEvents="true")
    assert code == 422


def test_timeout_seconds_ends_the_stream(apiserver: APIServerProcess, namespace: str) -> None:
    started = time.monotonic()
    events = _watch(apiserver, f"/api/v1/namespaces/{namespace}/pods", params={"timeoutSeconds": "1"})
    elapsed = time.monotonic() - started
    assert events == [] and 0.9 <= elapsed < 10


def test_fifty_watchers_each_see_every_event_once_in_order(apiserver: APIServerProcess, admin: Client,
                                                           namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    rv = admin.get(base)[1]["metadata"]["resourceVersion"]
    n_events = 60

    async def scenario() -> list[list[dict[str, Any]]]:
        watchers = [asyncio.create_task(_collect(apiserver, base, {"resourceVersion": rv}, count=n_events,
                                                 deadline=60)) for _ in range(50)]
        await asyncio.sleep(0.5)

        def writes() -> None:
            for i in range(n_events // 2):
                admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i:03d}"}})
                admin.patch(f"{base}/c{i:03d}", {"data": {"i": str(i)}})

        await asyncio.to_thread(writes)
        return await asyncio.gather(*watchers)

    results = asyncio.run(scenario())
    expected = [(t, f"c{i:03d}") for i in range(n_events // 2) for t in ("ADDED", "MODIFIED")]
    for events in results:
        assert _names(events) == expected
        revs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert revs == sorted(set(revs))


@pytest.mark.timeout(60)
def test_too_old_resource_version_gets_410() -> None:
    with running_apiserver(extra_args=["--watch-cache-size", "10"]) as api:
        admin = Client(api, api.token)
        base = "/api/v1/namespaces/default/configmaps"
        first = admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c0"}})[1]
        code, page = admin.get(base, limit="1")
        assert page["metadata"].get("continue") is None  # only one object so far
        admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c1"}})
        code, page = admin.get(base, limit="1")
        token = page["metadata"]["continue"]
        for i in range(2, 15):
            admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}})
        events = _watch(api, base, params={"resourceVersion": first["metadata"]["resourceVersion"]}, count=1)
        assert len(events) == 1 and events[0]["type"] == "ERROR"
        status = events[0]["object"]
        assert status["code"] == 410 and status["reason"] == "Expired"
        assert "too old resource version" in status["message"]
        code, status = admin.get(base, limit="1", **{"continue": token})
        assert code == 410 and status["reason"] == "Expired"
        code, status = admin.get(base, resourceVersion=first["metadata"]["resourceVersion"],
                                 resourceVersionMatch="Exact")
        assert code == 410
        # a recent version still replays
        recent = admin.get(base)[1]["metadata"]["resourceVersion"]
        admin.delete(f"{base}/c3")
        assert _names(_watch(api, base, params={"resourceVersion": recent}, count=1)) == [("DELETED", "c3")]

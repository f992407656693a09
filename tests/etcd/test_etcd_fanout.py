"""Watch fan-out on both stores: the pump that writes each batch to every caught-up stream
(apiserver/watch.py) next to streams its task serves (selectors), under concurrent writers.

Every watcher must see exactly its events, once each, in resourceVersion order: plain watchers, a
single-object watch (fieldSelector metadata.name) that the pump serves from a chunk of its own, a
label-selector watch (served by its task: objects enter and leave its view), and a watcher that
drops its connection half way and resumes from the last resourceVersion it saw.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest
import requests
import urllib3

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

pytestmark = pytest.mark.timeout(180)

N_WRITERS = 4
PER_WRITER = 15  # objects per writer: create, label it, unlabel it, delete it


def _session(api: APIServerProcess) -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=
    s.headers["Authorization"] = f"Bearer {api.token}"
    s.verify = api.ca_file or False
    return s


def _writes(api: APIServerProcess, base: str, w: int) -> None:
    s = _session(api)
    for i in range(PER_WRITER):
        name = f"w{w}-{i:02d}"
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
        r = s.post(base, json=body)
        assert r.status_code == 201, r.text
        for labels in ({"pick": "yes"}, {"pick": "no"}):
            r = s.patch(f"{base}/{name}", json={"metadata": {"labels": labels}},
                        headers={"Content-Type": "application/merge-patch+json"})
            assert r.status_code == 200, r.text
        assert s.delete(f"{base}/{name}").status_code == 200


async def _watch(api: APIServerProcess, base: str, params: dict[str, str], count: int,
                 stop_after: int = 0) -> list[dict[str, Any]]:
    """Events until `count` (or `stop_after`, then the connection is dropped)."""
    ctx = ssl.create_default_context(cafile=api.ca_file)
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api.token}"}) as s:
        async with s.get(base, params={"watch": "true", **params}, ssl=ctx,
                         timeout=aiohttp.ClientTimeout(total=120)) as r:
            assert r.status == 200
            async for line in r.content:
                out.append(json.loads(line))
                assert out[-1]["type"] != "ERROR", out[-1]
                if len(out) == (stop_after or count):
                    break
    return out


def _seen(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"], e["object"]["metadata"].get("labels", {}).get("pick", ""))
            for e in events]


def _rvs(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["object"]["metadata"]["resourceVersion"]) for e in events]


@pytest.mark.parametrize("storage", ["sqlite", "etcd3"])
def test_pumped_and_task_served_watchers_each_see_their_events_once_in_order(storage: str) -> None:
    urllib3.disable_warnings()
    with running_apiserver(storage=storage) as api:
        base = api.url + "/api/v1/namespaces/default/configmaps"
        rv = _session(api).get(base).json()["metadata"]["resourceVersion"]
        total = N_WRITERS * PER_WRITER * 4
        one = "w1-07"

        async def scenario() -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]], list[dict[str, Any]],
                                      list[dict[str, Any]]]:
            start = {"resourceVersion": rv}
            plain = [asyncio.create_task(_watch(api, base, start, total)) for _ in range(12)]
            single = asyncio.create_task(_watch(api, base, {**start, "fieldSelector": f"metadata.name={one}"}, 4))
            picked = asyncio.create_task(_watch(api, base, {**start, "labelSelector": "pick=yes"},
                                                N_WRITERS * PER_WRITER * 2))
            half = asyncio.create_task(_watch(api, base, start, total, stop_after=total // 2))
            await asyncio.sleep(0.5)
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(N_WRITERS) as pool:
                await asyncio.gather(*(loop.run_in_executor(pool, _writes, api, base, w) for w in range(N_WRITERS)))
            first = await half
            rest = await _watch(api, base, {"resourceVersion": first[-1]["object"]["metadata"]["resourceVersion"]},
                                total - len(first))
            return await asyncio.gather(*plain), await single, await picked, first + rest

        plain, single, picked, resumed = asyncio.run(scenario())
        metrics = _session(api).get(api.url + "/metrics").text
        pumped = [float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("kproxy_apiserver_watch_events_pumped ")]
        assert pumped and pumped[0] > 0  # the shared fan-out wrote at least part of it
        reference = plain[0]
        assert len(reference) == total
        assert _rvs(reference) == sorted(set(_rvs(reference)))
        for name in {e["object"]["metadata"]["name"] for e in reference}:  # each object's own life, in order
            assert [(t, p) for t, n, p in _seen(reference) if n == name] == [
                ("ADDED", ""), ("MODIFIED", "yes"), ("MODIFIED", "no"), ("DELETED", "no")]
        for other in plain[1:]:
            assert _seen(other) == _seen(reference) and _rvs(other) == _rvs(reference)
        assert _seen(resumed) == _seen(reference) and _rvs(resumed) == _rvs(reference)
        assert _seen(single) == [(t, n, p) for t, n, p in _seen(reference) if n == one]
        # The selector's view: an object enters (ADDED) when labelled yes and leaves (DELETED) when relabelled.
        expected = [("ADDED" if p == "yes" else "DELETED", n, p)
                    for t, n, p in _seen(reference) if t == "MODIFIED"]
        assert _seen(picked) == expected

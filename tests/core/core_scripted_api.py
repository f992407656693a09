"""`scripted_api`: a tiny aiohttp server speaking the list/watch wire format with scripted
faults (410 on a watch, an expired continue token, a dropped stream). It exists only for the
fault cases a well-behaved real API server cannot be made to produce on demand; everything
else runs against controlplane_stub's real API server (see test_core_apiserver.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class ScriptedApi:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    rv: int = 100
    # watch scripts consumed one per watch request: list of events (dicts) then end-of-stream;
    # a string "410" or "500" answers the watch request itself with that HTTP status.
    watch_scripts: list[Any] = field(default_factory=list)
    list_calls: list[dict[str, str]] = field(default_factory=list)
    watch_calls: list[dict[str, str]] = field(default_factory=list)
    expire_continue_once: bool = False
    hang_after_script: bool = False
    url: str = ""

    def put(self, name: str, **spec: Any) -> dict[str, Any]:
        self.rv += 1
        obj = {"metadata": {"name": name, "namespace": "default", "resourceVersion": str(self.rv),
                            "uid": f"uid-{name}", "annotations": {"big": "x" * 10}},
               "spec": spec, "ignored": {"deep": [1, 2, 3]}}
        self.objects[name] = obj
        return obj


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message, "metadata": {}}


@contextlib.asynccontextmanager
async def scripted_api() -> AsyncIterator[ScriptedApi]:
    """Use inside a running loop: `async with scripted_api() as api:` (no pytest-asyncio here)."""
    api = ScriptedApi()

    async def handle(request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        if q.get("watch") in ("true", "1"):
            api.watch_calls.append(q)
            script = api.watch_scripts.pop(0) if api.watch_scripts else []
            if script == "410":
                return web.json_response(_status(410, "Expired", "too old resource version"), status=410)
            if script == "500":
                return web.json_response(_status(500, "InternalError", "etcd is sad"), status=500)
            resp = web.StreamResponse()
            resp.content_type = "application/json"
            await resp.prepare(request)
            for ev in script:
                if isinstance(ev, asyncio.Event):  # a gate the test opens when it is ready
                    await ev.wait()
                    continue
                # bytes: a line written as is (a frame that is not even JSON)
                await resp.write((ev if isinstance(ev, bytes) else json.dumps(ev).encode()) + b"\n")
            if api.hang_after_script and not api.watch_scripts:
                await asyncio.sleep(30)
            return resp
        api.list_calls.append(q)
        names = sorted(api.objects)
        limit = int(q.get("limit", "0") or 0)
        start = 0
        if "continue" in q:
            if api.expire_continue_once:
                api.expire_continue_once = False
                return web.json_response(_status(410, "Expired", "continue token expired"), status=410)
            start = int(q["continue"])
        end = len(names) if not limit else min(len(names), start + limit)
        body = {"kind": "ThingList", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(api.rv),
                             **({"continue": str(end)} if end < len(names) else {})},
                "items": [api.objects[n] for n in names[start:end]]}
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/api/v1/things", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    api.url = f"http://127.0.0.1:{port}"
    try:
        yield api
    finally:
        await runner.cleanup()

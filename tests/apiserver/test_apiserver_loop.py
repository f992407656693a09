"""kproxy-apiserver's event loop: uvloop when installed, asyncio's own with KPROXY_APISERVER_LOOP=asyncio
(main._run_loop); both serve the same API (the rest of tests/apiserver runs on uvloop)."""
from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver


@contextmanager
def _server(loop: str | None) -> Iterator[APIServerProcess]:
    old = os.environ.pop("KPROXY_APISERVER_LOOP", None)
    if loop is not None:
        os.environ["KPROXY_APISERVER_LOOP"] = loop
    try:
        cm = running_apiserver(https=False, storage="sqlite")
        api = cm.__enter__()
    finally:
        os.environ.pop("KPROXY_APISERVER_LOOP", None)
        if old is not None:
            os.environ["KPROXY_APISERVER_LOOP"] = old
    try:
        yield api
    finally:
        cm.__exit__(None, None, None)


def _uvloop_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" in f.read()


@pytest.mark.parametrize("loop", [None, "asyncio"])
def test_event_loop_choice(loop: str | None) -> None:
    pytest.importorskip("uvloop")
    with _server(loop) as api:
        proc = api.proc
        assert _uvloop_mapped(api.pid) == (loop is None)
        req = urllib.request.Request(api.url + "/api/v1/namespaces/default/configmaps", method="POST",
                                     data=json.dumps({"apiVersion": "v1", "kind": "ConfigMap",
                                                      "metadata": {"name": "loop"}, "data": {"k": "v"}}).encode(),
                                     headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201
        get = urllib.request.Request(api.url + "/api/v1/namespaces/default/configmaps/loop", headers={"Authorization": f"Bearer {api.token}"})
        with urllib.request.urlopen(get, timeout=10) as r:
            assert json.load(r)["data"] == {"k": "v"}
    assert proc is not None and proc.returncode == 0  # SIGTERM: a clean shutdown on either loop

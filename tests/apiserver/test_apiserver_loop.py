"""kproxy-apiserver's event loop: uvloop when installed, asyncio's own with KPROXY_APISERVER_LOOP=asyncio
(main._run_loop); both serve the same API (the rest of tests/apiserver runs on uvloop)."""
from __future__ import annotations

import json
import urllib.request

import pytest

from controlplane_stub.apiserver.testing import running_apiserver


def _uvloop_mapped(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" in f.read()


@pytest.mark.parametrize("loop", [None, "asyncio"])
def test_event_loop_choice(loop: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv("KPROXY_APISERVER_LOOP", raising=False)
    if loop is not None:
        monkeypatch.setenv("KPROXY_APISERVER_LOOP", loop)  # read by the server process at its start
    with running_apiserver(https=False, storage="sqlite") as api:
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

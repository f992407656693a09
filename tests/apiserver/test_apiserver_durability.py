"""Acknowledged writes survive kill -9 of the server; the revision and watch history carry on."""
from __future__ import annotations

import threading
import time

import pytest
import requests
from apiserver_helpers import Client

from controlplane_stub.apiserver.testing import running_apiserver

pytestmark = pytest.mark.timeout(90)


def test_acknowledged_writes_survive_kill_9() -> None:
    with running_apiserver() as api:
        admin = Client(api, api.token)
        base = "/api/v1/namespaces/default/configmaps"
        acked: list[tuple[str, str]] = []  # (name, resourceVersion) the server answered 201 for
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set() and i < 5000:
                try:
                    code, body = admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap",
                                                   "metadata": {"name": f"cm{i}"}, "data": {"i": str(i)}})
                except requests.RequestException:
                    return  # the server died mid-request: that write was never acknowledged
                if code == 201:
                    acked.append((body["metadata"]["name"], body["metadata"]["resourceVersion"]))
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 25 and time.monotonic() < deadline:
            time.sleep(0.01)
        api.kill()  # SIGKILL while writes are in flight
        stop.set()
        t.join(30)
        assert len(acked) >= 25
        api.start()
        code, lst = admin.get(base)
        assert code == 200
        stored = {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in lst["items"]}
        for name, rv in acked:
            assert stored.get(name) == rv, f"acknowledged write {name}@{rv} lost after kill -9"
        # the revision continues past everything acknowledged (never reused)
        last_rv = max(int(rv) for _, rv in acked)
        code, cm = admin.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "post-crash"}})
        assert code == 201 and int(cm["metadata"]["resourceVersion"]) > last_rv
        # and the event history survived too: a watch from the first acknowledged version replays
        first_rv = min(int(rv) for _, rv in acked)
        r = admin.watch_lines(base, resourceVersion=str(first_rv), timeoutSeconds="1")
        import json

        names = [json.loads(line)["object"]["metadata"]["name"] for line in r.iter_lines() if line]
        assert names[-1] == "post-crash"
        assert [n for n in names if n != "post-crash"][: len(acked) - 1] == [n for n, _ in acked][1:]


def test_plain_http_mode_for_tests_still_needs_a_token() -> None:
    with running_apiserver(https=False) as api:
        assert api.url.startswith("http://127.0.0.1:") and api.ca_file is None
        assert Client(api, None).get("/api/v1/namespaces")[0] == 401
        code, lst = Client(api, api.token).get("/api/v1/namespaces")
        assert code == 200 and len(lst["items"]) == 4
        import yaml

        with open(api.kubeconfig) as f:
            cfg = yaml.safe_load(f)
        assert cfg["clusters"][0]["cluster"]["server"] == api.url
        assert "certificate-authority-data" not in cfg["clusters"][0]["cluster"]

"""Failover (issue 16): 3 etcd members, 2 API servers, 4 writers, watchers that resume.

kill -9 one etcd member, then one API server, then restart both, under a steady write load. Then:
every write that got 2xx is there with the resourceVersion it was acknowledged with; each writer's
resourceVersions only increase; every watcher, reconnecting to whichever server answers with its
last resourceVersion, saw every later event exactly once (or got 410 and relisted), so its view
equals the final list.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import requests
from etcd_helpers import Client, apiservers

from controlplane_stub.apiserver.testing import APIServerProcess
from controlplane_stub.store.etcd_process import running_etcd

CM = "/api/v1/namespaces/default/configmaps"


class Writer(threading.Thread):
    def __init__(self, n: int, servers: list[APIServerProcess], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.n, self.servers, self.stop = n, servers, stop
        self.acked: dict[str, int] = {}
        self.rvs: list[int] = []
        self.failed = 0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            name = f"w{self.n}-{i}"
            i += 1
            server = self.servers[(self.n + i) % 2]
            body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"i": str(i)}}
            try:
                code, obj = Client(server, timeout=10).call("POST", CM, body)
            except requests.RequestException:
                code, obj = 0, None
            if code == 201:
                rv = int(obj["metadata"]["resourceVersion"])
                self.acked[name] = rv
                self.rvs.append(rv)
            else:
                self.failed += 1
                time.sleep(0.05)
            time.sleep(0.01)


class Watcher(threading.Thread):
    """Keeps a view of the configmaps from list + watch, resuming from its last resourceVersion."""

    def __init__(self, n: int, servers: list[APIServerProcess], stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.n, self.servers, self.stop = n, servers, stop
        self.view: dict[str, int] = {}
        self.rv = 0
        self.relists = 0
        self.reconnects = 0
        self.errors: list[str] = []

    def _relist(self, c: Client) -> None:
        code, listed = c.call("GET", CM)
        if code != 200:
            raise requests.ConnectionError(f"list {code}")
        self.view = {i["metadata"]["name"]: int(i["metadata"]["resourceVersion"]) for i in listed["items"]}
        self.rv = int(listed["metadata"]["resourceVersion"])

    def run(self) -> None:
        turn = self.n
        need_list = True
        while not self.stop.is_set():
            turn += 1
            c = Client(self.servers[turn % 2], timeout=5)
            try:
                if need_list:
                    self._relist(c)
                    need_list = False
                resp = c.watch(CM, resourceVersion=str(self.rv), allowWatchBookmarks="true", timeoutSeconds="30")
                for line in resp.iter_lines():
                    if self.stop.is_set():
                        break
                    if not line:
                        continue
                    self._event(json.loads(line))
                    if self.rv < 0:  # 410
                        need_list = True
                        self.relists += 1
                        break
                resp.close()
            except (requests.RequestException, ValueError):
                pass
            self.reconnects += 1
            time.sleep(0.05)

    def _event(self, ev: dict[str, Any]) -> None:
        obj = ev["object"]
        if ev["type"] == "ERROR":
            if obj.get("code") == 410:
                self.rv = -1
            else:
                self.errors.append(f"error event {obj}")
            return
        rv = int(obj["metadata"]["resourceVersion"])
        if ev["type"] == "BOOKMARK":
            self.rv = max(self.rv, rv)
            return
        name = obj["metadata"]["name"]
        if rv <= self.rv:
            self.errors.append(f"{ev['type']} {name} at {rv} after {self.rv}: out of order or twice")
        if ev["type"] == "ADDED" and name in self.view:
            self.errors.append(f"ADDED {name} at {rv} twice (had {self.view[name]})")
        if ev["type"] == "DELETED":
            self.view.pop(name, None)
        else:
            self.view[name] = rv
        self.rv = rv


def test_failover_kill_etcd_member_and_api_server_under_load() -> None:
    with running_etcd(3) as etcd, apiservers(etcd, 2, "/registry", "--bootstrap-reconcile-interval", "1") as servers:
        stop, stop_watching = threading.Event(), threading.Event()
        writers = [Writer(n, servers, stop) for n in range(4)]
        watchers = [Watcher(n, servers, stop_watching) for n in range(3)]
        for t in (*watchers, *writers):
            t.start()

        def acked() -> int:
            return sum(len(w.acked) for w in writers)

        def progress(what: str, more: int = 20, timeout: float = 30) -> int:
            """Writes go on: `more` acknowledged writes within timeout. A write in flight when the etcd
            leader dies waits for etcd's own request timeout (7 s here), so phases are not fixed times."""
            start = acked()
            deadline = time.monotonic() + timeout
            while acked() < start + more:
                assert time.monotonic() < deadline, f"writes stopped {what}: {acked() - start} in {timeout}s"
                time.sleep(0.1)
            return acked()

        a0 = progress("at the start", 100)
        etcd.kill(0)  # the member every server's gRPC channel picked first
        a1 = progress("after the etcd member kill")
        servers[0].kill()  # kill -9 one API server
        a2 = progress("after the API server kill")
        etcd.start(0)
        servers[0].start()
        etcd.wait_healthy(30, members=[0])
        a3 = progress("after both restarts", 50)
        stop.set()
        for w in writers:
            w.join(30)
        print(f"\nacknowledged writes: {a0} before, {a1 - a0} after the etcd kill, {a2 - a1} after the API server "
              f"kill, {a3 - a2} after both restarts; failed (no 2xx): {sum(w.failed for w in writers)}")

        # Every 2xx write is there, with the resourceVersion it was acknowledged with, on both servers.
        finals = []
        for s in servers:
            code, listed = Client(s).call("GET", CM)
            assert code == 200
            finals.append(listed)
            have = {i["metadata"]["name"]: int(i["metadata"]["resourceVersion"]) for i in listed["items"]}
            for w in writers:
                missing = {k: v for k, v in w.acked.items() if have.get(k) != v}
                assert not missing, f"acknowledged writes lost or changed: {list(missing.items())[:5]}"
        final_rv = max(int(f["metadata"]["resourceVersion"]) for f in finals)
        for w in writers:
            assert w.rvs == sorted(set(w.rvs)), f"writer {w.n}: resourceVersions went backwards"
            assert all(rv <= final_rv for rv in w.rvs)

        # Every watcher's view converges on the final list: each event exactly once, or a 410 and a relist.
        final = {i["metadata"]["name"]: int(i["metadata"]["resourceVersion"]) for i in finals[0]["items"]}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(w.view != final for w in watchers):
            time.sleep(0.2)
        stop_watching.set()
        for w in watchers:
            assert not w.errors, w.errors[:5]
            assert w.view == final, (f"watcher {w.n}: {len(w.view)} objects, final list {len(final)}; missing "
                                     f"{sorted(set(final) - set(w.view))[:5]}")
        # The watchers that were on the killed server lived through it by reconnecting.
        assert all(w.reconnects >= 1 for w in watchers if (w.n + 1) % 2 == 0)
        print(f"watchers: reconnects {[w.reconnects for w in watchers]}, relists after 410 "
              f"{[w.relists for w in watchers]}")

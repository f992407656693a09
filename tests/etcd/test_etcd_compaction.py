"""Compaction on etcd (issue 16): a watch or a pinned list at a compacted revision gets 410 Gone; a
list continues page by page at its first page's revision while writes happen."""
from __future__ import annotations

import json
import re
import time

from etcd_helpers import Client, apiservers, configmap

from controlplane_stub.store.etcd_process import EtcdCluster

CM = "/api/v1/namespaces/default/configmaps"


def _compacted_past(log_path: str, revision: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            revs = [int(m) for m in re.findall(r"event=etcd_compacted revision=(\d+)", f.read())]
        if revs and max(revs) > revision:
            return max(revs)
        time.sleep(0.2)
    raise AssertionError(f"no compaction past {revision} within {timeout}s")


def test_watch_and_list_from_a_compacted_revision_get_410(etcd1: EtcdCluster, prefix: str) -> None:
    with apiservers(etcd1, 1, prefix, "--etcd-compaction-interval", "1s") as (api,):
        c = Client(api)
        code, first = c.call("POST", CM, configmap("before"))
        assert code == 201
        assert c.call("POST", CM, configmap("before-2"))[0] == 201
        old_rv = int(first["metadata"]["resourceVersion"])
        code, page = c.call("GET", CM, limit="1")
        assert code == 200 and page["metadata"].get("continue"), page
        for i in range(3):
            assert c.call("POST", CM, configmap(f"after-{i}"))[0] == 201
        compacted = _compacted_past(api.log_path, old_rv, 15)
        # etcd itself has forgotten old_rv: the compaction is real, not only the server's window.
        resp = c.watch(CM, resourceVersion=str(old_rv), timeoutSeconds="5")
        lines = [json.loads(x) for x in resp.iter_lines() if x]
        assert lines and lines[-1]["type"] == "ERROR", lines
        assert lines[-1]["object"]["code"] == 410 and lines[-1]["object"]["reason"] == "Expired", lines
        code, body = c.call("GET", CM, resourceVersion=str(old_rv), resourceVersionMatch="Exact")
        assert code == 410, body
        code, body = c.call("GET", CM, limit="1", **{"continue": page["metadata"]["continue"]})
        assert code == 410 and "continue" in body["message"], body
        # A watch from after the compaction still works: the client relists and goes on.
        code, listed = c.call("GET", CM)
        assert code == 200 and int(listed["metadata"]["resourceVersion"]) > compacted
        names = {i["metadata"]["name"] for i in listed["items"]}
        assert names == {"before", "before-2", "after-0", "after-1", "after-2"}
        resp = c.watch(CM, resourceVersion=listed["metadata"]["resourceVersion"], timeoutSeconds="10")
        assert c.call("DELETE", f"{CM}/before")[0] == 200
        for line in resp.iter_lines():
            if line:
                ev = json.loads(line)
                if ev["type"] != "BOOKMARK":
                    assert (ev["type"], ev["object"]["metadata"]["name"]) == ("DELETED", "before")
                    break
        resp.close()


def test_a_list_continues_across_pages_at_one_revision_while_writes_happen(etcd1: EtcdCluster, prefix: str) -> None:
    with apiservers(etcd1, 2, prefix) as (a, b):
        ca, cb = Client(a), Client(b)
        for i in range(60):
            assert ca.call("POST", CM, configmap(f"cm-{i:03d}", "orig"))[0] == 201
        code, page = cb.call("GET", CM, limit="7")
        assert code == 200
        rv = page["metadata"]["resourceVersion"]
        got = list(page["items"])
        step = 0
        while page["metadata"].get("continue"):
            # Writes between pages, through both servers: new keys, deletions and updates of keys
            # on later pages. The list must still show the state at rv.
            writer = ca if step % 2 else cb
            assert writer.call("POST", CM, configmap(f"new-{step}"))[0] == 201
            victim = f"cm-{59 - step:03d}"
            assert writer.call("DELETE", f"{CM}/{victim}")[0] == 200
            code, cur = writer.call("GET", f"{CM}/cm-{40 - step:03d}")
            if code == 200:
                cur["data"]["k"] = "changed"
                assert writer.call("PUT", f"{CM}/cm-{40 - step:03d}", cur)[0] == 200
            step += 1
            reader = ca if step % 2 else cb  # pages from either server: the token is the API's
            code, page = reader.call("GET", CM, limit="7", **{"continue": page["metadata"]["continue"]})
            assert code == 200, page
            assert page["metadata"]["resourceVersion"] == rv
            got.extend(page["items"])
        assert step >= 8
        assert [i["metadata"]["name"] for i in got] == [f"cm-{i:03d}" for i in range(60)]
        assert all(i["data"]["k"] == "orig" for i in got)
        assert all(int(i["metadata"]["resourceVersion"]) <= int(rv) for i in got)
        code, now = ca.call("GET", CM)
        names = {i["metadata"]["name"] for i in now["items"]}
        assert len(names) == 60 and f"new-{step - 1}" in names and "cm-059" not in names

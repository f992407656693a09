"""ReplicaSet controller: keeps spec.replicas active pods per ReplicaSet and reports its status."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of
from controlplane_stub.controllers.common import (
    condition,
    controller_of,
    controller_ref,
    pod_active,
    pod_available,
    pod_ready,
)
from controlplane_stub.controllers.index import Indexes
from controlplane_stub.selectors import label_selector_matches

log = logging.getLogger("kpc.replicaset")
Obj = dict[str, Any]

# Upstream's slow start: creations go out in batches of 1, 2, 4, ... so that a broken template
# fails fast instead of flooding the server with doomed pods.
SLOW_START_INITIAL_BATCH = 1
BURST_REPLICAS = 500


def deletion_rank(pod: Obj) -> tuple[int, int, int, int, str]:
    """Which pods to delete first when scaling down (upstream's ActivePods ordering, simplified):
    unscheduled, then pending, then not ready, then more restarts, then the newest."""
    st = pod.get("status") or {}
    scheduled = 1 if pod["spec"].get("nodeName") else 0
    phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(st.get("phase", "Pending"), 0)
    ready = 1 if pod_ready(pod) else 0
    restarts = sum(int(c.get("restartCount", 0)) for c in st.get("containerStatuses") or [])
    created = str(pod["metadata"].get("creationTimestamp", ""))
    # ascending sort puts the first to delete first; newest first => negate via reverse string compare
    return (scheduled, phase, ready, -restarts, "".join(chr(255 - ord(ch)) for ch in created))


class ReplicaSetController:
    def __init__(self, client: api.Client, pods: Informer, pod_index: Indexes, rss: Informer) -> None:
        self.client = client
        self.pods = pods
        self.pod_index = pod_index
        self.rss = rss
        self.queue = WorkQueue()
        rss.add_handler(self._on_rs)
        pods.add_handler(self._on_pod)

    def _on_rs(self, event: str, rs: Obj, old: Obj | None) -> None:
        self.queue.add(key_of(rs))

    def _on_pod(self, event: str, pod: Obj, old: Obj | None) -> None:
        for p in (pod, old):
            if p is None:
                continue
            ref = controller_of(p)
            if ref and ref.get("kind") == "ReplicaSet":
                self.queue.add(f"{p['metadata']['namespace']}/{ref['name']}")

    def owned_pods(self, rs: Obj) -> list[Obj]:
        uid = rs["metadata"]["uid"]
        return [p for p in self.pod_index.owned_by(uid) if (controller_of(p) or {}).get("uid") == uid]

    async def sync(self, key: str) -> None:
        rs = self.rss.cache.get(key)
        if rs is None or rs["metadata"].get("deletionTimestamp"):
            return
        ns = rs["metadata"]["namespace"]
        pods = [p for p in self.owned_pods(rs) if pod_active(p)]
        want = int(rs["spec"].get("replicas", 1))
        diff = want - len(pods)
        if diff > 0:
            await self._create(rs, min(diff, BURST_REPLICAS))
        elif diff < 0:
            victims = sorted(pods, key=deletion_rank)[:-diff]
            await asyncio.gather(*(self._delete(p) for p in victims))
        await self._update_status(rs, ns)

    async def _create(self, rs: Obj, n: int) -> None:
        tmpl = rs["spec"]["template"]
        md = tmpl.get("metadata") or {}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": rs["metadata"]["name"] + "-",
                "namespace": rs["metadata"]["namespace"],
                "labels": dict(md.get("labels") or {}),
                "annotations": dict(md.get("annotations") or {}),
                "ownerReferences": [controller_ref(rs)],
            },
            "spec": tmpl["spec"],
        }
        url = api.path("pods", rs["metadata"]["namespace"])
        batch, done = SLOW_START_INITIAL_BATCH, 0
        while done < n:
            size = min(batch, n - done)
            results = await asyncio.gather(
                *(self.client.create(url, pod) for _ in range(size)), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            for r in results:
                if isinstance(r, dict):
                    await self.pods.assume(r)
            done += size
            if failed:
                raise failed[0]
            batch *= 2

    async def _delete(self, pod: Obj) -> None:
        md = pod["metadata"]
        r = await self.client.delete(api.path("pods", md["namespace"], md["name"]))
        if r is not None and r.get("kind") == "Pod" and r["metadata"].get("deletionTimestamp"):
            await self.pods.assume(r)  # graceful: the pod stays until its node agent finishes it
        else:
            await self.pods.assume_deleted(pod)

    async def _update_status(self, rs: Obj, ns: str) -> None:
        pods = [p for p in self.owned_pods(rs) if pod_active(p)]
        labels = rs["spec"]["template"].get("metadata", {}).get("labels") or {}
        min_ready = int(rs["spec"].get("minReadySeconds", 0))
        t = time.time()
        available = sum(1 for p in pods if pod_available(p, min_ready, t))
        ready = sum(1 for p in pods if pod_ready(p))
        st: Obj = {
            "replicas": len(pods),
            "fullyLabeledReplicas": sum(
                1
                for p in pods
                if label_selector_matches({"matchLabels": labels}, p["metadata"].get("labels") or {})
            ),
            "readyReplicas": ready,
            "availableReplicas": available,
            "observedGeneration": rs["metadata"].get("generation", 1),
        }
        if min_ready and ready > available:
            self.queue.add_after(key_of(rs), 1.0)
        cur = rs.get("status") or {}
        if all(cur.get(k, 0) == v for k, v in st.items()) and condition(rs, "ReplicaFailure") is None:
            return
        try:
            r = await self.client.patch(api.obj_path("replicasets", rs, "status"), {"status": st})
            await self.rss.assume(r)
        except api.ApiError as e:
            if e.code != 404:
                raise

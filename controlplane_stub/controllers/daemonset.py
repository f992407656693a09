"""DaemonSet controller: one pod of each DaemonSet on every node its template's nodeSelector admits,
and its status (upstream's pkg/controller/daemon, reduced):

- A pod is made per fitting node with spec.nodeName set (the scheduler is not involved, as
  upstream before 1.12); a pod on a node that no longer fits, or a second one, is deleted.
- Node taints and the pods' tolerations are not weighed (every node fits but for nodeSelector).
- Updates: pods carry the label controller-revision-hash of their template; with RollingUpdate an
  outdated pod is deleted (and re-made from the new template) while fewer than maxUnavailable of
  the DaemonSet's pods are unavailable; with OnDelete only when someone deletes it. No
  ControllerRevisions are kept (rollback is not served).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of
from controlplane_stub.controllers.common import (
    controller_of,
    controller_ref,
    pod_active,
    pod_available,
    pod_ready,
    resolve_int_or_percent,
)
from controlplane_stub.controllers.index import Indexes

log = logging.getLogger("kpc.daemonset")
Obj = dict[str, Any]
HASH_LABEL = "controller-revision-hash"


def template_hash(ds: Obj) -> str:
    raw = json.dumps(ds["spec"].get("template") or {}, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:10]


def node_fits(ds: Obj, node: Obj) -> bool:
    selector = ((ds["spec"].get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
    labels = node["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


class DaemonSetController:
    def __init__(self, client: api.Client, dss: Informer, pods: Informer, pod_index: Indexes, nodes: Informer) -> None:
        self.client, self.dss, self.pods, self.pod_index, self.nodes = client, dss, pods, pod_index, nodes
        self.queue = WorkQueue()
        dss.add_handler(lambda ev, ds, old: self.queue.add(key_of(ds)))
        pods.add_handler(self._on_pod)
        nodes.add_handler(self._on_node)

    def _on_node(self, event: str, node: Obj, old: Obj | None) -> None:
        for key in list(self.dss.cache):  # a node came, went or changed its labels: every DaemonSet
            self.queue.add(key)

    def _on_pod(self, event: str, pod: Obj, old: Obj | None) -> None:
        for p in (pod, old):
            ref = controller_of(p) if p is not None else None
            if p is not None and ref and ref.get("kind") == "DaemonSet":
                self.queue.add(f"{p['metadata']['namespace']}/{ref['name']}")

    def owned_pods(self, ds: Obj) -> list[Obj]:
        uid = ds["metadata"]["uid"]
        return [p for p in self.pod_index.owned_by(uid) if (controller_of(p) or {}).get("uid") == uid and pod_active(p)]

    async def sync(self, key: str) -> None:
        ds = self.dss.cache.get(key)
        if ds is None or ds["metadata"].get("deletionTimestamp"):
            return
        want = {n["metadata"]["name"] for n in self.nodes.cache.values() if node_fits(ds, n)}
        by_node: dict[str, list[Obj]] = {}
        for p in self.owned_pods(ds):
            by_node.setdefault(p["spec"].get("nodeName") or "", []).append(p)
        doomed = [p for node, ps in by_node.items() if node not in want for p in ps]
        doomed += [p for node, ps in by_node.items() if node in want for p in ps[1:]]  # one per node
        h = template_hash(ds)
        strategy = ds["spec"].get("updateStrategy") or {}
        if strategy.get("type", "RollingUpdate") == "RollingUpdate":
            min_ready, t = int(ds["spec"].get("minReadySeconds", 0)), time.time()
            max_unavailable = max(1, resolve_int_or_percent(
                (strategy.get("rollingUpdate") or {}).get("maxUnavailable", 1), len(want), True))
            current = [ps[0] for node, ps in by_node.items() if node in want]
            unavailable = len(want) - sum(1 for p in current if pod_available(p, min_ready, t))
            for p in current:
                if unavailable >= max_unavailable:
                    break
                if (p["metadata"].get("labels") or {}).get(HASH_LABEL) != h and pod_available(p, min_ready, t):
                    doomed.append(p)
                    unavailable += 1
        for p in doomed:
            await self._delete(p)
        for node in sorted(want - set(by_node)):
            await self._create(ds, node, h)
        await self._update_status(ds, want, h)

    async def _create(self, ds: Obj, node: str, h: str) -> None:
        tmpl = ds["spec"]["template"]
        md = tmpl.get("metadata") or {}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": ds["metadata"]["name"] + "-", "namespace": ds["metadata"]["namespace"],
                            "labels": {**(md.get("labels") or {}), HASH_LABEL: h},
                            "annotations": dict(md.get("annotations") or {}),
                            "ownerReferences": [controller_ref(ds)]},
               "spec": {**tmpl["spec"], "nodeName": node}}
        created = await self.client.create(api.path("pods", ds["metadata"]["namespace"]), pod)
        await self.pods.assume(created)

    async def _delete(self, pod: Obj) -> None:
        md = pod["metadata"]
        try:
            r = await self.client.delete(api.path("pods", md["namespace"], md["name"]))
        except api.ApiError as e:
            if e.code != 404:
                raise
            r = None
        if r is not None and r.get("kind") == "Pod" and r["metadata"].get("deletionTimestamp"):
            await self.pods.assume(r)  # graceful: its node agent finishes it
        else:
            await self.pods.assume_deleted(pod)

    async def _update_status(self, ds: Obj, want: set[str], h: str) -> None:
        min_ready, t = int(ds["spec"].get("minReadySeconds", 0)), time.time()
        pods = self.owned_pods(ds)
        on = {p["spec"].get("nodeName") or "": p for p in pods}
        fitting = [on[n] for n in want if n in on]
        available = sum(1 for p in fitting if pod_available(p, min_ready, t))
        st: Obj = {
            "desiredNumberScheduled": len(want),
            "currentNumberScheduled": len(fitting),
            "numberMisscheduled": len(set(on) - want),
            "numberReady": sum(1 for p in fitting if pod_ready(p)),
            "numberAvailable": available,
            "numberUnavailable": len(want) - available,
            "updatedNumberScheduled": sum(1 for p in fitting if (p["metadata"].get("labels") or {}).get(HASH_LABEL) == h),
            "observedGeneration": ds["metadata"].get("generation", 1),
        }
        if min_ready and st["numberReady"] > available:
            self.queue.add_after(key_of(ds), 1.0)
        cur = ds.get("status") or {}
        if all(cur.get(k, 0) == v for k, v in st.items()):
            return
        try:
            r = await self.client.patch(api.obj_path("daemonsets", ds, "status"), {"status": st})
            await self.dss.assume(r)
        except api.ApiError as e:
            if e.code != 404:
                raise

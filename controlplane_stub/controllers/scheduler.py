"""Scheduler: binds pending pods to Ready nodes, spreading a controller's pods over the nodes.

Filters: node Ready, not unschedulable, nodeSelector, NoSchedule/NoExecute taints vs tolerations.
Score (lower wins): pods of the same owner on the node, then all pods on the node, then name
(upstream's PodTopologySpread default + LeastAllocated, reduced to counts).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of
from controlplane_stub.controllers.common import condition, controller_of, now
from controlplane_stub.controllers.index import Indexes

log = logging.getLogger("kpc.scheduler")
Obj = dict[str, Any]
SCHEDULER_NAME = "default-scheduler"


def node_ready(node: Obj) -> bool:
    c = condition(node, "Ready")
    return c is not None and c.get("status") == "True"


def tolerates(pod: Obj, taint: Obj) -> bool:
    for t in pod["spec"].get("tolerations") or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def fits(pod: Obj, node: Obj) -> str:
    """Empty when the pod may run on node, else why not (for the Unschedulable message)."""
    if not node_ready(node):
        return "node(s) were not ready"
    if node["spec"].get("unschedulable"):
        return "node(s) were unschedulable"
    labels = node["metadata"].get("labels") or {}
    for k, v in (pod["spec"].get("nodeSelector") or {}).items():
        if labels.get(k) != v:
            return "node(s) didn't match Pod's node affinity/selector"
    for taint in node["spec"].get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(pod, taint):
            return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    return ""


class Scheduler:
    def __init__(self, client: api.Client, pods: Informer, pod_index: Indexes, nodes: Informer) -> None:
        self.client = client
        self.pods = pods
        self.pod_index = pod_index
        self.nodes = nodes
        self.queue = WorkQueue()
        self.assumed: dict[str, str] = {}  # pod key -> node, until the watch shows the binding
        self.unschedulable: set[str] = set()
        self.unschedulable_reported: set[str] = set()
        self.binding_supported = True
        self.binding_tasks: set[asyncio.Task[None]] = set()
        self.events = api.EventRecorder(client, "default-scheduler")
        pods.add_handler(self._on_pod)
        nodes.add_handler(self._on_node)

    def _wants(self, pod: Obj) -> bool:
        return (
            not pod["spec"].get("nodeName")
            and not pod["metadata"].get("deletionTimestamp")
            and pod["spec"].get("schedulerName", SCHEDULER_NAME) == SCHEDULER_NAME
            and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
        )

    def _on_pod(self, event: str, pod: Obj, old: Obj | None) -> None:
        k = key_of(pod)
        if event == "DELETED" or pod["spec"].get("nodeName"):
            self.assumed.pop(k, None)
            self.unschedulable.discard(k)
            return
        if self._wants(pod):
            self.queue.add(k)

    def _on_node(self, event: str, node: Obj, old: Obj | None) -> None:
        # A node that joins or turns Ready may fit the pods that did not fit before.
        for k in list(self.unschedulable):
            self.queue.add(k)

    def _load(self, node: str, owner_uid: str) -> tuple[int, int]:
        same = 0
        total = self.pod_index.on_node(node) + sum(1 for n in self.assumed.values() if n == node)
        if owner_uid:
            for p in self.pod_index.owned_by(owner_uid):
                if p["spec"].get("nodeName") == node or self.assumed.get(key_of(p)) == node:
                    same += 1
        return same, total

    async def sync(self, key: str) -> None:
        pod = self.pods.cache.get(key)
        if pod is None or not self._wants(pod) or key in self.assumed:
            return
        reasons: dict[str, int] = {}
        candidates = []
        for node in self.nodes.cache.values():
            why = fits(pod, node)
            if why:
                reasons[why] = reasons.get(why, 0) + 1
            else:
                candidates.append(node["metadata"]["name"])
        if not candidates:
            self.unschedulable.add(key)
            msg = (
                f"0/{len(self.nodes.cache)} nodes are available: "
                + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
                + "."
            )
            if key not in self.unschedulable_reported:
                self.unschedulable_reported.add(key)
                self.events.event(
                    {"apiVersion": "v1", "kind": "Pod", "metadata": pod["metadata"]},
                    "Warning",
                    "FailedScheduling",
                    msg,
                )
            await self._condition(pod, "False", "Unschedulable", msg)
            self.queue.add_after(key, 5.0)
            return
        owner = (controller_of(pod) or {}).get("uid", "")
        best = min(candidates, key=lambda n: (*self._load(n, owner), n))
        # Bind in the background, as kube-scheduler's binding cycle does: the pod is assumed on the
        # node at once (so the next decision counts it) and the worker moves on to the next pod.
        self.assumed[key] = best
        t = asyncio.create_task(self._bind_async(pod, best))
        self.binding_tasks.add(t)
        t.add_done_callback(self.binding_tasks.discard)

    async def _bind_async(self, pod: Obj, node: str) -> None:
        key = key_of(pod)
        try:
            await self.bind(pod, node)
        except Exception as e:  # back to the queue: the next attempt may choose another node
            log.warning("scheduler: binding %s to %s failed: %r", key, node, e)
            self.assumed.pop(key, None)
            self.queue.add_after(key, 1.0)

    async def bind(self, pod: Obj, node: str) -> None:
        md = pod["metadata"]
        key = key_of(pod)
        self.assumed[key] = node
        try:
            if self.binding_supported:
                try:
                    await self.client.create(
                        api.path("pods", md["namespace"], md["name"], "binding"),
                        {
                            "apiVersion": "v1",
                            "kind": "Binding",
                            "metadata": {
                                "name": md["name"],
                                "namespace": md["namespace"],
                                "uid": md.get("uid"),
                            },
                            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                        },
                    )
                    self.unschedulable.discard(key)
                    self._scheduled(pod, node)
                    return
                except api.ApiError as e:
                    if e.code == 404 and f'"{md["name"]}"' in str(e):
                        self.assumed.pop(key, None)
                        return  # the pod is gone
                    if e.code not in (404, 405):
                        raise
                    log.warning("pods/binding not served (%s); binding by setting spec.nodeName", e)
                    self.binding_supported = False
            await self.client.patch(api.obj_path("pods", pod), {"spec": {"nodeName": node}})
            self.unschedulable.discard(key)
            self._scheduled(pod, node)
            # No PodScheduled=True write here: the node agent may already be writing the pod's
            # status (a merge patch replaces the whole conditions list), and it reports
            # PodScheduled itself, as the binding subresource would have.
        except Exception:
            self.assumed.pop(key, None)
            raise

    def _scheduled(self, pod: Obj, node: str) -> None:
        md = pod["metadata"]
        self.events.event(
            {"apiVersion": "v1", "kind": "Pod", "metadata": md},
            "Normal",
            "Scheduled",
            f"Successfully assigned {md['namespace']}/{md['name']} to {node}",
        )

    async def _condition(self, pod: Obj, status: str, reason: str, message: str) -> None:
        c = condition(pod, "PodScheduled")
        if c and c.get("status") == status and c.get("message", "") == message:
            return
        cond: Obj = {
            "type": "PodScheduled",
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": now(),
        }
        if reason:
            cond["reason"], cond["message"] = reason, message
        conds = [
            x for x in (pod.get("status") or {}).get("conditions") or [] if x.get("type") != "PodScheduled"
        ]
        try:
            await self.client.patch(
                api.obj_path("pods", pod, "status"), {"status": {"conditions": conds + [cond]}}
            )
        except api.ApiError as e:
            if e.code != 404:
                raise

"""Node lifecycle: a node whose Lease is not renewed within the grace period turns Ready=Unknown,
and the pods on it are marked not Ready, so that their endpoints stop receiving traffic (upstream's
node lifecycle controller, without the NoExecute eviction)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer
from controlplane_stub.controllers.common import condition, now
from controlplane_stub.controllers.index import Indexes

log = logging.getLogger("kpc.nodelifecycle")
Obj = dict[str, Any]


def lease_age(lease: Obj | None, at: float) -> float:
    if lease is None:
        return float("inf")
    t = (lease.get("spec") or {}).get("renewTime") or ""
    try:
        renewed = datetime.strptime(str(t)[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return float("inf")
    return at - renewed


class NodeLifecycleController:
    def __init__(
        self,
        client: api.Client,
        nodes: Informer,
        leases: Informer,
        pods: Informer,
        pod_index: Indexes,
        grace_seconds: float = 40.0,
        period: float = 5.0,
    ) -> None:
        self.client = client
        self.nodes = nodes
        self.leases = leases
        self.pods = pods
        self.pod_index = pod_index
        self.grace = grace_seconds
        self.period = period
        self.events = api.EventRecorder(client, "node-controller")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.check(time.time())
            except api.ApiError as e:
                log.warning("node lifecycle: %s", e)

    async def check(self, at: float) -> None:
        for node in list(self.nodes.cache.values()):
            name = node["metadata"]["name"]
            ready = condition(node, "Ready")
            if ready is None or ready.get("status") != "True":
                continue
            if lease_age(self.leases.cache.get(f"kube-node-lease/{name}"), at) <= self.grace:
                continue
            log.warning("node=%s lease not renewed for %.0fs: Ready=Unknown", name, self.grace)
            t = now()
            conds = [dict(c) for c in (node.get("status") or {}).get("conditions") or []]
            for c in conds:
                c.update(
                    status="Unknown",
                    reason="NodeStatusUnknown",
                    message="Kubelet stopped posting node status.",
                    lastTransitionTime=t,
                )
            await self.client.patch(
                api.path("nodes", name=name) + "/status", {"status": {"conditions": conds}}
            )
            self.events.event(
                {"apiVersion": "v1", "kind": "Node", "metadata": node["metadata"]},
                "Normal",
                "NodeNotReady",
                f"Node {name} status is now: NodeNotReady",
            )
            await self.mark_pods_not_ready(name, t)

    async def mark_pods_not_ready(self, node: str, t: str) -> None:
        for key in list(self.pod_index.by_node.get(node, ())):
            pod = self.pods.cache.get(key)
            if pod is None:
                continue
            conds = [dict(c) for c in (pod.get("status") or {}).get("conditions") or []]
            changed = False
            for c in conds:
                if c.get("type") == "Ready" and c.get("status") != "False":
                    c.update(status="False", lastTransitionTime=t)
                    changed = True
            if changed:
                try:
                    await self.client.patch(
                        api.obj_path("pods", pod, "status"), {"status": {"conditions": conds}}
                    )
                except api.ApiError as e:
                    if e.code != 404:
                        raise

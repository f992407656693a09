"""Simulated node agents: Nodes that report Ready and pods that turn Running and Ready at once,
with IPs from the node's podCIDR, but no namespaces and no processes.

For control-plane benchmarks and controller tests at a scale (thousands of pods) that real
processes on one machine cannot reach. Everything they write goes through the real API server.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent.pods import now

Obj = dict[str, Any]


class SimulatedNodes:
    def __init__(
        self,
        client: api.Client,
        count: int,
        *,
        prefix: str = "sim",
        zone_count: int = 3,
        ready_delay: float = 0.0,
    ) -> None:
        self.client = client
        self.names = [f"{prefix}-{i}" for i in range(1, count + 1)]
        self.cidrs = {
            n: ipaddress.ip_network(f"10.{200 + i // 256}.{i % 256}.0/24") for i, n in enumerate(self.names)
        }
        self.next_ip = {n: 2 for n in self.names}
        self.zone_count = zone_count
        self.ready_delay = ready_delay
        self.informer = api.Informer(client, "pods")
        self.informer.add_handler(self._on_pod)
        self.started: set[str] = set()
        self.silent: set[str] = set()  # nodes whose Lease is no longer renewed (a "dead" agent)
        self.pending: set[asyncio.Task[None]] = set()

    async def register(self) -> None:
        for i, n in enumerate(self.names):
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": n,
                    "labels": {
                        "kubernetes.io/hostname": n,
                        "topology.kubernetes.io/zone": f"zone-{i % self.zone_count}",
                    },
                },
                "spec": {"podCIDR": str(self.cidrs[n])},
            }
            try:
                await self.client.create(api.path("nodes"), node)
            except api.ApiError as e:
                if e.code != 409:
                    raise
            # The Lease before the Ready condition, as a kubelet starts: a node lifecycle check
            # between the two would find a Ready node without a Lease and turn it Unknown for good
            # (nothing here posts Ready again), leaving its pods not ready.
            await self._create_lease(n)
            t = now()
            await self.client.patch(
                api.path("nodes", name=n) + "/status",
                {
                    "status": {
                        "addresses": [
                            {"type": "InternalIP", "address": str(self.cidrs[n].network_address + 1)}
                        ],
                        # What a kubelet reports; the EndpointSlice controller's Auto hints
                        # weigh zones by allocatable CPU.
                        "capacity": {"cpu": "2", "pods": "110"},
                        "allocatable": {"cpu": "2", "pods": "110"},
                        "conditions": [
                            {
                                "type": "Ready",
                                "status": "True",
                                "reason": "KubeletReady",
                                "message": "simulated",
                                "lastHeartbeatTime": t,
                                "lastTransitionTime": t,
                            }
                        ],
                    }
                },
            )

    def _on_pod(self, event: str, pod: Obj, old: Obj | None) -> None:
        node = pod["spec"].get("nodeName")
        uid = pod["metadata"]["uid"]
        if event == "DELETED" or node not in self.cidrs:
            return
        if pod["metadata"].get("deletionTimestamp"):
            # Nothing to stop: confirm the graceful deletion at once, as a kubelet does when done.
            t = asyncio.create_task(self._finish(pod))
            self.pending.add(t)
            t.add_done_callback(self.pending.discard)
            return
        if uid in self.started:
            return
        self.started.add(uid)
        t = asyncio.create_task(self._run(pod, node))
        self.pending.add(t)
        t.add_done_callback(self.pending.discard)

    async def _finish(self, pod: Obj) -> None:
        md = pod["metadata"]
        try:
            await self.client.delete(api.obj_path("pods", pod), grace_seconds=0, uid=md.get("uid", ""))
        except api.ApiError as e:
            if e.code not in (404, 409):
                raise

    async def _run(self, pod: Obj, node: str) -> None:
        if self.ready_delay:
            await asyncio.sleep(self.ready_delay)
        ip = str(self.cidrs[node].network_address + self.next_ip[node])
        self.next_ip[node] += 1
        t = now()
        conds = [
            {"type": typ, "status": "True", "lastProbeTime": None, "lastTransitionTime": t}
            for typ in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        st = {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": str(self.cidrs[node].network_address + 1),
            "startTime": t,
            "conditions": conds,
            "containerStatuses": [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "ready": True,
                    "restartCount": 0,
                    "started": True,
                    "state": {"running": {"startedAt": t}},
                }
                for c in pod["spec"].get("containers") or []
            ],
        }
        try:
            await self.client.patch(api.obj_path("pods", pod, "status"), {"status": st})
        except api.ApiError as e:
            if e.code != 404:
                raise

    async def _create_lease(self, n: str) -> None:
        from controlplane_stub.agent.node import micro_time

        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": n, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": n, "leaseDurationSeconds": 40, "renewTime": micro_time()},
        }
        try:
            await self.client.create(api.path("leases", "kube-node-lease"), lease)
        except api.ApiError as e:
            if e.code != 409:
                raise

    async def renew_leases(self, every: float = 1.0) -> None:
        from controlplane_stub.agent.node import micro_time

        for n in self.names:
            await self._create_lease(n)
        while True:
            await asyncio.sleep(every)
            for n in self.names:
                if n not in self.silent:
                    await self.client.patch(
                        api.path("leases", "kube-node-lease", n), {"spec": {"renewTime": micro_time()}}
                    )

    async def run(self) -> None:
        await self.register()
        await asyncio.gather(self.informer.run(), self.renew_leases())

"""Runs every controller in one process (as kube-controller-manager + kube-scheduler do)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from dataclasses import dataclass, field

from controlplane_stub import client as api
from controlplane_stub.client import Informer, run_worker
from controlplane_stub.controllers.daemonset import DaemonSetController
from controlplane_stub.controllers.deployment import DeploymentController
from controlplane_stub.controllers.endpointslice import (
    CONTROLLER_NAME,
    MANAGED_BY,
    EndpointSliceController,
    SelectorIndex,
)
from controlplane_stub.controllers.gc import GarbageCollector
from controlplane_stub.controllers.index import Indexes
from controlplane_stub.controllers.loadbalancer import LoadBalancerController, parse_pool
from controlplane_stub.controllers.nodelifecycle import NodeLifecycleController
from controlplane_stub.controllers.replicaset import ReplicaSetController
from controlplane_stub.controllers.scheduler import Scheduler

log = logging.getLogger("kpc.controllers")

ALL = ("endpointslice", "replicaset", "deployment", "scheduler", "loadbalancer", "gc", "nodelifecycle", "daemonset")


@dataclass
class ControllerOptions:
    lb_pool: str = "10.251.0.0/24"
    max_endpoints_per_slice: int = 100
    enabled: tuple[str, ...] = ALL
    workers: int = 5
    node_grace_seconds: float = 40.0
    node_monitor_period: float = 5.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class ControllerManager:
    def __init__(self, client: api.Client, opts: ControllerOptions) -> None:
        self.client = client
        self.opts = opts
        self.pods = Informer(client, "pods")
        self.pod_index = Indexes(self.pods)  # first handler: controllers read it current
        self.services = Informer(client, "services")
        self.svc_selectors = SelectorIndex(self.services)
        self.nodes = Informer(client, "nodes")
        self.rss = Informer(client, "replicasets")
        self.rs_index = Indexes(self.rss)
        self.deployments = Informer(client, "deployments")
        self.slices = Informer(client, "endpointslices", label_selector=f"{MANAGED_BY}={CONTROLLER_NAME}")
        self.endpoints = Informer(client, "endpoints")
        self.informers = [
            self.pods,
            self.services,
            self.nodes,
            self.rss,
            self.deployments,
            self.slices,
            self.endpoints,
        ]
        en = set(opts.enabled)
        self.workers: list[tuple[str, api.WorkQueue, Callable[[str], Awaitable[None]]]] = []
        self.gcs: list[tuple[GarbageCollector, str]] = []
        self.loops: list[Callable[[], Coroutine[Any, Any, None]]] = []
        if "nodelifecycle" in en:
            self.leases = Informer(client, "leases", namespace="kube-node-lease")
            self.informers.append(self.leases)
            self.nlc = NodeLifecycleController(
                client,
                self.nodes,
                self.leases,
                self.pods,
                self.pod_index,
                opts.node_grace_seconds,
                opts.node_monitor_period,
            )
            self.loops.append(self.nlc.run)
        if "endpointslice" in en:
            self.eps = EndpointSliceController(
                client,
                self.services,
                self.svc_selectors,
                self.pods,
                self.pod_index,
                self.nodes,
                self.slices,
                self.endpoints,
                opts.max_endpoints_per_slice,
            )
            self.workers.append(("endpointslice", self.eps.queue, self.eps.sync))
        if "replicaset" in en:
            self.rsc = ReplicaSetController(client, self.pods, self.pod_index, self.rss)
            self.workers.append(("replicaset", self.rsc.queue, self.rsc.sync))
        if "deployment" in en:
            self.dc = DeploymentController(client, self.deployments, self.rss, self.rs_index)
            self.workers.append(("deployment", self.dc.queue, self.dc.sync))
        if "daemonset" in en:
            self.dss = Informer(client, "daemonsets")
            self.informers.append(self.dss)
            self.dsc = DaemonSetController(client, self.dss, self.pods, self.pod_index, self.nodes)
            self.workers.append(("daemonset", self.dsc.queue, self.dsc.sync))
        if "scheduler" in en:
            self.sched = Scheduler(client, self.pods, self.pod_index, self.nodes)
            self.workers.append(("scheduler", self.sched.queue, self.sched.sync))
        if "loadbalancer" in en:
            self.lb = LoadBalancerController(client, self.services, parse_pool(opts.lb_pool))
            self.workers.append(("loadbalancer", self.lb.queue, self.lb.sync))
        if "gc" in en:
            self.gcs = [
                (
                    GarbageCollector(client, self.deployments, self.rss, self.rs_index, "replicasets"),
                    "Deployment",
                ),
                (GarbageCollector(client, self.rss, self.pods, self.pod_index, "pods"), "ReplicaSet"),
            ]
            if "daemonset" in en:  # pods a DaemonSet made while its deletion was on its way
                self.gcs.append((GarbageCollector(client, self.dss, self.pods, self.pod_index, "pods"), "DaemonSet"))

    async def run(self) -> None:
        tasks = [asyncio.create_task(i.run(), name=f"informer {i.resource}") for i in self.informers]
        try:
            await asyncio.gather(*(i.synced.wait() for i in self.informers))
            for gc, kind in self.gcs:
                await gc.sweep(kind)
            # Several workers per controller (a key is never synced by two at once): syncs wait on
            # API round trips far more than on CPU, as upstream's --concurrent-*-syncs assume.
            for n, q, s in self.workers:
                failures: dict[str, int] = {}
                tasks += [
                    asyncio.create_task(run_worker(n, q, s, failures), name=f"worker {n}/{i}")
                    for i in range(self.opts.workers)
                ]
            tasks += [asyncio.create_task(loop()) for loop in self.loops]
            log.info("controllers running: %s", ", ".join(n for n, _, _ in self.workers))
            self.opts.ready.set()
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

"""The node agent (our kubelet): registers its Node, heartbeats a Lease, runs the pods bound to it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.agent import netns
from controlplane_stub.agent.catalog import Catalog
from controlplane_stub.agent.pods import PodWorker, now
from controlplane_stub.agent.record import Record
from controlplane_stub.agent.streaming import StreamingServer

log = logging.getLogger("kpc.agent")
Obj = dict[str, Any]


@dataclass
class AgentConfig:
    node: netns.NodeNet
    prefix: str
    data_dir: Path
    catalog_file: str = ""
    zone: str = ""
    dns_ip: str = ""
    cluster_domain: str = "cluster.local"
    backoff_base: float = 10.0  # crash-loop back-off (backoff.py): first delay, cap, reset
    backoff_cap: float = 300.0
    backoff_reset: float = 600.0
    # Directories no container may see (the cluster's tokens, keys, kubeconfigs; podinit.py).
    hide_paths: list[str] = field(default_factory=list)
    record_file: str = ""  # where the pod namespaces this agent makes are recorded (record.py)
    lease_seconds: int = 40
    heartbeat_seconds: float = 10.0
    max_pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    # The bearer token the API server presents to this agent's logs/exec endpoint (streaming.py);
    # empty: no endpoint, and the Node advertises none (port 0).
    kubelet_token: str = ""


class Ipam:
    """Pod IPs from the node's podCIDRs, one of each family per pod, primary first (the first
    address after the network's is the bridge's). Never-used addresses go first, then released ones
    oldest first, so a just-freed IP is not reused at once. Nothing is listed up front: only the
    first MAX_PER_FAMILY addresses of a CIDR (an IPv6 /64 has 2^64) are ever handed out."""

    MAX_PER_FAMILY = 65536

    def __init__(self, cidrs: str | Sequence[str]) -> None:
        self.nets = [ipaddress.ip_network(c) for c in ([cidrs] if isinstance(cidrs, str) else cidrs)]
        self.next = [2] * len(self.nets)  # offset of the next never-used address
        # the last offset + 1: IPv4 keeps its broadcast address out, as hosts() does
        self.end = [min(n.num_addresses - (1 if n.version == 4 else 0), 2 + self.MAX_PER_FAMILY) for n in self.nets]
        self.freed: list[deque[str]] = [deque() for _ in self.nets]
        self.taken: set[str] = set()
        self.used: dict[str, tuple[str, ...]] = {}

    def _usable(self, i: int, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False  # a podIP from the API is input: not an address, not preferred
        net = self.nets[i]
        return addr in net and 2 <= int(addr) - int(net.network_address) < self.end[i] and str(addr) not in self.taken

    def _take(self, i: int, prefer: Sequence[str]) -> str | None:
        for ip in prefer:
            if self._usable(i, ip):
                ip = str(ipaddress.ip_address(ip))
                if ip in self.freed[i]:
                    self.freed[i].remove(ip)
                return ip
        net = self.nets[i]
        while self.next[i] < self.end[i]:
            ip = str(net.network_address + self.next[i])
            self.next[i] += 1
            if ip not in self.taken:
                return ip
        while self.freed[i]:
            ip = self.freed[i].popleft()
            if ip not in self.taken:
                return ip
        return None

    def allocate_all(self, uid: str, prefer: Sequence[str] = ()) -> tuple[str, ...]:
        """The pod's IPs, one per podCIDR; `prefer` (the pod's earlier IPs, after an agent restart)
        where still free."""
        if uid in self.used:
            return self.used[uid]
        got: list[str] = []
        for i in range(len(self.nets)):
            ip = self._take(i, prefer)
            if ip is None:
                for j, back in enumerate(got):
                    self.taken.discard(back)
                    self.freed[j].appendleft(back)
                raise RuntimeError("podCIDR exhausted")
            self.taken.add(ip)
            got.append(ip)
        self.used[uid] = tuple(got)
        return self.used[uid]

    def allocate(self, uid: str, prefer: str = "") -> str:
        """The pod's IP of the primary family (see allocate_all)."""
        return self.allocate_all(uid, [prefer] if prefer else [])[0]

    def release(self, uid: str) -> None:
        for i, ip in enumerate(self.used.pop(uid, ())):
            self.taken.discard(ip)
            self.freed[i].append(ip)  # at the end: a just-freed IP is not reused at once


def _ready(status: Obj) -> str:
    return next(
        (str(c.get("status")) for c in status.get("conditions") or [] if c.get("type") == "Ready"), ""
    )


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    def __init__(self, client: api.Client, config: AgentConfig) -> None:
        self.client = client
        self.config = config
        self.node = config.node
        self.catalog = Catalog.load(config.catalog_file or None)
        self.record = Record(config.record_file) if config.record_file else None
        self.ipam = Ipam(self.node.all_pod_cidrs)
        self.workers: dict[str, PodWorker] = {}
        self.events = api.EventRecorder(client, "kubelet", self.node.name)
        self.informer = api.Informer(client, "pods", field_selector=f"spec.nodeName={self.node.name}")
        self.informer.add_handler(self._on_pod)
        self.streaming: StreamingServer | None = None

    def resolv_conf(self, pod: Obj) -> str | None:
        if not self.config.dns_ip or pod["spec"].get("dnsPolicy", "ClusterFirst") not in ("ClusterFirst", ""):
            return None
        ns, d = pod["metadata"]["namespace"], self.config.cluster_domain
        return f"search {ns}.svc.{d} svc.{d} {d}\nnameserver {self.config.dns_ip}\noptions ndots:5\n"

    def node_object(self) -> Obj:
        labels = {
            "kubernetes.io/hostname": self.node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.config.labels,
        }
        if self.config.zone:
            labels["topology.kubernetes.io/zone"] = self.config.zone
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node.name, "labels": labels},
            "spec": {"podCIDR": self.node.pod_cidr, "podCIDRs": list(self.node.all_pod_cidrs)},
        }

    def node_status(self) -> Obj:
        t = now()
        cap = {
            "cpu": str(os.cpu_count() or 1),
            "memory": "4Gi",
            "pods": str(self.config.max_pods),
            "ephemeral-storage": "10Gi",
        }
        conds = [
            {
                "type": typ,
                "status": "False",
                "reason": reason,
                "message": msg,
                "lastHeartbeatTime": t,
                "lastTransitionTime": self.started,
            }
            for typ, reason, msg in (
                ("MemoryPressure", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                ("DiskPressure", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("PIDPressure", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            )
        ]
        conds.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": t,
                "lastTransitionTime": self.started,
            }
        )
        return {
            # one InternalIP per family, primary first, as a dual-stack kubelet reports them
            "addresses": [{"type": "InternalIP", "address": a} for a in self.node.all_ips]
            + [{"type": "Hostname", "address": self.node.name}],
            "capacity": cap,
            "allocatable": cap,
            "conditions": conds,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.streaming.port if self.streaming else 0}},
            "nodeInfo": {
                "kubeletVersion": "v1.32.0-kpc",
                "kubeProxyVersion": "",
                "osImage": "kproxy-cluster netns node",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "kpc://0.1",
                "kernelVersion": os.uname().release,
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def register(self) -> None:
        self.started = now()
        url = api.path("nodes", name=self.node.name)
        try:
            await self.client.create(api.path("nodes"), self.node_object())
        except api.ApiError as e:
            if e.code != 409:
                raise

            def merge(cur: Obj) -> bool:
                want = self.node_object()
                cur["metadata"].setdefault("labels", {}).update(want["metadata"]["labels"])
                cur["spec"].update(want["spec"])
                return True

            await self.client.update_with_retry(url, merge)
        await self.client.patch(url + "/status", {"status": self.node_status()})

    async def lease_loop(self) -> None:
        url = api.path("leases", "kube-node-lease", self.node.name)
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.node.name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.node.name,
                "leaseDurationSeconds": self.config.lease_seconds,
                "renewTime": micro_time(),
            },
        }
        try:
            await self.client.create(api.path("leases", "kube-node-lease"), lease)
        except api.ApiError as e:
            if e.code != 409:
                log.warning("node=%s lease create: %s", self.node.name, e)
        beats = 0
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            beats += 1
            try:
                await self.client.patch(
                    url, {"spec": {"renewTime": micro_time(), "holderIdentity": self.node.name}}
                )
                node = await self.client.get(api.path("nodes", name=self.node.name))
                ready: Obj = next(
                    (c for c in (node.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"),
                    {},
                )
                # The Node's own status more rarely, as the kubelet does; at once when the node
                # lifecycle controller marked it Unknown while this agent was not heard from.
                if beats % 4 == 0 or ready.get("status") != "True":
                    if ready.get("status") != "True":
                        self.started = now()
                    await self.client.patch(
                        api.path("nodes", name=self.node.name) + "/status", {"status": self.node_status()}
                    )
            except api.ApiError as e:
                log.warning("node=%s heartbeat: %s", self.node.name, e)

    async def _on_pod(self, event: str, pod: Obj, old: Obj | None) -> None:
        md = pod["metadata"]
        uid = str(md.get("uid", ""))
        w = self.workers.get(uid)
        if event == "DELETED":
            if w is not None:
                asyncio.create_task(self._stop(w, self._grace(pod), delete=False))
            return
        if md.get("deletionTimestamp"):
            if w is None:
                # Never ran here (or ran before an agent restart): nothing to stop.
                asyncio.create_task(self._final_delete(pod))
            elif not w.terminating:
                asyncio.create_task(self._stop(w, self._grace(pod), delete=True))
            return
        if w is None and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
            w = PodWorker(self, pod)
            self.workers[uid] = w
            log.info("node=%s pod=%s starting ip-pending netns=%s", self.node.name, w.key, w.netns)
            w.start()
        elif w is not None:
            w.pod = pod
            if w.last_sent is not None and _ready(pod.get("status") or {}) != _ready(w.last_sent):
                # Someone else (the node lifecycle controller) rewrote our pod's readiness: re-report.
                w.last_sent = None
                w.changed()

    @staticmethod
    def _grace(pod: Obj) -> float:
        g = pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return float(g)

    async def _stop(self, w: PodWorker, grace: float, delete: bool) -> None:
        await w.terminate(grace)
        self.workers.pop(w.uid, None)
        if delete:
            await self._final_delete(w.pod)

    async def _final_delete(self, pod: Obj) -> None:
        md = pod["metadata"]
        try:
            await self.client.delete(
                api.path("pods", md["namespace"], md["name"]), grace_seconds=0, uid=md.get("uid", "")
            )
        except api.ApiError as e:
            if e.code not in (404, 409):
                log.warning("pod=%s/%s final delete: %s", md["namespace"], md["name"], e)

    async def run(self) -> None:
        # Pods of an earlier run of this agent died with it; their namespaces are stale.
        if self.config.kubelet_token:
            self.streaming = StreamingServer(self, self.config.kubelet_token)
            await self.streaming.start()
        await self.register()
        tasks = [asyncio.create_task(self.lease_loop()), asyncio.create_task(self.informer.run())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await self.shutdown(grace=2.0)
            if self.streaming is not None:
                await self.streaming.stop()

    async def shutdown(self, grace: float) -> None:
        ws = list(self.workers.values())
        await asyncio.gather(*(w.terminate(grace) for w in ws), return_exceptions=True)

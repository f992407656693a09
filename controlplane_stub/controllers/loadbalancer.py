"""LoadBalancer IPs for type LoadBalancer Services from a pool, as a bare-metal load balancer
(MetalLB) assigns them: status.loadBalancer.ingress[0].ip. Announcing the IPs is the network's
part: the one-machine cluster routes the pool to the nodes, where kproxy programs them."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of

log = logging.getLogger("kpc.loadbalancer")
Obj = dict[str, Any]


def parse_pool(spec: str) -> list[str]:
    """`10.251.0.0/24`, `10.251.0.10-10.251.0.20`, or a comma-separated list of both."""
    ips: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "-" in part:
            a, b = (ipaddress.ip_address(x.strip()) for x in part.split("-", 1))
            if int(b) < int(a):
                raise ValueError(f"--lb-pool {part}: range end is below its start")
            ips += [str(ipaddress.ip_address(i)) for i in range(int(a), int(b) + 1)]
        else:
            net = ipaddress.ip_network(part, strict=False)
            ips += [str(h) for h in (net.hosts() if net.num_addresses > 2 else net)]
    return ips


class LoadBalancerController:
    def __init__(self, client: api.Client, services: Informer, pool: list[str]) -> None:
        self.client = client
        self.services = services
        self.pool = pool
        self.pool_set = set(pool)
        self.owner: dict[str, str] = {}  # ip -> service key
        self.queue = WorkQueue()
        services.add_handler(self._on)

    def _on(self, event: str, svc: Obj, old: Obj | None) -> None:
        k = key_of(svc)
        if event == "DELETED":
            freed = [i for i, o in self.owner.items() if o == k]
            for ip in freed:
                del self.owner[ip]
            if freed:  # Services waiting for an IP may get this one now
                for other in self.services.cache.values():
                    if self._wanted(other) and not self._ingress_ips(other):
                        self.queue.add(key_of(other))
            return
        for ip in self._ingress_ips(svc):
            if ip in self.pool_set:
                self.owner.setdefault(ip, k)
        self.queue.add(k)

    @staticmethod
    def _ingress_ips(svc: Obj) -> list[str]:
        return [
            i["ip"]
            for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            if i.get("ip")
        ]

    def _wanted(self, svc: Obj) -> bool:
        return (
            svc["spec"].get("type") == "LoadBalancer"
            and not svc["spec"].get("loadBalancerClass")
            and not svc["metadata"].get("deletionTimestamp")
        )

    async def sync(self, key: str) -> None:
        svc = self.services.cache.get(key)
        if svc is None:
            return
        mine = [ip for ip in self._ingress_ips(svc) if self.owner.get(ip) == key]
        if not self._wanted(svc):
            if mine:
                for ip in mine:
                    self.owner.pop(ip, None)
                await self._write(svc, [])
                for other in self.services.cache.values():
                    if self._wanted(other) and not self._ingress_ips(other):
                        self.queue.add(key_of(other))
            return
        requested = svc["spec"].get("loadBalancerIP") or ""
        if mine and (not requested or requested in mine):
            return
        ip = ""
        if requested:
            if requested in self.pool_set and self.owner.get(requested, key) == key:
                ip = requested
            else:
                log.warning("service=%s loadBalancerIP %s is not free in the pool", key, requested)
                return
        else:
            ip = next((i for i in self.pool if i not in self.owner), "")
        if not ip:
            log.warning("service=%s: LoadBalancer pool exhausted (%d IPs)", key, len(self.pool))
            return
        self.owner[ip] = key
        await self._write(svc, [ip])

    async def _write(self, svc: Obj, ips: list[str]) -> None:
        # JSON merge patch: null removes the list (an empty object would merge into nothing).
        lb: Obj = {"ingress": [{"ip": ip, "ipMode": "VIP"} for ip in ips] if ips else None}
        try:
            r = await self.client.patch(
                api.obj_path("services", svc, "status"), {"status": {"loadBalancer": lb}}
            )
            await self.services.assume(r)
        except api.ApiError as e:
            if e.code != 404:
                raise

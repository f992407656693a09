"""LoadBalancer IPs for type LoadBalancer Services from a pool, as a bare-metal load balancer
(MetalLB) assigns them: status.loadBalancer.ingress[0].ip. Announcing the IPs is the network's
part: the one-machine cluster routes the pool to the nodes, where kproxy programs them."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Container, Iterator
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of

log = logging.getLogger("kpc.loadbalancer")
Obj = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class LBPool:
    """The pool as address ranges (an IPv6 /64 is 2^64 addresses: never listed out). Iterating
    yields the addresses in order; the first free one is found within len(taken) + 1 steps."""

    def __init__(self, ranges: list[tuple[IPAddress, IPAddress]]) -> None:
        self.ranges = ranges

    def __iter__(self) -> Iterator[str]:
        for a, b in self.ranges:
            for i in range(int(a), int(b) + 1):
                yield str(type(a)(i))

    def __contains__(self, ip: object) -> bool:
        try:
            addr = ipaddress.ip_address(ip) if isinstance(ip, str) else None
        except ValueError:
            return False
        return addr is not None and any(
            a.version == addr.version and int(a) <= int(addr) <= int(b) for a, b in self.ranges
        )

    def cidrs(self) -> list[str]:
        """One CIDR per range, the smallest that covers it: what a router in front of the cluster
        routes to the nodes (a range's neighbours inside it are routed too, and unused)."""
        out: list[str] = []
        for a, b in self.ranges:
            plen = a.max_prefixlen - (int(a) ^ int(b)).bit_length()
            out.append(str(ipaddress.ip_network((a, plen), strict=False)))
        return list(dict.fromkeys(out))

    def size(self) -> int:
        return sum(int(b) - int(a) + 1 for a, b in self.ranges)

    def families(self) -> list[str]:
        return list(dict.fromkeys(family_of(str(a)) for a, _b in self.ranges))

    def first_free(self, family: str, taken: Container[str]) -> str:
        for a, b in self.ranges:
            if family_of(str(a)) != family:
                continue
            for i in range(int(a), int(b) + 1):
                ip = str(type(a)(i))
                if ip not in taken:
                    return ip
        return ""


def family_of(ip: str) -> str:
    return "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"


def parse_pool(spec: str) -> LBPool:
    """`10.251.0.0/24`, `10.251.0.10-10.251.0.20`, `fd00:10:251::/112`, or a comma-separated list:
    IPv4 and IPv6 parts make a pool for dual-stack Services."""
    ranges: list[tuple[IPAddress, IPAddress]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            if "-" in part:
                a, b = (ipaddress.ip_address(x.strip()) for x in part.split("-", 1))
                if a.version != b.version or int(b) < int(a):
                    raise ValueError("range end is below its start or of another IP family")
                ranges.append((a, b))
            else:
                net = ipaddress.ip_network(part, strict=False)
                if net.num_addresses > 2:  # hosts(): neither the network nor the broadcast address
                    ranges.append((net[1], net[-1] if net.version == 6 else net[-2]))
                else:
                    ranges.append((net[0], net[-1]))
        except ValueError as e:
            raise ValueError(f"--lb-pool {part}: {e}") from None
    return LBPool(ranges)


class LoadBalancerController:
    def __init__(self, client: api.Client, services: Informer, pool: LBPool) -> None:
        self.client = client
        self.services = services
        self.pool = pool
        self.owner: dict[str, str] = {}  # ip -> service key
        self.queue = WorkQueue()
        # An unserved Service says why on itself (kubectl describe), as MetalLB's controller does.
        self.events = api.EventRecorder(client, "loadbalancer-controller")
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
            if ip in self.pool:
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
        # One ingress IP per family of the Service that the pool has, in the Service's family order.
        families = [f for f in (svc["spec"].get("ipFamilies") or ["IPv4"]) if f in self.pool.families()]
        requested = svc["spec"].get("loadBalancerIP") or ""
        have = {family_of(ip): ip for ip in mine}
        if requested and requested not in mine:
            if requested in self.pool and self.owner.get(requested, key) == key:
                have[family_of(requested)] = requested
            else:
                log.warning("service=%s loadBalancerIP %s is not free in the pool", key, requested)
                self.events.event(svc, "Warning", "AllocationFailed",
                                  f"loadBalancerIP {requested} is not a free address of the pool")
                return
        for fam in families:
            if fam not in have:
                ip = self.pool.first_free(fam, self.owner)
                if ip:
                    have[fam] = ip
                else:
                    log.warning("service=%s: LoadBalancer pool has no free %s address (%d IPs)", key, fam,
                                self.pool.size())
                    self.events.event(svc, "Warning", "AllocationFailed",
                                      f"no free {fam} address in the LoadBalancer pool ({self.pool.size()} IPs)")
        want = [have[f] for f in families if f in have]
        if want == mine:
            return
        for ip in mine:
            if ip not in want:
                self.owner.pop(ip, None)
        for ip in want:
            self.owner[ip] = key
        await self._write(svc, want)
        if len(want) < len(mine):
            for other in self.services.cache.values():
                if self._wanted(other) and not self._ingress_ips(other):
                    self.queue.add(key_of(other))

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

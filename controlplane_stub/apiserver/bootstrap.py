"""kube-apiserver's bootstrap controller: the system namespaces and the default/kubernetes Service.

Upstream (pkg/controlplane/controller/kubernetesservice and reconcilers/) the API server itself
keeps, in every cluster:
- the namespaces default, kube-system, kube-public and kube-node-lease;
- the Service default/kubernetes: ClusterIP = the first address of --service-cluster-ip-range,
  one port "https" 443/TCP whose targetPort is the server's port, labels component=apiserver and
  provider=kubernetes, no selector (so the EndpointSlice controller leaves it alone);
- its endpoints, written by the server: Endpoints "kubernetes" (labelled skip-mirror, so no
  mirroring controller copies it) and EndpointSlice "kubernetes" (label kubernetes.io/service-name,
  no managed-by label), both with the --advertise-address and the server's port.
All of it is re-created on every pass (10 s upstream) when deleted. The Service's spec is only
corrected on the first pass after start (upstream reconciles ports and type only then), so a user's
edit survives until the next restart, as on a real cluster.

With several API servers on one etcd (--storage-backend etcd3) the endpoints list every live server,
as upstream's lease endpoint reconciler does: each server keeps a key masterleases/IP:PORT under
the etcd prefix, attached to an etcd lease it keeps alive (TTL 1.5 x the reconcile interval, 15 s
by default as upstream); a server that dies stops renewing, etcd deletes its key when the lease
expires, and the next pass of any server writes endpoints without it.

The controller writes through the Registry (the same path as a request: defaults, allocation,
validation), not over HTTP: it runs inside the server and needs no credentials.
"""
from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
import math
import socket
from dataclasses import dataclass, replace
from typing import Any

from .errors import StatusError
from .registry import Registry
from .resources import BY_ID, Resource
from .semantics import Allocator

log = logging.getLogger("kproxy.apiserver.bootstrap")
Obj = dict[str, Any]

NAMESPACE = "default"
NAME = "kubernetes"
SERVICE_PORT = 443
PORT_NAME = "https"
DEFAULT_INTERVAL = 10.0  # upstream's EndpointInterval
SERVICE_LABELS = {"component": "apiserver", "provider": "kubernetes"}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"


def default_advertise_address(bind_address: str) -> str:
    """--advertise-address when not given: the bind address if it names one IP, else the host's
    first non-loopback IPv4 (the source address of its default route), else 127.0.0.1."""
    try:
        bind = ipaddress.ip_address(bind_address)
        if not bind.is_unspecified:
            return str(bind)
    except ValueError:
        pass  # "" or a host name: listen everywhere, as for 0.0.0.0
    try:
        # connect() on UDP sends nothing: it only makes the kernel pick the route's source address.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never needs to answer
            ip = ipaddress.ip_address(s.getsockname()[0])
            if not ip.is_loopback and not ip.is_unspecified:
                return str(ip)
    except OSError:
        pass  # no IPv4 route at all
    try:
        for addr in socket.gethostbyname_ex(socket.gethostname())[2]:
            if not ipaddress.ip_address(addr).is_loopback:
                return addr
    except (OSError, ValueError):
        pass
    return "127.0.0.1"


@dataclass(frozen=True, slots=True)
class KubernetesService:
    """What the kubernetes Service and its endpoints say."""

    cluster_ip: str | None  # None: no ClusterIP allocator (the Service is not made)
    advertise_address: str
    port: int  # the API server's own port: the Service's targetPort and the endpoints' port
    # Every live API server (IP, port), this one included; empty: this one alone.
    peers: tuple[tuple[str, int], ...] = ()

    def _servers(self) -> list[tuple[str, int]]:
        return sorted(set(self.peers) | {(self.advertise_address, self.port)}) if self.peers else \
            [(self.advertise_address, self.port)]

    def service(self) -> Obj:
        assert self.cluster_ip is not None
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": dict(SERVICE_LABELS)},
                "spec": {"type": "ClusterIP", "clusterIP": self.cluster_ip, "clusterIPs": [self.cluster_ip],
                         "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                         "ports": self.service_ports()}}

    def service_ports(self) -> list[Obj]:
        return [{"name": PORT_NAME, "port": SERVICE_PORT, "protocol": "TCP", "targetPort": self.port}]

    def endpoints(self) -> Obj:
        # One subset per port (upstream's servers share one port; on one test host they may not).
        by_port: dict[int, list[str]] = {}
        for ip, port in self._servers():
            by_port.setdefault(port, []).append(ip)
        return {"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {SKIP_MIRROR_LABEL: "true"}},
                "subsets": [{"addresses": [{"ip": ip} for ip in ips],
                             "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]}
                            for port, ips in sorted(by_port.items())]}

    def endpoint_slice(self) -> Obj:
        # A slice has one port list for all its endpoints: the servers on this server's port.
        version = ipaddress.ip_address(self.advertise_address).version
        ips = [ip for ip, port in self._servers()
               if port == self.port and ipaddress.ip_address(ip).version == version]
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {SERVICE_NAME_LABEL: NAME}},
                "addressType": "IPv6" if version == 6 else "IPv4",
                "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
                "ports": [{"name": PORT_NAME, "port": self.port, "protocol": "TCP"}]}


class BootstrapController:
    def __init__(self, registry: Registry, allocator: Allocator, want: KubernetesService,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.registry = registry
        self.allocator = allocator
        self.want = want
        self.interval = interval
        self.passes = 0
        self.leases: MasterLeases | None = None
        store = registry.store
        if hasattr(store, "internal_key") and hasattr(store, "client"):  # etcd: servers share the endpoints
            self.leases = MasterLeases(store, want.advertise_address, want.port, max(3, math.ceil(1.5 * interval)))

    async def run(self) -> None:
        """Every interval until cancelled; a failed pass is logged and the next one tries again."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    await self.reconcile()
                except Exception:
                    # A bug in one pass must not end the loop: the Service would never come back.
                    log.exception("event=bootstrap_pass_failed")
        finally:
            if self.leases is not None:
                await asyncio.shield(self.leases.release())

    async def reconcile(self) -> None:
        first = self.passes == 0
        self.passes += 1
        if self.leases is not None:
            try:
                peers = await self.leases.renew_and_list()
                self.want = replace(self.want, peers=tuple(peers))
            except Exception as e:  # etcd unreachable: keep the last list, try again next pass
                log.warning("event=master_lease_failed error=%s", e)
        for step in (self._namespaces, self._service, self._endpoints, self._endpoint_slice):
            try:
                await step(first)
            except StatusError as e:
                # A conflict with a concurrent writer, a namespace being deleted: next pass.
                log.warning("event=bootstrap_failed step=%s code=%d reason=%s message=%s", step.__name__, e.code,
                            e.reason, e)

    async def _namespaces(self, first: bool) -> None:
        made = await self.registry.ensure_system_namespaces()
        if made:
            log.info("event=namespaces_created names=%s", ",".join(made))

    async def _service(self, first: bool) -> None:
        if self.want.cluster_ip is None:
            return
        res = BY_ID["services"]
        cur = self._get(res, NAME)
        ip = self.want.cluster_ip
        if not self.allocator.reserve_for(ip, NAMESPACE, NAME,
                                          held_by_owner=cur is not None and ip in _cluster_ips(cur)):
            # A store written before this reservation existed lets another Service hold it: the
            # kubernetes Service waits until that one is gone (upstream fails the create alike).
            log.warning("event=kubernetes_service_ip_taken cluster_ip=%s", ip)
            return
        if cur is None:
            await self.registry.create(res, NAMESPACE, self.want.service(), dry_run=False)
            log.info("event=kubernetes_service_created cluster_ip=%s target_port=%d", ip, self.want.port)
            return
        spec = cur.get("spec") or {}
        if first and (spec.get("type") != "ClusterIP" or spec.get("ports") != self.want.service_ports()):
            new = copy.deepcopy(cur)
            new["spec"]["type"] = "ClusterIP"
            new["spec"]["ports"] = self.want.service_ports()
            await self.registry.update(res, NAMESPACE, NAME, new, "", dry_run=False)
            log.info("event=kubernetes_service_reset target_port=%d", self.want.port)

    async def _endpoints(self, first: bool) -> None:
        await self._ensure(BY_ID["endpoints"], self.want.endpoints(), ("subsets",))

    async def _endpoint_slice(self, first: bool) -> None:
        await self._ensure(BY_ID["endpointslices.discovery.k8s.io"], self.want.endpoint_slice(),
                           ("addressType", "endpoints", "ports"))

    async def _ensure(self, res: Resource, want: Obj, fields: tuple[str, ...]) -> None:
        """Create want, or make the stored object's fields and labels say what want says."""
        cur = self._get(res, NAME)
        if cur is None:
            await self.registry.create(res, NAMESPACE, want, dry_run=False)
            log.info("event=created kind=%s name=%s/%s", res.kind, NAMESPACE, NAME)
            return
        labels = cur["metadata"].get("labels") or {}
        want_labels = want["metadata"]["labels"]
        if all(cur.get(f) == want[f] for f in fields) and all(labels.get(k) == v for k, v in want_labels.items()):
            return
        new = copy.deepcopy(cur)
        new["metadata"]["labels"] = {**labels, **want_labels}
        for f in fields:
            new[f] = want[f]
        if res.id.startswith("endpointslices") and cur.get("addressType") != want["addressType"]:
            # addressType is immutable: replace the slice (as upstream's EndpointsAdapter does).
            await self.registry.delete(res, NAMESPACE, NAME, {}, dry_run=False)
            await self.registry.create(res, NAMESPACE, want, dry_run=False)
        else:
            await self.registry.update(res, NAMESPACE, NAME, new, "", dry_run=False)
        log.info("event=updated kind=%s name=%s/%s", res.kind, NAMESPACE, NAME)

    def _get(self, res: Resource, name: str) -> Obj | None:
        return self.registry.store.get(res.key(NAMESPACE, name))


def _cluster_ips(svc: Obj) -> list[str]:
    spec = svc.get("spec") or {}
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    return [ip for ip in ips if isinstance(ip, str)]


class MasterLeases:
    """This API server's entry in masterleases/ (see module doc) and the list of every live one."""

    def __init__(self, store: Any, address: str, port: int, ttl: int) -> None:
        self.store = store
        self.client = store.client
        self.address = address
        self.port = port
        self.ttl = ttl
        self.lease = 0
        self.key: bytes = store.internal_key(f"masterleases/{address}:{port}" if ":" not in address
                                             else f"masterleases/[{address}]:{port}")
        self.prefix: bytes = store.internal_key("masterleases/")

    async def renew_and_list(self) -> list[tuple[str, int]]:
        from ..store.etcd_client import prefix_end

        if not self.lease or await self.client.lease_keepalive(self.lease) <= 0:
            self.lease = await self.client.lease_grant(self.ttl)
            await self.client.put(self.key, f"{self.address} {self.port}".encode(), lease=self.lease)
        out = []
        for kv in (await self.client.range(self.prefix, prefix_end(self.prefix))).kvs:
            parsed = parse_lease(kv.value)
            if parsed is None:
                log.warning("event=bad_master_lease key=%s", kv.key[:200])
                continue
            out.append(parsed)
        return out

    async def release(self) -> None:
        """At shutdown: the key goes now rather than at the lease's expiry."""
        if self.lease:
            try:
                await asyncio.wait_for(self.client.lease_revoke(self.lease), 2.0)
            except Exception as e:
                log.warning("event=master_lease_revoke_failed error=%s", e)
            self.lease = 0


def parse_lease(value: bytes) -> tuple[str, int] | None:
    """"IP PORT" as written by MasterLeases; None when it is anything else."""
    try:
        ip_text, port_text = value.decode("ascii").split(" ")
        ip = ipaddress.ip_address(ip_text)
        port = int(port_text)
    except (UnicodeDecodeError, ValueError):
        return None
    if not 0 < port < 65536 or ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip), port

"""EndpointSlice controller (and the legacy v1 Endpoints object) for Services with a selector.

Low churn, as upstream's reconciler: endpoints stay in the slice that holds them; a changed
endpoint is rewritten in place, new ones fill the slices with room before a new slice is made,
and only slices whose content changed are written. One pod change therefore rewrites one slice.
Endpoints are grouped by their resolved ports (a named targetPort can resolve differently per pod).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of
from controlplane_stub.controllers.common import now, pod_ready
from controlplane_stub.controllers.index import Indexes
from controlplane_stub.controllers.topology import TopologyCache, hints_enabled

log = logging.getLogger("kpc.endpointslice")
Obj = dict[str, Any]

MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
SERVICE_NAME = "kubernetes.io/service-name"
TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"
HEADLESS = "service.kubernetes.io/headless"
MAX_ENDPOINTS_ADDRESSES = 1000  # legacy Endpoints are truncated beyond this, as upstream


def resolve_target_port(sp: Obj, pod: Obj) -> int | None:
    tp = sp.get("targetPort", sp.get("port"))
    if isinstance(tp, int):
        return tp
    if isinstance(tp, str) and tp.isdigit():
        return int(tp)
    proto = sp.get("protocol", "TCP")
    for c in pod["spec"].get("containers") or []:
        for cp in c.get("ports") or []:
            if cp.get("name") == tp and cp.get("protocol", "TCP") == proto:
                return int(cp["containerPort"])
    return None


def slice_ports(svc: Obj, pod: Obj) -> list[Obj]:
    out = []
    for sp in svc["spec"].get("ports") or []:
        port = resolve_target_port(sp, pod)
        if port is None:
            continue  # upstream skips a port whose name this pod does not define
        p: Obj = {"name": sp.get("name", ""), "port": port, "protocol": sp.get("protocol", "TCP")}
        if sp.get("appProtocol"):
            p["appProtocol"] = sp["appProtocol"]
        out.append(p)
    return out


def service_address_types(svc: Obj) -> list[str]:
    """The Service's IP families in order (the API server always sets them; IPv4 for a stored
    object from before dual-stack)."""
    fams = [f for f in (svc["spec"].get("ipFamilies") or []) if f in ("IPv4", "IPv6")]
    return list(dict.fromkeys(fams)) or ["IPv4"]


def pod_ip_of_family(pod: Obj, family: str) -> str | None:
    """The pod's address of that family: from status.podIPs, else status.podIP."""
    st = pod.get("status") or {}
    listed = [p.get("ip") for p in (st.get("podIPs") or []) if isinstance(p, dict)]
    if not listed and st.get("podIP"):
        listed = [st.get("podIP")]
    for ip in listed:
        if isinstance(ip, str) and _family(ip) == family:
            return ip
    return None


def _addresses_by_family(pods: Iterable[Obj], families: list[str]) -> Iterator[tuple[Obj, str, str | None]]:
    for pod in pods:
        for family in families:
            yield pod, family, pod_ip_of_family(pod, family)


def _family(ip: str) -> str | None:
    try:
        return "IPv4" if ipaddress.ip_address(ip).version == 4 else "IPv6"
    except ValueError:
        return None  # a malformed podIP is skipped: one bad pod does not stop the others


def group_key(address_type: str, ports: list[Obj]) -> str:
    return f"{address_type}/{ports_key(ports)}"


def ports_key(ports: list[Obj]) -> str:
    return json.dumps(sorted(ports, key=lambda p: (p.get("name", ""), p.get("protocol", ""))), sort_keys=True)


class SelectorIndex:
    """Services by the k=v pairs of their selectors: which Services may select a pod with given labels."""

    def __init__(self, services: Informer) -> None:
        self.by_pair: dict[tuple[str, str, str], set[str]] = {}
        services.add_handler(self._on)

    @staticmethod
    def _pairs(svc: Obj) -> list[tuple[str, str, str]]:
        ns = svc["metadata"]["namespace"]
        return [(ns, k, v) for k, v in ((svc.get("spec") or {}).get("selector") or {}).items()]

    def _on(self, event: str, svc: Obj, old: Obj | None) -> None:
        k = key_of(svc)
        if old is not None:
            for pair in self._pairs(old):
                self.by_pair.get(pair, set()).discard(k)
        if event != "DELETED":
            for pair in self._pairs(svc):
                self.by_pair.setdefault(pair, set()).add(k)


class EndpointSliceController:
    def __init__(
        self,
        client: api.Client,
        services: Informer,
        svc_index: SelectorIndex,
        pods: Informer,
        pod_index: Indexes,
        nodes: Informer,
        slices: Informer,
        endpoints: Informer,
        max_per_slice: int = 100,
    ) -> None:
        self.client = client
        self.services, self.svc_index = services, svc_index
        self.pods, self.pod_index = pods, pod_index
        self.nodes = nodes
        self.slices = slices
        self.endpoints = endpoints
        self.max_per_slice = max_per_slice
        self.queue = WorkQueue()
        self.trigger: dict[str, str] = {}
        self.slices_by_service: dict[str, set[str]] = {}
        self.slice_writes = 0
        self.topology = TopologyCache()
        self._said: dict[str, tuple[tuple[str, str, str], ...]] = {}  # last hint Events per Service
        self.events = api.EventRecorder(client, "endpoint-slice-controller")
        services.add_handler(self._on_service)
        pods.add_handler(self._on_pod)
        slices.add_handler(self._on_slice)
        nodes.add_handler(self._on_node)

    # -- events ------------------------------------------------------------------------------
    def _enqueue(self, key: str) -> None:
        self.trigger.setdefault(key, now())
        self.queue.add(key)

    def _on_service(self, event: str, svc: Obj, old: Obj | None) -> None:
        self._enqueue(key_of(svc))

    def _on_node(self, event: str, node: Obj, old: Obj | None) -> None:
        # upstream's checkNodeTopologyDistribution: new zone shares; Services whose Auto hints
        # now overload a zone are synced again.
        for key in self.topology.set_nodes(self.nodes.cache.values()):
            self._enqueue(key)

    def _on_pod(self, event: str, pod: Obj, old: Obj | None) -> None:
        if old is not None and event == "MODIFIED" and _endpoint_view(pod) == _endpoint_view(old):
            return  # nothing an endpoint shows changed (e.g. a container restart count)
        ns = pod["metadata"]["namespace"]
        keys: set[str] = set()
        for p in (pod, old):
            if p is None:
                continue
            labels = p["metadata"].get("labels") or {}
            for k, v in labels.items():
                for skey in self.svc_index.by_pair.get((ns, k, v), ()):
                    keys.add(skey)
        for skey in keys:
            svc = self.services.cache.get(skey)
            if svc is None:
                continue
            sel = svc["spec"].get("selector") or {}
            if any(
                all((p["metadata"].get("labels") or {}).get(k) == v for k, v in sel.items())
                for p in (pod, old)
                if p is not None
            ):
                self._enqueue(skey)

    def _on_slice(self, event: str, sl: Obj, old: Obj | None) -> None:
        labels = sl["metadata"].get("labels") or {}
        if labels.get(MANAGED_BY) != CONTROLLER_NAME or SERVICE_NAME not in labels:
            return
        skey = f"{sl['metadata']['namespace']}/{labels[SERVICE_NAME]}"
        names = self.slices_by_service.setdefault(skey, set())
        if event == "DELETED":
            names.discard(key_of(sl))
        else:
            names.add(key_of(sl))
        if old is not None and old["metadata"].get("resourceVersion") == sl["metadata"].get(
            "resourceVersion"
        ):
            return  # our own write coming back
        if event != "ADDED" or old is not None:
            self.queue.add(skey)  # someone else changed or removed a slice we manage: repair it

    # -- sync --------------------------------------------------------------------------------
    def _zone(self, node: str) -> str:
        n = self.nodes.cache.get(node)
        return (
            ((n or {}).get("metadata", {}).get("labels") or {}).get("topology.kubernetes.io/zone", "")
            if n
            else ""
        )

    def desired(self, svc: Obj) -> dict[str, tuple[list[Obj], list[Obj]]]:
        """group key (address type and ports) -> (ports, endpoints) for the pods the Service selects:
        one slice set per IP family of the Service, each with the pods' addresses of that family."""
        ns = svc["metadata"]["namespace"]
        publish = bool(svc["spec"].get("publishNotReadyAddresses"))
        groups: dict[str, tuple[list[Obj], list[Obj]]] = {}
        families = service_address_types(svc)
        selected = self.pod_index.selected(ns, svc["spec"].get("selector") or {})
        for pod, family, ip in _addresses_by_family(selected, families):
            st = pod.get("status") or {}
            if not ip or st.get("phase") in ("Succeeded", "Failed"):
                continue
            terminating = bool(pod["metadata"].get("deletionTimestamp"))
            ready = publish or pod_ready(pod)
            serving = ready
            if terminating and not publish:
                ready = False
            ep: Obj = {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "targetRef": {
                    "kind": "Pod",
                    "namespace": ns,
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            }
            node = pod["spec"].get("nodeName")
            if node:
                ep["nodeName"] = node
                zone = self._zone(node)
                if zone:
                    ep["zone"] = zone
            hn = pod["spec"].get("hostname")
            if hn and pod["spec"].get("subdomain") == svc["metadata"]["name"]:
                ep["hostname"] = hn
            ports = slice_ports(svc, pod)
            pk = group_key(family, ports)
            groups.setdefault(pk, (ports, []))[1].append(ep)
        return groups

    def set_hints(self, svc: Obj, groups: dict[str, tuple[list[Obj], list[Obj]]]) -> list[tuple[str, str, str]]:
        """Zone hints on the desired endpoints, per address type as upstream: the topology-mode
        Auto annotation (proportional, topology.py) wins over spec.trafficDistribution
        PreferClose (same zone). Returns the Events (type, reason, message) for the Service."""
        key = key_of(svc)
        by_type: dict[str, list[Obj]] = {}
        for pk, (_ports, eps) in groups.items():
            by_type.setdefault(pk.split("/", 1)[0], []).extend(eps)
        auto = hints_enabled(svc["metadata"].get("annotations"))
        events = []
        for address_type in service_address_types(svc):
            eps = by_type.get(address_type, [])
            if auto:
                events += self.topology.add_hints(key, address_type, eps)
                continue
            events += self.topology.annotation_off(key, address_type)
            if svc["spec"].get("trafficDistribution") == PREFER_CLOSE:
                prefer_close_hints(eps)
        said = tuple((e.type, e.reason, e.message) for e in events)
        if not said:
            return []
        # A Service that stays without hints would get the same Warning on every sync: written
        # once, as client-go's event correlator folds repeats into one Event.
        if self._said.get(key) == said:
            return []
        self._said[key] = said
        return list(said)

    async def sync(self, key: str) -> None:
        svc = self.services.cache.get(key)
        trigger = self.trigger.pop(key, now())
        if svc is None or not svc["spec"].get("selector") or svc["spec"].get("type") == "ExternalName":
            await self._delete_all(key, svc)
            return
        groups = self.desired(svc)
        events = self.set_hints(svc, groups)
        await self._reconcile_slices(svc, groups, trigger)
        await self._reconcile_endpoints(svc, groups, trigger)
        ref = {"apiVersion": "v1", "kind": "Service", "metadata": svc["metadata"]}
        for type_, reason, message in events:
            self.events.event(ref, type_, reason, message)

    def _labels(self, svc: Obj) -> dict[str, str]:
        labels = {
            k: v
            for k, v in (svc["metadata"].get("labels") or {}).items()
            if k not in (MANAGED_BY, SERVICE_NAME)
        }
        labels[SERVICE_NAME] = svc["metadata"]["name"]
        labels[MANAGED_BY] = CONTROLLER_NAME
        if svc["spec"].get("clusterIP") == "None":
            labels[HEADLESS] = ""
        return labels

    async def _reconcile_slices(
        self, svc: Obj, groups: dict[str, tuple[list[Obj], list[Obj]]], trigger: str
    ) -> None:
        skey = key_of(svc)
        existing = [
            self.slices.cache[k]
            for k in sorted(self.slices_by_service.get(skey, ()))
            if k in self.slices.cache
        ]
        existing = [s for s in existing if s["metadata"].get("deletionTimestamp") is None]
        by_group: dict[str, list[Obj]] = {}
        for s in existing:
            by_group.setdefault(group_key(str(s.get("addressType", "IPv4")), s.get("ports") or []), []).append(s)
        to_write: list[Obj] = []
        to_create: list[Obj] = []
        to_delete: list[Obj] = []
        labels = self._labels(svc)
        for pk, (ports, eps) in groups.items():
            want = {e["targetRef"]["uid"]: e for e in eps}
            placed: set[str] = set()
            slices = by_group.pop(pk, [])
            new_contents: list[tuple[Obj, list[Obj]]] = []
            for s in slices:
                kept = []
                for e in s.get("endpoints") or []:
                    uid = (e.get("targetRef") or {}).get("uid", "")
                    if uid in want and uid not in placed:
                        kept.append(want[uid])
                        placed.add(uid)
                new_contents.append((s, kept))
            rest = [e for uid, e in want.items() if uid not in placed]
            # Fill the fullest slices with room first (fewer slices over time), then make new ones.
            for s, kept in sorted(new_contents, key=lambda sk: -len(sk[1])):
                room = self.max_per_slice - len(kept)
                if room > 0 and rest:
                    kept.extend(rest[:room])
                    rest = rest[room:]
            for s, kept in new_contents:
                if not kept:
                    to_delete.append(s)
                elif (
                    _eps_key(kept) != _eps_key(s.get("endpoints") or [])
                    or s.get("ports") != ports
                    or not _labels_ok(s, labels)
                ):
                    to_write.append(self._slice(svc, pk, ports, kept, labels, trigger, s))
            for i in range(0, len(rest), self.max_per_slice):
                to_create.append(
                    self._slice(svc, pk, ports, rest[i : i + self.max_per_slice], labels, trigger, None)
                )
        for slices in by_group.values():
            to_delete.extend(slices)
        if not groups:
            # Upstream keeps one empty "placeholder" slice (of the primary family) for a Service
            # without endpoints.
            placeholder = group_key(service_address_types(svc)[0], [])
            # addressType is immutable: only a slice of the primary family can be kept.
            same_type = [s for s in to_delete if s.get("addressType", "IPv4") == placeholder.split("/", 1)[0]]
            keep = next((s for s in same_type if not (s.get("endpoints") or [])), None) or (
                same_type[0] if same_type else None
            )
            if keep is not None:
                to_delete.remove(keep)
                if keep.get("endpoints") or keep.get("ports"):
                    to_write.append(self._slice(svc, placeholder, [], [], labels, trigger, keep))
            elif not to_create:
                to_create.append(self._slice(svc, placeholder, [], [], labels, trigger, None))
        for s in to_create:
            r = await self.client.create(api.path("endpointslices", svc["metadata"]["namespace"]), s)
            self.slice_writes += 1
            await self.slices.assume(r)
        for s in to_write:
            r = await self.client.update(api.obj_path("endpointslices", s), s)
            self.slice_writes += 1
            await self.slices.assume(r)
        for s in to_delete:
            await self.client.delete(api.obj_path("endpointslices", s))
            self.slice_writes += 1
            await self.slices.assume_deleted(s)

    def _slice(
        self,
        svc: Obj,
        key: str,
        ports: list[Obj],
        eps: list[Obj],
        labels: dict[str, str],
        trigger: str,
        current: Obj | None,
    ) -> Obj:
        md: Obj
        if current is not None:
            md = json.loads(json.dumps(current["metadata"]))
        else:
            md = {
                "generateName": f"{svc['metadata']['name']}-",
                "namespace": svc["metadata"]["namespace"],
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": svc["metadata"]["name"],
                        "uid": svc["metadata"]["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            }
        md["labels"] = {**(md.get("labels") or {}), **labels}
        md.setdefault("annotations", {})[TRIGGER_TIME] = trigger
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": md,
            "addressType": key.split("/", 1)[0],
            "endpoints": eps,
            "ports": ports,
        }

    async def _reconcile_endpoints(
        self, svc: Obj, groups: dict[str, tuple[list[Obj], list[Obj]]], trigger: str
    ) -> None:
        publish = bool(svc["spec"].get("publishNotReadyAddresses"))
        subsets = []
        total = 0
        # The legacy Endpoints object lists the Service's primary family only, as upstream's.
        primary = service_address_types(svc)[0]
        for pk, (ports, eps) in groups.items():
            if not pk.startswith(primary + "/"):
                continue
            ready: list[Obj] = []
            not_ready: list[Obj] = []
            for e in eps:
                c = e["conditions"]
                if c["terminating"] and not publish:
                    continue  # legacy Endpoints never list terminating pods
                a: Obj = {"ip": e["addresses"][0], "targetRef": e["targetRef"]}
                if e.get("nodeName"):
                    a["nodeName"] = e["nodeName"]
                if e.get("hostname"):
                    a["hostname"] = e["hostname"]
                (ready if c["ready"] else not_ready).append(a)
            if not ready and not not_ready:
                continue
            ready.sort(key=lambda a: a["ip"])
            not_ready.sort(key=lambda a: a["ip"])
            total += len(ready) + len(not_ready)
            sub: Obj = {"ports": [{k: v for k, v in p.items()} for p in ports]}
            if ready:
                sub["addresses"] = ready
            if not_ready:
                sub["notReadyAddresses"] = not_ready
            subsets.append(sub)
        subsets.sort(key=lambda s: json.dumps(s["ports"], sort_keys=True))
        labels = {k: v for k, v in (svc["metadata"].get("labels") or {}).items()}
        if svc["spec"].get("clusterIP") == "None":
            labels[HEADLESS] = ""
        annotations = {TRIGGER_TIME: trigger}
        if total > MAX_ENDPOINTS_ADDRESSES:
            annotations["endpoints.kubernetes.io/over-capacity"] = "truncated"
            left = MAX_ENDPOINTS_ADDRESSES
            for sub in subsets:
                for f in ("addresses", "notReadyAddresses"):
                    if f in sub:
                        sub[f] = sub[f][:left]
                        left -= len(sub[f])
        key = key_of(svc)
        cur = self.endpoints.cache.get(key)
        if (
            cur is not None
            and (cur.get("subsets") or []) == subsets
            and (cur["metadata"].get("labels") or {}) == labels
        ):
            return
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": svc["metadata"]["name"],
                "namespace": svc["metadata"]["namespace"],
                "labels": labels,
                "annotations": annotations,
            },
            "subsets": subsets,
        }
        if cur is None:
            try:
                r = await self.client.create(api.path("endpoints", svc["metadata"]["namespace"]), body)
            except api.ApiError as e:
                if e.code != 409:
                    raise
                cur = await self.client.get(api.obj_path("endpoints", body))
        if cur is not None:
            body["metadata"]["resourceVersion"] = cur["metadata"].get("resourceVersion")
            r = await self.client.update(api.obj_path("endpoints", body), body)
        await self.endpoints.assume(r)

    async def _delete_all(self, key: str, svc: Obj | None) -> None:
        self.topology.forget(key)
        self._said.pop(key, None)
        for k in list(self.slices_by_service.get(key, ())):
            s = self.slices.cache.get(k)
            if s is not None:
                await self.client.delete(api.obj_path("endpointslices", s))
                await self.slices.assume_deleted(s)
        ep = self.endpoints.cache.get(key)
        if ep is not None and (svc is None or svc["spec"].get("selector")):
            await self.client.delete(api.obj_path("endpoints", ep))
            await self.endpoints.assume_deleted(ep)


PREFER_CLOSE = "PreferClose"


def prefer_close_hints(eps: list[Obj]) -> None:
    """spec.trafficDistribution PreferClose, as upstream's trafficdist heuristic: every ready
    endpoint with a zone is hinted for its own zone; endpoints that are not ready, or whose node
    has no zone, get no hints (and a proxy then ignores the hints of the whole Service: it only
    filters by zone when every ready endpoint carries one)."""
    for ep in eps:
        zone = ep.get("zone")
        if ep["conditions"].get("ready") and zone:
            ep["hints"] = {"forZones": [{"name": zone}]}
        else:
            ep.pop("hints", None)


def _endpoint_view(pod: Obj) -> tuple[Any, ...]:
    st = pod.get("status") or {}
    return (
        st.get("podIP"),
        json.dumps(st.get("podIPs") or []),
        st.get("phase"),
        pod_ready(pod),
        pod["metadata"].get("deletionTimestamp"),
        pod["spec"].get("nodeName"),
        json.dumps(pod["metadata"].get("labels") or {}, sort_keys=True),
    )


def _eps_key(eps: list[Obj]) -> str:
    return json.dumps(eps, sort_keys=True)


def _labels_ok(s: Obj, labels: dict[str, str]) -> bool:
    have = s["metadata"].get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())

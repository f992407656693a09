"""ServiceCIDR objects (networking.k8s.io/v1) kept by the API server itself.

Upstream splits this over two controllers: kube-apiserver's defaultservicecidr controller creates
the ServiceCIDR "kubernetes" from --service-cluster-ip-range (re-created when deleted, upgraded
from one CIDR to two when the flag turned dual-stack, Ready=True once its CIDRs match the flag),
and kube-controller-manager's servicecidrs controller sets Ready=True on the others. This server
has no controller manager of its own (kproxy-cluster runs one, a plain kproxy-apiserver does not),
so both run here, writing through the Registry (validation and the status subresource as a
client's write) and following the store's events, so a write by another API server on the same
etcd is seen too.

The ClusterIP allocator takes addresses from every Ready ServiceCIDR: the flag ranges first, then
the others' CIDRs (ServiceAllocator.set_extra_ranges).

Deletion, as upstream's servicecidrs controller: every ServiceCIDR gets the finalizer
networking.k8s.io/service-cidr-finalizer, so a delete only sets deletionTimestamp (registry.py,
FINALIZED); while a Service holds a ClusterIP of it that no other live ServiceCIDR covers, it
stays, Ready=False with reason Terminating, and gives no new addresses; once none does, the
finalizer is removed and the object goes (the default one is then re-created from the flag).
"""
from __future__ import annotations

import asyncio
import copy
import ipaddress
import logging
from typing import Any

from ..store.base import Compacted
from .errors import StatusError
from .registry import Registry, now_rfc3339
from .resources import BY_ID
from .semantics import Allocator

log = logging.getLogger("kproxy.apiserver.servicecidrs")
Obj = dict[str, Any]

DEFAULT_NAME = "kubernetes"
RESOURCE = BY_ID["servicecidrs.networking.k8s.io"]
READY = "Ready"
FINALIZER = "networking.k8s.io/service-cidr-finalizer"
TERMINATING = "Terminating"
TERMINATING_MESSAGE = ("There are still IPAddresses referencing the ServiceCIDR, please remove them or create a new "
                       "ServiceCIDR")
DEFAULT_READY_MESSAGE = "Kubernetes default Service CIDR is ready"
READY_MESSAGE = "Kubernetes Service CIDR is ready"
DEFAULT_INTERVAL = 10.0
SERVICES = BY_ID["services"].prefix()
SERVICE_SETTLE = 0.5  # seconds Service events gather before a held ServiceCIDR is looked at again  # upstream's default ServiceCIDR sync interval


def cidrs_of(obj: Obj) -> list[str]:
    spec = obj.get("spec")
    cidrs = spec.get("cidrs") if isinstance(spec, dict) else None
    return [c for c in cidrs if isinstance(c, str)] if isinstance(cidrs, list) else []


def ready_condition(obj: Obj) -> Obj | None:
    status = obj.get("status")
    conds = status.get("conditions") if isinstance(status, dict) else None
    for cond in conds if isinstance(conds, list) else []:
        if isinstance(cond, dict) and cond.get("type") == READY:
            return cond
    return None


def _parses(cidr: str) -> bool:
    try:
        ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
    return True


def is_ready(obj: Obj) -> bool:
    cond = ready_condition(obj)
    return cond is not None and cond.get("status") == "True"


class ServiceCIDRController:
    def __init__(self, registry: Registry, allocator: Allocator, flag_cidrs: list[str],
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.registry = registry
        self.store = registry.store
        self.allocator = allocator
        # The flag's ranges in canonical text (the object's validation wants "fd00:10:96::/108").
        self.flag_cidrs = [str(ipaddress.ip_network(c, strict=False)) for c in flag_cidrs]
        self.interval = interval
        self._reported_mismatch = False

    # --- the default ServiceCIDR ----------------------------------------------------------------

    def default_object(self) -> Obj:
        return {"apiVersion": RESOURCE.api_version, "kind": RESOURCE.kind, "metadata": {"name": DEFAULT_NAME},
                "spec": {"cidrs": list(self.flag_cidrs)}}

    async def ensure_default(self) -> None:
        """Create "kubernetes" when missing, turn it dual-stack when the flag did, set it Ready
        when its CIDRs are the flag's (else one warning: the operator changed the flag)."""
        cur = self.store.get(RESOURCE.key("", DEFAULT_NAME))
        if cur is None:
            try:
                cur = await self.registry.create(RESOURCE, "", self.default_object(), dry_run=False)
                log.info("event=default_servicecidr_created cidrs=%s", ",".join(self.flag_cidrs))
            except StatusError as e:
                if e.code != 409:
                    raise
                cur = self.store.get(RESOURCE.key("", DEFAULT_NAME))  # another API server made it
                if cur is None:
                    return
        cidrs = cidrs_of(cur)
        if len(self.flag_cidrs) == 2 and len(cidrs) == 1 and cidrs[0] == self.flag_cidrs[0]:
            new = copy.deepcopy(cur)
            new["spec"]["cidrs"] = list(self.flag_cidrs)
            cur = await self.registry.update(RESOURCE, "", DEFAULT_NAME, new, "", dry_run=False)
            log.info("event=default_servicecidr_dual_stack cidrs=%s", ",".join(self.flag_cidrs))
            cidrs = cidrs_of(cur)
        if cidrs != self.flag_cidrs:
            if not self._reported_mismatch:
                log.warning("event=default_servicecidr_inconsistent servicecidr=%s flag=%s: configure the flag "
                            "to match the ServiceCIDR or delete it", ",".join(cidrs), ",".join(self.flag_cidrs))
                self._reported_mismatch = True
            return
        await self._set_ready(cur, DEFAULT_READY_MESSAGE)

    # --- every ServiceCIDR --------------------------------------------------------------------------

    async def _set_ready(self, obj: Obj, message: str) -> bool:
        """Ready=True on an object with no Ready condition (or Unknown) that is not being deleted;
        a False set by someone else is left alone, as upstream. True: it is Ready now."""
        cond = ready_condition(obj)
        if obj["metadata"].get("deletionTimestamp") or (cond is not None and cond.get("status") in ("True", "False")):
            return is_ready(obj)
        return await self._write_ready(obj, "True", "", message)

    async def _write_ready(self, obj: Obj, status_value: str, reason: str, message: str) -> bool:
        new = copy.deepcopy(obj)
        status = new.setdefault("status", {})
        conds = [c for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type") != READY]
        conds.append({"type": READY, "status": status_value, "lastTransitionTime": now_rfc3339(), "reason": reason,
                      "message": message})
        status["conditions"] = conds
        return await self._write(obj, new, "status")

    async def _write(self, obj: Obj, new: Obj, subresource: str) -> bool:
        name = obj["metadata"]["name"]
        try:
            await self.registry.update(RESOURCE, "", name, new, subresource, dry_run=False)
        except StatusError as e:  # a concurrent write (409) or a delete (404): its event brings us back
            log.info("event=servicecidr_write_failed name=%s code=%d message=%s", name, e.code, e)
            return False
        return True

    async def _set_finalizers(self, obj: Obj, finalizers: list[str]) -> bool:
        new = copy.deepcopy(obj)
        new["metadata"]["finalizers"] = finalizers
        return await self._write(obj, new, "")

    @staticmethod
    def _in_use(obj: Obj, live: list[Obj], services: list[Obj]) -> bool:
        """A Service holds a ClusterIP of obj's CIDRs that no other live ServiceCIDR covers."""
        mine = [ipaddress.ip_network(c, strict=False) for c in cidrs_of(obj) if _parses(c)]
        others = [ipaddress.ip_network(c, strict=False) for o in live if o is not obj for c in cidrs_of(o)
                  if _parses(c)]
        for svc in services:
            spec = svc.get("spec")
            for text in (spec.get("clusterIPs") or []) if isinstance(spec, dict) else []:
                try:
                    ip = ipaddress.ip_address(text)
                except (ValueError, TypeError):
                    continue  # "None" (headless) and anything that is not an address
                if any(ip in n for n in mine) and not any(ip in n for n in others):
                    return True
        return False

    async def _terminate(self, obj: Obj, live: list[Obj], services: list[Obj]) -> None:
        """A deleted ServiceCIDR: Ready=False while its addresses are in use, else let it go."""
        finalizers = [f for f in obj["metadata"].get("finalizers") or [] if f != FINALIZER]
        if len(finalizers) == len(obj["metadata"].get("finalizers") or []):
            return  # not ours to hold (another finalizer, or none)
        if not self._in_use(obj, live, services):
            if await self._set_finalizers(obj, finalizers):
                log.info("event=servicecidr_released name=%s", obj["metadata"]["name"])
            return
        cond = ready_condition(obj)
        if cond is None or cond.get("reason") != TERMINATING:
            await self._write_ready(obj, "False", TERMINATING, TERMINATING_MESSAGE)

    def _objects(self) -> tuple[list[Obj], int]:
        revision = self.store.revision
        return self.registry.decode_all(self.store.list(RESOURCE.prefix()).items), revision

    def _services(self) -> list[Obj]:
        return self.registry.decode_all(self.store.list(BY_ID["services"].prefix()).items)

    async def reconcile(self, objects: list[Obj]) -> bool:
        """Finalizer and Ready on the new ones, deleted ones released or held, then the
        allocator's ranges from the Ready live ones. True while one is held (Services matter)."""
        live = [o for o in objects if not o["metadata"].get("deletionTimestamp")]
        deleted = [o for o in objects if o["metadata"].get("deletionTimestamp")]
        ready_cidrs: list[str] = []
        for obj in live:
            if FINALIZER not in (obj["metadata"].get("finalizers") or []):
                await self._set_finalizers(obj, [*(obj["metadata"].get("finalizers") or []), FINALIZER])
                continue  # its event brings it back, finalized
            ready = is_ready(obj) if obj["metadata"].get("name") == DEFAULT_NAME else \
                await self._set_ready(obj, READY_MESSAGE)
            if ready:
                ready_cidrs.extend(cidrs_of(obj))
        set_extra = getattr(self.allocator, "set_extra_ranges", None)
        if set_extra is not None:  # the Services are read only when a range is new
            set_extra(ready_cidrs, self._services)
        if deleted:
            services = self._services()
            for obj in deleted:
                await self._terminate(obj, live, services)
        return bool(deleted)

    async def run(self) -> None:
        """Until cancelled: follow ServiceCIDR writes; every interval also make sure the default
        one exists (it is re-created when deleted, as upstream)."""
        while True:
            try:
                await self.ensure_default()
                objects, revision = self._objects()
                held = await self.reconcile(objects)
                await self._follow(revision, held)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed pass must not end the loop: the next one tries again
                log.exception("event=servicecidr_pass_failed")
                await asyncio.sleep(self.interval)

    async def _follow(self, revision: int, held: bool) -> None:
        """Reconcile after each ServiceCIDR event (and Service event while a deleted one is held:
        its Services going lets it go); return after interval to check the default."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.interval
        while (left := deadline - loop.time()) > 0:
            try:
                events = self.store.events_since(revision)
            except Compacted:
                return
            if events:
                revision = events[-1].revision
                mine = any(ev.key.startswith(RESOURCE.prefix()) for ev in events)
                if mine or (held and any(ev.key.startswith(SERVICES) for ev in events)):
                    if not mine:
                        # Only Services changed: a burst of them (a namespace deleted) costs one
                        # reconcile, which reads them all, not one each.
                        await asyncio.sleep(SERVICE_SETTLE)
                    objects, revision = self._objects()
                    held = await self.reconcile(objects)
                continue
            await self.store.wait_for_events(revision, left)

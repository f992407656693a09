"""Object semantics of the generic registry: what create/update/patch/delete do, without HTTP.

Order on every write, as in kube-apiserver: prepare (server-owned fields) -> apply_defaults ->
allocate (services) -> validate -> store. Anything raised before the store commits leaves the
store untouched, and allocations made for the failed request are released.
"""
from __future__ import annotations

import copy
import datetime
import logging
import os
import secrets
import time
from typing import Any

from ..store.base import KeyExists, KeyNotFound, Obj, RevisionConflict, Store
from . import bodies, semantics
from .defaults import _sub, normalize_cluster_ips
from .errors import StatusError, already_exists, bad_request, conflict, invalid, not_found
from .resources import BY_ID, DEPENDENTS, RESOURCES, Resource
from .validation import decode_check

log = logging.getLogger("kproxy.apiserver.registry")
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_GEN_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real server's generateName alphabet


class _Clock:
    """The RFC 3339 second and fresh object uids, cheaper than per call: a create stamps both, and
    strftime and uuid4 (a getrandom call each) showed as ~3.5% of the API server's CPU in the
    50-watcher fan-out (bench/README.md etcd)."""

    def __init__(self) -> None:
        self.second = -1
        self.stamp = ""
        self.random = b""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.stamp = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            self.second = second
        return self.stamp

    def uid(self) -> str:
        """A random (version 4) UUID as uuid.uuid4() makes it, its bytes from one os.urandom read
        per 256 uids."""
        if not self.random:
            self.random = os.urandom(16 * 256)
        n = int.from_bytes(self.random[:16])
        self.random = self.random[16:]
        n = (n & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)  # version 4, RFC 4122 variant
        h = f"{n:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_clock = _Clock()
# A forked child must not hand out the uids its parent still holds.
os.register_at_fork(after_in_child=lambda: setattr(_clock, "random", b""))
now_rfc3339 = _clock.now
new_uid = _clock.uid


# Every failed attempt means another write committed, so the writers as a whole progress; the bound
# only stops a pathological loop (kube-apiserver retries until the request's deadline).
_PATCH_ATTEMPTS = 100
# Kinds whose metadata.finalizers hold a delete back (deletionTimestamp set; the object goes when
# an update removes its last finalizer), as kube-apiserver does for every kind. Only these so far:
# elsewhere here a finalizer is stored but does not block.
FINALIZED = frozenset({"servicecidrs.networking.k8s.io"})


def _revision(obj: Obj | None) -> str:
    return "" if obj is None else str(obj["metadata"].get("resourceVersion", ""))


def _conflict_msg() -> str:
    return "the object has been modified; please apply your changes to the latest version and try again"


class Registry:
    def __init__(self, store: Store, allocator: semantics.Allocator) -> None:
        self.store = store
        self.allocator = allocator

    # -- bootstrap -----------------------------------------------------------------------------

    async def bootstrap(self) -> None:
        services = BY_ID["services"]
        self.allocator.load(self.decode_all(self.store.list(services.prefix()).items))
        await self.ensure_system_namespaces()

    async def ensure_system_namespaces(self) -> list[str]:
        """Create the system namespaces that do not exist (kube-apiserver's bootstrap controller
        does this at start and then periodically: kube-node-lease may be deleted). Returns those made."""
        made = []
        for ns in SYSTEM_NAMESPACES:
            if self.store.get(BY_ID["namespaces"].key("", ns)) is None:
                await self.create(BY_ID["namespaces"], "", {"apiVersion": "v1", "kind": "Namespace",
                                                      "metadata": {"name": ns}}, dry_run=False)
                made.append(ns)
        return made

    @staticmethod
    def decode_all(items: list[tuple[str, bytes]]) -> list[Obj]:
        import msgspec

        return [msgspec.json.decode(v) for _, v in items]

    # -- helpers -------------------------------------------------------------------------------

    def _check_identity(self, res: Resource, namespace: str, obj: Any) -> Obj:
        if not isinstance(obj, dict):
            raise bad_request("the body of the request was in an unknown format")
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind and kind != res.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({res.kind})")
        if api_version and api_version != res.api_version:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected API "
                              f"version ({res.api_version})")
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        for key in [k for k, v in obj.items() if v is None]:
            del obj[key]  # "spec": null decodes to an empty spec in Go: the field is simply absent
        meta = obj.get("metadata")
        if meta is None:
            meta = obj["metadata"] = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        # Values of the wrong JSON type are the decoder's 400, before the server touches the object.
        decode_check(res.id, obj)
        if res.namespaced:
            ns = meta.get("namespace") or namespace
            if namespace and ns != namespace:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        return obj

    def _require_namespace(self, res: Resource, namespace: str, verb: str) -> None:
        if not res.namespaced:
            return
        ns = self.store.get(BY_ID["namespaces"].key("", namespace))
        if ns is None:
            raise not_found("namespaces", namespace)
        if verb == "create" and (ns.get("status") or {}).get("phase") == "Terminating":
            raise StatusError(403, "Forbidden", f'{res.id} "{namespace}" is forbidden: unable to create new content '
                              f"in namespace {namespace} because it is being terminated")

    def _release_quietly(self, svc: Obj, keep: Obj | None = None) -> None:
        """Free what svc holds beyond keep (see semantics.Allocator.release)."""
        try:
            self.allocator.release(svc, keep)
        except Exception:
            log.debug("event=release_failed service=%s", (svc.get("metadata") or {}).get("name"), exc_info=True)

    @staticmethod
    def check_fields(res: Resource, obj: Any, directive: str, warnings: list[str] | None,
                     duplicates: list[str] | tuple[str, ...] = ()) -> None:
        """?fieldValidation, as kube-apiserver's decoder: Strict rejects unknown and duplicate fields
        (400); Warn drops unknown fields and reports them and the duplicates; Ignore drops them
        silently. Unknown fields are never stored (a typed decoder has nowhere to put them)."""
        if not isinstance(obj, dict):
            return
        unknown = semantics.unknown_fields(res.id, obj, drop=directive != "Strict")
        if directive == "Ignore" or not (unknown or duplicates):
            return
        if directive == "Strict":
            problems = [f'unknown field "{f}"' for f in unknown] + [f'duplicate field "{f}"' for f in duplicates]
            raise semantics.strict_decoding_error(res.kind, res.version, problems)
        if warnings is not None:
            warnings.extend(f'unknown field "{f}"' for f in unknown)
            warnings.extend(f'duplicate field "{f}"' for f in duplicates)

    # -- verbs ---------------------------------------------------------------------------------

    def get(self, res: Resource, namespace: str, name: str) -> Obj:
        obj = self.store.get(res.key(namespace, name))
        if obj is None:
            raise not_found(res.plural, name, res.group)
        return obj

    async def create(self, res: Resource, namespace: str, body: Any, *, dry_run: bool) -> Obj:
        obj = self._check_identity(res, namespace, body)
        meta = obj["metadata"]
        if res.namespaced:
            self._require_namespace(res, meta["namespace"], "create")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(secrets.choice(_GEN_ALPHABET) for _ in range(5))
        for server_owned in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink"):
            meta.pop(server_owned, None)
        meta["uid"] = new_uid()
        meta["creationTimestamp"] = now_rfc3339()
        if res.has_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        self._prepare_status_on_create(res, obj)
        return await self._admit_and_store(res, obj, None, dry_run)

    @staticmethod
    def _prepare_status_on_create(res: Resource, obj: Obj) -> None:
        if res.plural == "namespaces":
            obj["status"] = {"phase": "Active"}
            # _sub: "labels": null or "spec": null in the body is a missing field, not a 500.
            _sub(obj, "spec").setdefault("finalizers", ["kubernetes"])
            _sub(obj["metadata"], "labels")["kubernetes.io/metadata.name"] = obj["metadata"].get("name", "")
        elif res.plural == "pods":
            obj["status"] = {"phase": "Pending"}
        elif "status" in res.subresources and res.plural != "nodes":
            obj["status"] = {}

    async def _admit_and_store(self, res: Resource, obj: Obj, old: Obj | None, dry_run: bool) -> Obj:
        is_svc = res.id == "services"
        if is_svc and old is not None:
            normalize_cluster_ips(obj, old)
        semantics.apply_defaults(res.id, obj, decode_checked=True)  # _check_identity did decode_check
        if is_svc:
            self.allocator.assign(obj, old)
        try:
            if old is None:
                semantics.validate_create(res.id, obj)
            else:
                semantics.validate_update(res.id, obj, old)
            bodies.check_object_size(obj)
            if dry_run:
                if is_svc:
                    self._release_quietly(obj, old)
                return obj
            meta = obj["metadata"]
            if not meta.get("name"):
                raise invalid(res.kind, "", [{"reason": "FieldValueRequired", "field": "metadata.name",
                                             "message": "Required value: name or generateName is required"}],
                              res.group)
            key = res.key(meta.get("namespace", ""), meta["name"])
            if old is None:
                try:
                    stored = await self.store.create(key, obj)
                except KeyExists:
                    raise already_exists(res.plural, meta["name"], res.group) from None
            else:
                expected = int(old["metadata"]["resourceVersion"])
                try:
                    stored = await self.store.update(key, obj, expected)
                except RevisionConflict:
                    raise conflict(res.plural, meta["name"], _conflict_msg(), res.group) from None
                except KeyNotFound:
                    raise not_found(res.plural, meta["name"], res.group) from None
        except Exception:
            # (Not BaseException: a cancelled caller may still see its write commit.)
            if is_svc:
                self._release_quietly(obj, old)
            raise
        if is_svc and old is not None:
            # Release what the update gave up (e.g. nodePorts of a type NodePort -> ClusterIP change).
            self._release_quietly(old, stored)
        return stored

    async def update(self, res: Resource, namespace: str, name: str, body: Any, subresource: str, *,
               dry_run: bool) -> Obj:
        new = self._check_identity(res, namespace, body)
        meta = new["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise bad_request(f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})')
        meta["name"] = name
        old = self.store.get(res.key(namespace, name))
        if old is None:
            raise not_found(res.plural, name, res.group)
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(res.plural, name, _conflict_msg(), res.group)
        return await self._update_from(res, old, new, subresource, dry_run)

    async def _update_from(self, res: Resource, old: Obj, new: Obj, subresource: str, dry_run: bool) -> Obj:
        if subresource == "status":
            # The status subresource changes status only; the rest comes from the stored object.
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            new = merged
        else:
            if "status" in res.subresources and res.plural != "nodes":
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
                if res.plural == "services":
                    _drop_stale_load_balancer_status(new, old)
        meta, ometa = new["metadata"], old["metadata"]
        for kept in ("uid", "creationTimestamp", "namespace", "deletionTimestamp", "deletionGracePeriodSeconds",
                     "generation"):
            if kept in ometa:
                meta[kept] = ometa[kept]
            else:
                meta.pop(kept, None)
        meta["resourceVersion"] = ometa["resourceVersion"]
        if res.has_generation and new.get("spec") != old.get("spec"):
            meta["generation"] = int(ometa.get("generation", 1)) + 1
        if res.plural == "namespaces":
            _sub(meta, "labels")["kubernetes.io/metadata.name"] = meta["name"]
        stored = await self._admit_and_store(res, new, old, dry_run)
        smeta = stored["metadata"]
        if res.id in FINALIZED and smeta.get("deletionTimestamp") and not smeta.get("finalizers") and not dry_run:
            # Its last finalizer went: the delete it waited for happens now.
            try:
                return await self.store.delete(res.key(smeta.get("namespace", ""), smeta["name"]),
                                               int(smeta["resourceVersion"]))
            except (KeyNotFound, RevisionConflict):
                return stored  # deleted meanwhile, or written again: its own next update decides
        return stored

    async def patch(self, res: Resource, namespace: str, name: str, content_type: str, body: bytes, subresource: str,
                    *, dry_run: bool, field_manager: str, force: bool, field_validation: str = "Ignore",
                    warnings: list[str] | None = None) -> tuple[Obj, bool]:
        """Returns (object, created): server-side apply creates what is missing.

        A patch that names no resourceVersion is applied to whatever is current, as kube-apiserver's
        GuaranteedUpdate does: when another writer commits between our read and our write, the patch
        is applied again to the new object instead of failing with 409 (kubectl scale or label would
        otherwise race every controller's status write).
        """
        key = res.key(namespace, name)
        for attempt in range(_PATCH_ATTEMPTS):
            old = self.store.get(key)
            try:
                return await self._patch_once(res, old, namespace, name, content_type, body, subresource,
                                              dry_run=dry_run, field_manager=field_manager, force=force,
                                              field_validation=field_validation, warnings=warnings)
            except StatusError as e:
                # A conflict the patch itself asks for (a stale resourceVersion, SSA fields) comes
                # back at once; one caused by another write is retried on the new object.
                if e.code != 409 or attempt == _PATCH_ATTEMPTS - 1 or _revision(self.store.get(key)) == _revision(old):
                    raise
                if warnings is not None:
                    warnings.clear()
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _patch_once(self, res: Resource, old: Obj | None, namespace: str, name: str, content_type: str,
                          body: bytes, subresource: str, *, dry_run: bool, field_manager: str, force: bool,
                          field_validation: str, warnings: list[str] | None) -> tuple[Obj, bool]:
        duplicates: list[str] = []
        if content_type == "application/apply-patch+yaml":
            decoded = bodies.decode_yaml(body)
            applied, duplicates = decoded.obj, decoded.duplicates
            if not isinstance(applied, dict):
                raise bad_request("the body of an apply patch must be an object")
            if not isinstance(applied.get("metadata") or {}, dict):
                raise bad_request("metadata must be an object")
            if (applied.get("metadata") or {}).get("name", name) != name:
                raise bad_request("the name of the object does not match the name on the URL")
            if not field_manager:
                raise bad_request("PATCH, application/apply-patch+yaml requires fieldManager to be set")
            if old is None:
                if subresource:
                    raise not_found(res.plural, name, res.group)
                self.check_fields(res, applied, field_validation, warnings, duplicates)
                obj = semantics.server_side_apply(None, applied, field_manager, force)
                obj.setdefault("metadata", {})["name"] = name
                return (await self.create(res, namespace, obj, dry_run=dry_run)), True
            self.check_fields(res, applied, field_validation, warnings, duplicates)
            new = semantics.server_side_apply(copy.deepcopy(old), applied, field_manager, force)
        else:
            if old is None:
                raise not_found(res.plural, name, res.group)
            new = semantics.apply_patch(content_type, copy.deepcopy(old), body, res.id, duplicates)
            self.check_fields(res, new, field_validation, warnings, duplicates)
        new = self._check_identity(res, namespace, new)
        rv = new["metadata"].get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(res.plural, name, _conflict_msg(), res.group)
        if new["metadata"].get("name", name) != name:
            raise bad_request("metadata.name cannot be changed by a patch")
        new["metadata"]["name"] = name
        return (await self._update_from(res, old, new, subresource, dry_run)), False

    async def bind(self, namespace: str, name: str, binding: Any, *, dry_run: bool) -> Obj:
        """pods/binding: the scheduler's write of spec.nodeName (once) plus PodScheduled=True."""
        pods = BY_ID["pods"]
        if not isinstance(binding, dict) or not (binding.get("target") or {}).get("name"):
            raise invalid("Binding", name, [{"reason": "FieldValueRequired", "field": "target.name",
                                             "message": "Required value"}])
        node = binding["target"]["name"]
        if (binding.get("target") or {}).get("kind", "Node") not in ("Node", ""):
            raise invalid("Binding", name, [{"reason": "FieldValueNotSupported", "field": "target.kind",
                                             "message": 'Unsupported value: must be "Node"'}])
        pod = self.get(pods, namespace, name)
        want_uid = (binding.get("metadata") or {}).get("uid")
        if want_uid and want_uid != pod["metadata"].get("uid"):
            raise conflict("pods", name, f"Precondition failed: UID in precondition: {want_uid}, UID in object meta: "
                           f"{pod['metadata'].get('uid')}")
        spec = pod.setdefault("spec", {})
        if spec.get("nodeName"):
            raise conflict("pods", name, f"pod {name} is already assigned to node \"{spec['nodeName']}\"")
        if pod["metadata"].get("deletionTimestamp"):
            raise conflict("pods", name, f"pod {name} is being deleted, cannot be assigned to a host")
        spec["nodeName"] = node
        status = pod.setdefault("status", {})
        conds = [c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"]
        conds.append({"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                      "lastTransitionTime": now_rfc3339()})
        status["conditions"] = conds
        if dry_run:
            return pod
        try:
            return await self.store.update(pods.key(namespace, name), pod, int(pod["metadata"]["resourceVersion"]))
        except RevisionConflict:
            raise conflict("pods", name, _conflict_msg()) from None
        except KeyNotFound:
            raise not_found("pods", name) from None

    async def delete(self, res: Resource, namespace: str, name: str, options: Obj, *, dry_run: bool) -> Obj:
        key = res.key(namespace, name)
        old = self.store.get(key)
        if old is None:
            raise not_found(res.plural, name, res.group)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != old["metadata"].get("uid"):
            raise conflict(res.plural, name, f'Precondition failed: UID in precondition: {pre["uid"]}, UID in object '
                           f'meta: {old["metadata"].get("uid")}', res.group)
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(res.plural, name, f'Precondition failed: ResourceVersion in precondition: '
                           f'{pre["resourceVersion"]}, ResourceVersion in object meta: '
                           f'{old["metadata"]["resourceVersion"]}', res.group)
        if res.plural == "namespaces" and name in SYSTEM_NAMESPACES[:3]:
            raise StatusError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                              kind="namespaces", name=name)
        if res.plural == "pods":
            for _ in range(_PATCH_ATTEMPTS):
                terminating = self._graceful_pod_delete(old, options)
                if terminating is None:
                    break
                if dry_run or terminating is old:
                    return terminating
                try:
                    return await self.store.update(key, terminating, int(old["metadata"]["resourceVersion"]))
                except (KeyNotFound, RevisionConflict):
                    old = self._current_for_retry(res, key, name, pre)
            else:
                raise conflict(res.plural, name, _conflict_msg(), res.group)
        if res.id in FINALIZED and old["metadata"].get("finalizers"):
            return old if dry_run else await self._mark_deleted(res, key, old)
        if dry_run:
            return old
        if res.plural == "namespaces":
            old = await self._mark_terminating(key, old)
            await self._delete_namespace_contents(name)
        elif options.get("propagationPolicy") != "Orphan" and options.get("orphanDependents") is not True:
            await self._delete_dependents(old)
        for attempt in range(_PATCH_ATTEMPTS):
            try:
                gone = await self.store.delete(key, int(old["metadata"]["resourceVersion"]))
                break
            except (KeyNotFound, RevisionConflict):
                # A controller's status write landed while we cascaded: delete what is there now,
                # as kube-apiserver does unless the client pinned a resourceVersion.
                if attempt == _PATCH_ATTEMPTS - 1:
                    raise conflict(res.plural, name, _conflict_msg(), res.group) from None
                old = self._current_for_retry(res, key, name, pre)
        if res.id == "services":
            self._release_quietly(gone)
        return gone

    async def _mark_deleted(self, res: Resource, key: str, old: Obj) -> Obj:
        """A delete of an object with finalizers: deletionTimestamp set (once), the object stays."""
        if old["metadata"].get("deletionTimestamp"):
            return old
        new = copy.deepcopy(old)
        new["metadata"]["deletionTimestamp"] = now_rfc3339()
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        try:
            return await self.store.update(key, new, int(old["metadata"]["resourceVersion"]))
        except (KeyNotFound, RevisionConflict):
            raise conflict(res.plural, old["metadata"]["name"], _conflict_msg(), res.group) from None

    def _current_for_retry(self, res: Resource, key: str, name: str, pre: Obj) -> Obj:
        """The object as it is now, for another attempt at a delete that lost a write race."""
        cur = self.store.get(key)
        if cur is None:
            raise not_found(res.plural, name, res.group)
        if pre.get("resourceVersion") or (pre.get("uid") and pre["uid"] != cur["metadata"].get("uid")):
            raise conflict(res.plural, name, _conflict_msg(), res.group)
        return cur

    @staticmethod
    def _graceful_pod_delete(pod: Obj, options: Obj) -> Obj | None:
        """A running pod is not removed at once: it gets deletionTimestamp/deletionGracePeriodSeconds
        (a MODIFIED event) and its node agent stops it, then deletes it with grace 0. Returns the
        terminating pod, the unchanged pod when it already terminates sooner, or None to delete now."""
        spec, status, meta = pod.get("spec") or {}, pod.get("status") or {}, pod["metadata"]
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", 30)
        try:
            grace = max(int(grace), 0)
        except (TypeError, ValueError):
            raise bad_request(f"gracePeriodSeconds must be an integer, not {grace!r}") from None
        if grace == 0 or not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return None
        current = meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and current is not None and int(current) <= grace:
            return pod
        new = copy.deepcopy(pod)
        deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=grace)
        new["metadata"]["deletionTimestamp"] = deadline.strftime("%Y-%m-%dT%H:%M:%SZ")
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        return new

    async def _delete_dependents(self, owner: Obj) -> None:
        """The garbage collector's background cascade, done synchronously for the owned kinds."""
        deps = DEPENDENTS.get(owner.get("kind", ""))
        if not deps:
            return
        uid = owner["metadata"].get("uid")
        ns = owner["metadata"].get("namespace", "")
        for rid in deps:
            dres = BY_ID[rid]
            for obj in self.decode_all(self.store.list(dres.prefix(ns)).items):
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []):
                    try:
                        await self.delete(dres, ns, obj["metadata"]["name"], {}, dry_run=False)
                    except StatusError as e:
                        if e.code != 404:  # already gone (the garbage collector got there first) is fine
                            raise

    async def _mark_terminating(self, key: str, ns: Obj) -> Obj:
        """Phase Terminating first (a MODIFIED event, as the real server shows it): from then on
        creates in the namespace are refused, so emptying it below cannot race with new content."""
        if (ns.get("status") or {}).get("phase") == "Terminating":
            return ns
        new = copy.deepcopy(ns)
        new["metadata"]["deletionTimestamp"] = now_rfc3339()
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        new.setdefault("status", {})["phase"] = "Terminating"
        try:
            return await self.store.update(key, new, int(ns["metadata"]["resourceVersion"]))
        except (KeyNotFound, RevisionConflict):
            raise conflict("namespaces", ns["metadata"]["name"], _conflict_msg()) from None

    async def _delete_namespace_contents(self, namespace: str) -> None:
        # A create admitted just before the phase change may commit while we delete: go again
        # until a pass finds nothing (bounded; each pass only sees what exists).
        for _ in range(5):
            found = False
            for res in RESOURCES:
                if not res.namespaced:
                    continue
                for key, _ in self.store.list(res.prefix(namespace)).items:
                    found = True
                    try:
                        gone = await self.store.delete(key)
                    except KeyNotFound:
                        continue  # already removed as a dependent
                    if res.id == "services":
                        self._release_quietly(gone)
            if not found:
                return


def _drop_stale_load_balancer_status(new: Obj, old: Obj) -> None:
    """A Service switched away from LoadBalancer loses its load-balancer status in the same write, as
    kube-apiserver's service strategy does: de-provisioning is asynchronous, but the user is not shown
    that, and the status validation (ingress only on type LoadBalancer) would refuse the update."""
    was_lb = (old.get("spec") or {}).get("type") == "LoadBalancer"
    if was_lb and (new.get("spec") or {}).get("type") != "LoadBalancer" and isinstance(new.get("status"), dict):
        new["status"]["loadBalancer"] = {}

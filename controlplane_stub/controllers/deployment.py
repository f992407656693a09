"""Deployment controller: ReplicaSets per pod template, rolling updates, status for `rollout status`.

The rolling update follows upstream's arithmetic (pkg/controller/deployment/rolling.go): the new
ReplicaSet grows while the total stays within replicas + maxSurge; old ReplicaSets shrink while the
available pods stay at or above replicas - maxUnavailable (unhealthy old pods go first).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer, WorkQueue, key_of
from controlplane_stub.controllers.common import (
    condition,
    controller_of,
    controller_ref,
    now,
    resolve_int_or_percent,
)
from controlplane_stub.controllers.index import Indexes

log = logging.getLogger("kpc.deployment")
Obj = dict[str, Any]

HASH_LABEL = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # no vowels: no accidental words, as upstream


def template_hash(template: Obj, collision_count: int = 0) -> str:
    """A stable short hash of a pod template: FNV-1a 32 over its canonical JSON, then encoded
    into consonants and digits (the shape of upstream's pod-template-hash values)."""
    h = 0x811C9DC5
    for b in (
        json.dumps(template, sort_keys=True, separators=(",", ":")).encode() + str(collision_count).encode()
    ):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE_ALPHABET[ord(c) % len(SAFE_ALPHABET)] for c in str(h))[:10]


def _normalized(v: Any) -> Any:
    """The template without null fields (kubectl sends metadata.creationTimestamp: null, which the
    real server drops on decode), so that equal templates compare and hash equal."""
    if isinstance(v, dict):
        return {k: _normalized(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_normalized(x) for x in v]
    return v


def _without_hash(template: Obj) -> Obj:
    t: Obj = json.loads(json.dumps(template))
    labels = (t.get("metadata") or {}).get("labels")
    if isinstance(labels, dict):
        labels.pop(HASH_LABEL, None)
    return t


def replicas_of(rs: Obj) -> int:
    return int(rs["spec"].get("replicas", 0))


def revision_of(rs: Obj) -> int:
    try:
        return int((rs["metadata"].get("annotations") or {}).get(REVISION, "0"))
    except ValueError:
        return 0


class DeploymentController:
    def __init__(self, client: api.Client, deployments: Informer, rss: Informer, rs_index: Indexes) -> None:
        self.client = client
        self.deployments = deployments
        self.rss = rss
        self.rs_index = rs_index
        self.queue = WorkQueue()
        self.events = api.EventRecorder(client, "deployment-controller")
        deployments.add_handler(lambda ev, d, old: self.queue.add(key_of(d)))
        rss.add_handler(self._on_rs)

    def _on_rs(self, event: str, rs: Obj, old: Obj | None) -> None:
        ref = controller_of(rs)
        if ref and ref.get("kind") == "Deployment":
            self.queue.add(f"{rs['metadata']['namespace']}/{ref['name']}")

    def owned(self, d: Obj) -> list[Obj]:
        uid = d["metadata"]["uid"]
        return [rs for rs in self.rs_index.owned_by(uid) if (controller_of(rs) or {}).get("uid") == uid]

    async def sync(self, key: str) -> None:
        d = self.deployments.cache.get(key)
        if d is None or d["metadata"].get("deletionTimestamp"):
            return
        spec = d["spec"]
        replicas = int(spec.get("replicas", 1))
        rss = self.owned(d)
        want_tmpl = _normalized(spec["template"])
        h = template_hash(want_tmpl, int((d.get("status") or {}).get("collisionCount", 0)))
        new = next((rs for rs in rss if (rs["metadata"].get("labels") or {}).get(HASH_LABEL) == h), None)
        if new is None:
            # `kubectl rollout undo` writes back an old ReplicaSet's template: reuse that ReplicaSet
            # (upstream compares templates ignoring the hash label, EqualIgnoreHash).
            new = next(
                (rs for rs in rss if _normalized(_without_hash(rs["spec"]["template"])) == want_tmpl), None
            )
        olds = [rs for rs in rss if rs is not new]
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("type", "RollingUpdate") == "RollingUpdate"
        ru = strategy.get("rollingUpdate") or {}
        max_surge = resolve_int_or_percent(ru.get("maxSurge", "25%"), replicas, True) if rolling else 0
        max_unavail = (
            resolve_int_or_percent(ru.get("maxUnavailable", "25%"), replicas, False) if rolling else 0
        )
        if rolling and max_surge == 0 and max_unavail == 0:
            max_unavail = 1  # upstream: both zero would deadlock the rollout
        if spec.get("paused"):
            await self._update_status(d, new, rss, max_unavail)
            return
        if new is None:
            new = await self._create_new_rs(d, h, olds, replicas, rolling, max_surge)
            rss = olds + [new]
        elif revision_of(new) <= max((revision_of(r) for r in olds), default=0):
            await self._annotate_revision(new, max(revision_of(r) for r in olds) + 1)

        if not rolling:
            active_old = [
                rs for rs in olds if replicas_of(rs) > 0 or (rs.get("status") or {}).get("replicas", 0) > 0
            ]
            for rs in olds:
                if replicas_of(rs) > 0:
                    await self._scale(d, rs, 0)
            if not active_old and replicas_of(new) != replicas:
                await self._scale(d, new, replicas)
        else:
            await self._rolling(d, new, olds, replicas, max_surge, max_unavail)
        await self._cleanup(d, olds)
        await self._sync_revision_annotation(d, new)
        await self._update_status(d, new, [self.rss.cache.get(key_of(r), r) for r in rss], max_unavail)

    async def _create_new_rs(
        self, d: Obj, h: str, olds: list[Obj], replicas: int, rolling: bool, max_surge: int
    ) -> Obj:
        tmpl = _normalized(json.loads(json.dumps(d["spec"]["template"])))
        tmpl.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = json.loads(json.dumps(d["spec"]["selector"]))
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        old_total = sum(replicas_of(r) for r in olds)
        if not olds or old_total == 0:
            start = replicas
        elif rolling:
            start = max(0, min(replicas + max_surge - old_total, replicas))
        else:
            start = 0
        rev = max((revision_of(r) for r in olds), default=0) + 1
        rs = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{d['metadata']['name']}-{h}",
                "namespace": d["metadata"]["namespace"],
                "labels": dict(tmpl["metadata"]["labels"]),
                "annotations": {
                    REVISION: str(rev),
                    "deployment.kubernetes.io/desired-replicas": str(replicas),
                    "deployment.kubernetes.io/max-replicas": str(replicas + max_surge),
                },
                "ownerReferences": [controller_ref(d)],
            },
            "spec": {
                "replicas": start,
                "minReadySeconds": int(d["spec"].get("minReadySeconds", 0)),
                "selector": selector,
                "template": tmpl,
            },
        }
        try:
            created = await self.client.create(api.path("replicasets", d["metadata"]["namespace"]), rs)
        except api.ApiError as e:
            if e.code != 409:
                raise
            created = await self.client.get(api.obj_path("replicasets", rs))
            if not (
                created["metadata"].get("ownerReferences")
                and (controller_of(created) or {}).get("uid") == d["metadata"]["uid"]
            ):
                # A hash collision with a ReplicaSet that is not ours: bump collisionCount.
                cc = int((d.get("status") or {}).get("collisionCount", 0)) + 1
                await self.client.patch(
                    api.obj_path("deployments", d, "status"), {"status": {"collisionCount": cc}}
                )
                raise
        await self.rss.assume(created)
        await self._set_progressing(
            d, "True", "NewReplicaSetCreated", f'Created new replica set "{created["metadata"]["name"]}"'
        )
        return created

    async def _rolling(
        self, d: Obj, new: Obj, olds: list[Obj], replicas: int, max_surge: int, max_unavail: int
    ) -> None:
        all_rs = [new] + olds
        total = sum(replicas_of(r) for r in all_rs)
        # Scale up the new ReplicaSet within replicas + maxSurge.
        if replicas_of(new) > replicas:
            await self._scale(d, new, replicas)
        elif replicas_of(new) < replicas:
            room = replicas + max_surge - total
            if room > 0:
                await self._scale(d, new, replicas_of(new) + min(room, replicas - replicas_of(new)))
        new = self.rss.cache.get(key_of(new), new)
        # Scale down old ReplicaSets while availability stays >= replicas - maxUnavailable.
        olds = [self.rss.cache.get(key_of(r), r) for r in olds]
        active_olds = [r for r in olds if replicas_of(r) > 0]
        if not active_olds:
            return
        total = sum(replicas_of(r) for r in [new] + olds)
        min_available = replicas - max_unavail
        new_unavailable = replicas_of(new) - int((new.get("status") or {}).get("availableReplicas", 0))
        max_scaled_down = total - min_available - new_unavailable
        if max_scaled_down <= 0:
            return
        # First the old pods that are not available anyway: removing them costs no availability.
        for rs in sorted(active_olds, key=lambda r: r["metadata"].get("creationTimestamp", "")):
            if max_scaled_down <= 0:
                break
            unhealthy = replicas_of(rs) - int((rs.get("status") or {}).get("availableReplicas", 0))
            cut = min(max(unhealthy, 0), max_scaled_down)
            if cut > 0:
                await self._scale(d, rs, replicas_of(rs) - cut)
                max_scaled_down -= cut
        olds = [self.rss.cache.get(key_of(r), r) for r in olds]
        available = sum(int((r.get("status") or {}).get("availableReplicas", 0)) for r in [new] + olds)
        can_remove = min(available - min_available, max_scaled_down)
        for rs in sorted(olds, key=lambda r: r["metadata"].get("creationTimestamp", "")):
            if can_remove <= 0:
                break
            cut = min(replicas_of(rs), can_remove)
            if cut > 0:
                await self._scale(d, rs, replicas_of(rs) - cut)
                can_remove -= cut

    async def _scale(self, d: Obj, rs: Obj, n: int) -> None:
        old = replicas_of(rs)
        if old == n:
            return
        r = await self.client.patch(api.obj_path("replicasets", rs), {"spec": {"replicas": max(n, 0)}})
        await self.rss.assume(r)
        self.events.event(
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": d["metadata"]},
            "Normal",
            "ScalingReplicaSet",
            f"Scaled {'up' if n > old else 'down'} replica set {rs['metadata']['name']} from {old} to {n}",
        )

    async def _annotate_revision(self, rs: Obj, rev: int) -> None:
        r = await self.client.patch(
            api.obj_path("replicasets", rs), {"metadata": {"annotations": {REVISION: str(rev)}}}
        )
        await self.rss.assume(r)

    async def _sync_revision_annotation(self, d: Obj, new: Obj) -> None:
        rev = str(revision_of(self.rss.cache.get(key_of(new), new)))
        if (d["metadata"].get("annotations") or {}).get(REVISION) != rev:
            r = await self.client.patch(
                api.obj_path("deployments", d), {"metadata": {"annotations": {REVISION: rev}}}
            )
            await self.deployments.assume(r)

    async def _cleanup(self, d: Obj, olds: list[Obj]) -> None:
        """Deletes the oldest empty old ReplicaSets beyond revisionHistoryLimit."""
        limit = int(d["spec"].get("revisionHistoryLimit", 10))
        empty = [self.rss.cache.get(key_of(r), r) for r in olds]
        empty = [
            r for r in empty if replicas_of(r) == 0 and int((r.get("status") or {}).get("replicas", 0)) == 0
        ]
        empty.sort(key=revision_of)
        for rs in empty[: max(len(empty) - limit, 0)]:
            await self.client.delete(api.obj_path("replicasets", rs))
            await self.rss.assume_deleted(rs)

    async def _set_progressing(self, d: Obj, status: str, reason: str, message: str) -> None:
        d = self.deployments.cache.get(key_of(d), d)
        await self._write_status(d, dict(d.get("status") or {}), {"Progressing": (status, reason, message)})

    async def _write_status(self, d: Obj, st: Obj, conds: dict[str, tuple[str, str, str]]) -> None:
        t = now()
        old = {c["type"]: c for c in (d.get("status") or {}).get("conditions") or []}
        out = []
        for typ in ("Available", "Progressing", "ReplicaFailure"):
            if typ in conds:
                status, reason, message = conds[typ]
                prev = old.get(typ)
                transition = prev["lastTransitionTime"] if prev and prev.get("status") == status else t
                same = (
                    prev
                    and prev.get("status") == status
                    and prev.get("reason") == reason
                    and prev.get("message") == message
                )
                out.append(
                    {
                        "type": typ,
                        "status": status,
                        "reason": reason,
                        "message": message,
                        "lastUpdateTime": prev.get("lastUpdateTime", t) if same and prev else t,
                        "lastTransitionTime": transition,
                    }
                )
            elif typ in old:
                out.append(old[typ])
        st["conditions"] = out
        cur = d.get("status") or {}
        if all(cur.get(k) == v for k, v in st.items() if k != "conditions") and _conds_equal(
            cur.get("conditions") or [], out
        ):
            return
        try:
            r = await self.client.patch(api.obj_path("deployments", d, "status"), {"status": st})
            await self.deployments.assume(r)
        except api.ApiError as e:
            if e.code != 404:
                raise

    async def _update_status(self, d: Obj, new: Obj | None, rss: list[Obj], max_unavail: int) -> None:
        d = self.deployments.cache.get(key_of(d), d)
        replicas = int(d["spec"].get("replicas", 1))
        rss = [self.rss.cache.get(key_of(r), r) for r in rss]

        def s(rs: Obj, f: str) -> int:
            return int((rs.get("status") or {}).get(f, 0))

        available = sum(s(r, "availableReplicas") for r in rss)
        total_spec = sum(replicas_of(r) for r in rss)
        updated = s(new, "replicas") if new is not None else 0
        st: Obj = {
            "observedGeneration": d["metadata"].get("generation", 1),
            "replicas": sum(s(r, "replicas") for r in rss),
            "updatedReplicas": updated,
            "readyReplicas": sum(s(r, "readyReplicas") for r in rss),
            "availableReplicas": available,
            "unavailableReplicas": max(total_spec - available, 0),
        }
        if "collisionCount" in (d.get("status") or {}):
            st["collisionCount"] = d["status"]["collisionCount"]
        conds: dict[str, tuple[str, str, str]] = {}
        if available >= replicas - max_unavail:
            conds["Available"] = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            conds["Available"] = (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        name = new["metadata"]["name"] if new is not None else ""
        complete = (
            new is not None
            and updated == replicas
            and st["replicas"] == replicas
            and available >= replicas
            and d["metadata"].get("generation", 1) == st["observedGeneration"]
        )
        prog = condition(d, "Progressing")
        if d["spec"].get("paused"):
            conds["Progressing"] = ("Unknown", "DeploymentPaused", "Deployment is paused")
        elif complete:
            conds["Progressing"] = (
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{name}" has successfully progressed.',
            )
        elif (
            prog
            and prog.get("reason") == "NewReplicaSetCreated"
            and prog.get("message", "").endswith(f'"{name}"')
            and st["updatedReplicas"] == 0
        ):
            conds["Progressing"] = (prog["status"], prog["reason"], prog["message"])
        else:
            deadline = int(d["spec"].get("progressDeadlineSeconds", 600))
            last = (prog or {}).get("lastUpdateTime")
            from controlplane_stub.controllers.common import parse_time

            if (
                prog
                and prog.get("reason") == "ReplicaSetUpdated"
                and last
                and parse_time(str(last)) + deadline < time.time()
                and (d.get("status") or {}).get("updatedReplicas") == updated
                and (d.get("status") or {}).get("availableReplicas") == available
            ):
                conds["Progressing"] = (
                    "False",
                    "ProgressDeadlineExceeded",
                    f'ReplicaSet "{name}" has timed out progressing.',
                )
            else:
                conds["Progressing"] = ("True", "ReplicaSetUpdated", f'ReplicaSet "{name}" is progressing.')
            self.queue.add_after(key_of(d), 5.0)
        await self._write_status(d, st, conds)


def _conds_equal(a: list[Obj], b: list[Obj]) -> bool:
    def norm(cs: list[Obj]) -> list[tuple[str, str, str, str]]:
        return sorted(
            (c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("message", "")) for c in cs
        )

    return norm(a) == norm(b)

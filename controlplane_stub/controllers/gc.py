"""A small garbage collector: dependents go when their controller owner is gone.

kubectl deletes a Deployment with propagationPolicy=Background and leaves the ReplicaSets and Pods
to the garbage collector, so the cluster needs one. It follows controller ownerReferences only
(Deployment -> ReplicaSet -> Pod; EndpointSlices are removed by their own controller).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from controlplane_stub import client as api
from controlplane_stub.client import Informer
from controlplane_stub.controllers.common import controller_of
from controlplane_stub.controllers.index import Indexes

log = logging.getLogger("kpc.gc")
Obj = dict[str, Any]


class GarbageCollector:
    def __init__(
        self,
        client: api.Client,
        owners: Informer,
        dependents: Informer,
        dep_index: Indexes,
        dep_resource: str,
    ) -> None:
        self.client = client
        self.owners = owners
        self.dependents = dependents
        self.dep_index = dep_index
        self.dep_resource = dep_resource
        self.delay = 2.0
        owners.add_handler(self._on_owner)

    def _on_owner(self, event: str, owner: Obj, old: Obj | None) -> None:
        if event == "DELETED" or owner["metadata"].get("deletionTimestamp"):
            uid = str(owner["metadata"]["uid"])
            # Servers that cascade deletes themselves are given a moment first: collecting the same
            # dependents from two places only makes the two race.
            asyncio.get_running_loop().call_later(
                self.delay, lambda: asyncio.ensure_future(self.delete_dependents(uid))
            )

    async def delete_dependents(self, uid: str) -> None:
        for d in self.dep_index.owned_by(uid):
            if (controller_of(d) or {}).get("uid") != uid or d["metadata"].get("deletionTimestamp"):
                continue
            try:
                # Orphan: this collector walks the chain itself, one level per owner, so the
                # server's own cascade never races the controllers that write these objects.
                r = await self.client.delete(api.obj_path(self.dep_resource, d), propagation="Orphan")
                if r is not None and r.get("metadata", {}).get("deletionTimestamp"):
                    await self.dependents.assume(r)
                else:
                    await self.dependents.assume_deleted(d)
            except api.ApiError as e:
                log.warning("gc: deleting %s %s: %s", self.dep_resource, d["metadata"]["name"], e)

    async def sweep(self, owner_kind: str) -> None:
        """Once after the first sync: dependents whose owner vanished while we were not running."""
        live = {o["metadata"]["uid"] for o in self.owners.cache.values()}
        for d in list(self.dependents.cache.values()):
            ref = controller_of(d)
            if ref and ref.get("kind") == owner_kind and ref.get("uid") not in live:
                await self.delete_dependents(str(ref["uid"]))

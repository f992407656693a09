"""Indexes kept next to informer caches so that a sync touches only the objects it concerns."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from controlplane_stub.client import Informer, key_of

Obj = dict[str, Any]


class Indexes:
    """Secondary indexes over one informer's cache: by namespace, by label k=v, by owner uid,
    by node name. Registered as the informer's FIRST handler so controllers see them current."""

    def __init__(self, informer: Informer) -> None:
        self.informer = informer
        self.by_ns: dict[str, set[str]] = defaultdict(set)
        self.by_label: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self.by_owner: dict[str, set[str]] = defaultdict(set)
        self.by_node: dict[str, set[str]] = defaultdict(set)
        informer.add_handler(self._on)

    @staticmethod
    def _facets(obj: Obj) -> tuple[str, list[tuple[str, str, str]], list[str], str]:
        md = obj["metadata"]
        ns = md.get("namespace") or ""
        labels = [(ns, k, v) for k, v in (md.get("labels") or {}).items()]
        owners = [r["uid"] for r in md.get("ownerReferences") or [] if r.get("uid")]
        node = (obj.get("spec") or {}).get("nodeName") or ""
        return ns, labels, owners, node

    def _remove(self, key: str, obj: Obj) -> None:
        ns, labels, owners, node = self._facets(obj)
        self.by_ns[ns].discard(key)
        for lk in labels:
            s = self.by_label.get(lk)
            if s is not None:
                s.discard(key)
                if not s:
                    del self.by_label[lk]
        for o in owners:
            s = self.by_owner.get(o)
            if s is not None:
                s.discard(key)
                if not s:
                    del self.by_owner[o]
        if node:
            self.by_node[node].discard(key)

    def _add(self, key: str, obj: Obj) -> None:
        ns, labels, owners, node = self._facets(obj)
        self.by_ns[ns].add(key)
        for lk in labels:
            self.by_label[lk].add(key)
        for o in owners:
            self.by_owner[o].add(key)
        if node:
            self.by_node[node].add(key)

    def _on(self, event: str, new: Obj, old: Obj | None) -> None:
        key = key_of(new)
        if old is not None:
            self._remove(key, old)
        if event != "DELETED":
            self._add(key, new)

    def selected(self, namespace: str, selector: dict[str, str]) -> list[Obj]:
        """Objects in namespace whose labels include every pair of a map selector."""
        if not selector:
            return []
        sets = [self.by_label.get((namespace, k, v), set()) for k, v in selector.items()]
        smallest = min(sets, key=len)
        cache = self.informer.cache
        out = []
        for key in smallest:
            o = cache.get(key)
            if o is None:
                continue
            labels = o["metadata"].get("labels") or {}
            if all(labels.get(k) == v for k, v in selector.items()):
                out.append(o)
        return out

    def owned_by(self, uid: str) -> list[Obj]:
        cache = self.informer.cache
        return [cache[k] for k in self.by_owner.get(uid, ()) if k in cache]

    def in_namespace(self, namespace: str) -> list[Obj]:
        cache = self.informer.cache
        return [cache[k] for k in self.by_ns.get(namespace, ()) if k in cache]

    def on_node(self, node: str) -> int:
        return len(self.by_node.get(node, ()))

"""Helpers the controllers share: owner references, pod readiness, times (label selectors:
controlplane_stub.selectors)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str) -> float:
    return datetime.strptime(s[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()


def controller_ref(owner: Obj) -> Obj:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_of(obj: Obj) -> Obj | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def is_owned_by(obj: Obj, owner: Obj) -> bool:
    ref = controller_of(obj)
    return ref is not None and ref.get("uid") == owner["metadata"].get("uid")


def condition(obj: Obj, typ: str) -> Obj | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == typ:
            return dict(c)
    return None


def pod_ready(pod: Obj) -> bool:
    c = condition(pod, "Ready")
    return c is not None and c.get("status") == "True"


def pod_available(pod: Obj, min_ready_seconds: int, at: float) -> bool:
    if not pod_ready(pod) or pod["metadata"].get("deletionTimestamp"):
        return False
    if min_ready_seconds <= 0:
        return True
    c = condition(pod, "Ready") or {}
    t = c.get("lastTransitionTime")
    return bool(t) and parse_time(str(t)) + min_ready_seconds <= at


def pod_active(pod: Obj) -> bool:
    """Counts toward a ReplicaSet's replicas: not terminal and not being deleted."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed") and not pod["metadata"].get(
        "deletionTimestamp"
    )


def resolve_int_or_percent(v: Any, total: int, round_up: bool) -> int:
    if v is None:
        return 0
    if isinstance(v, int):
        return v
    s = str(v)
    if s.endswith("%"):
        pct = int(s[:-1])
        q, r = divmod(pct * total, 100)
        return q + (1 if round_up and r else 0)
    return int(s)

"""Who a container runs as, and what of the host filesystem it must not see.

A container here is a host process (there is no container runtime), so the kubelet's and the
runtime's defaults are re-made with host means:

- Identity: `securityContext.runAsUser` / `runAsGroup` / `runAsNonRoot` / `allowPrivilegeEscalation`
  (the container's fields over the pod's, as the kubelet merges them), plus the pod's
  `supplementalGroups` and `fsGroup`. An image has no USER here, so a container that names no user
  runs as nobody (65534:65534), not as root: root only when the pod asks (`runAsUser: 0`). A uid
  without runAsGroup gets its primary group from the host's passwd (the runtime reads the image's),
  and nogroup when the host does not know the uid (the runtime would use gid 0, but here gid 0
  would open every root-group file of the host).
- View: podinit hides the cluster's state directory (tokens, keys, kubeconfigs) behind an empty
  tmpfs in the container's own mount namespace. An image of the catalog (trusted: the operator's
  file) whose program lies below a directory the container's user cannot enter (a Python under
  /root/.pyenv) gets only that program's top folder shown again there (exposures()); a pod's own
  `command` gets nothing shown, so a pod cannot use this to reach other files.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

NOBODY = 65534
NOGROUP = 65534
MAX_ID = 2**31 - 1


class SecurityContextError(ValueError):
    """The container cannot be started as asked (kubelet: CreateContainerConfigError)."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    no_new_privs: bool = False


def _id(ctx: dict[str, Any], key: str, where: str) -> int | None:
    v = ctx.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_ID:
        raise SecurityContextError(f"{where}.{key}: must be an integer between 0 and {MAX_ID}, got {v!r}")
    return v


def _ctx(obj: dict[str, Any], where: str) -> dict[str, Any]:
    c = obj.get("securityContext")
    if c is None:
        return {}
    if not isinstance(c, dict):
        raise SecurityContextError(f"{where}: must be an object")
    return c


def primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return NOGROUP


def identity(pod_spec: dict[str, Any], container: dict[str, Any]) -> Identity:
    pc = _ctx(pod_spec, "spec.securityContext")
    cc = _ctx(container, "securityContext")
    uid = _id(cc, "runAsUser", "securityContext")
    if uid is None:
        uid = _id(pc, "runAsUser", "spec.securityContext")
    gid = _id(cc, "runAsGroup", "securityContext")
    if gid is None:
        gid = _id(pc, "runAsGroup", "spec.securityContext")
    non_root = cc.get("runAsNonRoot", pc.get("runAsNonRoot"))
    if uid is None:
        uid = NOBODY
        gid = NOGROUP if gid is None else gid
    elif gid is None:
        gid = 0 if uid == 0 else primary_gid(uid)
    if non_root is True and uid == 0:
        raise SecurityContextError("container has runAsNonRoot and image will run as root")
    groups: list[int] = []
    sup = pc.get("supplementalGroups") or []
    if not isinstance(sup, list):
        raise SecurityContextError("spec.securityContext.supplementalGroups: must be a list")
    for i, g in enumerate(sup):
        v = _id({"g": g}, "g", f"spec.securityContext.supplementalGroups[{i}]")
        if v is None:
            raise SecurityContextError(f"spec.securityContext.supplementalGroups[{i}]: must be an integer")
        groups.append(v)
    fs = _id(pc, "fsGroup", "spec.securityContext")
    if fs is not None:
        groups.append(fs)
    ape = cc.get("allowPrivilegeEscalation")
    return Identity(uid, gid, tuple(dict.fromkeys(groups)), no_new_privs=ape is False)


def can_enter(st: os.stat_result, uid: int, gids: Iterable[int]) -> bool:
    """Whether uid (with gids) may search directory st (the owner/group/other x bit, as the kernel
    checks it; root may always)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def exposures(
    paths: Iterable[str], who: Identity, stat_fn: Callable[[str], os.stat_result] = os.stat
) -> list[tuple[str, str]]:
    """For each absolute path: (the first ancestor directory `who` cannot enter, the name below it
    on the way to the path); paths reachable already give nothing. Only the first blocked step of
    a path is lifted: a second one keeps the path closed, as its owner made it."""
    out: list[tuple[str, str]] = []
    gids = {who.gid, *who.groups}
    for p in paths:
        if not os.path.isabs(p):
            continue
        parts = [x for x in os.path.normpath(p).split("/") if x]
        cur = "/"
        for name in parts[:-1] if len(parts) > 1 else []:
            try:
                st = stat_fn(cur)
            except OSError:
                break
            if not stat.S_ISDIR(st.st_mode):
                break
            if not can_enter(st, who.uid, gids):
                if (cur, name) not in out:
                    out.append((cur, name))
                break
            cur = os.path.join(cur, name)
    return out

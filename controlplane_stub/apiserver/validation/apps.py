"""apps/v1 Deployments and ReplicaSets.
"""
from __future__ import annotations

import re
from typing import Any

from .fielderrors import FieldErrors, GoValue, Obj
from .meta import _obj, label_selector_go, selector_matches, validate_label_selector, validate_object_meta
from .names import is_dns1123_subdomain
from .pods import validate_pod_template

# --- apps: deployments and replicasets -------------------------------------------------------------


def _nonnegative(errs: FieldErrors, spec: Obj, key: str, path: str) -> None:
    value = spec.get(key)
    if value is not None and (not isinstance(value, int) or value < 0):
        errs.invalid(f"{path}.{key}", value, "must be greater than or equal to 0")


def _validate_selector_and_template(errs: FieldErrors, spec: Obj, what: str) -> None:
    sel = spec.get("selector")
    if not isinstance(sel, dict):
        errs.required("spec.selector", "")
    else:
        validate_label_selector(errs, sel, "spec.selector")
        if not sel.get("matchLabels") and not sel.get("matchExpressions"):
            errs.invalid("spec.selector", label_selector_go(sel), f"empty selector is invalid for {what}")
    template = spec.get("template")
    if not isinstance(template, dict):
        errs.required("spec.template", "")
        return
    meta = _obj(template.get("metadata"))
    labels = meta.get("labels")
    empty_selector = isinstance(sel, dict) and not sel.get("matchLabels") and not sel.get("matchExpressions")
    if not empty_selector and not selector_matches(sel, labels):
        shown: Any = labels if isinstance(labels, dict) and labels else GoValue("map[string]string(nil)")
        errs.invalid("spec.template.metadata.labels", shown, "`selector` does not match template `labels`")
    validate_pod_template(errs, template, "spec.template")
    tspec = _obj(template.get("spec"))
    restart = tspec.get("restartPolicy")
    if restart and restart != "Always":
        errs.not_supported("spec.template.spec.restartPolicy", restart, ("Always",))
    if tspec.get("activeDeadlineSeconds") is not None:
        errs.forbidden("spec.template.spec.activeDeadlineSeconds",
                       "activeDeadlineSeconds in ReplicaSet is not Supported")


def _int_or_percent(value: Any) -> tuple[int, bool] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, False
    if isinstance(value, str) and re.fullmatch(r"[0-9]+%", value):
        return int(value[:-1]), True
    return None


def _validate_strategy(errs: FieldErrors, strategy: Any) -> None:
    if not isinstance(strategy, dict):
        return
    stype = strategy.get("type")
    if not stype:
        errs.required("spec.strategy.type", "")
    elif stype not in ("Recreate", "RollingUpdate"):
        errs.not_supported("spec.strategy.type", stype, ("Recreate", "RollingUpdate"))
    rolling = strategy.get("rollingUpdate")
    if stype == "Recreate" and rolling is not None:
        errs.forbidden("spec.strategy.rollingUpdate", "may not be specified when strategy `type` is 'Recreate'")
    if stype == "RollingUpdate" and isinstance(rolling, dict):
        parsed = {}
        for key in ("maxUnavailable", "maxSurge"):
            value = rolling.get(key)
            path = f"spec.strategy.rollingUpdate.{key}"
            if value is None:
                continue
            p = _int_or_percent(value)
            if p is None:
                errs.invalid(path, value, "a valid percent string must be a numeric string followed by an ending '%' "
                                          "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')")
                continue
            if p[0] < 0:
                errs.invalid(path, value, "must be greater than or equal to 0")
            if p[1] and p[0] > 100:
                errs.invalid(path, value, "must not be greater than 100%")
            parsed[key] = p[0]
        if parsed.get("maxUnavailable") == 0 and parsed.get("maxSurge") == 0:
            errs.invalid("spec.strategy.rollingUpdate.maxUnavailable", rolling.get("maxUnavailable"),
                         "may not be 0 when `maxSurge` is 0")


def _validate_deployment(errs: FieldErrors, deploy: Obj) -> None:
    validate_object_meta(errs, deploy.get("metadata"), True, is_dns1123_subdomain)
    spec = deploy.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec", "")
        return
    for key in ("replicas", "minReadySeconds", "revisionHistoryLimit"):
        _nonnegative(errs, spec, key, "spec")
    _validate_selector_and_template(errs, spec, "deployment")
    _validate_strategy(errs, spec.get("strategy"))
    pds = spec.get("progressDeadlineSeconds")
    if pds is not None:
        if not isinstance(pds, int) or pds < 0:
            errs.invalid("spec.progressDeadlineSeconds", pds, "must be greater than or equal to 0")
        elif pds <= (spec.get("minReadySeconds") or 0):
            errs.invalid("spec.progressDeadlineSeconds", pds, "must be greater than minReadySeconds")


def _validate_replicaset(errs: FieldErrors, rs: Obj) -> None:
    validate_object_meta(errs, rs.get("metadata"), True, is_dns1123_subdomain)
    spec = rs.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec", "")
        return
    for key in ("replicas", "minReadySeconds"):
        _nonnegative(errs, spec, key, "spec")
    _validate_selector_and_template(errs, spec, "deployment")


def _validate_selector_update(errs: FieldErrors, obj: Obj, old: Obj) -> None:
    sel = (obj.get("spec") or {}).get("selector")
    old_sel = (old.get("spec") or {}).get("selector")
    if old_sel is not None and sel != old_sel:
        errs.invalid("spec.selector", label_selector_go(sel), "field is immutable")

"""apps/v1 Deployments and ReplicaSets.
"""
from __future__ import annotations

import re
from typing import Any

from ...selectors import label_selector_matches as selector_matches  # the controllers' copy too: one module
from .fielderrors import FieldErrors, GoValue, Obj
from .meta import _obj, label_selector_go, validate_label_selector, validate_object_meta
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


def _rolling_update(errs: FieldErrors, rolling: Any, path: str) -> dict[str, int]:
    """maxUnavailable/maxSurge as int-or-percent; what parsed, for the both-zero check."""
    parsed: dict[str, int] = {}
    if not isinstance(rolling, dict):
        return parsed
    for key in ("maxUnavailable", "maxSurge"):
        value = rolling.get(key)
        if value is None:
            continue
        p = _int_or_percent(value)
        if p is None:
            errs.invalid(f"{path}.{key}", value, "a valid percent string must be a numeric string followed by an "
                                                 "ending '%' (e.g. '1%',  or '93%', regex used for validation is "
                                                 "'[0-9]+%')")
            continue
        if p[0] < 0:
            errs.invalid(f"{path}.{key}", value, "must be greater than or equal to 0")
        if p[1] and p[0] > 100:
            errs.invalid(f"{path}.{key}", value, "must not be greater than 100%")
        parsed[key] = p[0]
    return parsed


def _strategy_type(errs: FieldErrors, strategy: Obj, path: str, types: tuple[str, str]) -> Any:
    stype = strategy.get("type")
    if not stype:
        errs.required(f"{path}.type", "")
    elif stype not in types:
        errs.not_supported(f"{path}.type", stype, types)
    return stype


def _validate_strategy(errs: FieldErrors, strategy: Any) -> None:
    if not isinstance(strategy, dict):
        return
    stype = _strategy_type(errs, strategy, "spec.strategy", ("Recreate", "RollingUpdate"))
    rolling = strategy.get("rollingUpdate")
    if stype == "Recreate" and rolling is not None:
        errs.forbidden("spec.strategy.rollingUpdate", "may not be specified when strategy `type` is 'Recreate'")
    if stype == "RollingUpdate" and isinstance(rolling, dict):
        parsed = _rolling_update(errs, rolling, "spec.strategy.rollingUpdate")
        if parsed.get("maxUnavailable") == 0 and parsed.get("maxSurge") == 0:
            errs.invalid("spec.strategy.rollingUpdate.maxUnavailable", rolling.get("maxUnavailable"),
                         "may not be 0 when `maxSurge` is 0")


def _workload_spec(errs: FieldErrors, obj: Obj, counts: tuple[str, ...], what: str) -> Obj | None:
    """Metadata, the spec's non-negative counts, selector and template: what every apps workload
    validates alike; the spec for the kind's own checks (None when there is none)."""
    validate_object_meta(errs, obj.get("metadata"), True, is_dns1123_subdomain)
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        errs.required("spec", "")
        return None
    for key in counts:
        _nonnegative(errs, spec, key, "spec")
    _validate_selector_and_template(errs, spec, what)
    return spec


def _validate_deployment(errs: FieldErrors, deploy: Obj) -> None:
    spec = _workload_spec(errs, deploy, ("replicas", "minReadySeconds", "revisionHistoryLimit"), "deployment")
    if spec is None:
        return
    _validate_strategy(errs, spec.get("strategy"))
    pds = spec.get("progressDeadlineSeconds")
    if pds is not None:
        if not isinstance(pds, int) or pds < 0:
            errs.invalid("spec.progressDeadlineSeconds", pds, "must be greater than or equal to 0")
        elif pds <= (spec.get("minReadySeconds") or 0):
            errs.invalid("spec.progressDeadlineSeconds", pds, "must be greater than minReadySeconds")


def _validate_replicaset(errs: FieldErrors, rs: Obj) -> None:
    _workload_spec(errs, rs, ("replicas", "minReadySeconds"), "deployment")


def _validate_selector_update(errs: FieldErrors, obj: Obj, old: Obj) -> None:
    sel = (obj.get("spec") or {}).get("selector")
    old_sel = (old.get("spec") or {}).get("selector")
    if old_sel is not None and sel != old_sel:
        errs.invalid("spec.selector", label_selector_go(sel), "field is immutable")


def validate_daemonset(errs: FieldErrors, ds: Obj) -> None:
    """ValidateDaemonSet: selector and template as a ReplicaSet's (restartPolicy Always), the
    update strategy OnDelete or RollingUpdate with maxUnavailable/maxSurge not both 0."""
    spec = _workload_spec(errs, ds, ("minReadySeconds", "revisionHistoryLimit"), "daemonset")
    if spec is None:
        return
    strategy = spec.get("updateStrategy")
    if not isinstance(strategy, dict):
        return
    stype = _strategy_type(errs, strategy, "spec.updateStrategy", ("OnDelete", "RollingUpdate"))
    rolling = strategy.get("rollingUpdate")
    if stype == "RollingUpdate":
        if not isinstance(rolling, dict):
            errs.required("spec.updateStrategy.rollingUpdate", "")
            return
        parsed = _rolling_update(errs, rolling, "spec.updateStrategy.rollingUpdate")
        if parsed.get("maxUnavailable", 0) == 0 and parsed.get("maxSurge", 0) == 0 and len(parsed) == 2:
            errs.invalid("spec.updateStrategy.rollingUpdate.maxUnavailable", rolling.get("maxUnavailable"),
                         "cannot be 0 when maxSurge is 0")

"""metav1.LabelSelector matching, the one copy the API server's validation and the controllers
share (controllers import nothing from the API server; both import this).

upstream: metav1.LabelSelectorAsSelector(sel).Matches(labels). A nil selector matches nothing, an
empty one everything; a selector that does not convert (an unknown operator, In/NotIn without
values, Exists/DoesNotExist with values) is an error upstream, and selects nothing here.
"""
from __future__ import annotations

from typing import Any

_SET_OPS = ("In", "NotIn")
_EXIST_OPS = ("Exists", "DoesNotExist")


def label_selector_matches(sel: Any, labels: Any) -> bool:
    if not isinstance(sel, dict):
        return False
    labels = labels if isinstance(labels, dict) else {}
    match_labels = sel.get("matchLabels") or {}
    if not isinstance(match_labels, dict):
        return False
    for key, value in match_labels.items():
        if labels.get(key) != value:
            return False
    exprs = sel.get("matchExpressions") or []
    if not isinstance(exprs, list):
        return False
    for expr in exprs:
        if not isinstance(expr, dict):
            return False
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not isinstance(values, list) or (op in _SET_OPS) != bool(values) or op not in _SET_OPS + _EXIST_OPS:
            return False
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True

"""controlplane_stub/selectors.py: the one metav1.LabelSelector matcher of the API server's
validation and the controllers, with upstream's LabelSelectorAsSelector meaning."""
from __future__ import annotations

from typing import Any

import pytest

from controlplane_stub.apiserver.validation.apps import selector_matches as validation_copy
from controlplane_stub.selectors import label_selector_matches as matches

LABELS = {"app": "web", "tier": "front"}


@pytest.mark.parametrize("sel,want", [
    (None, False),  # a nil selector selects nothing
    ("app=web", False),  # not a LabelSelector object
    ({}, True),  # an empty one everything
    ({"matchLabels": {"app": "web"}}, True),
    ({"matchLabels": {"app": "db"}}, False),
    ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]}]}, True),
    ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}, False),
    ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, True),  # absent key
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, False),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, True),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, False),
    ({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}, True),
    # selectors that do not convert upstream select nothing
    ({"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["web"]}]}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}, False),
    ({"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["web"]}]}, False),
    ({"matchExpressions": "app"}, False),
    ({"matchLabels": ["app"]}, False),
])
def test_label_selector_matches_as_upstream(sel: Any, want: bool) -> None:
    assert matches(sel, LABELS) is want
    assert validation_copy is matches  # the API server's validation uses this very function


def test_labels_that_are_not_a_map_are_no_labels() -> None:
    assert matches({}, None) and not matches({"matchLabels": {"app": "web"}}, ["app"])

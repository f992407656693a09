from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def _twins(compiled: str, pure: str) -> list[ModuleType]:
    return [importlib.import_module(compiled), importlib.import_module(pure)]


@pytest.fixture(params=["compiled", "pure"])
def kproxy_path(request: pytest.FixtureRequest) -> ModuleType:
    """Runs a test once against kproxy._fastpath and once against kproxy._purepath."""
    compiled, pure = _twins("kproxy._fastpath", "kproxy._purepath")
    return compiled if request.param == "compiled" else pure

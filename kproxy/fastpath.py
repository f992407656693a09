"""The one import point for hot paths: the compiled module when built, else the pure twin.

KPROXY_PURE=1 forces the pure-Python twin, so the whole suite can run against either.
"""
from __future__ import annotations

import os
from types import ModuleType


def _load() -> ModuleType:
    if os.environ.get("KPROXY_PURE") != "1":
        try:
            from kproxy import _fastpath

            return _fastpath
        except ImportError:
            pass
    from kproxy import _purepath

    return _purepath


impl: ModuleType = _load()
COMPILED: bool = impl.__name__.endswith("_fastpath")

"""The one import point for hot paths: the compiled module when built, else the pure twin.

KPROXY_PURE=1 forces the pure-Python twin, so the whole suite can run against either. For mypy,
`impl` is the pure twin: every call into either twin is checked against its signatures (the
compiled twin declares the same ones in _fastpath.pyi; the twin tests compare their outputs).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING


def _load() -> ModuleType:
    if os.environ.get("KPROXY_PURE") != "1":
        try:
            from kproxy import _fastpath

            return _fastpath
        except ImportError:
            pass
    from kproxy import _purepath

    return _purepath


if TYPE_CHECKING:
    from kproxy import _purepath as impl
else:
    impl = _load()
COMPILED: bool = impl.__name__.endswith("_fastpath")
__all__ = ["COMPILED", "impl"]

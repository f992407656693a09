"""The one import point for hot paths: the compiled module when built, else the pure twin.

KPROXY_PURE=1 forces the pure-Python twin, so the whole suite can run against either. For mypy,
`impl` is the pure twin: every call into either twin is checked against its signatures (the
compiled twin declares the same ones in _fastpath.pyi; the twin tests compare their outputs).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING


def _load() -> ModuleType:
    if not want_pure():
        try:
            from kproxy import _fastpath

            return _fastpath
        except ImportError:
            pass
    from kproxy import _purepath

    return _purepath


def want_pure() -> bool:
    return os.environ.get("KPROXY_PURE") == "1"


def pure_twin(module: ModuleType) -> ModuleType:
    """The pure-Python twin of a module setup.py compiles from its own .py source in Cython's
    pure-Python mode (kproxy._nftpath, kproxy.backends.nftnl): that source, beside the
    extension, imported once more as plain Python under NAME_pure."""
    name = f"{module.__name__}_pure"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(module.__file__ or "")), module.__name__.rpartition(".")[2] + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    twin = importlib.util.module_from_spec(spec)
    sys.modules[name] = twin
    spec.loader.exec_module(twin)
    return twin


if TYPE_CHECKING:
    from kproxy import _purepath as impl
else:
    impl = _load()
COMPILED: bool = impl.__name__.endswith("_fastpath")
__all__ = ["COMPILED", "impl", "pure_twin", "want_pure"]

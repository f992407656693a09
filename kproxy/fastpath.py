"""The one import point for hot paths: the compiled module when built, else the pure twin.

KPROXY_PURE=1 forces the pure-Python twin, so the whole suite can run against either. `impl` is
typed as the Renderer protocol, so mypy --strict checks every call into either twin.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

from kproxy.model import Endpoint, ServicePort


class Renderer(Protocol):
    """What kproxy/_fastpath.pyx and kproxy/_purepath.py both provide (see _fastpath.pyi)."""

    LARGE_CLUSTER_ENDPOINTS: int

    def port_proto_hash(self, service_port_name: str, protocol: str) -> str: ...

    def endpoint_chain_name(self, service_port_name: str, protocol: str, endpoint: str) -> str: ...

    def render_service_port(
        self,
        svc: ServicePort,
        endpoints: tuple[Endpoint, ...],
        masquerade_all: bool,
        cluster_cidr: str,
        large_cluster: bool,
        node_ips: tuple[str, ...],
        node_zone: str = "",
    ) -> tuple[str, str, str, str, list[str], bool]: ...


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
    # mypy checks that both twins implement the protocol (the compiled one through its .pyi).
    from kproxy import _fastpath as _compiled_twin
    from kproxy import _purepath as _pure_twin

    _CHECK_COMPILED: Renderer = _compiled_twin
    _CHECK_PURE: Renderer = _pure_twin

_module = _load()
impl: Renderer = cast(Renderer, _module)
COMPILED: bool = _module.__name__.endswith("_fastpath")

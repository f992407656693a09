from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from userspace_helpers import Backends, Topology, topology

from kproxy.relay import Impl, Relay, compiled_available


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    reason = _can_netns()
    if reason:
        pytest.skip(reason)
    with topology() as t:
        yield t


@pytest.fixture(scope="module")
def backends(topo: Topology) -> Iterator[Backends]:
    with Backends(topo.backend) as b:
        yield b


@pytest.fixture(params=["compiled", "pure"])
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "compiled" and not compiled_available():
        pytest.fail("kproxy._relay is not built: run `.venv/bin/python setup.py build_ext --inplace`")
    impl: Impl = request.param
    return impl


@pytest.fixture
def relay(impl: Impl, topo: Topology, backends: Backends) -> Iterator[Relay]:
    # Generous: under a loaded CI the asyncio twin can see its own timer before the connect completes.
    r = Relay(impl, netns=topo.node, connect_timeout=5.0).start()
    try:
        yield r
    finally:
        r.stop()

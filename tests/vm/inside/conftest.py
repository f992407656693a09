"""Fixtures of the IPVS suite that runs INSIDE the User-Mode Linux VM (see ipvs_helpers.py)."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

if os.environ.get("KPROXY_IN_VM") != "1":
    pytest.skip("the IPVS suite runs only inside the VM (tests/vm/run sets KPROXY_IN_VM=1)",
                allow_module_level=True)

from ipvs_helpers import State, Topology, make_proxier, setup_topology, teardown_topology

from kproxy.backends.conntrack import Conntrack
from kproxy.healthcheck import ServiceHealthServer
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.ipvs import IPVSProxier


@pytest.fixture(scope="session")
def topo() -> Iterator[Topology]:
    suffix = secrets.token_hex(2)
    try:
        yield setup_topology(suffix, 3)
    finally:
        teardown_topology(suffix, 3)


@pytest.fixture(scope="session")
def session_proxier() -> Iterator[IPVSProxier]:
    """One proxier for the suite (as one kproxy process would be, with its conntrack cleaner and
    health check server); cleanup() at the end."""
    p = make_proxier(Conntrack(), ServiceHealthServer(), tcpfin_timeout=2)
    try:
        yield p
    finally:
        assert p.cleanup()
        p.close()


@pytest.fixture
def proxier(session_proxier: IPVSProxier) -> Iterator[IPVSProxier]:
    """The session proxier, emptied after each test by a full sync with no services (which
    also proves that deleted services leave nothing behind)."""
    yield session_proxier
    result = session_proxier.sync(SyncRequest({}, {}))
    assert result.ok, result.error
    assert result.rules_total["ipvs_virtual_servers"] == 0


@pytest.fixture
def state(proxier: IPVSProxier) -> State:
    return State(proxier)

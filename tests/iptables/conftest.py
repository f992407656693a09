"""Fixtures for the iptables tests (topology code lives in iptables_topology.py)."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from helpers.netns import fresh_netns
from iptables_topology import SKIP_REASON, Topology, _build, _destroy, sh


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    topo: Topology | None = None
    suffix = secrets.token_hex(3)
    try:
        topo = _build(suffix)
        yield topo
    finally:
        if topo is not None:
            _destroy(topo)
        else:  # _build failed half-way: remove what this suffix created, nothing else
            for ns in sh("ip", "netns", "list", check=False).stdout.split():
                if ns.endswith(suffix) and ns.startswith("kpt"):
                    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def rules_netns() -> Iterator[str]:
    """One empty namespace per module for rule-only tests (both back ends; each test cleans up)."""
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    # A node address for NodePort/--nodeport-addresses matching.
    with fresh_netns("kptR", {"eth0": "192.168.7.2/24", "eth1": "10.0.0.5/24"}) as name:
        yield name

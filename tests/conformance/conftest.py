"""The conformance matrix's topology: the iptables tests' one-node topology (reused, not copied)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "iptables"))

from iptables_topology import SKIP_REASON, Topology, _build, _destroy, sh  # noqa: E402


def _remove_namespaces(suffix: str) -> None:
    """Whatever this run's suffix created, also after a half-built topology; nothing else."""
    for ns in sh("ip", "netns", "list", check=False).stdout.split():
        if ns.startswith("kpt") and ns.endswith(suffix):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def conformance_topology() -> Iterator[Topology]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    suffix = "c" + secrets.token_hex(3)
    built: list[Topology] = []
    try:
        built.append(_build(suffix))
        yield built[0]
    finally:
        for topo in built:
            _destroy(topo)
        _remove_namespaces(suffix)

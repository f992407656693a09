"""Fixtures for the nftables tests: an empty network namespace per test (unique name,
removed in finally even when a test fails). Nothing is done in the root namespace but
`ip netns add/del`."""
from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from nft_state import SKIP_REASON, sh


def _netns() -> Iterator[str]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    name = f"kpnft{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        sh("ip", "-n", name, "addr", "add", "192.168.77.1/24", "dev", "eth0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


@pytest.fixture()
def netns() -> Iterator[str]:
    yield from _netns()


@pytest.fixture()
def netns2() -> Iterator[str]:
    yield from _netns()

"""Fixtures for the nftables tests: an empty network namespace per test (unique name,
removed in finally even when a test fails). Nothing is done in the root namespace but
`ip netns add/del`."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers.netns import fresh_netns
from nft_state import SKIP_REASON


def _netns() -> Iterator[str]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    with fresh_netns("kpnft", {"eth0": "192.168.77.1/24"}) as name:
        yield name


@pytest.fixture()
def netns() -> Iterator[str]:
    yield from _netns()


@pytest.fixture()
def netns2() -> Iterator[str]:
    yield from _netns()

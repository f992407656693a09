"""Fixtures for the cluster DNS tests; the helpers they use live in dns_helpers.py."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from dns_helpers import DeadPort, FakeUpstream, KdnsProcess, start_kdns


@pytest.fixture
def kdns_factory() -> Iterator[Any]:
    started: list[KdnsProcess] = []

    def make(objects: list[dict[str, Any]] | None, extra: list[str] | None = None,
             env: dict[str, str] | None = None) -> KdnsProcess:
        p = start_kdns(objects, extra, env)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture
def fake_upstream() -> Iterator[Any]:
    started: list[FakeUpstream] = []

    def make(records: dict[tuple[str, str], tuple[int, list[str]]], **kw: Any) -> FakeUpstream:
        u = FakeUpstream(records, **kw)
        started.append(u)
        return u

    yield make
    for u in started:
        u.stop()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port where nothing answers, reserved for the test (dns_helpers.DeadPort)."""
    d = DeadPort()
    try:
        yield d.port
    finally:
        d.close()

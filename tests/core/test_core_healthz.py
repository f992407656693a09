"""Proxier health semantics with an injected clock (the HTTP side runs in test_core_apiserver.py)."""
from __future__ import annotations

from kproxy.healthz import ProxierHealth, go_time


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_healthy_until_a_change_waits_longer_than_timeout() -> None:
    c = Clock()
    h = ProxierHealth(health_timeout=60.0, clock=c)
    assert h.check() == (True, None, c.t)  # starting up: healthy
    h.queued_update()
    c.t += 59.9
    assert h.check()[0]
    h.queued_update()  # a later change does not move the oldest pending one
    c.t += 0.2
    assert not h.check()[0]
    h.updated()
    ok, last, now = h.check()
    assert ok and last == now == c.t
    c.t += 3600  # no pending change: healthy however old the last sync is
    assert h.check()[0]


def test_go_time_format() -> None:
    assert go_time(None) == "0001-01-01 00:00:00 +0000 UTC"
    assert go_time(0.5) == "1970-01-01 00:00:00.5 +0000 UTC"
    assert go_time(86400.0) == "1970-01-02 00:00:00 +0000 UTC"

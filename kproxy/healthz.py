"""The proxier health server (:10256 /healthz and /livez), as upstream's healthcheck package.

Healthy while no change has been waiting longer than healthTimeout (2 x syncPeriod) for a
successful sync; /healthz also requires the node to be eligible (not being deleted, not tainted
ToBeDeletedByClusterAutoscaler).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from kproxy.httpserve import Handler, Response
from kproxy.metrics import ProxyMetrics


def go_time(ts: float | None) -> str:
    """Go's time.Time String() in UTC, as upstream's JSON carries it."""
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f").rstrip("0").rstrip(".") + " +0000 UTC"


class ProxierHealth:
    """Per IP family, as upstream's ProxierHealthServer since dual-stack: every family's proxier
    reports its own syncs, and the node is healthy only while every family is. A change is queued
    for every family (each proxier sees every event); `updated(family)` clears one family's."""

    def __init__(self, health_timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.health_timeout = health_timeout
        self._clock = clock
        self.last_updated_by_family: dict[str, float] = {}
        self.oldest_pending_by_family: dict[str, float] = {}
        self.families: tuple[str, ...] = ("",)  # "": a single proxier; set by the server
        self.node_eligible = True  # until the first Node event says otherwise

    @property
    def last_updated(self) -> float | None:
        return max(self.last_updated_by_family.values(), default=None)

    @property
    def oldest_pending_queued(self) -> float | None:
        return min(self.oldest_pending_by_family.values(), default=None)

    def queued_update(self) -> None:
        now = self._clock()
        for family in self.families:
            self.oldest_pending_by_family.setdefault(family, now)

    def updated(self, family: str | None = None) -> None:
        """A successful sync of `family` (None: of every family)."""
        now = self._clock()
        for fam in self.families if family is None else (family,):
            self.oldest_pending_by_family.pop(fam, None)
            self.last_updated_by_family[fam] = now

    def check(self) -> tuple[bool, float | None, float]:
        now = self._clock()
        for family, pending in self.oldest_pending_by_family.items():
            if now - pending >= self.health_timeout:
                # Upstream answers with the failing family's lastUpdated.
                return False, self.last_updated_by_family.get(family), now
        return True, self.last_updated, now


def health_routes(health: ProxierHealth, metrics: ProxyMetrics | None = None) -> dict[str, Handler]:
    def healthz() -> Response:
        ok, last, now = health.check()
        eligible = health.node_eligible
        ok = ok and eligible
        if metrics is not None:
            metrics.healthz_total.labels(code="200" if ok else "503").inc()
        # Upstream reports lastUpdated as "now" while healthy (compatibility with old releases).
        body = (f'{{"lastUpdated": "{go_time(now if ok else last)}","currentTime": "{go_time(now)}", '
                f'"nodeEligible": {str(eligible).lower()}, "nodeHealthy": {str(eligible).lower()}}}')
        return _json(body, 200 if ok else 503)

    def livez() -> Response:
        ok, last, now = health.check()
        if metrics is not None:
            metrics.livez_total.labels(code="200" if ok else "503").inc()
        body = f'{{"lastUpdated": "{go_time(now if ok else last)}","currentTime": "{go_time(now)}"}}'
        return _json(body, 200 if ok else 503)

    return {"/healthz": healthz, "/livez": livez}


def _json(body: str, status: int) -> Response:
    return Response(status, body.encode(), "application/json", (("X-Content-Type-Options", "nosniff"),))

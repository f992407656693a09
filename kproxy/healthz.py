"""The proxier health server (:10256 /healthz and /livez), as upstream's healthcheck package.

Healthy while no change has been waiting longer than healthTimeout (2 x syncPeriod) for a
successful sync; /healthz also requires the node to be eligible (not being deleted, not tainted
ToBeDeletedByClusterAutoscaler).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web

from kproxy.metrics import ProxyMetrics


def go_time(ts: float | None) -> str:
    """Go's time.Time String() in UTC, as upstream's JSON carries it."""
    if ts is None:
        return "0001-01-01 00:00:00 +0000 UTC"
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f").rstrip("0").rstrip(".") + " +0000 UTC"


class ProxierHealth:
    def __init__(self, health_timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.health_timeout = health_timeout
        self._clock = clock
        self.last_updated: float | None = None
        self.oldest_pending_queued: float | None = None
        self.node_eligible = True  # until the first Node event says otherwise

    def queued_update(self) -> None:
        if self.oldest_pending_queued is None:
            self.oldest_pending_queued = self._clock()

    def updated(self) -> None:
        self.oldest_pending_queued = None
        self.last_updated = self._clock()

    def check(self) -> tuple[bool, float | None, float]:
        now = self._clock()
        pending = self.oldest_pending_queued
        healthy = pending is None or now - pending < self.health_timeout
        return healthy, self.last_updated, now


def health_app(health: ProxierHealth, metrics: ProxyMetrics | None = None) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, last, now = health.check()
        eligible = health.node_eligible
        ok = ok and eligible
        if metrics is not None:
            metrics.healthz_total.labels(code="200" if ok else "503").inc()
        # Upstream reports lastUpdated as "now" while healthy (compatibility with old releases).
        body = (f'{{"lastUpdated": "{go_time(now if ok else last)}","currentTime": "{go_time(now)}", '
                f'"nodeEligible": {str(eligible).lower()}, "nodeHealthy": {str(eligible).lower()}}}')
        return _json(body, 200 if ok else 503)

    async def livez(_: web.Request) -> web.Response:
        ok, last, now = health.check()
        if metrics is not None:
            metrics.livez_total.labels(code="200" if ok else "503").inc()
        body = f'{{"lastUpdated": "{go_time(now if ok else last)}","currentTime": "{go_time(now)}"}}'
        return _json(body, 200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    return app


def _json(body: str, status: int) -> web.Response:
    return web.Response(text=body, status=status, content_type="application/json",
                        headers={"X-Content-Type-Options": "nosniff"})

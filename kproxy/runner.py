"""Bounded-frequency runner, as upstream's pkg/proxy/runner (shared/DESIGN.md §3.4).

- minSyncPeriod: at most one run per interval; requests that arrive meanwhile coalesce into
  one run at the end of the interval.
- syncPeriod: at least one run per interval even without requests.
- a failed run is retried with exponential backoff (capped at syncPeriod), and the retry and
  every later run until one succeeds are full.

The timing decisions are a sans-I/O policy driven by an injectable clock; the async loop only
sleeps until the policy's next deadline or a new request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("kproxy.runner")


class BoundedFrequencyPolicy:
    def __init__(self, min_interval: float, max_interval: float, retry_initial: float = 1.0) -> None:
        if max_interval < min_interval:
            raise ValueError(f"syncPeriod ({max_interval}s) must be >= minSyncPeriod ({min_interval}s)")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.retry_initial = retry_initial
        self.requested = False
        self.need_full = True  # the first run is full
        self.last_start: float | None = None
        self.retry_at: float | None = None
        self.failures = 0

    def request(self) -> None:
        self.requested = True

    def next_run_at(self, now: float) -> float:
        if self.last_start is None:
            return now
        earliest = self.last_start + self.min_interval
        due = self.last_start + self.max_interval
        if self.requested:
            due = min(due, max(now, earliest))
        if self.retry_at is not None:
            due = min(due, max(self.retry_at, earliest))
        return due

    def started(self, now: float) -> bool:
        """Marks a run as begun; returns whether it must be full."""
        self.last_start = now
        self.requested = False
        return self.need_full

    def finished(self, now: float, ok: bool) -> None:
        if ok:
            self.failures = 0
            self.retry_at = None
            self.need_full = False
            return
        self.failures += 1
        self.need_full = True
        delay = min(self.retry_initial * 2 ** (self.failures - 1), self.max_interval)
        self.retry_at = now + delay


class BoundedFrequencyRunner:
    """Calls `fn(full)` (an async callable returning success) under the policy's timing."""

    def __init__(self, name: str, fn: Callable[[bool], Awaitable[bool]], min_interval: float,
                 max_interval: float, *, retry_initial: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.policy = BoundedFrequencyPolicy(min_interval, max_interval, retry_initial)
        self._fn = fn
        self._clock = clock
        self._wake = asyncio.Event()
        self.runs = 0

    def run(self) -> None:
        """Ask for a run as soon as minSyncPeriod allows. Cheap; call on every change."""
        self.policy.request()
        self._wake.set()

    async def loop(self) -> None:
        while True:
            now = self._clock()
            at = self.policy.next_run_at(now)
            if at > now:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), at - now)
                except TimeoutError:
                    pass
                continue
            full = self.policy.started(now)
            try:
                ok = await self._fn(full)
            except Exception:  # a crashing sync must not kill the loop: it is a failed sync
                log.exception("runner=%s sync raised", self.name)
                ok = False
            self.runs += 1
            self.policy.finished(self._clock(), ok)
            if not ok:
                log.warning("runner=%s sync failed retry_at=+%.2fs full=true", self.name,
                            (self.policy.retry_at or now) - self._clock())

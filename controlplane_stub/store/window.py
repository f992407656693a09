"""The in-memory event window watchers read from (the apiserver's watch cache, reduced to its core).

A fixed-size ring indexed by revision: revisions are contiguous (every write is exactly one event),
so event r lives at slot r % capacity. Watchers do not get queues of their own; each keeps a cursor
(the last revision it delivered) and reads the shared Event objects, whose wire line was encoded
once. A watcher whose cursor fell out of the ring gets Compacted (-> 410 Gone, the client relists).
"""
from __future__ import annotations

import asyncio

from .base import Compacted, Event


class EventWindow:
    def __init__(self, capacity: int, revision: int) -> None:
        if capacity < 1:
            raise ValueError("event window capacity must be >= 1")
        self.capacity = capacity
        self._ring: list[Event | None] = [None] * capacity
        self.last = revision  # newest revision held (or the store revision when empty)
        self.first = revision + 1  # oldest revision held
        self._wakeup = asyncio.Event()

    @property
    def oldest_replayable(self) -> int:
        """The smallest since_revision that can still be served."""
        return self.first - 1

    def append(self, ev: Event) -> None:
        if ev.revision != self.last + 1:
            raise ValueError(f"event window: revision {ev.revision} does not follow {self.last}")
        self._ring[ev.revision % self.capacity] = ev
        self.last = ev.revision
        if self.last - self.first >= self.capacity:
            self.first = self.last - self.capacity + 1
        # Wake every waiter once, then arm a fresh Event for the next write.
        wake, self._wakeup = self._wakeup, asyncio.Event()
        wake.set()

    def since(self, since_revision: int, max_events: int = 1000) -> list[Event]:
        if since_revision < self.first - 1:
            raise Compacted(since_revision, self.first - 1)
        if since_revision >= self.last:
            return []
        end = min(self.last, since_revision + max_events)
        ring, cap = self._ring, self.capacity
        out: list[Event] = []
        for rev in range(since_revision + 1, end + 1):
            ev = ring[rev % cap]
            assert ev is not None and ev.revision == rev
            out.append(ev)
        return out

    def wake(self) -> None:
        wake, self._wakeup = self._wakeup, asyncio.Event()
        wake.set()

    async def wait(self, after_revision: int, timeout: float) -> bool:
        if self.last > after_revision:
            return True
        wake = self._wakeup
        try:
            await asyncio.wait_for(wake.wait(), timeout)
        except TimeoutError:
            return self.last > after_revision
        return True

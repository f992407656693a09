"""Bounded-frequency runner: the policy with a fake clock, the async loop in real time."""
from __future__ import annotations

import asyncio
import time

import pytest

from kproxy.runner import BoundedFrequencyPolicy, BoundedFrequencyRunner


def test_first_run_is_immediate_and_full() -> None:
    p = BoundedFrequencyPolicy(min_interval=1.0, max_interval=30.0)
    assert p.next_run_at(now=50.0) == 50.0
    assert p.started(50.0) is True
    p.finished(50.2, ok=True)
    assert p.next_run_at(now=50.3) == 80.0  # nothing requested: the periodic run


def test_burst_coalesces_at_min_interval() -> None:
    p = BoundedFrequencyPolicy(min_interval=2.0, max_interval=30.0)
    p.started(0.0)
    p.finished(0.1, ok=True)
    for t in (0.2, 0.5, 1.9):  # three requests inside the interval
        p.request()
        assert p.next_run_at(t) == 2.0
    assert p.started(2.0) is False
    p.finished(2.1, ok=True)
    assert p.next_run_at(2.2) == 32.0  # all three served by one run
    p.request()
    assert p.next_run_at(10.0) == 10.0  # quiet long enough: at once


def test_zero_min_interval_runs_every_request() -> None:
    p = BoundedFrequencyPolicy(min_interval=0.0, max_interval=30.0)
    p.started(0.0)
    p.finished(0.0, ok=True)
    p.request()
    assert p.next_run_at(0.001) == 0.001


def test_failure_retries_with_backoff_and_full() -> None:
    p = BoundedFrequencyPolicy(min_interval=1.0, max_interval=10.0, retry_initial=2.0)
    p.started(0.0)
    p.finished(0.0, ok=True)
    t = 5.0
    waits = []
    for _ in range(5):
        p.request()
        at = p.next_run_at(t)
        assert p.started(at) is (t != 5.0)  # every run after a failure is full
        p.finished(at, ok=False)
        t = p.next_run_at(at)
        waits.append(t - at)
    assert waits == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert p.started(t) is True
    p.finished(t, ok=True)
    assert p.retry_at is None and p.next_run_at(t) == t + 10.0


def test_sync_period_below_min_is_rejected() -> None:
    with pytest.raises(ValueError, match="syncPeriod"):
        BoundedFrequencyPolicy(min_interval=5.0, max_interval=1.0)


@pytest.mark.timeout(10)
def test_loop_coalesces_and_retries_in_real_time() -> None:
    async def main() -> list[tuple[float, bool]]:
        calls: list[tuple[float, bool]] = []
        t0 = time.monotonic()

        async def fn(full: bool) -> bool:
            calls.append((time.monotonic() - t0, full))
            if len(calls) == 3:
                raise RuntimeError("boom")  # counts as a failed sync
            return True

        async def until_calls(n: int) -> None:
            for _ in range(300):  # bounded: at most 3 s, a loaded machine delays the loop
                if len(calls) >= n:
                    return
                await asyncio.sleep(0.01)

        r = BoundedFrequencyRunner("test", fn, min_interval=0.3, max_interval=5.0, retry_initial=0.2)
        task = asyncio.create_task(r.loop())
        # Each step waits for the run it follows (a fixed sleep let a loaded machine fold the burst
        # into the first run, or the next request into the second).
        await until_calls(1)
        for _ in range(20):  # a burst right after the first run
            r.run()
            await asyncio.sleep(0.005)
        await until_calls(2)
        r.run()  # run 3 fails, run 4 is the retry
        await until_calls(4)
        await asyncio.sleep(0.1)  # and no fifth run right after (nothing requested)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return calls

    calls = asyncio.run(main())
    times = [t for t, _ in calls]
    assert [f for _, f in calls] == [True, False, False, True]
    assert times[1] >= 0.29 and times[2] - times[1] >= 0.29  # minSyncPeriod held
    assert 0.19 <= times[3] - times[2] <= 2.0  # retried after the backoff, not at syncPeriod (5 s)

"""Pure parts of the etcd backend: the sparse event window, Go durations, lease values, allocation keys."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane_stub.apiserver import limits
from controlplane_stub.apiserver.allocators import reservation_names
from controlplane_stub.apiserver.bootstrap import parse_lease
from controlplane_stub.apiserver.watch import WatchHub
from controlplane_stub.store.base import Compacted, Event
from controlplane_stub.store.etcd import SparseWindow, parse_duration
from controlplane_stub.store.etcd_client import prefix_end


def _window(capacity: int, floor: int, gaps: list[int]) -> tuple[SparseWindow, list[int]]:
    async def build() -> tuple[SparseWindow, list[int]]:
        w = SparseWindow(capacity, floor)
        revs = []
        rev = floor
        for g in gaps:
            rev += g  # a gap of 0 is a second event of one revision (a multi-key transaction)
            w.append(Event(rev, "ADDED", f"/registry/x/{len(revs)}", b"{}", None))
            revs.append(rev)
        return w, revs
    return asyncio.run(build())


@given(st.integers(1, 20), st.integers(0, 50), st.lists(st.integers(0, 4), max_size=60), st.integers(0, 300))
def test_sparse_window_returns_exactly_the_events_after_a_revision(capacity: int, floor: int, gaps: list[int],
                                                                  since: int) -> None:
    gaps = [g if i else max(g, 1) for i, g in enumerate(gaps)]
    w, revs = _window(capacity, floor, gaps)
    if since < w.floor:
        with pytest.raises(Compacted):
            w.since(since)
        return
    got = [e.revision for e in w.since(since, 1 << 30)]
    assert got == [r for r in revs if r > since]
    assert len(got) <= capacity + gaps.count(0)  # the window holds about capacity events
    # Every event after the floor is held: nothing between floor and the first held one was dropped.
    assert w.floor >= floor and all(r > w.floor for r in got)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 5))
def test_sparse_window_never_splits_one_revision_between_reads(gaps: list[int], batch: int) -> None:
    gaps = [max(gaps[0], 1), *gaps[1:]]
    w, revs = _window(1000, 0, gaps)
    cursor, seen = 0, []
    while True:
        evs = w.since(cursor, batch)
        if not evs:
            break
        seen.extend(e.revision for e in evs)
        cursor = evs[-1].revision
    assert seen == revs


def test_sparse_window_floor_raised_by_compaction() -> None:
    w, _ = _window(100, 0, [1, 1, 5, 1])  # revisions 1 2 7 8
    w.raise_floor(7)
    assert [e.revision for e in w.since(7)] == [8]
    with pytest.raises(Compacted):
        w.since(6)


@pytest.mark.parametrize(("text", "seconds"), [("5m", 300), ("30s", 30), ("1m30s", 90), ("500ms", 0.5),
                                                ("0", 0), ("1h", 3600), ("2", 2)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "m", "1m-", "abc"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.binary(max_size=40))
def test_parse_lease_takes_only_ip_and_port(value: bytes) -> None:
    out = parse_lease(value)
    if out is not None:
        assert value.decode() == f"{out[0]} {out[1]}" or " " in value.decode()
        assert 0 < out[1] < 65536


def test_parse_lease_examples() -> None:
    assert parse_lease(b"127.0.0.1 6443") == ("127.0.0.1", 6443)
    assert parse_lease(b"::1 6443") == ("::1", 6443)
    assert parse_lease(b"0.0.0.0 6443") is None
    assert parse_lease(b"127.0.0.1 0") is None
    assert parse_lease(b"127.0.0.1") is None
    assert parse_lease(b"\xff 1") is None


def test_reservation_names() -> None:
    svc = {"spec": {"type": "NodePort", "clusterIPs": ["10.96.0.5", "fd00::5"], "healthCheckNodePort": 30001,
                    "ports": [{"port": 80, "nodePort": 30000}, {"port": 81}]}}
    assert reservation_names(svc) == {"ranges/serviceips/10.96.0.5", "ranges/serviceips/fd00::5",
                                      "ranges/servicenodeports/30000", "ranges/servicenodeports/30001"}
    assert reservation_names({"spec": {"clusterIP": "None"}}) == set()
    assert reservation_names(None) == set()


@given(st.binary(min_size=1, max_size=8))
def test_prefix_end_bounds_every_key_with_the_prefix(prefix: bytes) -> None:
    end = prefix_end(prefix)
    if end == b"\x00":
        assert set(prefix) == {0xFF}
    else:
        assert prefix < end and not end.startswith(prefix)
        assert prefix + b"\xff" * 4 < end


def test_wake_delay_grows_with_waiting_watchers_up_to_the_cap() -> None:
    from controlplane_stub.store import etcd

    async def run() -> tuple[list[float], list[float], list[float]]:
        loop = asyncio.get_running_loop()
        w = SparseWindow(10_000, 0)
        delays = [w.wake_delay()]
        waiters = [asyncio.create_task(w.wait(0, 5.0)) for _ in range(100)]
        await asyncio.sleep(0)
        delays.append(w.wake_delay())
        # After a quiet spell the first event wakes every waiter at once (no batch to wait for).
        w.append(Event(1, "ADDED", "/registry/x/a", b"{}", None), wake=False)
        w.wake_soon()
        for _ in range(5):  # a few loop turns, whatever the clock says
            await asyncio.sleep(0)
        assert all(t.done() and t.result() for t in waiters)
        # The next ones, right after that wake-up, are coalesced; the stream then pauses: they go
        # out at WAKE_MIN_SHARE of the delay after the first wake-up, not at its end.
        first_wake = w._last_wake  # the loop time of that wake-up
        waiters = [asyncio.create_task(w.wait(1, 5.0)) for _ in range(100)]
        await asyncio.sleep(0)
        w.append(Event(2, "ADDED", "/registry/x/b", b"{}", None), wake=False)
        w.wake_soon()
        w.append(Event(3, "ADDED", "/registry/x/c", b"{}", None), wake=False)
        w.wake_soon()  # a second call in the same batch schedules nothing more
        for _ in range(5):
            await asyncio.sleep(0)
        if loop.time() < first_wake + etcd.WAKE_DELAY_MAX * etcd.WAKE_MIN_SHARE * 0.5:  # (a stalled machine skips)
            assert not any(t.done() for t in waiters)
        assert all(await asyncio.gather(*waiters))
        paused = [w._last_wake - first_wake]  # the second wake-up, from the first
        # A stream that keeps coming (a batch every 0.5 ms, each gap under WAKE_QUIET) is woken at
        # the end of the delay only.
        second_wake = w._last_wake
        waiters = [asyncio.create_task(w.wait(3, 5.0)) for _ in range(100)]
        await asyncio.sleep(0)
        gaps: list[float] = []
        rev, last = 4, loop.time()
        while not all(t.done() for t in waiters) and rev < 2000:
            w.append(Event(rev, "ADDED", f"/registry/x/{rev}", b"{}", None), wake=False)
            w.wake_soon()
            rev += 1
            await asyncio.sleep(0.0005)
            gaps.append(loop.time() - last)
            last = loop.time()
        streamed = [w._last_wake - second_wake, max(gaps)]
        delays.append(w.wake_delay())
        return delays, paused, streamed

    (idle, busy, after), (paused,), (streamed, max_gap) = asyncio.run(run())
    assert idle == etcd.WAKE_DELAY
    assert busy == etcd.WAKE_DELAY_MAX  # 100 waiters: capped
    # a timer may fire up to the clock's resolution early
    assert paused >= etcd.WAKE_DELAY_MAX * etcd.WAKE_MIN_SHARE * 0.9
    if max_gap < etcd.WAKE_QUIET:  # the loop kept the pace (a stalled machine pauses the stream)
        assert streamed >= etcd.WAKE_DELAY_MAX * 0.9
    assert after == etcd.WAKE_DELAY  # nobody waits any more


def test_a_paused_stream_is_woken_before_the_end_of_the_delay() -> None:
    """The last events of a burst go out WAKE_QUIET after it (when that is past WAKE_MIN_SHARE of
    the delay since the last wake-up), not at the end of the delay (~12.5 ms later here); a pause is
    relative to the stream's recent gaps, so the burst's own batches come one loop turn apart."""
    from controlplane_stub.store import etcd

    async def run() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        w = SparseWindow(10_000, 0)
        waiters = [asyncio.create_task(w.wait(0, 5.0)) for _ in range(100)]  # the delay: WAKE_DELAY_MAX
        await asyncio.sleep(0)
        w.append(Event(1, "ADDED", "/registry/x/a", b"{}", None), wake=False)
        w.wake_soon()  # the leading edge
        await asyncio.gather(*waiters)
        waiters = [asyncio.create_task(w.wait(1, 5.0)) for _ in range(100)]
        await asyncio.sleep(etcd.WAKE_DELAY_MAX * 0.5)  # past WAKE_MIN_SHARE of the delay
        for rev in range(2, 22):  # a burst: 20 batches one loop turn apart
            w.append(Event(rev, "ADDED", f"/registry/x/{rev}", b"{}", None), wake=False)
            w.wake_soon()
            await asyncio.sleep(0)
        burst_end = w._last_batch
        # A plain timer of WAKE_QUIET, as the control: on a slow machine both come late alike.
        control = loop.create_future()
        loop.call_later(etcd.WAKE_QUIET, lambda: control.set_result(loop.time()))
        await asyncio.gather(*waiters)
        return w._last_wake - burst_end, await control - burst_end

    after_burst, control = asyncio.run(run())
    assert after_burst >= etcd.WAKE_QUIET * 0.9
    assert after_burst < control + 0.004, (after_burst, control)


def _unchunk(chunk: bytes) -> bytes:
    size, _, rest = chunk.partition(b"\r\n")
    assert rest.endswith(b"\r\n") and int(size, 16) == len(rest) - 2
    return rest[:-2]


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["/registry/configmaps/a/", "/registry/configmaps/b/",
                                                          "/registry/secrets/a/"]),
                          st.integers(1, 3), st.integers(0, 40_000)), min_size=1, max_size=60),
       st.sampled_from([("/registry/configmaps/", ""), ("/registry/configmaps/a/", ""),
                        ("/registry/configmaps/", "/registry/configmaps/a/x1")]),
       st.integers(1, 25))
def test_pump_chunks_carry_every_wanted_event_once_in_order_without_splitting_a_revision(
        spec: list[tuple[bool, str, int, int]], want: tuple[str, str], per_read: int) -> None:
    """The watch pump's chunking (WatchHub._chunk) as the pump uses it: read up to per_read events
    after the cursor, write one chunk, move the cursor to its last revision; events of one revision
    (a multi-key transaction) stay together, chunks stay within a piece unless one revision is larger."""
    events, rev = [], 0
    for same_rev, prefix, name, size in spec:
        rev += 0 if same_rev and rev else 1
        events.append(Event(rev, "ADDED", f"{prefix}x{name}", b'{"s":"' + b"v" * size + b'"}', None))
    prefix, exact = want
    wanted = [ev.line for ev in events if ev.key.startswith(prefix) and (not exact or ev.key == exact)]
    cursor, got = 0, []
    for _ in range(len(events) + 1):
        more = [ev for ev in events if ev.revision > cursor]
        evs = more[:per_read]
        while len(evs) < len(more) and more[len(evs)].revision == evs[-1].revision:
            evs.append(more[len(evs)])  # a store's read never ends inside a revision (SparseWindow.since)
        if not evs:
            break
        chunk, n, last, cut = WatchHub._chunk(evs, prefix, exact)
        body = _unchunk(chunk) if chunk else b""
        assert body.count(b"\n") == n
        lines = [line + b"\n" for line in body.split(b"\n")[:-1]]
        if len(body) > limits.SEND_PIECE:  # only because the chunk's last revision could not be split
            mine = [ev for ev in evs if ev.key.startswith(prefix) and (not exact or ev.key == exact)][:n]
            assert len(b"".join(ev.line for ev in mine if ev.revision != mine[-1].revision)) <= limits.SEND_PIECE
        assert last >= cursor and (cut or last == evs[-1].revision)
        got += lines
        cursor = last
    assert got == wanted

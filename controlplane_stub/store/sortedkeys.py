"""The etcd mirror's key index: the keys it holds, in order, for lists and continue tokens.

One sorted Python list made every create an O(n) insert: a ConfigMap's key sorts before the
Services', so each insert moved every Service key after it (5.4 us per create with 20,000 keys on the
bench machine, growing with the store). Here the keys are kept in sorted runs of at most 2 x _RUN: an
insert or a removal moves at most a run and the short list of the runs' last keys.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

_RUN = 512


class SortedKeys:
    """A sorted set of strings: add, remove, and the keys in [lo, hi) in order."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        items = sorted(set(keys))
        self._runs: list[list[str]] = [items[i:i + _RUN] for i in range(0, len(items), _RUN)]
        self._lasts: list[str] = [run[-1] for run in self._runs]  # each run's greatest key

    def __len__(self) -> int:
        return sum(map(len, self._runs))

    def __iter__(self) -> Iterator[str]:
        for run in self._runs:
            yield from run

    def _find(self, key: str) -> tuple[int, int, bool]:
        """(run, position in it, present): where key is or would go; run len(self._runs) when key
        is past the last one."""
        i = bisect.bisect_left(self._lasts, key)
        if i == len(self._runs):
            return i, 0, False
        run = self._runs[i]
        j = bisect.bisect_left(run, key)
        return i, j, j < len(run) and run[j] == key

    def __contains__(self, key: str) -> bool:
        return self._find(key)[2]

    def add(self, key: str) -> None:
        """Insert key (nothing when it is already there)."""
        i, j, present = self._find(key)
        if present:
            return
        if i == len(self._runs):  # past the end (or empty): the last run's tail, or a first run
            if not self._runs:
                self._runs.append([])
                self._lasts.append(key)
            i = len(self._runs) - 1
            j = len(self._runs[i])
        run = self._runs[i]
        run.insert(j, key)
        self._lasts[i] = run[-1]
        if len(run) > 2 * _RUN:  # split: no run grows past 2 x _RUN
            self._runs[i:i + 1] = [run[:_RUN], run[_RUN:]]
            self._lasts[i:i + 1] = [run[_RUN - 1], run[-1]]

    def remove(self, key: str) -> None:
        """Remove key (nothing when it is not there)."""
        i, j, present = self._find(key)
        if not present:
            return
        run = self._runs[i]
        del run[j]
        if run:
            self._lasts[i] = run[-1]
        else:
            del self._runs[i]
            del self._lasts[i]

    def between(self, lo: str, hi: str, limit: int = 0) -> list[str]:
        """The keys k with lo <= k < hi, in order; the first `limit` of them (0: all). Whole slices of
        the runs: a full list of 10,000 keys is some twenty list copies, not 10,000 steps."""
        out: list[str] = []
        runs = self._runs
        i = bisect.bisect_left(self._lasts, lo)
        if i == len(runs):
            return out
        j = bisect.bisect_left(runs[i], lo)
        while i < len(runs):
            run = runs[i]
            stop = bisect.bisect_left(run, hi, j)
            if limit and len(out) + stop - j >= limit:
                out.extend(run[j:j + limit - len(out)])
                return out
            out.extend(run[j:stop])
            if stop < len(run):
                return out
            i, j = i + 1, 0
        return out

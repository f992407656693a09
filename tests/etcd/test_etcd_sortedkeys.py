"""The etcd mirror's key index (controlplane_stub/store/sortedkeys.py) against a plain sorted list:
the same keys, in the same order, for any sequence of adds and removes, across run splits."""
from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.store import sortedkeys
from controlplane_stub.store.sortedkeys import SortedKeys

_KEYS = st.text(alphabet="/abcz0129-", min_size=0, max_size=6)


@settings(max_examples=300, deadline=None)
@given(initial=st.lists(_KEYS, max_size=50), ops=st.lists(st.tuples(st.booleans(), _KEYS), max_size=300),
       bounds=st.lists(st.tuples(_KEYS, _KEYS), min_size=1, max_size=5))
def test_same_as_a_sorted_list(initial: list[str], ops: list[tuple[bool, str]],
                               bounds: list[tuple[str, str]]) -> None:
    old_run = sortedkeys._RUN
    sortedkeys._RUN = 2  # tiny runs: every few adds split one, removes empty them
    try:
        index = SortedKeys(initial)
        model = sorted(set(initial))
        for add, key in ops:
            i = bisect.bisect_left(model, key)
            present = i < len(model) and model[i] == key
            if add:
                index.add(key)
                if not present:
                    model.insert(i, key)
            else:
                index.remove(key)
                if present:
                    del model[i]
            assert len(index) == len(model)
            assert (key in index) is add
        assert list(index) == model
        for lo, hi in bounds:
            want = [k for k in model if lo <= k < hi]
            assert index.between(lo, hi) == want, (lo, hi)
            for limit in (1, 2, 3, 7):
                assert index.between(lo, hi, limit) == want[:limit], (lo, hi, limit)
    finally:
        sortedkeys._RUN = old_run


def test_runs_split_and_stay_ordered() -> None:
    keys = [f"/registry/services/default/svc-{i:05d}" for i in range(5000)]
    index = SortedKeys(keys)
    for i in range(3000):  # ConfigMaps sort before every Service: inserts at the front
        index.add(f"/registry/configmaps/default/cm-{i:05d}")
    everything = list(index)
    assert everything == sorted(everything) and len(everything) == 8000 == len(index)
    assert max(len(run) for run in index._runs) <= 2 * sortedkeys._RUN
    assert list(index.between("/registry/configmaps/", "/registry/configmaps0"))[:2] == [
        "/registry/configmaps/default/cm-00000", "/registry/configmaps/default/cm-00001"]
    assert len(list(index.between("/registry/services/", "/registry/services0"))) == 5000

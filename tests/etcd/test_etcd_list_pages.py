"""EtcdStore.list at the current revision makes only the page's rows: every page of every size and
start, at the current revision and at an older one, is exactly the slice of the sorted keys under the
prefix (keys just outside it on both sides), on a real etcd."""
from __future__ import annotations

import asyncio

from controlplane_stub.store.etcd import open_etcd_store
from controlplane_stub.store.etcd_process import EtcdCluster

_NAMES = [f"cm-{i:02d}" for i in range(23)]


def test_pages_are_slices_of_the_sorted_keys(etcd1: EtcdCluster, prefix: str) -> None:
    async def run() -> None:
        store = open_etcd_store([etcd1.endpoints], prefix=prefix, compaction_interval=0)
        await store.start()
        try:
            await store.create("/registry/configmaps/a/before", {"metadata": {"name": "before"}})
            for name in reversed(_NAMES):
                await store.create(f"/registry/configmaps/b/{name}", {"metadata": {"name": name}})
            await store.create("/registry/configmaps/c/after", {"metadata": {"name": "after"}})
            old = store.revision
            await store.delete("/registry/configmaps/b/cm-05")
            await store.create("/registry/configmaps/b/cm-99", {"metadata": {"name": "cm-99"}})
            keys_now = sorted(f"/registry/configmaps/b/{n}" for n in [*_NAMES, "cm-99"] if n != "cm-05")
            keys_old = sorted(f"/registry/configmaps/b/{n}" for n in _NAMES)
            for revision, keys in ((0, keys_now), (store.revision, keys_now), (old, keys_old)):
                for limit in (0, 1, 2, 5, len(keys) - 1, len(keys), len(keys) + 1):
                    for start in range(len(keys)):
                        after = keys[start - 1] if start else ""
                        page = store.list("/registry/configmaps/b/", start_after=after, limit=limit,
                                          revision=revision)
                        want = keys[start:start + limit] if limit else keys[start:]
                        assert [k for k, _ in page.items] == want, (revision, limit, start)
                        assert page.more == (bool(limit) and len(keys) - start > limit), (revision, limit, start)
                        assert page.revision == (revision or store.revision)
                        for k, value in page.items:
                            assert f'"name":"{k.rsplit("/", 1)[1]}"'.encode() in value
        finally:
            await store.close()

    asyncio.run(run())

"""Feeds the ZoneIndex from the API server with kproxy's own Reflector (one list+watch code path
for the proxy and the DNS), or once from a file of objects."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
from typing import Generic, TypeVar

from kdns.objects import EndpointSlice, Service, load_objects
from kdns.records import ZoneIndex

log = logging.getLogger("kdns.source")

SERVICES_PATH = "/api/v1/services"
SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"


class IndexFeeder:
    """Re-encodes what a (re)list changed in slices of Services, yielding to the event loop in
    between, so queries keep being answered (SERVFAIL before the first sync, the previous
    answers during a relist) instead of waiting seconds for a 10,000-Service zone."""

    SLICE = 50  # Services per turn: a few ms of encoding between two looks at the sockets

    def __init__(self, index: ZoneIndex) -> None:
        self.index = index
        self.idle = asyncio.Event()
        self.idle.set()
        self.task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        if self.index.pending and self.task is None:
            self.idle.clear()
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while not self.index.encode_pending(self.SLICE):
                await asyncio.sleep(0)
        finally:
            self.task = None
            self.idle.set()


_O = TypeVar("_O", Service, EndpointSlice)


class _ObjectStore(Generic[_O]):
    """A Reflector store (with the PagedReflectorStore extension) feeding the index. Each list page
    is compacted as it arrives, so the garbage of decoding one page is freed before the next page
    is decoded into the same memory: compacting only once the whole list is in left that garbage
    as holes between the kept objects (3.4 MiB more RSS at 10,000 Services, bench_dns_memory.py)."""

    def __init__(self, index: ZoneIndex, feeder: IndexFeeder) -> None:
        self.index = index
        self.feeder = feeder
        self._listed: list[_O] = []

    def begin_replace(self) -> None:
        self._listed = []

    def replace_page(self, items: list[_O]) -> None:
        self._listed.extend(item.compact(self.index.shared) for item in items)

    def end_replace(self, resource_version: str) -> None:
        items, self._listed = self._listed, []
        self.replace(items, resource_version)

    def replace(self, items: list[_O], resource_version: str) -> None:
        self._replace(items)
        self.feeder.kick()

    def _replace(self, items: list[_O]) -> None:
        raise NotImplementedError


class ServiceStore(_ObjectStore[Service]):
    def _replace(self, items: list[Service]) -> None:
        self.index.replace(services=items, defer=True)

    def apply(self, event_type: str, item: Service) -> None:
        if event_type == "DELETED":
            self.index.delete_service(item.key)
        else:
            self.index.set_service(item)


class SliceStore(_ObjectStore[EndpointSlice]):
    def _replace(self, items: list[EndpointSlice]) -> None:
        self.index.replace(slices=items, defer=True)

    def apply(self, event_type: str, item: EndpointSlice) -> None:
        if event_type == "DELETED":
            self.index.delete_slice(item.key)
        else:
            self.index.set_slice(item)


def release_memory() -> None:
    """After the initial list: collect the garbage of decoding and encoding and hand free heap
    pages back to the OS (glibc keeps them otherwise), so RSS reflects what the zone needs. The
    survivors (the index) are frozen out of the cyclic GC: a full collection over 10,000 Services'
    records would otherwise stall queries for tens of milliseconds now and then."""
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


async def watch_cluster(index: ZoneIndex, kubeconfig: str, master: str = "") -> None:
    """Runs until cancelled. The index is marked synced once both lists are in: before that the
    zone answers SERVFAIL and /ready says 503, as CoreDNS does."""
    from kproxy.kube.client import ApiClient
    from kproxy.kube.kubeconfig import resolve_access
    from kproxy.kube.reflector import Reflector

    client = ApiClient(resolve_access(kubeconfig, master))
    feeder = IndexFeeder(index)
    services: Reflector[Service] = Reflector(client, SERVICES_PATH, Service, ServiceStore(index, feeder),
                                             name="services")
    slices: Reflector[EndpointSlice] = Reflector(client, SLICES_PATH, EndpointSlice, SliceStore(index, feeder),
                                                 name="endpointslices")
    tasks = [asyncio.create_task(services.run()), asyncio.create_task(slices.run())]
    try:
        await services.wait_synced()
        await slices.wait_synced()
        await feeder.idle.wait()
        index.mark_synced()
        release_memory()
        log.info("synced services=%d endpointslices=%d", len(index.services), len(index.slices))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def load_file(index: ZoneIndex, path: str) -> None:
    """--objects: a static zone from a JSON List of Services and EndpointSlices."""
    with open(path, "rb") as f:
        services, slices = load_objects(f.read())
    index.replace(services=services, slices=slices)
    index.mark_synced()
    release_memory()
    log.info("loaded file=%s services=%d endpointslices=%d", path, len(services), len(slices))

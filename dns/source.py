"""Feeds the ZoneIndex from the API server with kproxy's own Reflector (one list+watch code path
for the proxy and the DNS), or once from a file of objects."""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging

from kdns.objects import EndpointSlice, Service, load_objects
from kdns.records import ZoneIndex

log = logging.getLogger("kdns.source")

SERVICES_PATH = "/api/v1/services"
SLICES_PATH = "/apis/discovery.k8s.io/v1/endpointslices"


class ServiceStore:
    """Reflector store for Services (the ReflectorStore protocol)."""

    def __init__(self, index: ZoneIndex) -> None:
        self.index = index

    def replace(self, items: list[Service], resource_version: str) -> None:
        self.index.replace(services=items)

    def apply(self, event_type: str, item: Service) -> None:
        if event_type == "DELETED":
            self.index.delete_service(item.key)
        else:
            self.index.set_service(item)


class SliceStore:
    def __init__(self, index: ZoneIndex) -> None:
        self.index = index

    def replace(self, items: list[EndpointSlice], resource_version: str) -> None:
        self.index.replace(slices=items)

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
    services: Reflector[Service] = Reflector(client, SERVICES_PATH, Service, ServiceStore(index),
                                             name="services")
    slices: Reflector[EndpointSlice] = Reflector(client, SLICES_PATH, EndpointSlice, SliceStore(index),
                                                 name="endpointslices")
    tasks = [asyncio.create_task(services.run()), asyncio.create_task(slices.run())]
    try:
        await services.wait_synced()
        await slices.wait_synced()
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

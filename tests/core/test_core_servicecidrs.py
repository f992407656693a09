"""kproxy's ServiceCIDR source (kproxy/servicecidrs.py) and its hand-over to the proxiers.

The served case runs against the real kproxy-apiserver in tests/nftables/test_nftables_servicecidr.py
(real kproxy, real kernel). Here: the parsing and merging as properties; what the proxier gets and
when (MetaProxier hands the CIDRs over at the start of a sync, in the sync's thread); and two
servers the real one cannot be made into, each a few lines of aiohttp: one that serves no
ServiceCIDRs (kube-apiserver before 1.31 answers discovery of networking.k8s.io/v1 without them,
of v1beta1 with 404; the real 1.24 is not on CI machines) and one whose store holds an invalid
ServiceCIDR (the real server refuses to write one).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.kube.client import ApiClient
from kproxy.kube.ingest import InvalidObject
from kproxy.kube.kubeconfig import ClusterAccess
from kproxy.kube.reflector import Backoff
from kproxy.kube.types import ObjectMeta
from kproxy.model import CIDR
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import MetaProxier
from kproxy.servicecidrs import ServiceCIDR, ServiceCIDRSource, ServiceCIDRSpec, merge, parse_service_cidr


def _obj(name: str, *cidrs: str) -> ServiceCIDR:
    return ServiceCIDR(metadata=ObjectMeta(name=name), spec=ServiceCIDRSpec(cidrs=list(cidrs)))


def test_parse_takes_canonical_cidrs_and_refuses_the_rest_whole() -> None:
    assert parse_service_cidr(_obj("a", "10.96.0.0/12", "FD00:10:96::/108")) == ("10.96.0.0/12", "fd00:10:96::/108")
    for bad in (_obj("b", "10.96.0.0/12", "nonsense"), _obj("c", "10.0.0.0/8", "fd00::/64", "10.1.0.0/16"),
                _obj("d", "fe80::%eth0/64"), _obj("e", "10.96.0.0")):
        with pytest.raises(InvalidObject) as err:
            parse_service_cidr(bad)
        assert err.value.kind == "ServiceCIDR" and err.value.reason == "cidr"


_nets = st.one_of(
    st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), st.ip_addresses(v=4), st.integers(8, 32)),
    st.builds(lambda a, p: ipaddress.ip_network(f"{a}/{p}", strict=False), st.ip_addresses(v=6), st.integers(16, 128)))


@settings(max_examples=50, deadline=None)
@given(st.lists(_nets, max_size=6), st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), max_size=20))
def test_merge_covers_exactly_the_union(nets: list[Any], probes: list[Any]) -> None:
    merged = [ipaddress.ip_network(c) for c in merge([CIDR(str(n)) for n in nets])]
    # every address of an input (its first and last, and random ones) is in the result, and no other
    for addr in [*probes, *(n.network_address for n in nets), *(n.broadcast_address for n in nets)]:
        assert any(addr in n for n in nets if n.version == addr.version) == \
            any(addr in m for m in merged if m.version == addr.version)
    assert [m.version for m in merged] == sorted(m.version for m in merged)  # IPv4 first
    for a, b in zip(merged, merged[1:]):
        assert a.version != b.version or not a.overlaps(b)


class Family(Proxier):
    mode = "nftables"

    def __init__(self, during_sync: Any = None) -> None:
        self.events: list[Any] = []
        self.during_sync = during_sync  # called inside sync(), as the event loop would meanwhile

    def set_service_cidrs(self, cidrs: tuple[str, ...]) -> None:
        self.events.append(("cidrs", cidrs))

    def sync(self, request: SyncRequest) -> SyncResult:
        self.events.append("sync")
        if self.during_sync is not None:
            self.during_sync()
        return SyncResult(ok=True)

    def cleanup(self) -> bool:
        return True


def test_meta_proxier_never_changes_the_cidrs_during_a_sync() -> None:
    v4, v6 = Family(), Family()
    meta = MetaProxier({"IPv4": v4, "IPv6": v6})
    meta.set_service_cidrs(("10.96.0.0/12", "fd00::/108"))  # no sync running: at once
    assert v4.events == v6.events == [("cidrs", ("10.96.0.0/12", "fd00::/108"))]
    v4.during_sync = lambda: meta.set_service_cidrs(("10.96.0.0/12",))  # arrives while v4 syncs
    assert meta.sync(SyncRequest({}, {})).ok
    v4.during_sync = None
    assert v4.events[1:] == ["sync"] and v6.events[1:] == ["sync"]  # neither got it mid-sync
    assert meta.sync(SyncRequest({}, {})).ok  # the next sync starts with it
    assert v4.events[2:] == v6.events[2:] == [("cidrs", ("10.96.0.0/12",)), "sync"]
    assert meta.sync(SyncRequest({}, {})).ok
    assert v4.events[4:] == ["sync"]  # handed over once


@contextlib.asynccontextmanager
async def _server(routes: dict[str, Any]) -> AsyncIterator[tuple[str, list[str]]]:
    """GET path -> JSON body (or an int: that status with a Status body); anything else 404.
    Yields the URL and the paths asked for."""
    asked: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        asked.append(request.path + ("?watch" if request.query.get("watch") else ""))
        if request.query.get("watch"):
            await asyncio.sleep(30)  # a watch with nothing to say
        body = routes.get(request.path, 404)
        if isinstance(body, int):
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": body,
                                      "reason": "NotFound", "message": "the server could not find the requested "
                                                                       "resource"}, status=body)
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        await runner.cleanup()


async def _source(url: str, invalid: list[InvalidObject]) -> tuple[ApiClient, ServiceCIDRSource, list[Any]]:
    changes: list[Any] = []
    client = ApiClient(ClusterAccess(server=url))
    src = ServiceCIDRSource(client, changes.append, on_invalid=invalid.append, backoff=Backoff(initial=0.01, cap=0.05))
    return client, src, changes


def test_a_server_without_servicecidrs_gets_one_line_and_no_drop_rule(caplog: pytest.LogCaptureFixture) -> None:
    # kube-apiserver 1.24: networking.k8s.io/v1 without servicecidrs, no v1beta1 at all.
    v1 = {"kind": "APIResourceList", "groupVersion": "networking.k8s.io/v1",
          "resources": [{"name": "ingresses", "namespaced": True, "kind": "Ingress"}]}

    async def main() -> tuple[bool, ServiceCIDRSource, list[Any], list[str]]:
        async with _server({"/apis/networking.k8s.io/v1": v1}) as (url, asked):
            client, src, changes = await _source(url, [])
            task = asyncio.create_task(src.run())
            try:
                listed = await src.wait_listed(5)
                await asyncio.sleep(0.2)
                assert not task.done()  # it stays (kproxy's tasks run forever) and does nothing
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await client.close()
            return listed, src, changes, asked

    with caplog.at_level(logging.INFO, logger="kproxy.servicecidrs"):
        listed, src, changes, asked = asyncio.run(main())
    assert listed and src.path == "" and changes == []
    assert asked == ["/apis/networking.k8s.io/v1", "/apis/networking.k8s.io/v1beta1"]
    lines = [r.getMessage() for r in caplog.records if r.name == "kproxy.servicecidrs"]
    assert lines == ["the API server serves no ServiceCIDRs (networking.k8s.io v1/v1beta1): traffic to "
                     "unallocated ClusterIPs is not dropped"]


def test_an_invalid_servicecidr_is_skipped_and_the_others_count() -> None:
    def item(name: str, *cidrs: Any) -> dict[str, Any]:
        return {"metadata": {"name": name, "resourceVersion": "5"}, "spec": {"cidrs": list(cidrs)}}

    routes: dict[str, Any] = {
        "/apis/networking.k8s.io/v1": 404,
        "/apis/networking.k8s.io/v1beta1": {"resources": [{"name": "servicecidrs"}]},
        "/apis/networking.k8s.io/v1beta1/servicecidrs": {
            "kind": "ServiceCIDRList", "metadata": {"resourceVersion": "7"},
            "items": [item("kubernetes", "10.96.0.0/12"), item("hostile", "0.0.0.0/0; flush ruleset"),
                      item("inside", "10.96.8.0/24", "fd00::/64"), item("weird", 42)]},
    }

    async def main() -> tuple[bool, list[Any], list[InvalidObject]]:
        async with _server(routes) as (url, _):
            invalid: list[InvalidObject] = []
            client, src, changes = await _source(url, invalid)
            task = asyncio.create_task(src.run())
            try:
                return await src.wait_listed(5), changes, invalid
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await client.close()

    listed, changes, invalid = asyncio.run(main())
    assert listed
    assert changes[-1] == ("10.96.0.0/12", "fd00::/64")  # merged; nothing of the invalid ones
    assert sorted(e.key for e in invalid) == ["hostile"]  # "weird" does not decode: counted by the reflector

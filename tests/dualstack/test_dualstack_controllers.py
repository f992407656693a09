"""The EndpointSlice controller writes one slice set per IP family of a Service, and the LoadBalancer
controller gives one ingress IP per family, against a real dual-stack kproxy-apiserver. Pods are created
through the API with their status written as a node agent would (no pod processes: these tests are
about the controllers)."""
from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub import client as api
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.controllers.loadbalancer import parse_pool
from controlplane_stub.controllers.manager import ControllerManager, ControllerOptions

Obj = dict[str, Any]
POOL = "10.251.0.10-10.251.0.11,fd00:10:251::/126"


@pytest.fixture(scope="module")
def apiserver(storage_backend: str) -> Iterator[APIServerProcess]:
    with running_apiserver(extra_args=["--service-cluster-ip-range", "10.96.0.0/12,fd00:10:96::/108"]) as a:
        yield a


async def until(what: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await what():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what.__name__}")


def run_with_controllers(apiserver: APIServerProcess, body: Callable[[api.Client, str], Awaitable[None]]) -> None:
    async def main() -> None:
        cfg = api.load_kubeconfig(apiserver.kubeconfig)
        c = api.Client(cfg)
        opts = ControllerOptions(lb_pool=POOL, enabled=("endpointslice", "loadbalancer"))
        mgr = ControllerManager(c, opts)
        task = asyncio.get_running_loop().create_task(mgr.run())
        try:
            await asyncio.wait_for(opts.ready.wait(), 20)
            ns = "ds-" + secrets.token_hex(3)
            await c.create(api.path("namespaces"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            await body(c, ns)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await c.close()

    asyncio.run(main())


async def running_pod(c: api.Client, ns: str, name: str, ips: list[str]) -> None:
    pod = await c.create(api.path("pods", ns), {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "ds"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox",
                                                        "ports": [{"name": "http", "containerPort": 8080}]}]}})
    pod["status"] = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
                     "conditions": [{"type": "Ready", "status": "True"}]}
    await c.update(api.obj_path("pods", pod, "status"), pod)


async def slices_by_type(c: api.Client, ns: str, svc: str) -> dict[str, list[str]]:
    items = (await c.get(api.path("endpointslices", ns),
                         {"labelSelector": f"kubernetes.io/service-name={svc}"})).get("items") or []
    out: dict[str, list[str]] = {}
    for s in items:
        out.setdefault(s["addressType"], []).extend(a for e in s.get("endpoints") or [] for a in e["addresses"])
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.timeout(90)
def test_one_slice_set_per_family(apiserver: APIServerProcess) -> None:
    async def body(c: api.Client, ns: str) -> None:
        await running_pod(c, ns, "a", ["10.244.0.5", "fd00:10:244::5"])
        await running_pod(c, ns, "b", ["10.244.0.6", "fd00:10:244::6"])
        await running_pod(c, ns, "old", ["10.244.0.7"])  # an IPv4-only pod: in the IPv4 set only
        await c.create(api.path("services", ns), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "ds"}, "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv6", "IPv4"],
                     "ports": [{"name": "web", "port": 80, "targetPort": "http"}]}})
        want = {"IPv6": ["fd00:10:244::5", "fd00:10:244::6"], "IPv4": ["10.244.0.5", "10.244.0.6", "10.244.0.7"]}

        async def both_families() -> bool:
            return await slices_by_type(c, ns, "web") == want
        await until(both_families)
        items = (await c.get(api.path("endpointslices", ns))).get("items") or []
        assert all(s["ports"] == [{"name": "web", "port": 8080, "protocol": "TCP"}] for s in items)

        # The legacy Endpoints object has the primary family only, as upstream's controller writes it.
        async def endpoints_primary() -> bool:
            try:
                ep = await c.get(api.path("endpoints", ns, "web"))
            except api.ApiError:
                return False
            ips = sorted(a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or [])
            return ips == want["IPv6"]
        await until(endpoints_primary)

        # Downgrading to SingleStack removes the IPv4 slice set.
        await c.patch(api.path("services", ns, "web"), {"spec": {"ipFamilyPolicy": "SingleStack"}})

        async def v6_only() -> bool:
            return await slices_by_type(c, ns, "web") == {"IPv6": want["IPv6"]}
        await until(v6_only)

        # A Service without endpoints keeps one empty placeholder slice of its primary family.
        await c.create(api.path("services", ns), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "empty"},
            "spec": {"selector": {"app": "none"}, "ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6"],
                     "ports": [{"port": 80}]}})

        async def placeholder() -> bool:
            return await slices_by_type(c, ns, "empty") == {"IPv6": []}
        await until(placeholder)

    run_with_controllers(apiserver, body)


@pytest.mark.timeout(90)
def test_load_balancer_ingress_per_family(apiserver: APIServerProcess) -> None:
    async def body(c: api.Client, ns: str) -> None:
        await c.create(api.path("services", ns), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
            "spec": {"type": "LoadBalancer", "selector": {"app": "ds"}, "ipFamilyPolicy": "PreferDualStack",
                     "ports": [{"port": 80}]}})

        async def ingress() -> list[str]:
            svc = await c.get(api.path("services", ns, "lb"))
            return [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]

        async def dual() -> bool:
            return await ingress() == ["10.251.0.10", "fd00:10:251::1"]
        await until(dual)
        await c.patch(api.path("services", ns, "lb"), {"spec": {"ipFamilyPolicy": "SingleStack"}})

        async def single() -> bool:
            return await ingress() == ["10.251.0.10"]
        await until(single)
        # The freed IPv6 address goes to the next Service that wants one.
        await c.create(api.path("services", ns), {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb6"},
            "spec": {"type": "LoadBalancer", "selector": {"app": "ds"}, "ipFamilies": ["IPv6"],
                     "ports": [{"port": 80}]}})

        async def six() -> bool:
            svc = await c.get(api.path("services", ns, "lb6"))
            got = [i["ip"] for i in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]
            return got == ["fd00:10:251::1"]
        await until(six)

    run_with_controllers(apiserver, body)


def test_pool_of_both_families_is_never_listed_out() -> None:
    pool = parse_pool("10.251.0.0/30, fd00:10:251::/64")
    assert pool.families() == ["IPv4", "IPv6"]
    assert pool.size() == 2 + (2**64 - 1)
    assert "fd00:10:251::ffff" in pool and "fd00:10:252::1" not in pool and "10.251.0.3" not in pool
    assert pool.first_free("IPv6", {"fd00:10:251::1"}) == "fd00:10:251::2"
    assert pool.first_free("IPv4", {"10.251.0.1", "10.251.0.2"}) == ""
    assert "not-an-ip" not in pool
    with pytest.raises(ValueError, match="--lb-pool 10.0.0.1-fd00::1"):
        parse_pool("10.0.0.1-fd00::1")


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**32 - 64), length=st.integers(1, 40), taken=st.sets(st.integers(0, 39)))
def test_first_free_is_the_lowest_untaken(start: int, length: int, taken: set[int]) -> None:
    a = ipaddress.IPv4Address(start)
    b = ipaddress.IPv4Address(start + length - 1)
    pool = parse_pool(f"{a}-{b}")
    taken_ips = {str(ipaddress.IPv4Address(start + t)) for t in taken if t < length}
    free = [str(ipaddress.IPv4Address(start + i)) for i in range(length) if str(ipaddress.IPv4Address(start + i))
            not in taken_ips]
    assert pool.first_free("IPv4", taken_ips) == (free[0] if free else "")
    assert list(pool) == [str(ipaddress.IPv4Address(start + i)) for i in range(length)]


def test_pod_address_per_family_from_untrusted_status() -> None:
    from controlplane_stub.controllers.endpointslice import pod_ip_of_family, service_address_types

    dual = {"status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}}
    assert pod_ip_of_family(dual, "IPv6") == "fd00::1" and pod_ip_of_family(dual, "IPv4") == "10.0.0.1"
    legacy = {"status": {"podIP": "10.0.0.2"}}  # no podIPs: podIP stands for them
    assert pod_ip_of_family(legacy, "IPv4") == "10.0.0.2" and pod_ip_of_family(legacy, "IPv6") is None
    junk = {"status": {"podIPs": [{"ip": "not-an-ip"}, "x", {"ip": 7}, {"ip": "fd00::9"}]}}
    assert pod_ip_of_family(junk, "IPv6") == "fd00::9" and pod_ip_of_family(junk, "IPv4") is None
    assert service_address_types({"spec": {}}) == ["IPv4"]
    assert service_address_types({"spec": {"ipFamilies": ["IPv6", "IPv6", "IPX"]}}) == ["IPv6"]

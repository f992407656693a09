"""API semantics benchmarks (defaults, validation, allocation, tables, patch), each against a peer.

- ClusterIP allocation for 10,000 Services: ServiceAllocator (used-set + next-free cursor) against
  a first-free scan from the bottom of the range, what a naive bitmap allocator does;
- the Service create path (defaults + validation + allocation) per object, against the JSON
  decode+encode every create pays anyway;
- `kubectl get svc` on 10,000 Services: to_table() against json.dumps of the same objects;
- `kubectl set image`'s strategic merge patch against an RFC 7386 merge patch of the same body.

Run: .venv/bin/pytest bench/bench_apisem_semantics.py --benchmark-enable -s
"""
from __future__ import annotations

import copy
import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from controlplane_stub.apiserver.allocators import ServiceAllocator
from controlplane_stub.apiserver.defaults import apply_defaults
from controlplane_stub.apiserver.patch import apply_patch
from controlplane_stub.apiserver.tables import to_table
from controlplane_stub.apiserver.validation import validate_create

N = 10_000


def _service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "default", "creationTimestamp": "2026-11-23T18:00:00Z"},
            "spec": {"type": "NodePort" if i % 10 == 0 else "ClusterIP", "selector": {"app": f"app-{i}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "https", "port": 443}]}}


def _best_of(fn: Callable[[], object], runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


class _FirstFreeScan:
    """The peer: every allocation scans the range from its first address for a free one."""

    def __init__(self, cidr: str) -> None:
        net = ipaddress.ip_network(cidr)
        self.base = int(net.network_address)
        self.size = net.num_addresses
        self.used = bytearray(self.size)

    def allocate(self) -> str:
        for offset in range(1, self.size - 1):
            if not self.used[offset]:
                self.used[offset] = 1
                return str(ipaddress.ip_address(self.base + offset))
        raise RuntimeError("range is full")


def _report(what: str, ours: float, peer: float, peer_name: str) -> None:
    print(f"\n[apisem] {what}: kproxy {ours * 1e3:.1f} ms, {peer_name} {peer * 1e3:.1f} ms, "
          f"ratio {peer / ours:.1f}x")


@pytest.mark.timeout(600)
def test_bench_cluster_ip_allocation(benchmark: Any) -> None:
    def ours() -> None:
        alloc = ServiceAllocator(["10.96.0.0/12"])
        for i in range(N):
            alloc.assign({"metadata": {"name": f"s{i}"}, "spec": {"type": "ClusterIP", "ports": [{"port": 80}]}}, None)

    def peer() -> None:
        scan = _FirstFreeScan("10.96.0.0/12")
        for _ in range(N):
            scan.allocate()

    benchmark.pedantic(ours, rounds=1, iterations=1)
    t_ours, t_peer = _best_of(ours), _best_of(peer, runs=1)
    _report(f"allocate {N} ClusterIPs in 10.96.0.0/12", t_ours, t_peer, "first-free scan")
    assert t_ours < t_peer


@pytest.mark.timeout(600)
def test_bench_service_create_path(benchmark: Any) -> None:
    raw = [json.dumps(_service(i)).encode() for i in range(N)]

    def ours() -> None:
        alloc = ServiceAllocator(["10.96.0.0/12"])
        for body in raw:
            svc = json.loads(body)
            apply_defaults("services", svc)
            validate_create("services", svc)
            alloc.assign(svc, None)

    def peer() -> None:
        for body in raw:
            json.dumps(json.loads(body))

    benchmark.pedantic(ours, rounds=1, iterations=1)
    t_ours, t_peer = _best_of(ours), _best_of(peer)
    _report(f"{N} Service creates: decode + defaults + validation + allocation", t_ours, t_peer,
            "decode + encode only")
    print(f"[apisem] per create: {t_ours / N * 1e6:.0f} us of semantics+decode")
    assert t_ours / N < 0.002  # well under the ~0.8 ms CPU the whole HTTP create costs


@pytest.mark.timeout(600)
def test_bench_service_table(benchmark: Any) -> None:
    services = [_service(i) for i in range(N)]
    alloc = ServiceAllocator(["10.96.0.0/12"])
    for svc in services:
        apply_defaults("services", svc)
        alloc.assign(svc, None)

    def ours() -> None:
        json.dumps(to_table("services", services))

    def peer() -> None:
        json.dumps({"kind": "ServiceList", "apiVersion": "v1", "items": services})

    benchmark.pedantic(ours, rounds=1, iterations=1)
    t_ours, t_peer = _best_of(ours), _best_of(peer)
    _report(f"Table of {N} Services (encoded)", t_ours, t_peer, "ServiceList json.dumps")
    assert t_ours < 5 * t_peer


@pytest.mark.timeout(600)
def test_bench_set_image_patch(benchmark: Any) -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                  "spec": {"template": {"spec": {"containers": [
                      {"name": f"c{i}", "image": "img:1", "ports": [{"containerPort": 8000 + i}],
                       "env": [{"name": f"E{j}", "value": "x"} for j in range(10)]} for i in range(5)]}}}}
    smp = b'{"spec":{"template":{"spec":{"containers":[{"name":"c3","image":"img:2"}]}}}}'
    merge = json.dumps({"spec": {"template": {"spec": {"containers": copy.deepcopy(
        deployment["spec"]["template"]["spec"]["containers"])}}}}).encode()
    rounds = 2000

    def ours() -> None:
        for _ in range(rounds):
            apply_patch("application/strategic-merge-patch+json", deployment, smp, "deployments.apps")

    def peer() -> None:
        for _ in range(rounds):
            apply_patch("application/merge-patch+json", deployment, merge, "deployments.apps")

    benchmark.pedantic(ours, rounds=1, iterations=1)
    t_ours, t_peer = _best_of(ours), _best_of(peer)
    _report(f"{rounds} `kubectl set image` patches (5 containers)", t_ours, t_peer,
            "RFC 7386 merge patch carrying the whole list")
    assert t_ours < 3 * t_peer

"""iptables: what validating every field at ingestion (issue 13) costs a full sync at 10,000 Services.

Side by side in one run, alternating, best of 3 CPU times (the 2-core machine is shared):
- baseline: the ingestion as it was before the validators (kproxy/kube/ingest.py at BASELINE,
  read from git and loaded as a module of its own);
- current: kproxy.kube.ingest.
Each round decodes a 10,000-Service list and a 10,000-EndpointSlice list (10 endpoints each),
builds the records and renders the iptables proxier's full-sync restore input (no kernel: the
render is the same code for both, and the two inputs are checked to be byte-identical). Then the
current records are applied once for real into a fresh network namespace on nf_tables (the full
sync the checks are a part of), and the coexistence check a large nf_tables restore now makes
before it zeroes counters (the nat table's chain count from the kernel plus the built-in chains'
rules) is timed in that 10,000-Service table.

Run: .venv/bin/pytest bench/bench_iptables_ingest.py --benchmark-enable -s -p no:cacheprovider
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

from kproxy.backends.iptables import IPTables
from kproxy.kube import ingest
from kproxy.kube.types import ObjectList
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.iptables import IptablesProxier

N = 10_000
EPS = 10
BASELINE = "0682211"  # main just before the validators landed
ROOT = Path(__file__).resolve().parent.parent


def _baseline() -> ModuleType:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE}:kproxy/kube/ingest.py"],
                         capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("kproxy_ingest_baseline", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # msgspec resolves the Structs' annotations through it
    exec(compile(src, f"{BASELINE}:kproxy/kube/ingest.py", "exec"), mod.__dict__)  # noqa: S102 - our own code, from git
    return mod


def _bodies() -> tuple[bytes, bytes]:
    services, slices = [], []
    for i in range(N):
        name, ns = f"svc-{i}", f"ns-{i % 50}"
        vip = f"10.{96 + i // 65536}.{(i >> 8) & 255}.{i & 255}"
        services.append({
            "metadata": {"name": name, "namespace": ns, "uid": f"u-{i}", "resourceVersion": str(i + 10),
                         "labels": {"app": name}},
            "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
            "status": {"loadBalancer": {}}})
        slices.append({
            "metadata": {"name": f"{name}-abc", "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [f"10.{128 + (i >> 8) % 64}.{i & 255}.{e + 1}"], "nodeName": f"n{e}",
                           "conditions": {"ready": True}} for e in range(EPS)]})
    meta = {"resourceVersion": "99"}
    return json.dumps({"items": services, "metadata": meta}).encode(), json.dumps({"items": slices, "metadata": meta}).encode()


def _records(mod: Any, svc_body: bytes, es_body: bytes) -> SyncRequest:
    services: dict[Any, Any] = {}
    for s in msgspec.json.decode(svc_body, type=ObjectList[mod.Service]).items or []:
        services.update(mod.service_ports(s))
    endpoints: dict[Any, Any] = {}
    for es in msgspec.json.decode(es_body, type=ObjectList[mod.EndpointSlice]).items or []:
        endpoints.update(mod.slice_endpoints(es, "n0"))
    return SyncRequest(services=services, endpoints=endpoints)


class _NoKernel:
    backend = "nft"

    def save(self, table: str) -> str:
        return ""

    def chain_rules(self, table: str, chain: str) -> list[str]:
        return []


def _plan(request: SyncRequest) -> bytes:
    return IptablesProxier(_NoKernel()).plan(request, full=True).data  # type: ignore[arg-type]


def _cpu(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


@pytest.mark.timeout(900)
def test_iptables_ingest_validation_cost_10k(benchmark: Any) -> None:
    old_mod = _baseline()
    svc_body, es_body = _bodies()
    # The same restore input from both: the checks change nothing for valid objects.
    assert _plan(_records(old_mod, svc_body, es_body)) == _plan(_records(ingest, svc_body, es_body))
    best = {"old_ingest": float("inf"), "new_ingest": float("inf"), "plan": float("inf")}
    for _ in range(3):  # alternating, so both see the same neighbours
        for tag, mod in (("old", old_mod), ("new", ingest)):
            t, req = _cpu(lambda mod=mod: _records(mod, svc_body, es_body))  # type: ignore[misc]
            best[f"{tag}_ingest"] = min(best[f"{tag}_ingest"], t)
        t, _ = _cpu(lambda: _plan(req))  # type: ignore[arg-type]
        best["plan"] = min(best["plan"], t)
    request = benchmark.pedantic(lambda: _records(ingest, svc_body, es_body), rounds=1, iterations=1)

    netns = f"kptI{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    try:
        proxier = IptablesProxier(IPTables(backend="nft", netns=netns))
        t0 = time.perf_counter()
        assert proxier.sync(request).ok
        sync_wall = time.perf_counter() - t0
        stats = dict(proxier.last_plan_stats)
        check = float("inf")
        for _ in range(3):
            t1 = time.perf_counter()
            private = proxier._zero_is_private(None)
            check = min(check, time.perf_counter() - t1)
        assert private, "kproxy is alone in this namespace's nat table"
        proxier.cleanup()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=60)

    added = best["new_ingest"] - best["old_ingest"]
    pipeline = best["old_ingest"] + best["plan"]
    full_sync = best["old_ingest"] + sync_wall
    info = {
        "old_ingest_cpu_s": best["old_ingest"], "new_ingest_cpu_s": best["new_ingest"],
        "render_cpu_s": best["plan"], "added_cpu_s": added,
        "added_vs_ingest_plus_render": added / pipeline, "full_sync_wall_s": sync_wall,
        "restore_cpu_s": stats.get("restore_cpu_s", 0.0), "added_vs_full_sync": added / full_sync,
        "zero_check_wall_s": check, "zero_check_vs_full_sync": check / sync_wall,
        "load_avg": os.getloadavg(),
    }
    benchmark.extra_info.update(info)
    print(f"\niptables ingestion at {N} Services x {EPS} endpoints (CPU, best of 3, alternating): "
          f"baseline {best['old_ingest']:.2f} s, validated {best['new_ingest']:.2f} s (+{added * 1e3:.0f} ms); "
          f"render {best['plan']:.2f} s; +{100 * added / pipeline:.1f}% of ingest+render; "
          f"nft full sync {sync_wall:.2f} s wall -> +{100 * added / full_sync:.1f}% of ingest+full sync; "
          f"-Z coexistence check {check * 1e3:.0f} ms ({100 * check / sync_wall:.1f}% of the sync); "
          f"load {os.getloadavg()[0]:.1f}")
    assert added / full_sync < 0.05

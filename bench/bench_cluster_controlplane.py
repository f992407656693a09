"""Benchmarks of the one-machine cluster's control plane (section "cluster" of bench/README.md).

1. kubectl apply of a 100-replica Deployment -> 100 ready endpoints in its Service's
   EndpointSlices: on the real cluster (netns pods, one real process each) side by side with the
   same controllers over simulated node agents (pods reported Ready without processes): the
   difference is what the node runtime costs.
2. 1,000 Services x 10 pods (Deployments of 10 replicas), SIMULATED node agents (no processes):
   controller-manager CPU seconds and API write rate, against the API server's raw create rate
   from one client in the same run (the limit).

Run: .venv/bin/pytest bench/bench_cluster_controlplane.py -s  (KPC_BENCH_SERVICES=N scales bench 2)
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane_stub import client as api
from controlplane_stub.agent.simulated import SimulatedNodes
from controlplane_stub.apiserver.testing import running_apiserver
from controlplane_stub.controllers.manager import ControllerManager, ControllerOptions

BIN = Path(sys.executable).parent
Obj = dict[str, Any]


def manifest(name: str, replicas: int) -> list[Obj]:
    labels = {"app": name}
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "terminationGracePeriodSeconds": 1,
                        "containers": [
                            {
                                "name": "c",
                                "image": "busybox",
                                "command": ["sleep", "3600"],
                                "ports": [{"containerPort": 8080}],
                            }
                        ],
                    },
                },
            },
        },
    ]


async def wait_ready_endpoints(c: api.Client, ns: str, svc: str, want: int, timeout: float) -> float:
    """Seconds until the Service's EndpointSlices hold `want` ready endpoints (watch, no polling)."""
    t0 = time.monotonic()
    url = api.path("endpointslices", ns)
    params = {"labelSelector": f"kubernetes.io/service-name={svc}"}
    slices: dict[str, Obj] = {}
    items, rv = await c.list(url, params)
    for s in items:
        slices[s["metadata"]["name"]] = s

    def ready() -> int:
        return sum(1 for s in slices.values() for e in s.get("endpoints") or [] if e["conditions"]["ready"])

    async def follow() -> None:
        nonlocal rv
        while ready() < want:
            async for ev in c.watch(url, rv, params, timeout_seconds=60):
                o = ev["object"]
                rv = o["metadata"].get("resourceVersion", rv)
                if ev["type"] == "DELETED":
                    slices.pop(o["metadata"]["name"], None)
                elif ev["type"] in ("ADDED", "MODIFIED"):
                    slices[o["metadata"]["name"]] = o
                if ready() >= want:
                    return

    await asyncio.wait_for(follow(), timeout)
    return time.monotonic() - t0


def kubectl_apply(kubeconfig: str, docs: list[Obj]) -> None:
    doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    subprocess.run(
        ["kubectl", "apply", "-f", "-"],
        input=doc,
        text=True,
        check=True,
        capture_output=True,
        env=dict(os.environ, KUBECONFIG=kubeconfig),
    )


def real_cluster_apply_to_ready(replicas: int) -> float:
    name = "kpt" + secrets.token_hex(3)
    home = tempfile.mkdtemp(prefix="kpt-bench-")
    env = dict(os.environ, KPROXY_CLUSTER_HOME=home)
    kc = str(Path(home) / name / "kubeconfig")
    try:
        r = subprocess.run(
            [
                str(BIN / "kproxy-cluster"),
                "up",
                "--name",
                name,
                "--nodes",
                "3",
                "--proxy-mode",
                "none",
                "--no-dns",
                "--no-localhost-lb",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, r.stdout + r.stderr

        async def run() -> float:
            async with api.Client(api.load_kubeconfig(kc)) as c:
                t0 = time.monotonic()
                waiter = asyncio.create_task(wait_ready_endpoints(c, "default", "bench", replicas, 300))
                await asyncio.to_thread(kubectl_apply, kc, manifest("bench", replicas))
                await waiter
                return time.monotonic() - t0

        return asyncio.run(run())
    finally:
        subprocess.run(
            [str(BIN / "kproxy-cluster"), "down", "--name", name], env=env, capture_output=True, timeout=180
        )
        shutil.rmtree(home, ignore_errors=True)


def simulated_apply_to_ready(replicas: int) -> float:
    with running_apiserver() as a:

        async def run() -> float:
            cfg = api.load_kubeconfig(a.kubeconfig)
            async with api.Client(cfg) as c, api.Client(cfg) as sc:
                mgr = ControllerManager(c, ControllerOptions())
                sim = SimulatedNodes(sc, 3)
                await sim.register()
                tasks = [
                    asyncio.create_task(sim.informer.run()),
                    asyncio.create_task(sim.renew_leases()),
                    asyncio.create_task(mgr.run()),
                ]
                await mgr.opts.ready.wait()
                t0 = time.monotonic()
                waiter = asyncio.create_task(wait_ready_endpoints(c, "default", "bench", replicas, 300))
                await asyncio.to_thread(kubectl_apply, a.kubeconfig, manifest("bench", replicas))
                await waiter
                dt = time.monotonic() - t0
                for t in tasks:
                    t.cancel()
                return dt

        return asyncio.run(run())


@pytest.mark.timeout(900)
def test_bench_cluster_apply_100_replicas_to_ready_endpoints(benchmark: Any) -> None:
    if os.geteuid() != 0 or shutil.which("kubectl") is None:
        pytest.skip("needs root (netns) and kubectl")
    sim = simulated_apply_to_ready(100)
    real = benchmark.pedantic(real_cluster_apply_to_ready, args=(100,), rounds=1, iterations=1)
    benchmark.extra_info.update(real_s=round(real, 2), simulated_s=round(sim, 2), ratio=round(real / sim, 2))
    print(
        f"\n100 replicas, kubectl apply -> 100 ready endpoints: real netns pods {real:.2f} s, "
        f"simulated nodes {sim:.2f} s, ratio {real / sim:.1f}x"
    )
    assert real < 300


def proc_cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


async def current_revision(c: api.Client) -> int:
    doc = await c.get(api.path("namespaces"), {"limit": "1"})
    return int(doc["metadata"]["resourceVersion"])


@pytest.mark.timeout(1800)
def test_bench_cluster_1000_services_x_10_pods_simulated(benchmark: Any) -> None:
    services = int(os.environ.get("KPC_BENCH_SERVICES", "1000"))
    per = 10
    with running_apiserver(extra_args=["--watch-cache-size", "100000"]) as a:
        cfg = api.load_kubeconfig(a.kubeconfig)
        log = open(Path(a.data_dir) / "controllers.log", "wb")  # noqa: SIM115
        ctrl = subprocess.Popen(
            [str(BIN / "kproxy-cluster"), "_controllers", "--kubeconfig", a.kubeconfig],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            async def run() -> dict[str, float]:
                async with api.Client(cfg) as c, api.Client(cfg) as sc:
                    # The limit: raw creates from one client (64 in flight), same server, same run.
                    await c.create(
                        api.path("namespaces"),
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "raw"}},
                    )
                    n_raw = 2000
                    t0 = time.monotonic()
                    sem = asyncio.Semaphore(64)

                    async def one(i: int) -> None:
                        async with sem:
                            await c.create(
                                "/api/v1/namespaces/raw/configmaps",
                                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i}"}},
                            )

                    await asyncio.gather(*(one(i) for i in range(n_raw)))
                    raw_rate = n_raw / (time.monotonic() - t0)

                    sim = SimulatedNodes(sc, 10)
                    await sim.register()
                    sim_task = asyncio.create_task(sim.informer.run())
                    lease_task = asyncio.create_task(sim.renew_leases(every=5.0))
                    await asyncio.sleep(1.0)
                    cpu0 = proc_cpu_seconds(ctrl.pid)
                    api_cpu0 = proc_cpu_seconds(a.pid)
                    own_cpu0 = time.process_time()
                    rev0 = await current_revision(c)
                    t0 = time.monotonic()

                    async def apply(i: int) -> None:
                        async with sem:
                            for d in manifest(f"s{i}", per):
                                res = "services" if d["kind"] == "Service" else "deployments"
                                await c.create(api.path(res, "default"), d)

                    await asyncio.gather(*(apply(i) for i in range(services)))
                    t_applied = time.monotonic() - t0
                    want = services * per
                    deadline = time.monotonic() + 1500
                    ready = 0
                    while time.monotonic() < deadline:
                        assert ctrl.poll() is None, (
                            f"the controllers exited; see {a.data_dir}/controllers.log"
                        )
                        items, _ = await c.list(api.path("endpointslices", "default"), page=500)
                        ready = sum(
                            1 for s in items for e in s.get("endpoints") or [] if e["conditions"]["ready"]
                        )
                        if ready >= want:
                            break
                        await asyncio.sleep(2)
                    wall = time.monotonic() - t0
                    rev1 = await current_revision(c)
                    cpu = proc_cpu_seconds(ctrl.pid) - cpu0
                    api_cpu = proc_cpu_seconds(a.pid) - api_cpu0
                    own_cpu = time.process_time() - own_cpu0
                    sim_task.cancel()
                    lease_task.cancel()
                    total_writes = rev1 - rev0
                    # Writes not made by the controllers: our creates, the simulated agents' pod status
                    # patches and their Lease renewals (10 nodes every 5 s).
                    lease_writes = int(10 * wall / 5.0)
                    controller_writes = total_writes - 2 * services - want - lease_writes
                    return {
                        "wall_s": wall,
                        "apply_s": t_applied,
                        "ready": ready,
                        "controller_cpu_s": cpu,
                        "apiserver_cpu_s": api_cpu,
                        "bench_and_sim_cpu_s": own_cpu,
                        "total_writes": total_writes,
                        "controller_writes": controller_writes,
                        "controller_write_rate": controller_writes / wall,
                        "all_write_rate": total_writes / wall,
                        "raw_create_rate": raw_rate,
                    }

            res = benchmark.pedantic(lambda: asyncio.run(run()), rounds=1, iterations=1)
        finally:
            ctrl.terminate()
            ctrl.wait(10)
            log.close()
    benchmark.extra_info.update({k: round(v, 2) for k, v in res.items()})
    print(
        f"\n{services} Services x {per} pods (simulated nodes): all ready after {res['wall_s']:.1f} s "
        f"(creates took {res['apply_s']:.1f} s); CPU: controllers {res['controller_cpu_s']:.1f} s, "
        f"API server {res['apiserver_cpu_s']:.1f} s, simulated agents+bench {res['bench_and_sim_cpu_s']:.1f} s; "
        f"controller writes {res['controller_writes']:.0f} ({res['controller_write_rate']:.0f}/s); all writes "
        f"{res['all_write_rate']:.0f}/s vs raw create limit {res['raw_create_rate']:.0f}/s "
        f"({res['all_write_rate'] / res['raw_create_rate']:.0%})"
    )
    assert res["ready"] >= services * per

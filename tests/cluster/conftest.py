"""Fixtures for the one-machine cluster tests (helpers live in cluster_helpers.py)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import BIN, Cluster, ControlPlane, LoopThread, needs_root

from controlplane_stub import client as api
from controlplane_stub.agent.simulated import SimulatedNodes
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.controllers.manager import ControllerManager, ControllerOptions


@pytest.fixture(scope="module")
def apiserver() -> Iterator[APIServerProcess]:
    # A small watch window, so that 410 Gone and the informers' relist really happen in these tests.
    with running_apiserver(extra_args=["--watch-cache-size", "300"]) as a:
        yield a


@pytest.fixture(scope="module")
def controlplane(apiserver: APIServerProcess) -> Iterator[ControlPlane]:
    loop = LoopThread()
    cfg = api.load_kubeconfig(apiserver.kubeconfig)

    async def start() -> ControlPlane:
        c = api.Client(cfg)
        opts = ControllerOptions(
            max_endpoints_per_slice=3,
            lb_pool="10.251.0.10-10.251.0.11",
            node_grace_seconds=10.0,
            node_monitor_period=0.5,
        )
        mgr = ControllerManager(c, opts)
        sim = SimulatedNodes(api.Client(cfg), 3, prefix="sim")
        await sim.register()
        asyncio.get_running_loop().create_task(sim.informer.run())
        asyncio.get_running_loop().create_task(sim.renew_leases(every=0.5))
        asyncio.get_running_loop().create_task(mgr.run())
        await asyncio.wait_for(opts.ready.wait(), 20)
        return ControlPlane(apiserver, loop, c, mgr, sim)

    cp = loop.run(start())
    try:
        yield cp
    finally:
        try:
            loop.run(cp.client.close(), 5)
            loop.run(cp.sim.client.close(), 5)
        finally:
            loop.stop()


def _cluster(nodes: int, extra: list[str]) -> Iterator[Cluster]:
    needs_root()
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    name = "kpt" + secrets.token_hex(3)
    home = tempfile.mkdtemp(prefix="kpt-cluster-")
    env = dict(os.environ, KPROXY_CLUSTER_HOME=home)
    cmd = [
        str(BIN / "kproxy-cluster"),
        "up",
        "--name",
        name,
        "--nodes",
        str(nodes),
        "--backoff-base",
        "1",
        "--no-localhost-lb",
        "--timeout",
        "90",
        *extra,
    ]
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    c = Cluster(name, home, str(Path(home) / name / "kubeconfig"), {}, root_links)
    try:
        assert r.returncode == 0, (
            f"kproxy-cluster up failed:\n{r.stdout}\n{r.stderr}\n"
            + (Path(home) / name / "logs" / "supervisor.log").read_text()[-3000:]
        )
        c.refresh()
        yield c
    finally:
        subprocess.run(
            [str(BIN / "kproxy-cluster"), "down", "--name", name], env=env, capture_output=True, timeout=120
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """3 nodes over 2 zones: zone-a (node-1, node-3), zone-b (node-2)."""
    yield from _cluster(3, ["--zones", "2"])


@pytest.fixture(scope="module")
def small_cluster() -> Iterator[Cluster]:
    """One node and a crash-loop back-off of 1 s doubling to 2 s, for the supervision tests."""
    yield from _cluster(1, ["--backoff-cap", "2"])


@pytest.fixture(scope="module")
def dual_cluster() -> Iterator[Cluster]:
    """`up --ip-family dual`: 2 nodes (one zone), IPv4 and IPv6 everywhere, IPv4 primary."""
    yield from _cluster(2, ["--ip-family", "dual", "--zones", "0"])


@pytest.fixture(scope="module")
def ipv6_cluster() -> Iterator[Cluster]:
    """`up --ip-family ipv6`: one node, IPv6 only."""
    yield from _cluster(1, ["--ip-family", "ipv6", "--zones", "0"])

"""Fixtures for the one-machine cluster tests.

- `apiserver`: a real kproxy-apiserver process (module scope) for controller tests.
- `controlplane`: that server plus the real ControllerManager and simulated node agents
  (Nodes and pods that report Ready without processes) in a background event loop thread.
- `cluster`: a real `kproxy-cluster up` (netns nodes, real pod processes), torn down with `down`.
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
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controlplane_stub import client as api
from controlplane_stub.agent.simulated import SimulatedNodes
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.controllers.manager import ControllerManager, ControllerOptions

T = TypeVar("T")
BIN = Path(sys.executable).parent


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")


class LoopThread:
    """An asyncio loop in a thread, so that sync tests can drive async clients and controllers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> "asyncio.Future[Any]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        async def cancel_all() -> None:
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
            await asyncio.sleep(0.1)

        try:
            self.run(cancel_all(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@dataclass
class ControlPlane:
    api: APIServerProcess
    loop: LoopThread
    client: api.Client
    manager: ControllerManager
    sim: SimulatedNodes

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.loop.run(coro, timeout)

    def get(self, url: str) -> dict[str, Any]:
        return self.call(self.client.get(url))

    def items(self, url: str, **params: str) -> list[dict[str, Any]]:
        return self.call(self.client.list(url, params or None))[0]

    def create(self, url: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.call(self.client.create(url, obj))

    def patch(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.call(self.client.patch(url, body))

    def delete(self, url: str) -> None:
        self.call(self.client.delete(url))


def wait_for(cond: Callable[[], T], timeout: float = 20, interval: float = 0.1, what: str = "condition",
             dump: Callable[[], str] | None = None) -> T:
    """Polls cond until it returns something truthy (bounded in time); fails with what was last seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{dump()}" if dump is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}{extra}")


@pytest.fixture(scope="module")
def apiserver() -> Iterator[APIServerProcess]:
    # A small watch window, so that 410 Gone and the informers' relist really happen in these tests.
    with running_apiserver(extra_args=["--watch-cache-size", "300"]) as a:
        yield a


@pytest.fixture(scope="module")
def controlplane(apiserver: APIServerProcess) -> Iterator[ControlPlane]:
    loop = LoopThread()
    cfg = api.Config.from_kubeconfig(apiserver.kubeconfig)

    async def start() -> ControlPlane:
        c = api.Client(cfg)
        opts = ControllerOptions(max_endpoints_per_slice=3, lb_pool="10.251.0.10-10.251.0.11")
        mgr = ControllerManager(c, opts)
        sim = SimulatedNodes(api.Client(cfg), 3, prefix="sim")
        await sim.register()
        asyncio.get_running_loop().create_task(sim.informer.run())
        asyncio.get_running_loop().create_task(mgr.run())
        await asyncio.wait_for(opts.ready.wait(), 20)
        return ControlPlane(apiserver, loop, c, mgr, sim)

    cp = loop.run(start())
    try:
        yield cp
    finally:
        loop.stop()


# -- the real cluster -------------------------------------------------------------------------
@dataclass
class Cluster:
    name: str
    home: str
    kubeconfig: str
    state: dict[str, Any]
    root_links: str = ""

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, KUBECONFIG=self.kubeconfig, KPROXY_CLUSTER_HOME=self.home)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(["kubectl", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {r.stderr}")
        return r.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "kproxy-cluster"), *args, "--name", self.name] if args[0] != "exec" else
                              [str(BIN / "kproxy-cluster"), "exec", "--name", self.name, *args[1:]],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def refresh(self) -> None:
        self.state = json.loads((Path(self.home) / self.name / "state.json").read_text())


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    needs_root()
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    name = "kpt" + secrets.token_hex(3)
    home = tempfile.mkdtemp(prefix="kpt-cluster-")
    env = dict(os.environ, KPROXY_CLUSTER_HOME=home)
    cmd = [str(BIN / "kproxy-cluster"), "up", "--name", name, "--nodes", "3", "--backoff-base", "1", "--no-dns",
           "--no-localhost-lb", "--timeout", "90"]
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    c = Cluster(name, home, str(Path(home) / name / "kubeconfig"), {}, root_links)
    try:
        assert r.returncode == 0, f"kproxy-cluster up failed:\n{r.stdout}\n{r.stderr}\n" + \
            (Path(home) / name / "logs" / "supervisor.log").read_text()[-3000:]
        c.refresh()
        yield c
    finally:
        subprocess.run([str(BIN / "kproxy-cluster"), "down", "--name", name], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(home, ignore_errors=True)

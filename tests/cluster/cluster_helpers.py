"""Helpers for the one-machine cluster tests (a uniquely named module: every test folder has its own
conftest.py, so tests import helpers from here, never from `conftest`).

Fixtures in conftest.py:

- `apiserver`: a real kproxy-apiserver process (module scope) for controller tests.
- `controlplane`: that server plus the real ControllerManager and simulated node agents
  (Nodes and pods that report Ready without processes) in a background event loop thread.
- `cluster`: a real `kproxy-cluster up` (netns nodes, real pod processes), torn down with `down`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controlplane_stub import client as api
from controlplane_stub.agent.simulated import SimulatedNodes
from controlplane_stub.apiserver.testing import APIServerProcess
from controlplane_stub.controllers.manager import ControllerManager

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


def wait_for(
    cond: Callable[[], T],
    timeout: float = 20,
    interval: float = 0.1,
    what: str = "condition",
    dump: Callable[[], str] | None = None,
) -> T:
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

    def apply(self, doc: dict[str, Any]) -> None:
        """kubectl apply of one object."""
        r = subprocess.run(
            ["kubectl", "apply", "-f", "-"],
            input=json.dumps(doc),
            text=True,
            capture_output=True,
            env=self.env,
            check=False,
            timeout=60,
        )
        if r.returncode != 0:
            raise AssertionError(f"kubectl apply failed: {r.stderr}")

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "kproxy-cluster"), *args, "--name", self.name]
            if args[0] != "exec"
            else [str(BIN / "kproxy-cluster"), "exec", "--name", self.name, *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def refresh(self) -> None:
        self.state = json.loads((Path(self.home) / self.name / "state.json").read_text())

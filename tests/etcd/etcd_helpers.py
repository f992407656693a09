"""Helpers for the etcd tests: API servers on one etcd, and a small HTTP client."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import requests
import urllib3

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.store.etcd_process import EtcdCluster

urllib3.disable_warnings()


def etcd_args(etcd: EtcdCluster, prefix: str, *extra: str) -> list[str]:
    return ["--storage-backend", "etcd3", "--etcd-servers", etcd.endpoints, "--etcd-prefix", prefix, *extra]


@contextmanager
def apiservers(etcd: EtcdCluster, n: int, prefix: str, *extra: str) -> Iterator[list[APIServerProcess]]:
    """n kproxy-apiserver processes on one etcd prefix: one API."""
    with ExitStack() as stack:
        yield [stack.enter_context(running_apiserver(extra_args=etcd_args(etcd, prefix, *extra), storage="etcd3"))
               for _ in range(n)]


class Client:
    def __init__(self, api: APIServerProcess, timeout: float = 20.0) -> None:
        self.api = api
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {api.token}"
        self.verify: str | bool = api.ca_file or False
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        r = self.s.request(method, self.api.url + path, params=params or None, timeout=self.timeout,
                           verify=self.verify,
                           data=None if body is None else json.dumps(body),
                           headers={"Content-Type": "application/json"} if body is not None else None)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def watch(self, path: str, **params: Any) -> requests.Response:
        return self.s.get(self.api.url + path, params={"watch": "1", **params}, stream=True, timeout=self.timeout,
                          verify=self.verify)


def configmap(name: str, value: str = "v") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": value}}


def read_events(resp: requests.Response, count: int) -> list[dict[str, Any]]:
    """count watch events (bookmarks skipped) from a streaming response."""
    out: list[dict[str, Any]] = []
    for line in resp.iter_lines():
        if not line:
            continue
        ev = json.loads(line)
        if ev["type"] == "BOOKMARK":
            continue
        out.append(ev)
        if len(out) >= count:
            break
    return out

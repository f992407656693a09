"""Fixtures: a real kproxy-apiserver process on loopback (one per test module) and clients for it."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import urllib3
from apiserver_helpers import Client

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver


@pytest.fixture(scope="module", autouse=True)
def _every_backend(storage_backend: str) -> str:
    """Every test here runs on SQLite and on etcd (tests/conftest.py: storage_backend)."""
    return storage_backend


@pytest.fixture(scope="module")
def apiserver(storage_backend: str) -> Iterator[APIServerProcess]:
    urllib3.disable_warnings()
    with running_apiserver(extra_args=["--bookmark-interval", "1", "--watch-cache-size", "200"]) as api:
        yield api


@pytest.fixture(scope="module")
def admin(apiserver: APIServerProcess) -> Client:
    return Client(apiserver, apiserver.token)


@pytest.fixture
def namespace(admin: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test (deleted afterwards with everything in it)."""
    import secrets

    name = "t-" + secrets.token_hex(4)
    code, body = admin.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": name}})
    assert code == 201, body
    yield name
    admin.delete(f"/api/v1/namespaces/{name}")

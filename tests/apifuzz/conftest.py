"""The fuzz campaign's server: one real kproxy-apiserver process per module, on loopback (plain
HTTP; see apifuzz_helpers.py)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from apifuzz_helpers import FUZZ_NAMESPACE, FuzzClient

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver


@pytest.fixture(scope="module")
def fuzz_api(storage_backend: str) -> Iterator[APIServerProcess]:
    """On SQLite, then on etcd (tests/conftest.py: storage_backend; test_apifuzz_openapi.py runs
    on SQLite only unless KPROXY_TEST_STORAGE names a store)."""
    with running_apiserver(https=False) as api:
        yield api


@pytest.fixture(scope="module")
def fuzz_client(fuzz_api: APIServerProcess) -> FuzzClient:
    client = FuzzClient(fuzz_api)
    r = client.json("POST", "/api/v1/namespaces", {"metadata": {"name": FUZZ_NAMESPACE}})
    assert r.status_code == 201, r.text
    return client

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import settings

# No property here is about time: hypothesis' default 200 ms deadline per example only measures how
# loaded the shared 2-core machine is (it failed the hardening units under load). A test that sets
# its own deadline keeps it.
settings.register_profile("kproxy", deadline=None)
settings.load_profile("kproxy")


def _twins(compiled: str, pure: str) -> list[ModuleType]:
    return [importlib.import_module(compiled), importlib.import_module(pure)]


@pytest.fixture(params=["compiled", "pure"])
def kproxy_path(request: pytest.FixtureRequest) -> ModuleType:
    """Runs a test once against kproxy._fastpath and once against kproxy._purepath."""
    compiled, pure = _twins("kproxy._fastpath", "kproxy._purepath")
    return compiled if request.param == "compiled" else pure


# The modules that run on etcd by default (kubectl 1.32, the Python client, the apisem kubectl flows;
# watch semantics on etcd are tests/etcd's): doubling every server test costs ~2 CI minutes.
# KPROXY_TEST_ETCD_ALL=1 runs every module on both stores (all pass: tests/etcd/README.md).
ETCD_BY_DEFAULT = {"test_apiserver_kubectl", "test_apiserver_pyclient", "test_apisem_kubectl"}


def _storage_backends() -> list[str]:
    forced = os.environ.get("KPROXY_TEST_STORAGE")
    return [forced] if forced else ["sqlite", "etcd3"]


@pytest.fixture(scope="module", params=_storage_backends())
def storage_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The API server's store for the servers a test module starts (controlplane_stub.apiserver.testing
    reads KPROXY_TEST_STORAGE): sqlite, then etcd3 on one etcd member shared by the test process."""
    from controlplane_stub.store.etcd_process import etcd_available

    if request.param == "etcd3" and not etcd_available():
        pytest.skip("etcd is not installed (apt-get install etcd-server; ./run setup does it)")
    module = request.module.__name__.rsplit(".", 1)[-1]
    if (request.param == "etcd3" and "KPROXY_TEST_STORAGE" not in os.environ
            and not os.environ.get("KPROXY_TEST_ETCD_ALL") and module not in ETCD_BY_DEFAULT):
        pytest.skip("on etcd3 only with KPROXY_TEST_ETCD_ALL=1 (CI runs a representative subset on etcd)")
    old = os.environ.get("KPROXY_TEST_STORAGE")
    os.environ["KPROXY_TEST_STORAGE"] = request.param
    try:
        yield request.param
    finally:
        if old is None:
            os.environ.pop("KPROXY_TEST_STORAGE", None)
        else:
            os.environ["KPROXY_TEST_STORAGE"] = old

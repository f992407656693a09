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


# Every API server module runs on both stores (issue 16: "the existing API server test suite passes
# against the etcd backend too"): the etcd half costs ~1 CI minute (measured 2026-12-06: 115 tests on
# etcd in 94 s at load ~1, ~40 s of them the kubectl and Python-client modules that ran on etcd before).
# KPROXY_TEST_STORAGE=sqlite (or etcd3) runs them on one store only, for a quicker local run.


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
    old = os.environ.get("KPROXY_TEST_STORAGE")
    os.environ["KPROXY_TEST_STORAGE"] = request.param
    try:
        yield request.param
    finally:
        if old is None:
            os.environ.pop("KPROXY_TEST_STORAGE", None)
        else:
            os.environ["KPROXY_TEST_STORAGE"] = old

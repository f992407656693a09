"""Fixtures: a real etcd (Debian's etcd-server) on free loopback ports, data on tmpfs."""
from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from controlplane_stub.store.etcd_process import EtcdCluster, etcd_available, running_etcd  # noqa: E402

if not etcd_available():
    pytest.skip("etcd is not installed (apt-get install etcd-server; ./run setup does it)", allow_module_level=True)


@pytest.fixture(scope="module")
def etcd1() -> Iterator[EtcdCluster]:
    with running_etcd(1) as e:
        yield e


@pytest.fixture
def prefix() -> str:
    return "/t-" + secrets.token_hex(4)

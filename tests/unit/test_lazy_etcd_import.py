"""The SQLite API server must not load the etcd back end's gRPC client (~15 MiB of idle RSS):
controlplane_stub/store/backend.py imports it only for --storage-backend etcd3."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: this test process may already hold grpc from other tests.
PROBE = textwrap.dedent("""
    import asyncio, sys, tempfile
    from controlplane_stub.apiserver import main
    from controlplane_stub.store import backend

    async def probe(data, backend_name):
        args = main.parse_args(["--data-dir", data, "--storage-backend", backend_name,
                                "--etcd-servers", "ftp://nowhere"])
        try:
            store = await backend.open_store(args, data)
        except SystemExit as e:
            return str(e)
        await store.close()
        return type(store).__name__

    with tempfile.TemporaryDirectory() as d:
        print(asyncio.run(probe(d, sys.argv[1])))
    print("grpc" in sys.modules, "aetcd" in sys.modules)
""")


def _probe(backend_name: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, backend_name], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return out.strip().splitlines()


def test_sqlite_server_does_not_import_grpc() -> None:
    opened, loaded = _probe("sqlite")
    assert opened == "SQLiteStore"
    assert loaded == "False False", "the SQLite API server imported grpc/aetcd"


def test_etcd3_backend_still_imports_its_client() -> None:
    # The counter-check: the probe can see the import when it happens (the bad URL fails after it).
    failed, loaded = _probe("etcd3")
    assert "--etcd-servers 'ftp://nowhere'" in failed
    assert loaded == "True True"

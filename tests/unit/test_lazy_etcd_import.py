"""The SQLite API server must not load the etcd back end's client: controlplane_stub/store/backend.py
imports it only for --storage-backend etcd3. And the etcd back end loads neither grpc nor protobuf
(nor aetcd, which imports both: ~20 MiB of RSS): its client is grpc_h2.py and etcd_wire.py."""
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
    print("controlplane_stub.store.etcd_client" in sys.modules,
          sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("grpc", "aetcd", "google")}))
""")


def _probe(backend_name: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, backend_name], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return out.strip().splitlines()


def test_sqlite_server_does_not_import_grpc() -> None:
    opened, loaded = _probe("sqlite")
    assert opened == "SQLiteStore"
    assert loaded == "False []", "the SQLite API server imported the etcd client or grpc/protobuf/aetcd"


def test_etcd3_backend_imports_its_client_without_grpc_or_protobuf() -> None:
    # The client's import is the counter-check: the probe sees imports (the bad URL fails after it).
    failed, loaded = _probe("etcd3")
    assert "--etcd-servers 'ftp://nowhere'" in failed
    assert loaded == "True []", "the etcd back end imported grpc, protobuf (google) or aetcd"

"""The control plane's client (controlplane_stub.client over kproxy.kube) with a kubeconfig whose
CA, client certificate and key are inline (*-data): a real TLS handshake with client-certificate
auth on loopback, and no file of that data written anywhere (they went through temporary files
that were never removed, later through a temporary directory; now through memory files)."""
from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers.tls import mtls_nodes_server, write_kubeconfig

from controlplane_stub import client as api
from kproxy.kube.kubeconfig import KubeConfigError


def _self_signed(tmp: Path, cn: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, by the openssl tool."""
    cert, key = tmp / f"{cn}.crt", tmp / f"{cn}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert.read_bytes(), key.read_bytes()


@pytest.mark.timeout(60)
def test_inline_certificates_authenticate_and_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    srv_cert, srv_key = _self_signed(certs, "server")
    cli_cert, cli_key = _self_signed(certs, "client")
    (certs / "trust.crt").write_bytes(cli_cert)
    scratch = tmp_path / "tmp"  # the client's temporary files land here, if it writes any
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731

    def kubeconfig(url: str, user: dict[str, object]) -> str:
        return write_kubeconfig(tmp_path / "kubeconfig", {"server": url, "certificate-authority-data": b64(srv_cert)},
                                user)

    async def main() -> None:
        async with mtls_nodes_server(certs / "trust.crt", certs / "server.crt", certs / "server.key") as (url, seen):
            cfg = api.load_kubeconfig(kubeconfig(url, {"client-certificate-data": b64(cli_cert),
                                                       "client-key-data": b64(cli_key)}))
            assert cfg.client_cert_file == cfg.client_key_file == cfg.ca_file == ""  # the data stays in memory
            c = api.Client(cfg)
            try:
                items, _ = await c.list(api.path("nodes"))
                assert items == []
            finally:
                await c.close()
            assert seen == ["client"]
            # The server's key as the client's: the chain does not load, said as a kubeconfig error.
            bad = api.load_kubeconfig(kubeconfig(url, {"client-certificate-data": b64(cli_cert),
                                                       "client-key-data": b64(srv_key)}))
            with pytest.raises(KubeConfigError, match="cannot load client certificate/key"):
                bad.ssl_context()

    asyncio.run(main())
    assert os.listdir(scratch) == []
    # and nothing of the key anywhere under the test's own directories but where the test put it
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != certs and cli_key in p.read_bytes()]
    assert leaked == []

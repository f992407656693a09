"""The client's TLS settings against a real TLS handshake on loopback: server verified with the
kubeconfig's CA (or not, with insecure-skip-tls-verify), client certificate presented from
*-data fields. The HTTPS endpoint: tests/helpers/tls.py."""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.tls import mtls_nodes_server, write_kubeconfig

from kproxy.kube.client import ApiClient
from kproxy.kube.kubeconfig import load_kubeconfig

Pem = tuple[bytes, bytes]


def _issue(cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, server: bool = False,
           is_ca: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .issuer_name(ca[0].subject if ca else subject)
         .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("kubernetes")]), critical=False)
    return b.sign(ca[1] if ca else key, hashes.SHA256()), key


def _pem(c: x509.Certificate, k: ec.EllipticCurvePrivateKey) -> Pem:
    return (c.public_bytes(serialization.Encoding.PEM),
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.mark.timeout(30)
def test_ca_verification_and_client_certificate(tmp_path: Path) -> None:
    ca = _issue("test-ca", None, is_ca=True)
    srv_cert, srv_key = _pem(*_issue("kubernetes", ca, server=True))
    cli_cert, cli_key = _pem(*_issue("system:kube-proxy", ca))
    other_ca = _issue("other-ca", None, is_ca=True)
    for name, data in (("srv.crt", srv_cert), ("srv.key", srv_key), ("ca.crt", _pem(*ca)[0])):
        (tmp_path / name).write_bytes(data)

    def kubeconfig(name: str, cluster: dict[str, object], user: dict[str, object]) -> str:
        return write_kubeconfig(tmp_path / name, cluster, user)

    b64 = lambda b: base64.b64encode(b).decode()

    async def main() -> None:
        async with mtls_nodes_server(tmp_path / "ca.crt", tmp_path / "srv.crt", tmp_path / "srv.key") as (url, seen):
            good = kubeconfig("good", {"server": url, "certificate-authority-data": b64(_pem(*ca)[0])},
                              {"client-certificate-data": b64(cli_cert), "client-key-data": b64(cli_key)})
            async with ApiClient(load_kubeconfig(good)) as c:
                assert b'"NodeList"' in await c.get("/api/v1/nodes")
            assert seen == ["system:kube-proxy"]

            # tls-server-name: the certificate is checked against that name instead of the IP.
            named = kubeconfig("named", {"server": url, "certificate-authority-data": b64(_pem(*ca)[0]),
                                         "tls-server-name": "kubernetes"},
                               {"client-certificate-data": b64(cli_cert), "client-key-data": b64(cli_key)})
            async with ApiClient(load_kubeconfig(named)) as c:
                await c.get("/api/v1/nodes")

            wrong_ca = kubeconfig("wrong", {"server": url, "certificate-authority-data": b64(_pem(*other_ca)[0])},
                                  {"client-certificate-data": b64(cli_cert), "client-key-data": b64(cli_key)})
            async with ApiClient(load_kubeconfig(wrong_ca)) as c:
                with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                    await c.get("/api/v1/nodes")

            insecure = kubeconfig("insecure", {"server": url, "insecure-skip-tls-verify": True},
                                  {"client-certificate-data": b64(cli_cert), "client-key-data": b64(cli_key)})
            async with ApiClient(load_kubeconfig(insecure)) as c:
                await c.get("/api/v1/nodes")

            no_cert = kubeconfig("nocert", {"server": url, "certificate-authority-data": b64(_pem(*ca)[0])},
                                 {"token": "t"})
            async with ApiClient(load_kubeconfig(no_cert)) as c:
                with pytest.raises(Exception):  # noqa: B017 - the server aborts the handshake
                    await c.get("/api/v1/nodes")
            assert seen == ["system:kube-proxy"] * 3

    asyncio.run(main())

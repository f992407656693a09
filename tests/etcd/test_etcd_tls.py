"""--etcd-cafile/--etcd-certfile/--etcd-keyfile: etcd serving TLS and requiring client certificates."""
from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from etcd_helpers import Client, configmap

from controlplane_stub.apiserver.testing import running_apiserver
from controlplane_stub.store.etcd_process import running_etcd


def _cert(d: str, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
          usages: list[x509.ObjectIdentifier]) -> tuple[str, str, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca[0].subject if ca else subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    if ca is None:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False).add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    cert = b.sign(ca[1] if ca else key, hashes.SHA256())
    crt_path, key_path = os.path.join(d, f"{name}.crt"), os.path.join(d, f"{name}.key")
    with open(crt_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return crt_path, key_path, cert, key


def test_api_server_on_etcd_with_tls_and_client_certificates() -> None:
    with tempfile.TemporaryDirectory() as d:
        ca_crt, _, ca_cert, ca_key = _cert(d, "ca", None, [])
        srv_crt, srv_key, _, _ = _cert(d, "etcd", (ca_cert, ca_key),
                                       [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        cli_crt, cli_key, _, _ = _cert(d, "apiserver-etcd-client", (ca_cert, ca_key), [ExtendedKeyUsageOID.CLIENT_AUTH])
        with running_etcd(1, tls=(ca_crt, srv_crt, srv_key)) as etcd:
            assert etcd.urls[0].startswith("https://")
            args = ["--storage-backend", "etcd3", "--etcd-servers", etcd.endpoints, "--etcd-cafile", ca_crt,
                    "--etcd-certfile", cli_crt, "--etcd-keyfile", cli_key]
            with running_apiserver(extra_args=args, storage="etcd3") as api:
                c = Client(api)
                code, obj = c.call("POST", "/api/v1/namespaces/default/configmaps", configmap("over-tls"))
                assert code == 201, obj
                code, got = c.call("GET", "/api/v1/namespaces/default/configmaps/over-tls")
                assert code == 200 and got["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]
            # A key without its certificate is refused before anything connects: one line, exit 1.
            import subprocess
            import sys

            bad = subprocess.run([sys.executable, "-c", "import sys; from controlplane_stub.apiserver.main import main;"
                                  " sys.exit(main())", "--data-dir", d + "/api", "--secure-port", "0",
                                  *args[:6], "--etcd-keyfile", cli_key], capture_output=True, text=True, timeout=60)
            assert bad.returncode == 1 and "--etcd-certfile and --etcd-keyfile go together" in bad.stderr, bad.stderr

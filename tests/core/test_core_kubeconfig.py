"""kubeconfig loading as clientcmd does it, and the in-cluster service account."""
from __future__ import annotations

import base64
import datetime as dt
import ssl
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kproxy.kube.kubeconfig import KubeConfigError, TokenSource, in_cluster, load_kubeconfig, resolve_access


def _cert() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "system:kube-proxy")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _write(path: Path, doc: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _doc(cluster: dict[str, object], user: dict[str, object], ctx: str = "c1") -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Config", "current-context": ctx,
            "contexts": [{"name": "c1", "context": {"cluster": "k", "user": "u", "namespace": "kube-system"}}],
            "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}]}


def test_token_ca_data_client_cert_data(tmp_path: Path) -> None:
    cert, key = _cert()
    b64 = lambda b: base64.b64encode(b).decode()
    kc = _write(tmp_path / "kc", _doc(
        {"server": "https://10.0.0.1:6443/", "certificate-authority-data": b64(cert)},
        {"token": "abc", "client-certificate-data": b64(cert), "client-key-data": b64(key)}))
    a = load_kubeconfig(str(kc))
    assert a.server == "https://10.0.0.1:6443" and a.namespace == "kube-system"
    assert a.auth_header() == "Bearer abc"
    ctx = a.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.get_ca_certs()[0]["subject"] == ((("commonName", "system:kube-proxy"),),)
    # --master overrides the file's server.
    assert load_kubeconfig(str(kc), master="https://127.0.0.1:7443").server == "https://127.0.0.1:7443"


def test_relative_files_token_file_and_insecure(tmp_path: Path) -> None:
    cert, key = _cert()
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "client.crt").write_bytes(cert)
    (tmp_path / "pki" / "client.key").write_bytes(key)
    (tmp_path / "token").write_text("t1\n")
    kc = _write(tmp_path / "kc", _doc({"server": "https://h:1", "insecure-skip-tls-verify": True},
                                      {"tokenFile": "token", "client-certificate": "pki/client.crt",
                                       "client-key": "pki/client.key"}))
    a = load_kubeconfig(str(kc))
    assert a.client_cert_file == str(tmp_path / "pki" / "client.crt")
    ctx = a.ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert a.auth_header() == "Bearer t1"
    # Rotated token files are picked up once the reload interval has passed.
    src = TokenSource(token_file=str(tmp_path / "token"), reload_after=0.0)
    assert src.token() == "t1"
    (tmp_path / "token").write_text("t2")
    assert src.token() == "t2"


def test_kubeconfig_env_merge_first_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _write(tmp_path / "a", {"current-context": "c1", "users": [{"name": "u", "user": {"token": "first"}}]})
    second = _write(tmp_path / "b", _doc({"server": "http://127.0.0.1:8080"}, {"token": "second"}, ctx="other"))
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{first}:{second}")
    a = load_kubeconfig(None)
    assert a.server == "http://127.0.0.1:8080" and a.auth_header() == "Bearer first"
    assert a.ssl_context() is None  # plain http


@pytest.mark.parametrize("doc,needle", [
    ({"current-context": "nope"}, "no context named 'nope'"),
    ({"current-context": "c1", "contexts": [{"name": "c1", "context": {"cluster": "k"}}],
      "clusters": [{"name": "k", "cluster": {}}]}, "cluster 'k' has no server"),
    ({}, "no current-context set"),
])
def test_kubeconfig_errors(tmp_path: Path, doc: dict[str, object], needle: str) -> None:
    with pytest.raises(KubeConfigError, match=needle):
        load_kubeconfig(str(_write(tmp_path / "kc", doc)))
    (tmp_path / "broken").write_text("clusters: [")
    with pytest.raises(KubeConfigError, match="not valid YAML"):
        load_kubeconfig(str(tmp_path / "broken"))


def test_in_cluster_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST/PORT unset"):
        resolve_access("", "")
    assert resolve_access("", "http://127.0.0.1:8080").server == "http://127.0.0.1:8080"
    cert, _ = _cert()
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "namespace").write_text("kube-system")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    a = in_cluster(tmp_path)
    assert a.server == "https://[fd00::1]:443" and a.auth_header() == "Bearer sa-token"
    assert a.namespace == "kube-system" and a.ca_file == str(tmp_path / "ca.crt")

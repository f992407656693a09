"""First-start credentials: a CA, a serving certificate, a token file and kubeconfigs.

Everything is created once in the data directory and reused on later starts, so kubeconfigs handed
out stay valid across restarts.
"""
from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets
import socket
from dataclasses import dataclass

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ADMIN_GROUP = "system:masters"


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def secure_data_dir(path: str) -> None:
    """The data directory holds the store (every Secret), the CA key and the tokens: it becomes
    0700 and every file in it 0600, also what an older version left readable; the process umask
    becomes 077 so that what the server writes later (SQLite's -wal/-shm, kubeconfigs) is private too."""
    os.umask(0o077)
    os.makedirs(path, mode=0o700, exist_ok=True)
    for root, _, files in os.walk(path):
        os.chmod(root, 0o700)
        for name in files:
            file_path = os.path.join(root, name)
            if not os.path.islink(file_path):  # a link's target may be anything, anywhere
                os.chmod(file_path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_certs(pki_dir: str, sans: list[str]) -> tuple[str, str, str]:
    """Returns (ca.crt, apiserver.crt, apiserver.key) paths, creating what is missing."""
    os.makedirs(pki_dir, exist_ok=True)
    ca_crt, ca_key = os.path.join(pki_dir, "ca.crt"), os.path.join(pki_dir, "ca.key")
    crt, key = os.path.join(pki_dir, "apiserver.crt"), os.path.join(pki_dir, "apiserver.key")
    now = datetime.datetime.now(datetime.UTC)
    if not (os.path.exists(ca_crt) and os.path.exists(ca_key)):
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kproxy-ca")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(k, hashes.SHA256())
        )
        _write_private(ca_key, _key_pem(k))
        with open(ca_crt, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        for stale in (crt, key):
            if os.path.exists(stale):
                os.unlink(stale)
    if not (os.path.exists(crt) and os.path.exists(key)) or not _covers(crt, sans):
        with open(ca_key, "rb") as f:
            ca_k = serialization.load_pem_private_key(f.read(), None)
        with open(ca_crt, "rb") as f:
            ca_c = x509.load_pem_x509_certificate(f.read())
        assert isinstance(ca_k, ec.EllipticCurvePrivateKey)
        k = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for s in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                alt.append(x509.DNSName(s))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_c.subject).public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_k, hashes.SHA256())
        )
        _write_private(key, _key_pem(k))
        with open(crt, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    return ca_crt, crt, key


def _covers(crt: str, sans: list[str]) -> bool:
    with open(crt, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    have = {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(ext.get_values_for_type(x509.DNSName))
    return set(sans) <= have


def default_sans(extra: list[str]) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local", socket.gethostname()]
    for e in extra:
        if e and e not in names and e not in ("0.0.0.0", "::"):
            names.append(e)
    return names


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: str
    groups: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return ADMIN_GROUP in self.groups


def ensure_token_file(path: str) -> None:
    """kube-apiserver's --token-auth-file format: token,user,uid,"group1,group2"."""
    if os.path.exists(path):
        return
    lines = [
        f'{secrets.token_urlsafe(32)},admin,admin,"{ADMIN_GROUP}"',
        f'{secrets.token_urlsafe(32)},kproxy-readonly,kproxy-readonly,"system:readonly"',
    ]
    _write_private(path, ("\n".join(lines) + "\n").encode())


def load_tokens(path: str) -> dict[str, User]:
    users: dict[str, User] = {}
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(",", 3)
            if len(parts) < 3:
                raise ValueError(f"{path}:{n}: want token,user,uid[,\"groups\"]")
            groups = tuple(g for g in parts[3].strip('"').split(",") if g) if len(parts) == 4 else ()
            users[parts[0]] = User(parts[1], parts[2], groups)
    return users


def token_for(users: dict[str, User], admin: bool) -> str:
    for token, user in users.items():
        if user.is_admin == admin:
            return token
    raise LookupError("no admin token" if admin else "no read-only token")


def write_kubeconfig(path: str, server: str, ca_crt: str | None, token: str, user: str) -> None:
    cluster: dict[str, object] = {"server": server}
    if ca_crt:
        with open(ca_crt, "rb") as f:
            cluster["certificate-authority-data"] = base64.b64encode(f.read()).decode()
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kproxy", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": f"{user}@kproxy", "context": {"cluster": "kproxy", "user": user,
                                                              "namespace": "default"}}],
        "current-context": f"{user}@kproxy",
        "preferences": {},
    }
    _write_private(path, yaml.safe_dump(cfg, sort_keys=False).encode())

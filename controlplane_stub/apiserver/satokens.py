"""ServiceAccount tokens: signed JWTs issued by TokenRequest and by the legacy token Secrets, and
their authentication as `system:serviceaccount:NS:NAME`.

Behaviour read from kubernetes/pkg/serviceaccount (jwt.go, claims.go, legacy.go),
pkg/registry/core/serviceaccount/storage/token.go (TokenRequest) and
pkg/controller/serviceaccount/tokens_controller.go (legacy Secrets):

- A TokenRequest token carries iss (the first --service-account-issuer), sub, aud (the request's
  audiences, else --api-audiences), iat, nbf, exp, jti and the private claim "kubernetes.io"
  {namespace, serviceaccount{name, uid}, and the bound Pod or Secret{name, uid} if any}. It is
  valid while it has not expired and while the ServiceAccount (and the bound object) with those
  uids exists: deleting the ServiceAccount revokes every token issued for it.
- A legacy token (iss "kubernetes/serviceaccount", no exp, no aud) is valid while its Secret exists
  and still holds exactly that token, and while the ServiceAccount with its uid exists.
- Every part of a presented token is checked before anything in it is trusted: its size, the
  base64url alphabet, the header (alg must be the one of a configured key: no "none", no HMAC, no
  RS/ES confusion; no "crit"), the signature, then the claims' types, lengths, issuer, audience,
  exp/nbf (60 s leeway as go-jose's) and names. A token that fails any check authenticates nobody.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from .pki import User

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
LEGACY_ISSUER = "kubernetes/serviceaccount"
SA_PREFIX = "system:serviceaccount:"
SA_GROUP = "system:serviceaccounts"
AUTHENTICATED = "system:authenticated"

# TokenRequest bounds (upstream's validation of spec.expirationSeconds).
MIN_EXPIRATION = 600
MAX_EXPIRATION = 1 << 32
DEFAULT_EXPIRATION = 3600
LEEWAY = 60  # seconds of clock skew accepted on exp/nbf/iat (go-jose's DefaultLeeway)

# A presented token is refused before any decoding when it is larger than this: the signed
# tokens issued here are under 1.5 KiB; nothing legitimate comes close.
MAX_TOKEN_BYTES = 8192
_MAX_HEADER_BYTES = 1024
_MAX_AUDIENCES = 32
_MAX_STR = 253  # a DNS subdomain: namespaces, names; uids are 36
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

SECRET_TYPE = "kubernetes.io/service-account-token"
SA_NAME_ANNOTATION = "kubernetes.io/service-account.name"
SA_UID_ANNOTATION = "kubernetes.io/service-account.uid"


class TokenError(ValueError):
    """A token that authenticates nobody; the message says why (logged, never sent to the client)."""


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError(f"{what}: not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"{what}: not base64url") from None


def _alg(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("RSA keys must have at least 2048 bits")
        return "RS256"
    if key.curve.name == "secp256r1":
        return "ES256"
    if key.curve.name == "secp384r1":
        return "ES384"
    if key.curve.name == "secp521r1":
        return "ES512"
    raise ValueError(f"unsupported elliptic curve {key.curve.name}")


_EC_HASH = {"ES256": (hashes.SHA256, 32), "ES384": (hashes.SHA384, 48), "ES512": (hashes.SHA512, 66)}


def key_id(key: PublicKey) -> str:
    """As upstream's keyIDFromPublicKey: base64url(sha256(PKIX DER of the public key))."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _b64e(hashlib.sha256(der).digest())


@dataclass(frozen=True, slots=True)
class VerifyKey:
    key: PublicKey
    alg: str
    kid: str

    @classmethod
    def of(cls, key: PublicKey) -> VerifyKey:
        return cls(key, _alg(key), key_id(key))

    def verify(self, alg: str, signed: bytes, sig: bytes) -> bool:
        if alg != self.alg:
            return False
        try:
            if isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
            else:
                h, size = _EC_HASH[alg]
                if len(sig) != 2 * size:  # JWS ECDSA signatures are r || s, fixed width (RFC 7518 3.4)
                    return False
                r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
                self.key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(h()))
        except InvalidSignature:
            return False
        return True


class Signer:
    def __init__(self, key: PrivateKey) -> None:
        self.key = key
        self.public = VerifyKey.of(key.public_key())

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"alg": self.public.alg, "kid": self.public.kid}
        signing_input = (_b64e(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64e(json.dumps(claims, separators=(",", ":")).encode()))
        data = signing_input.encode("ascii")
        if isinstance(self.key, rsa.RSAPrivateKey):
            sig = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        else:
            h, size = _EC_HASH[self.public.alg]
            r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(h())))
            sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return signing_input + "." + _b64e(sig)


# -- keys from files ---------------------------------------------------------------------------------


def load_private_key(path: str) -> PrivateKey:
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{path}: want an RSA or ECDSA key")  # noqa: TRY004 - a bad file, reported as such
    _alg(key.public_key())
    return key


def load_public_keys(path: str) -> list[PublicKey]:
    """Every PEM public key, certificate or private key in the file (as --service-account-key-file)."""
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read()
    keys: list[PublicKey] = []
    for m in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", data, re.DOTALL):
        pem, label = m.group(0), m.group(1)
        try:
            if label == b"CERTIFICATE":
                pub: object = x509.load_pem_x509_certificate(pem).public_key()
            elif label.endswith(b"PRIVATE KEY"):
                pub = serialization.load_pem_private_key(pem, None).public_key()
            else:
                pub = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: a {label.decode()} block does not parse ({e})") from None
        if not isinstance(pub, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
            raise ValueError(f"{path}: want RSA or ECDSA keys")  # noqa: TRY004 - a bad file, reported as such
        _alg(pub)
        keys.append(pub)
    if not keys:
        raise ValueError(f"{path}: no PEM public key, certificate or private key in it")
    return keys


def ensure_signing_key(path: str) -> None:
    """The API server's own service-account key (ECDSA P-256), made on first start beside the CA."""
    if os.path.exists(path):
        return
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


# -- claims --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says; checked against the store before it authenticates anyone."""

    namespace: str
    name: str
    uid: str  # the ServiceAccount's uid ("" in a legacy token that had none)
    secret: Ref | None = None  # legacy: its Secret; bound: the Secret it is bound to
    pod: Ref | None = None
    legacy: bool = False

    @property
    def user(self) -> User:
        return User(f"{SA_PREFIX}{self.namespace}:{self.name}", self.uid,
                    (SA_GROUP, f"{SA_GROUP}:{self.namespace}", AUTHENTICATED))


def _str(v: object, what: str, *, required: bool = True, limit: int = _MAX_STR) -> str:
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v) or len(v) > limit:
        raise TokenError(f"{what}: want a string of 1 to {limit} characters")
    return v


_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def _name(v: object, what: str) -> str:
    s = _str(v, what)
    if not _NAME.fullmatch(s):
        raise TokenError(f"{what}: not a Kubernetes name")
    return s


def _int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 62:
        raise TokenError(f"{what}: want a NumericDate")
    return v


def _ref(v: object, what: str) -> Ref | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise TokenError(f"{what}: want an object")
    return Ref(_name(v.get("name"), f"{what}.name"), _str(v.get("uid"), f"{what}.uid", limit=64))


class TokenAuthority:
    """Issues and verifies service-account tokens with the API server's keys."""

    def __init__(self, signer: Signer | None, verify_keys: Iterable[PublicKey], issuers: list[str],
                 audiences: list[str], max_expiration: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        if not issuers:
            raise ValueError("at least one --service-account-issuer is required")
        self.signer = signer
        keys = [VerifyKey.of(k) for k in verify_keys]
        if signer is not None and signer.public.kid not in {k.kid for k in keys}:
            keys.append(signer.public)
        self.keys = keys
        self.issuers = issuers
        self.audiences = audiences or issuers[:1]
        self.max_expiration = max_expiration
        self.clock = clock

    # -- issuing --

    def issue(self, namespace: str, name: str, uid: str, audiences: list[str], expiration: int,
              bound: tuple[str, Ref] | None = None) -> tuple[str, int]:
        """A TokenRequest token and its exp (Unix seconds)."""
        if self.signer is None:
            raise TokenError("no --service-account-signing-key-file: this server cannot issue tokens")
        now = int(self.clock())
        exp = now + expiration
        private: dict[str, Any] = {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}}
        if bound is not None:
            private[bound[0].lower()] = {"name": bound[1].name, "uid": bound[1].uid}
        claims = {"aud": audiences, "exp": exp, "iat": now, "iss": self.issuers[0], "jti": str(uuid.uuid4()),
                  "kubernetes.io": private, "nbf": now, "sub": f"{SA_PREFIX}{namespace}:{name}"}
        return self.signer.sign(claims), exp

    def issue_legacy(self, namespace: str, name: str, uid: str, secret_name: str) -> str:
        if self.signer is None:
            raise TokenError("no --service-account-signing-key-file: this server cannot issue tokens")
        return self.signer.sign({
            "iss": LEGACY_ISSUER,
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/secret.name": secret_name,
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
            "sub": f"{SA_PREFIX}{namespace}:{name}",
        })

    # -- verifying --

    def verify(self, token: str) -> Claims:
        """The claims of a token signed by one of our keys and currently valid; TokenError if not.
        The caller still checks that the objects it names exist (lookup())."""
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError("token too large")
        if not _COMPACT.fullmatch(token):  # also keeps every later step in ASCII
            raise TokenError("not a JWS compact serialization")
        parts = token.split(".")
        if len(parts[0]) > _MAX_HEADER_BYTES:
            raise TokenError("header too large")
        header = _json(_b64d(parts[0], "header"), "header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in {k.alg for k in self.keys}:
            raise TokenError(f"alg {str(alg)[:16]!r} is not one of this server's keys'")
        if "crit" in header:
            raise TokenError("crit header parameters are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("kid: want a string")
        sig = _b64d(parts[2], "signature")
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        # A kid, when given, picks the key; else every key of that alg is tried (upstream's way).
        candidates = [k for k in self.keys if k.kid == kid] if kid else self.keys
        if not any(k.verify(alg, signed, sig) for k in candidates):
            raise TokenError("signature does not verify with any service-account key")
        return self._claims(_json(_b64d(parts[1], "payload"), "payload"))

    def _claims(self, c: dict[str, Any]) -> Claims:
        iss = c.get("iss")
        if iss == LEGACY_ISSUER:
            return self._legacy_claims(c)
        if not isinstance(iss, str) or iss not in self.issuers:
            raise TokenError("issuer not accepted")
        aud = c.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if (not isinstance(auds, list) or not 0 < len(auds) <= _MAX_AUDIENCES
                or not all(isinstance(a, str) and 0 < len(a) <= 1024 for a in auds)):
            raise TokenError("aud: want 1 to 32 strings")
        if not set(auds) & set(self.audiences):
            raise TokenError("token audiences are not this server's")
        now = int(self.clock())
        if "exp" not in c:
            raise TokenError("exp: required")
        if now > _int(c["exp"], "exp") + LEEWAY:
            raise TokenError("token has expired")
        if "nbf" in c and now + LEEWAY < _int(c["nbf"], "nbf"):
            raise TokenError("token is not valid yet")
        if "iat" in c and now + LEEWAY < _int(c["iat"], "iat"):
            raise TokenError("token issued in the future")
        private = c.get("kubernetes.io")
        if not isinstance(private, dict):
            raise TokenError("kubernetes.io: want an object")
        ns = _name(private.get("namespace"), "kubernetes.io.namespace")
        sa = private.get("serviceaccount")
        if not isinstance(sa, dict):
            raise TokenError("kubernetes.io.serviceaccount: want an object")
        name = _name(sa.get("name"), "kubernetes.io.serviceaccount.name")
        uid = _str(sa.get("uid"), "kubernetes.io.serviceaccount.uid", limit=64)
        if c.get("sub") != f"{SA_PREFIX}{ns}:{name}":
            raise TokenError("sub does not match the kubernetes.io claim")
        return Claims(ns, name, uid, secret=_ref(private.get("secret"), "kubernetes.io.secret"),
                      pod=_ref(private.get("pod"), "kubernetes.io.pod"))

    @staticmethod
    def _legacy_claims(c: dict[str, Any]) -> Claims:
        p = "kubernetes.io/serviceaccount/"
        ns = _name(c.get(p + "namespace"), "namespace")
        name = _name(c.get(p + "service-account.name"), "service-account.name")
        uid = _str(c.get(p + "service-account.uid"), "service-account.uid", required=False, limit=64)
        secret = _name(c.get(p + "secret.name"), "secret.name")
        if c.get("sub") != f"{SA_PREFIX}{ns}:{name}":
            raise TokenError("sub does not match the service account claims")
        return Claims(ns, name, uid, secret=Ref(secret, ""), legacy=True)


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        v = json.loads(raw)
    except (ValueError, RecursionError):
        raise TokenError(f"{what}: not JSON") from None
    if not isinstance(v, dict):
        raise TokenError(f"{what}: want a JSON object")
    return v


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and len(token) <= MAX_TOKEN_BYTES

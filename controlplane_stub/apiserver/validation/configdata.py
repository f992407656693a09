"""ConfigMaps and Secrets: data keys, sizes, base64, immutability.
"""
from __future__ import annotations

from ..errors import StatusError
from .fielderrors import FieldErrors, Obj
from .meta import _obj, validate_object_meta
from .names import is_config_map_key, is_dns1123_subdomain


def _validate_data_keys(errs: FieldErrors, obj: Obj, fields: tuple[str, ...]) -> None:
    seen: dict[str, str] = {}
    for fname in fields:
        data = obj.get(fname)
        if not isinstance(data, dict):
            continue
        for key in data:
            for msg in is_config_map_key(key):
                errs.invalid(f"{fname}[{key}]", key, msg)
            if key in seen:
                errs.invalid(f"{fname}[{key}]", key, f"duplicate of key present in {seen[key]}")
            seen[key] = fname


def _immutable_data(errs: FieldErrors, obj: Obj, old: Obj, fields: tuple[str, ...]) -> None:
    if old.get("immutable") is not True:
        return
    if obj.get("immutable") is not True:
        errs.forbidden("immutable", "field is immutable when `immutable` is set")
    for fname in fields:
        if (obj.get(fname) or {}) != (old.get(fname) or {}):
            errs.forbidden(fname, "field is immutable when `immutable` is set")


def _validate_configmap(errs: FieldErrors, cm: Obj) -> None:
    validate_object_meta(errs, cm.get("metadata"), True, is_dns1123_subdomain)
    _validate_data_keys(errs, cm, ("data", "binaryData"))
    size = sum(len(k) + len(str(v)) for f in ("data", "binaryData") for k, v in (cm.get(f) or {}).items())
    if size > 1024 * 1024:
        errs.too_long("", 1024 * 1024)


_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def base64_error_offset(value: str) -> int | None:
    """Where Go's base64.StdEncoding gives up on value ("illegal base64 data at input byte N")."""
    body = value.rstrip("=")
    padding = len(value) - len(body)
    for i, ch in enumerate(body):
        if ch not in _B64:
            return i
    if padding > 2 or len(value) % 4:
        return len(value) - len(value) % 4 if len(value) % 4 else len(body)
    if padding and len(body) % 4 == 1:
        return len(body)
    return None


def _decode_secret_data(secret: Obj) -> None:
    """Secret.data values are base64; a bad one fails decoding (400) before validation."""
    for value in _obj(secret.get("data")).values():
        offset = base64_error_offset(value) if isinstance(value, str) else 0
        if offset is not None:
            raise StatusError(
                400, "BadRequest",
                f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data at input byte {offset}')


MAX_SECRET_SIZE = 1024 * 1024  # core/validation's MaxSecretSize


def _validate_secret(errs: FieldErrors, secret: Obj) -> None:
    _decode_secret_data(secret)
    validate_object_meta(errs, secret.get("metadata"), True, is_dns1123_subdomain)
    _validate_data_keys(errs, secret, ("data", "stringData"))
    # base64 text of n bytes is 4*ceil(n/3) characters: the decoded size, without decoding.
    size = sum(len(str(v)) * 3 // 4 for v in _obj(secret.get("data")).values())
    if size > MAX_SECRET_SIZE:
        errs.too_long("data", MAX_SECRET_SIZE)
    stype = secret.get("type")
    if stype == "kubernetes.io/tls":
        for key in ("tls.crt", "tls.key"):
            if key not in (secret.get("data") or {}) and key not in (secret.get("stringData") or {}):
                errs.required(f"data[{key}]", "")
    elif stype == "kubernetes.io/dockerconfigjson":
        if ".dockerconfigjson" not in (secret.get("data") or {}) and ".dockerconfigjson" not in (
                secret.get("stringData") or {}):
            errs.required("data[.dockerconfigjson]", "")
    elif stype == "kubernetes.io/service-account-token":
        # ValidateSecret: the token controller needs to know whose token it is.
        annotations = _obj(_obj(secret.get("metadata")).get("annotations"))
        if not annotations.get("kubernetes.io/service-account.name"):
            errs.required("metadata.annotations[kubernetes.io/service-account.name]", "")


def _validate_secret_update(errs: FieldErrors, secret: Obj, old: Obj) -> None:
    if secret.get("type", "Opaque") != old.get("type", "Opaque"):
        errs.invalid("type", secret.get("type"), "field is immutable")
    _immutable_data(errs, secret, old, ("data",))

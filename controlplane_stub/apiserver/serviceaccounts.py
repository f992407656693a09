"""ServiceAccounts in the API server: authenticating their tokens against the store, the
TokenRequest subresource (`POST .../serviceaccounts/NAME/token`, `kubectl create token`) and the
token controller that fills legacy `kubernetes.io/service-account-token` Secrets.

The tokens themselves (signing, parsing, checking) are satokens.py. Upstream the legacy Secrets
are filled by kube-controller-manager's tokens controller (with --service-account-private-key-file);
here the API server runs that controller itself, writing through the Registry like the bootstrap
controller, because it alone holds the signing key.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hmac
import logging
from typing import Any

import msgspec

from ..store.base import Store
from .errors import StatusError, bad_request, invalid, not_found
from .pki import User
from .registry import Registry
from .resources import BY_ID
from .satokens import (
    DEFAULT_EXPIRATION,
    MAX_EXPIRATION,
    MIN_EXPIRATION,
    SA_NAME_ANNOTATION,
    SA_UID_ANNOTATION,
    SECRET_TYPE,
    Claims,
    Ref,
    TokenAuthority,
    TokenError,
    looks_like_jwt,
)

log = logging.getLogger("kproxy.apiserver.serviceaccounts")
Obj = dict[str, Any]

_SA = BY_ID["serviceaccounts"]
_SECRETS = BY_ID["secrets"]
_PODS = BY_ID["pods"]


def _meta(obj: Obj | None) -> Obj:
    m = (obj or {}).get("metadata")
    return m if isinstance(m, dict) else {}


def _uid(obj: Obj | None) -> str:
    return str(_meta(obj).get("uid") or "")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def authenticate(store: Store, authority: TokenAuthority, token: str) -> User | None:
    """The ServiceAccount a bearer token speaks for, or None (then 401) when it is not one of our
    tokens, has expired, or names a ServiceAccount, Secret or Pod that no longer exists as it was."""
    if not looks_like_jwt(token):
        return None
    try:
        claims = authority.verify(token)
        _check_objects(store, claims, token)
    except TokenError as e:
        log.debug("event=sa_token_rejected reason=%r", str(e))  # per request: a flood must not fill the log
        return None
    return claims.user


def _check_objects(store: Store, c: Claims, token: str) -> None:
    sa = store.get(_SA.key(c.namespace, c.name))
    if sa is None or _meta(sa).get("deletionTimestamp"):
        raise TokenError(f"service account {c.namespace}/{c.name} does not exist")
    if c.uid and _uid(sa) != c.uid:
        raise TokenError(f"service account {c.namespace}/{c.name} was re-created (uid differs)")
    if c.secret is not None:
        secret = store.get(_SECRETS.key(c.namespace, c.secret.name))
        if secret is None or _meta(secret).get("deletionTimestamp"):
            raise TokenError(f"secret {c.namespace}/{c.secret.name} does not exist")
        if c.legacy:
            # The Secret must still hold exactly this token (upstream's legacy validator).
            stored = (secret.get("data") or {}).get("token", "")
            try:
                held = base64.b64decode(stored, validate=True) if isinstance(stored, str) else b""
            except ValueError:
                held = b""
            if not hmac.compare_digest(held, token.encode("ascii", "replace")):
                raise TokenError(f"secret {c.namespace}/{c.secret.name} no longer holds this token")
        elif _uid(secret) != c.secret.uid:
            raise TokenError(f"bound secret {c.namespace}/{c.secret.name} was re-created")
    if c.pod is not None:
        pod = store.get(_PODS.key(c.namespace, c.pod.name))
        if pod is None or _meta(pod).get("deletionTimestamp") or _uid(pod) != c.pod.uid:
            raise TokenError(f"bound pod {c.namespace}/{c.pod.name} does not exist")


# -- TokenRequest --------------------------------------------------------------------------------------


def _rfc3339(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_request(store: Store, authority: TokenAuthority, namespace: str, name: str, body: Any) -> Obj:
    """Answers a TokenRequest (authentication.k8s.io/v1) for ServiceAccount namespace/name."""
    if not isinstance(body, dict):
        raise bad_request("the body of the request was in an unknown format")
    kind, api_version = body.get("kind"), body.get("apiVersion")
    if kind not in (None, "TokenRequest") or api_version not in (None, "authentication.k8s.io/v1"):
        raise bad_request(f"the body must be an authentication.k8s.io/v1 TokenRequest, not {api_version}/{kind}")
    spec = body.get("spec") if body.get("spec") is not None else {}
    if not isinstance(spec, dict):
        raise bad_request("TokenRequest.spec: want an object")
    causes: list[dict[str, str]] = []

    def bad(field: str, message: str, reason: str = "FieldValueInvalid") -> None:
        causes.append({"reason": reason, "field": field, "message": message})

    audiences = spec.get("audiences")
    if audiences is None or audiences == []:
        audiences = list(authority.audiences)
    elif (not isinstance(audiences, list) or len(audiences) > 32
          or not all(isinstance(a, str) and 0 < len(a) <= 1024 for a in audiences)):
        bad("spec.audiences", "Invalid value: want at most 32 non-empty strings of at most 1024 characters")
        audiences = []
    expiration = spec.get("expirationSeconds")
    if expiration is None:
        expiration = DEFAULT_EXPIRATION
    if isinstance(expiration, bool) or not isinstance(expiration, int):
        bad("spec.expirationSeconds", f"Invalid value: {expiration!r}: want an integer")
        expiration = DEFAULT_EXPIRATION
    elif expiration < MIN_EXPIRATION:
        bad("spec.expirationSeconds", f"Invalid value: {expiration}: may not specify a duration less than 10 "
                                      "minutes")
    elif expiration > MAX_EXPIRATION:
        bad("spec.expirationSeconds", f"Invalid value: {expiration}: may not specify a duration larger than 2^32 "
                                      "seconds")
    bound: tuple[str, Ref] | None = None
    ref = spec.get("boundObjectRef")
    if ref is not None:
        bound = _bound_object(store, namespace, ref, bad)
    if causes:
        raise invalid("TokenRequest", name, causes, "authentication.k8s.io")
    sa = store.get(_SA.key(namespace, name))
    if sa is None:
        raise not_found("serviceaccounts", name)
    # --service-account-max-token-expiration caps what is asked for (upstream shortens, not refuses).
    if authority.max_expiration and expiration > authority.max_expiration:
        expiration = authority.max_expiration
    try:
        token, exp = authority.issue(namespace, name, _uid(sa), list(audiences), int(expiration), bound)
    except TokenError as e:
        raise StatusError(503, "ServiceUnavailable", str(e)) from None
    out_spec: Obj = {"audiences": list(audiences), "expirationSeconds": int(expiration),
                     "boundObjectRef": copy.deepcopy(ref) if ref is not None else None}
    return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": out_spec, "status": {"token": token, "expirationTimestamp": _rfc3339(exp)}}


def _bound_object(store: Store, namespace: str, ref: Any, bad: Any) -> tuple[str, Ref] | None:
    if not isinstance(ref, dict):
        bad("spec.boundObjectRef", "Invalid value: want an object")
        return None
    kind, name, uid = ref.get("kind"), ref.get("name"), ref.get("uid")
    if kind not in ("Pod", "Secret"):
        bad("spec.boundObjectRef.kind", f'Unsupported value: {kind!r}: supported values: "Pod", "Secret"',
            "FieldValueNotSupported")
        return None
    if ref.get("apiVersion", "v1") != "v1":
        bad("spec.boundObjectRef.apiVersion", f'Unsupported value: {ref.get("apiVersion")!r}: supported '
                                              'values: "v1"', "FieldValueNotSupported")
        return None
    if not isinstance(name, str) or not name or len(name) > 253:
        bad("spec.boundObjectRef.name", "Required value")
        return None
    res = _PODS if kind == "Pod" else _SECRETS
    obj = store.get(res.key(namespace, name))
    if obj is None:
        raise not_found(res.plural, name)
    if uid not in (None, "") and uid != _uid(obj):
        raise StatusError(409, "Conflict", f'the UID in the bound object reference ({uid}) does not match the UID '
                          f'in record. The object might have been deleted and then recreated')
    return kind, Ref(name, _uid(obj))


# -- the legacy token Secrets' controller ---------------------------------------------------------------


class TokenSecretsController:
    """Fills `kubernetes.io/service-account-token` Secrets as upstream's tokens controller: data.token
    (a legacy token), data["ca.crt"], data.namespace and the uid annotation; deletes such a Secret
    when its ServiceAccount does not exist (or is a different one than its uid annotation names)."""

    def __init__(self, registry: Registry, authority: TokenAuthority, ca_pem: bytes, interval: float = 0.5) -> None:
        self.registry, self.authority, self.ca = registry, authority, ca_pem
        self.interval = interval
        self._revision = -1

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad pass must not stop the controller
                log.exception("event=token_controller_failed")
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        store = self.registry.store
        if store.revision == self._revision:
            return
        self._revision = store.revision
        for _, raw in store.list(_SECRETS.prefix()).items:
            secret = msgspec.json.decode(raw)
            if secret.get("type") == SECRET_TYPE:
                try:
                    await self._sync_secret(secret)
                except StatusError as e:  # conflict or gone: the next pass sees the new state
                    log.info("event=token_secret_skipped secret=%s/%s code=%d", _meta(secret).get("namespace"),
                             _meta(secret).get("name"), e.code)

    async def _sync_secret(self, secret: Obj) -> None:
        meta = _meta(secret)
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        ann = meta.get("annotations") or {}
        sa_name = ann.get(SA_NAME_ANNOTATION)
        sa = self.registry.store.get(_SA.key(ns, sa_name)) if isinstance(sa_name, str) and sa_name else None
        want_uid = ann.get(SA_UID_ANNOTATION)
        if sa is None or (want_uid and want_uid != _uid(sa)):
            if meta.get("deletionTimestamp"):
                return
            log.info("event=token_secret_deleted secret=%s/%s reason=service_account_gone", ns, name)
            await self.registry.delete(_SECRETS, ns, name, {}, dry_run=False)
            return
        data = secret.get("data") or {}
        token_ok = False
        if isinstance(data.get("token"), str):
            # A token that is not ours for exactly this Secret is replaced (as upstream regenerates).
            try:
                c = self.authority.verify(base64.b64decode(data["token"]).decode("ascii"))
                token_ok = c.legacy and c.secret is not None and c.secret.name == name and c.name == sa_name
            except (TokenError, ValueError):
                token_ok = False
        if token_ok and data.get("ca.crt") == _b64(self.ca) and data.get("namespace") == _b64(ns.encode()) \
                and ann.get(SA_UID_ANNOTATION) == _uid(sa):
            return
        new = copy.deepcopy(secret)
        new_data = new.setdefault("data", {})
        if not token_ok:
            new_data["token"] = _b64(self.authority.issue_legacy(ns, sa_name or "", _uid(sa), name).encode())
        new_data["ca.crt"] = _b64(self.ca)
        new_data["namespace"] = _b64(ns.encode())
        new["metadata"].setdefault("annotations", {})[SA_UID_ANNOTATION] = _uid(sa)
        await self.registry.update(_SECRETS, ns, name, new, "", dry_run=False)
        log.info("event=token_secret_filled secret=%s/%s serviceaccount=%s", ns, name, sa_name)

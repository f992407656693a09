"""ServiceAccount tokens (controlplane_stub/apiserver/satokens.py, serviceaccounts.py): issuing and
checking JWTs, hostile tokens refused, and against a live kproxy-apiserver with kubectl 1.32:
`kubectl create token`, legacy token Secrets filled by the controller, authentication as
system:serviceaccount:NS:NAME with its groups, RBAC on that identity, and revocation when the
ServiceAccount is deleted."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.apiserver import satokens
from controlplane_stub.apiserver.pki import write_kubeconfig
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

EC_KEY = ec.generate_private_key(ec.SECP256R1())
NOW = 1_800_000_000


def authority(key: Any = EC_KEY, clock: Callable[[], float] = lambda: NOW, **kw: Any) -> satokens.TokenAuthority:
    return satokens.TokenAuthority(satokens.Signer(key), kw.pop("keys", []), kw.pop("issuers", ["https://iss"]),
                                   kw.pop("audiences", ["api"]), clock=clock, **kw)


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"iss": "https://iss", "aud": ["api"], "exp": NOW + 600, "iat": NOW, "nbf": NOW,
                         "sub": "system:serviceaccount:ns:sa",
                         "kubernetes.io": {"namespace": "ns", "serviceaccount": {"name": "sa", "uid": "u1"}}}
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def signed(payload: dict[str, Any], header: dict[str, Any] | None = None, key: Any = EC_KEY) -> str:
    """A token signed by `key` with any header and payload (the signer's own encoding, by hand)."""
    s = satokens.Signer(key)
    head = header if header is not None else {"alg": s.public.alg, "kid": s.public.kid}
    signing_input = f"{b64(head)}.{b64(payload)}"
    r, s_ = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s_.to_bytes(32, 'big'))}"


def test_issued_token_verifies_and_names_the_service_account() -> None:
    a = authority()
    token, exp = a.issue("ns", "sa", "u1", ["api"], 3600)
    assert exp == NOW + 3600
    c = a.verify(token)
    assert (c.namespace, c.name, c.uid, c.legacy) == ("ns", "sa", "u1", False)
    assert c.user.name == "system:serviceaccount:ns:sa"
    assert set(c.user.groups) == {"system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated"}
    legacy = a.verify(a.issue_legacy("ns", "sa", "u1", "sa-token"))
    assert legacy.legacy and legacy.secret is not None and legacy.secret.name == "sa-token"


def test_rsa_keys_and_extra_verification_keys() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    old = authority()
    old_token, _ = old.issue("ns", "sa", "u1", ["api"], 600)
    # A rotated signer still accepts tokens of the old key listed in --service-account-key-file.
    new = authority(rsa_key, keys=[EC_KEY.public_key()])
    assert new.verify(old_token).name == "sa"
    token, _ = new.issue("ns", "sa", "u1", ["api"], 600)
    assert new.verify(token).name == "sa"
    with pytest.raises(satokens.TokenError):
        old.verify(token)  # the old server does not know the new key


OTHER_EC = ec.generate_private_key(ec.SECP256R1())
HOSTILE: list[tuple[str, Callable[[], str]]] = [
    ("expired", lambda: signed(claims(exp=NOW - 61))),
    ("not yet valid", lambda: signed(claims(nbf=NOW + 61))),
    ("issued in the future", lambda: signed(claims(iat=NOW + 3600))),
    ("no exp", lambda: signed(claims(exp=None))),
    ("exp not a number", lambda: signed(claims(exp=str(NOW + 600)))),
    ("exp a bool", lambda: signed(claims(exp=True))),
    ("wrong audience", lambda: signed(claims(aud=["someone-else"]))),
    ("empty audience", lambda: signed(claims(aud=[]))),
    ("audience not strings", lambda: signed(claims(aud=[1]))),
    ("too many audiences", lambda: signed(claims(aud=["api"] * 33))),
    ("wrong issuer", lambda: signed(claims(iss="https://evil"))),
    ("no issuer", lambda: signed(claims(iss=None))),
    ("sub does not match", lambda: signed(claims(sub="system:serviceaccount:kube-system:admin"))),
    ("no private claim", lambda: signed(claims(**{"kubernetes.io": None}))),
    ("namespace not a name", lambda: signed(claims(sub="system:serviceaccount:../x:sa", **{
        "kubernetes.io": {"namespace": "../x", "serviceaccount": {"name": "sa", "uid": "u"}}}))),
    ("name too long", lambda: signed(claims(sub="system:serviceaccount:ns:" + "a" * 300, **{
        "kubernetes.io": {"namespace": "ns", "serviceaccount": {"name": "a" * 300, "uid": "u"}}}))),
    ("legacy claims of wrong types", lambda: signed({"iss": "kubernetes/serviceaccount", "sub": 5})),
    ("signed by another key", lambda: signed(claims(), key=OTHER_EC)),
    ("alg none", lambda: f"{b64({'alg': 'none'})}.{b64(claims())}."),
    ("alg HS256 keyed with the public key", lambda: _hs256_with_public_key()),
    ("alg RS256 on an EC key", lambda: signed(claims(), header={"alg": "RS256"})),
    ("crit header", lambda: signed(claims(), header={"alg": "ES256", "crit": ["exp"]})),
    ("kid not a string", lambda: signed(claims(), header={"alg": "ES256", "kid": 7})),
    ("payload tampered", lambda: _tamper(signed(claims()))),
    ("signature truncated", lambda: signed(claims())[:-4]),
    ("not base64url", lambda: signed(claims()).replace(".", ".!", 1)),
    ("two parts", lambda: ".".join(signed(claims()).split(".")[:2])),
    ("header not JSON", lambda: f"{b64(b'{{{')}.{b64(claims())}.AAAA"),
    ("payload a list", lambda: signed([1, 2])),  # type: ignore[arg-type]
    ("oversized", lambda: "a" * 9000 + ".b.c"),
]


def _tamper(token: str) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{b64(claims(sub='system:serviceaccount:ns:other'))}.{sig}"


def _hs256_with_public_key() -> str:
    import hashlib
    import hmac

    pem = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    si = f"{b64({'alg': 'HS256'})}.{b64(claims())}"
    return f"{si}.{b64(hmac.new(pem, si.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize(("why", "make"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_tokens_are_refused(why: str, make: Callable[[], str]) -> None:
    with pytest.raises(satokens.TokenError):
        authority().verify(make())


def test_leeway_accepts_small_clock_skew() -> None:
    assert authority().verify(signed(claims(exp=NOW - 30, nbf=NOW + 30))).name == "sa"


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.binary(min_size=1, max_size=3))
def test_any_corruption_of_a_valid_token_is_refused(pos: int, junk: bytes) -> None:
    a = authority()
    token, _ = a.issue("ns", "sa", "u1", ["api"], 600)
    i = pos % len(token)
    bad = token[:i] + junk.decode("latin-1") + token[i + 1:]
    if bad == token:
        return
    try:
        c = a.verify(bad)
    except satokens.TokenError:
        return
    # base64url has slack bits: a change that decodes to the same bytes is still the same token.
    assert (c.namespace, c.name, c.uid) == ("ns", "sa", "u1")


# -- against a live server with kubectl ----------------------------------------------------------------


@pytest.fixture(scope="module")
def live(storage_backend: str) -> Iterator[APIServerProcess]:
    """On SQLite, then on etcd (tests/conftest.py: storage_backend)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    with running_apiserver() as api:
        yield api


def kubectl(api: APIServerProcess, *args: str, cfg: str = "", stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", cfg or api.kubeconfig, *args], input=stdin,
                          capture_output=True, text=True, timeout=30, check=False)


def as_token(api: APIServerProcess, token: str) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="kpt-sa-"), "sa.kubeconfig")
    write_kubeconfig(path, api.url, api.ca_file, token, "sa")
    return path


def call(api: APIServerProcess, token: str, method: str, path: str, body: Any = None) -> requests.Response:
    s = requests.Session()
    s.trust_env = False
    return s.request(method, api.url + path, json=body, verify=api.ca_file, timeout=10,
                     headers={"Authorization": f"Bearer {token}"})


def eventually(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


@pytest.mark.kubectl
def test_kubectl_create_token_authenticates_as_the_service_account(live: APIServerProcess) -> None:
    api = live
    assert kubectl(api, "create", "namespace", "sa-team").returncode == 0
    r = kubectl(api, "create", "serviceaccount", "robot", "-n", "sa-team")
    assert r.returncode == 0, r.stderr
    r = kubectl(api, "create", "token", "robot", "-n", "sa-team", "--duration", "15m", "--audience", "api",
                "--audience", "https://kubernetes.default.svc.cluster.local")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["exp"] - payload["iat"] == 900
    assert payload["sub"] == "system:serviceaccount:sa-team:robot"
    cfg = as_token(api, token)
    who = kubectl(api, "auth", "whoami", "-o", "json", cfg=cfg)
    assert who.returncode == 0, who.stderr
    info = json.loads(who.stdout)["status"]["userInfo"]
    assert info["username"] == "system:serviceaccount:sa-team:robot"
    assert set(info["groups"]) == {"system:serviceaccounts", "system:serviceaccounts:sa-team",
                                   "system:authenticated"}
    # Authenticated, but RBAC grants it nothing yet: 403, not 401.
    r = kubectl(api, "get", "pods", "-n", "sa-team", cfg=cfg)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    r = kubectl(api, "create", "rolebinding", "robot-view", "-n", "sa-team", "--clusterrole=view",
                "--serviceaccount=sa-team:robot")
    assert r.returncode == 0, r.stderr
    assert eventually(lambda: kubectl(api, "get", "pods", "-n", "sa-team", cfg=cfg).returncode == 0)
    assert kubectl(api, "get", "pods", "-n", "default", cfg=cfg).returncode != 0
    # A token for an audience this server does not accept authenticates nobody.
    other = kubectl(api, "create", "token", "robot", "-n", "sa-team", "--audience", "vault").stdout.strip()
    assert call(api, other, "GET", "/api/v1/namespaces/sa-team/pods").status_code == 401
    # Deleting the ServiceAccount revokes its tokens; a new one of the same name has another uid.
    assert kubectl(api, "delete", "serviceaccount", "robot", "-n", "sa-team").returncode == 0
    assert call(api, token, "GET", "/api/v1/namespaces/sa-team/pods").status_code == 401
    assert kubectl(api, "create", "serviceaccount", "robot", "-n", "sa-team").returncode == 0
    assert call(api, token, "GET", "/api/v1/namespaces/sa-team/pods").status_code == 401


def test_a_binding_takes_effect_at_once_on_the_server_that_wrote_it(live: APIServerProcess) -> None:
    """Read-your-writes: a component whose binding was just created (kproxy-cluster makes the DNS's
    ServiceAccount and binding, then starts it) must not be refused for the policy cache's refresh
    interval. The policy is rebuilt after every request at most each 0.5 s, so before the write hook
    these back-to-back calls got 403 on most rounds (CI failed on it once)."""
    admin = live.token
    assert call(live, admin, "POST", "/api/v1/namespaces", {"metadata": {"name": "ryw"}}).status_code == 201
    for i in range(5):
        sa = f"ryw-{i}"
        r = call(live, admin, "POST", "/api/v1/namespaces/ryw/serviceaccounts", {"metadata": {"name": sa}})
        assert r.status_code == 201, r.text
        r = call(live, admin, "POST", f"/api/v1/namespaces/ryw/serviceaccounts/{sa}/token",
                 {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})
        assert r.status_code == 201, r.text
        token = r.json()["status"]["token"]
        assert call(live, token, "GET", "/api/v1/namespaces/ryw/services").status_code == 403
        r = call(live, admin, "POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/ryw/rolebindings",
                 {"metadata": {"name": sa}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                        "kind": "ClusterRole", "name": "view"},
                  "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": "ryw"}]})
        assert r.status_code == 201, r.text
        assert call(live, token, "GET", "/api/v1/namespaces/ryw/services").status_code == 200, i


@pytest.mark.kubectl
def test_token_request_validation(live: APIServerProcess) -> None:
    api = live
    kubectl(api, "create", "serviceaccount", "val", "-n", "default")
    base = "/api/v1/namespaces/default/serviceaccounts"
    admin = api.token
    for spec, field in (({"expirationSeconds": 60}, "spec.expirationSeconds"),
                        ({"expirationSeconds": 1 << 33}, "spec.expirationSeconds"),
                        ({"audiences": ["x" * 2000]}, "spec.audiences"),
                        ({"boundObjectRef": {"kind": "Node", "name": "n"}}, "spec.boundObjectRef.kind")):
        r = call(api, admin, "POST", f"{base}/val/token", {"apiVersion": "authentication.k8s.io/v1",
                                                          "kind": "TokenRequest", "spec": spec})
        assert r.status_code == 422, r.text
        assert [c["field"] for c in r.json()["details"]["causes"]] == [field]
    assert call(api, admin, "POST", f"{base}/nobody/token", {"spec": {}}).status_code == 404
    assert call(api, admin, "GET", f"{base}/val/token").status_code == 405
    r = call(api, admin, "POST", f"{base}/val/token", {"spec": {}})
    assert r.status_code == 201 and r.json()["spec"]["expirationSeconds"] == 3600
    # A token bound to a Secret dies with the Secret.
    kubectl(api, "create", "secret", "generic", "anchor", "-n", "default")
    r = call(api, admin, "POST", f"{base}/val/token",
             {"spec": {"boundObjectRef": {"kind": "Secret", "apiVersion": "v1", "name": "anchor"}}})
    assert r.status_code == 201, r.text
    bound = r.json()["status"]["token"]
    kubectl(api, "create", "rolebinding", "val-view", "--clusterrole=view", "--serviceaccount=default:val")
    assert eventually(lambda: call(api, bound, "GET", "/api/v1/namespaces/default/pods").status_code == 200)
    kubectl(api, "delete", "secret", "anchor")
    assert call(api, bound, "GET", "/api/v1/namespaces/default/pods").status_code == 401
    # Nobody may mint tokens without create on serviceaccounts/token.
    assert call(api, api.readonly_token, "POST", f"{base}/val/token", {"spec": {}}).status_code == 403


@pytest.mark.kubectl
def test_legacy_token_secret_is_filled_and_revoked(live: APIServerProcess) -> None:
    api = live
    kubectl(api, "create", "serviceaccount", "legacy", "-n", "default")
    manifest = """
apiVersion: v1
kind: Secret
metadata: {name: legacy-token, namespace: default, annotations: {kubernetes.io/service-account.name: legacy}}
type: kubernetes.io/service-account-token
"""
    assert kubectl(api, "apply", "-f", "-", stdin=manifest).returncode == 0

    def data() -> dict[str, str]:
        r = kubectl(api, "get", "secret", "legacy-token", "-o", "json")
        d: dict[str, str] = json.loads(r.stdout).get("data") or {} if r.returncode == 0 else {}
        return d if "token" in d else {}

    d = eventually(data)
    assert set(d) == {"token", "ca.crt", "namespace"}
    assert base64.b64decode(d["namespace"]) == b"default"
    with open(api.ca_file, "rb") as f:
        assert base64.b64decode(d["ca.crt"]) == f.read()
    token = base64.b64decode(d["token"]).decode()
    r = call(api, token, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews",
             {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert r.json()["status"]["userInfo"]["username"] == "system:serviceaccount:default:legacy"
    # A Secret without the annotation is invalid; one naming no ServiceAccount is deleted.
    bad = kubectl(api, "apply", "-f", "-", stdin=manifest.replace(
        "annotations: {kubernetes.io/service-account.name: legacy}", "name: x2"))
    assert bad.returncode != 0 and "kubernetes.io/service-account.name" in bad.stderr
    # Deleting the ServiceAccount revokes the token, and the controller deletes the Secret.
    kubectl(api, "delete", "serviceaccount", "legacy")
    assert call(api, token, "GET", "/api/v1/namespaces").status_code == 401
    assert eventually(lambda: kubectl(api, "get", "secret", "legacy-token").returncode != 0)

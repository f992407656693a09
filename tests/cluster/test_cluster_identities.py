"""kproxy-cluster's per-component identities (controlplane_stub/cluster/identities.py): the token
file and kubeconfigs the supervisor makes, against a real kproxy-apiserver: each component is who
it should be and is refused (403) what is outside its role, while what it needs is allowed. The
cluster tests (test_cluster_e2e.py) run every component with these identities, and check there that
the running processes use them."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from controlplane_stub import client as api
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.cluster import identities

NODES = ["node-1", "node-2"]


@pytest.fixture(scope="module")
def made() -> Iterator[tuple[APIServerProcess, dict[str, str]]]:
    d = Path(tempfile.mkdtemp(prefix="kpt-ident-"))
    try:
        ad = d / "apiserver"
        ad.mkdir(mode=0o700)
        identities.write_token_file(ad, NODES)
        with running_apiserver(data_dir=str(ad)) as a:
            kcs = identities.component_kubeconfigs(d, ad / "tokens.csv", a.kubeconfig)

            async def dns() -> str:
                async with api.Client(api.load_kubeconfig(a.kubeconfig)) as c:
                    return await identities.dns_kubeconfig(c, d, a.kubeconfig)

            kcs["dns"] = asyncio.run(dns())
            yield a, kcs
    finally:
        shutil.rmtree(d, ignore_errors=True)


def token_of(kubeconfig: str) -> str:
    return str(yaml.safe_load(Path(kubeconfig).read_text())["users"][0]["user"]["token"])


def status(a: APIServerProcess, kubeconfig: str, method: str, path: str, body: Any = None) -> int:
    s = requests.Session()
    s.trust_env = False
    return s.request(method, a.url + path, json=body, verify=a.ca_file, timeout=10,
                     headers={"Authorization": f"Bearer {token_of(kubeconfig)}"}).status_code


CTRL, PROXY, NODE = identities.CONTROLLERS_USER, identities.KPROXY_USER, identities.node_user("node-1")
# (identity, method, path, allowed): what each component does, and something it must not do
TABLE: list[tuple[str, str, str, bool]] = [
    (CTRL, "GET", "/api/v1/pods", True),
    (CTRL, "GET", "/apis/apps/v1/deployments", True),
    (CTRL, "GET", "/apis/discovery.k8s.io/v1/endpointslices", True),
    (CTRL, "GET", "/api/v1/secrets", False),
    (CTRL, "DELETE", "/api/v1/nodes/node-1", False),
    (CTRL, "DELETE", "/api/v1/namespaces/default", False),
    (CTRL, "POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", False),
    (NODE, "GET", "/api/v1/pods", True),
    (NODE, "GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", True),
    (NODE, "GET", "/api/v1/secrets", False),
    (NODE, "POST", "/api/v1/namespaces/default/pods", False),
    (NODE, "POST", "/api/v1/namespaces/default/services", False),
    (NODE, "GET", "/apis/apps/v1/deployments", False),
    (PROXY, "GET", "/api/v1/services", True),
    (PROXY, "GET", "/api/v1/nodes", True),
    (PROXY, "GET", "/api/v1/pods", False),
    (PROXY, "GET", "/api/v1/namespaces/default/services/kubernetes", False),  # list/watch only
    (PROXY, "PATCH", "/api/v1/namespaces/default/services/kubernetes", False),
    ("dns", "GET", "/api/v1/services", True),
    ("dns", "GET", "/apis/discovery.k8s.io/v1/endpointslices", True),
    ("dns", "GET", "/api/v1/nodes", False),
    ("dns", "GET", "/api/v1/secrets", False),
    ("dns", "POST", "/api/v1/namespaces/default/configmaps", False),
]


@pytest.mark.parametrize(("ident", "method", "path", "allowed"), TABLE,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in TABLE])
def test_each_component_gets_its_role_and_nothing_more(made: tuple[APIServerProcess, dict[str, str]], ident: str,
                                                       method: str, path: str, allowed: bool) -> None:
    a, kcs = made
    code = status(a, kcs[ident], method, path, {} if method in ("POST", "PATCH") else None)
    if allowed:
        assert code == 200, code
    else:
        assert code == 403, code


def test_identities_are_who_they_claim(made: tuple[APIServerProcess, dict[str, str]]) -> None:
    a, kcs = made
    assert set(kcs) == {CTRL, PROXY, "dns", *(identities.node_user(n) for n in NODES)}
    for ident, kc in kcs.items():
        assert os.stat(kc).st_mode & 0o077 == 0, f"{kc} readable by others"
        s = requests.Session()
        s.trust_env = False
        r = s.post(a.url + "/apis/authentication.k8s.io/v1/selfsubjectreviews", json={}, verify=a.ca_file,
                   timeout=10, headers={"Authorization": f"Bearer {token_of(kc)}"})
        info = r.json()["status"]["userInfo"]
        want = "system:serviceaccount:kube-system:coredns" if ident == "dns" else ident
        assert info["username"] == want
        if ident.startswith("system:node:"):
            assert "system:nodes" in info["groups"]
        assert "system:masters" not in info["groups"]
    # One node may not be another: system:node:node-2 exists, but neither is admin.
    assert token_of(kcs[identities.node_user("node-1")]) != token_of(kcs[identities.node_user("node-2")])

"""Each component of kproxy-cluster talks to the API server as itself, with least privilege,
instead of as admin (kubeadm's identities, with tokens instead of client certificates):

| component | identity | authorized by |
| --- | --- | --- |
| controllers (incl. the scheduler: one process) | user system:kube-controller-manager | ClusterRole system:kube-controller-manager |
| node agent of NODE | user system:node:NODE, group system:nodes | ClusterRole system:node (bound to the group) |
| kproxy on every node | user system:kube-proxy | ClusterRole system:node-proxier |
| kproxy-dns | ServiceAccount kube-system/coredns (TokenRequest) | ClusterRole system:coredns |

The users are lines of the API server's token file, written before its first start; each component
gets a kubeconfig of its own under DATA/identities (0600, in the cluster's 0700 directory, hidden
from pods). The DNS is a ServiceAccount as in deploy/kproxy-dns.yaml: its token comes from a
TokenRequest (a year), made by the supervisor as admin. The roles are in apiserver/rbac.py.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import yaml

from controlplane_stub import client as api
from controlplane_stub.apiserver import pki

CONTROLLERS_USER = "system:kube-controller-manager"
KPROXY_USER = "system:kube-proxy"
NODES_GROUP = "system:nodes"
DNS_NAMESPACE, DNS_SERVICE_ACCOUNT = "kube-system", "coredns"
DNS_TOKEN_SECONDS = 365 * 24 * 3600


def node_user(node: str) -> str:
    return f"system:node:{node}"


def write_token_file(apiserver_dir: Path, nodes: list[str]) -> None:
    """tokens.csv (kube-apiserver's --token-auth-file format) before the API server's first start:
    admin and the read-only user, as the server would make them, plus one user per component."""
    path = apiserver_dir / "tokens.csv"
    if path.exists():
        return
    users = [("admin", pki.ADMIN_GROUP), ("kproxy-readonly", "system:readonly"), (CONTROLLERS_USER, ""),
             (KPROXY_USER, ""), *((node_user(n), NODES_GROUP) for n in nodes)]
    lines = [f'{secrets.token_urlsafe(32)},{u},{u},"{g}"' if g else f"{secrets.token_urlsafe(32)},{u},{u}"
             for u, g in users]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def _write_kubeconfig(admin_kubeconfig: str, out: Path, user: str, token: str) -> str:
    """The admin kubeconfig's cluster (URL, CA) with another user's token."""
    cfg = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cfg["users"] = [{"name": user, "user": {"token": token}}]
    for ctx in cfg.get("contexts") or []:
        ctx["context"]["user"] = user
    out.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


def component_kubeconfigs(data_dir: Path, token_file: Path, admin_kubeconfig: str) -> dict[str, str]:
    """user name -> its kubeconfig, for every user of the token file but admin and read-only."""
    out: dict[str, str] = {}
    for token, user in pki.load_tokens(str(token_file)).items():
        if user.name.startswith("system:"):
            out[user.name] = _write_kubeconfig(admin_kubeconfig, data_dir / "identities" / f"{user.name}.kubeconfig",
                                               user.name, token)
    return out


async def dns_kubeconfig(c: api.Client, data_dir: Path, admin_kubeconfig: str) -> str:
    """ServiceAccount kube-system/coredns bound to system:coredns (as deploy/kproxy-dns.yaml) and
    a kubeconfig with a token for it."""
    sa = {"apiVersion": "v1", "kind": "ServiceAccount",
          "metadata": {"name": DNS_SERVICE_ACCOUNT, "namespace": DNS_NAMESPACE}}
    crb = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": "system:coredns"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
           "subjects": [{"kind": "ServiceAccount", "name": DNS_SERVICE_ACCOUNT, "namespace": DNS_NAMESPACE}]}
    sa_url = f"/api/v1/namespaces/{DNS_NAMESPACE}/serviceaccounts"
    for url, obj in ((sa_url, sa), ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", crb)):
        try:
            await c.create(url, obj)
        except api.ApiError as e:
            if e.code != 409:
                raise
    review = await c.create(f"{sa_url}/{DNS_SERVICE_ACCOUNT}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                             "spec": {"expirationSeconds": DNS_TOKEN_SECONDS}})
    user = f"system:serviceaccount:{DNS_NAMESPACE}:{DNS_SERVICE_ACCOUNT}"
    return _write_kubeconfig(admin_kubeconfig, data_dir / "identities" / "coredns.kubeconfig", user,
                             str(review["status"]["token"]))

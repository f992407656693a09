"""How to reach the API server: kubeconfig files, --master, or the in-cluster service account.

Follows clientcmd's documented behaviour (kubectl/kube-proxy): the current-context picks a cluster
and a user; relative file paths are relative to the kubeconfig file; `*-data` fields are base64;
KUBECONFIG may list several files, the first one defining a name wins.
"""
from __future__ import annotations

import base64
import contextlib
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeConfigError(Exception):
    """The kubeconfig (or in-cluster environment) cannot be used; the message says why."""


class TokenSource:
    """A bearer token, from a fixed string or a file re-read periodically: projected
    service-account tokens rotate, and client-go re-reads them (about once a minute)."""

    def __init__(self, token: str = "", token_file: str = "", reload_after: float = 60.0) -> None:
        self._token = token
        self._file = token_file
        self._reload_after = reload_after
        self._read_at = float("-inf")

    def token(self) -> str:
        if self._file and time.monotonic() - self._read_at >= self._reload_after:
            try:
                self._token = Path(self._file).read_text(encoding="utf-8").strip()
                self._read_at = time.monotonic()
            except OSError as err:
                if not self._token:
                    raise KubeConfigError(f"cannot read token file {self._file}: {err.strerror}") from err
        return self._token


@dataclass
class ClusterAccess:
    """Everything an HTTP client needs: base URL, TLS settings and credentials."""

    server: str
    ca_file: str = ""
    ca_data: bytes = b""
    insecure_skip_tls_verify: bool = False
    tls_server_name: str = ""
    client_cert_file: str = ""
    client_key_file: str = ""
    client_cert_data: bytes = b""
    client_key_data: bytes = b""
    token: TokenSource = field(default_factory=TokenSource)
    username: str = ""
    password: str = ""
    namespace: str = "default"

    def ssl_context(self) -> ssl.SSLContext | None:
        """None for plain http; else a context with the CA and client certificate loaded."""
        if not self.server.startswith("https://"):
            return None
        # One context, loading only the CAs it uses: the system store that create_default_context()
        # loads without a CA costs about 1 MiB of OpenSSL heap, wasted when the cluster's CA is given.
        if self.insecure_skip_tls_verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_file or self.ca_data:
            ctx = ssl.create_default_context(
                cafile=self.ca_file or None, cadata=self.ca_data.decode("ascii") if self.ca_data else None
            )
        else:
            ctx = ssl.create_default_context()
        if self.client_cert_file or self.client_cert_data:
            _load_cert_chain(ctx, self)
        return ctx

    def auth_header(self) -> str:
        token = self.token.token()
        if token:
            return f"Bearer {token}"
        if self.username:
            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        return ""


def _load_cert_chain(ctx: ssl.SSLContext, access: ClusterAccess) -> None:
    try:
        with contextlib.ExitStack() as stack:
            cert = access.client_cert_file
            key = access.client_key_file
            if access.client_cert_data:
                cert = stack.enter_context(_memory_file(access.client_cert_data, "client.crt"))
            if access.client_key_data:
                key = stack.enter_context(_memory_file(access.client_key_data, "client.key"))
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as err:
        raise KubeConfigError(f"cannot load client certificate/key: {err}") from err


@contextlib.contextmanager
def _memory_file(data: bytes, name: str) -> Iterator[str]:
    """A path to `data` that is never on a disk: ssl loads a certificate chain only from a path,
    so inline kubeconfig data goes into an anonymous memory file (memfd, readable by this process
    only) named through /proc/self/fd, closed right after loading."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=False)
    except ValueError as err:
        raise KubeConfigError(f"{what} is not valid base64") from err


def _named(entries: Any, name: str, kind: str, source: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind)
            return body if isinstance(body, dict) else {}
    raise KubeConfigError(f"{source}: no {kind} named {name!r}")


def _load_yaml(path: Path) -> dict[str, Any]:
    # Imported here: a process that never reads a kubeconfig (in-cluster, --master) does not pay
    # for PyYAML and its C extension (half a MiB of RSS for kproxy-dns).
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise KubeConfigError(f"kubeconfig {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KubeConfigError(f"kubeconfig {path} is not a mapping")
    return data


def _merge(paths: list[Path]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Merge several kubeconfigs as clientcmd does: first file wins per name and for
    current-context. Returns the merged document and, per cluster/user name, its file's folder
    (relative paths resolve against the file that defined the entry)."""
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": [], "current-context": ""}
    origin: dict[str, Path] = {}
    for path in paths:
        doc = _load_yaml(path)
        if not merged["current-context"] and doc.get("current-context"):
            merged["current-context"] = doc["current-context"]
        for section in ("clusters", "users", "contexts"):
            seen = {e.get("name") for e in merged[section]}
            for entry in doc.get(section) or []:
                if isinstance(entry, dict) and entry.get("name") not in seen:
                    merged[section].append(entry)
                    origin[f"{section}/{entry.get('name')}"] = path.parent
    return merged, origin


def _resolve(base: Path, value: Any) -> str:
    if not value:
        return ""
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def load_kubeconfig(path: str | None, master: str = "", context: str = "") -> ClusterAccess:
    """ClusterAccess from a kubeconfig (path, or $KUBECONFIG when path is None/empty);
    `master` (--master) overrides the cluster's server URL."""
    if path:
        paths = [Path(path).expanduser()]
    else:
        env = os.environ.get("KUBECONFIG", "")
        # clientcmd skips KUBECONFIG entries that do not exist (an explicit file must).
        paths = [Path(p).expanduser() for p in env.split(os.pathsep) if p and Path(p).expanduser().exists()]
        if not paths:
            raise KubeConfigError("no kubeconfig given (--kubeconfig, or KUBECONFIG naming an existing file)")
    doc, origin = _merge(paths)
    source = ",".join(str(p) for p in paths)
    ctx_name = context or doc["current-context"]
    if not ctx_name:
        if master:
            return ClusterAccess(server=master.rstrip("/"))
        raise KubeConfigError(f"{source}: no current-context set")
    ctx = _named(doc["contexts"], ctx_name, "context", source)
    cluster_name = str(ctx.get("cluster", ""))
    user_name = str(ctx.get("user", ""))
    cluster = _named(doc["clusters"], cluster_name, "cluster", source) if cluster_name else {}
    user = _named(doc["users"], user_name, "user", source) if user_name else {}
    cbase = origin.get(f"clusters/{cluster_name}", paths[0].parent)
    ubase = origin.get(f"users/{user_name}", paths[0].parent)
    server = master or str(cluster.get("server", ""))
    if not server:
        raise KubeConfigError(f"{source}: cluster {cluster_name!r} has no server (or pass --master)")
    access = ClusterAccess(
        server=server.rstrip("/"),
        ca_file=_resolve(cbase, cluster.get("certificate-authority")),
        ca_data=_b64(cluster["certificate-authority-data"], "certificate-authority-data")
        if cluster.get("certificate-authority-data")
        else b"",
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify", False)),
        tls_server_name=str(cluster.get("tls-server-name", "")),
        client_cert_file=_resolve(ubase, user.get("client-certificate")),
        client_key_file=_resolve(ubase, user.get("client-key")),
        client_cert_data=_b64(user["client-certificate-data"], "client-certificate-data")
        if user.get("client-certificate-data")
        else b"",
        client_key_data=_b64(user["client-key-data"], "client-key-data") if user.get("client-key-data") else b"",
        token=TokenSource(str(user.get("token", "") or ""), _resolve(ubase, user.get("tokenFile"))),
        username=str(user.get("username", "") or ""),
        password=str(user.get("password", "") or ""),
        namespace=str(ctx.get("namespace", "") or "default"),
    )
    return access


def in_cluster(sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ClusterAccess:
    """rest.InClusterConfig: KUBERNETES_SERVICE_HOST/PORT plus the mounted service account."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise KubeConfigError(
            "not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset): pass --kubeconfig or --master"
        )
    token_file = sa_dir / "token"
    if not token_file.exists():
        raise KubeConfigError(f"in-cluster token file {token_file} is missing")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    ns_file = sa_dir / "namespace"
    namespace = ns_file.read_text(encoding="utf-8").strip() if ns_file.exists() else "default"
    ca = sa_dir / "ca.crt"
    return ClusterAccess(
        server=f"https://{host}:{port}",
        ca_file=str(ca) if ca.exists() else "",
        token=TokenSource(token_file=str(token_file)),
        namespace=namespace,
    )


def resolve_access(kubeconfig: str, master: str) -> ClusterAccess:
    """kube-proxy's rule: no --kubeconfig and no --master means in-cluster; --master alone is
    an unauthenticated URL; --kubeconfig with --master overrides the file's server."""
    if kubeconfig:
        return load_kubeconfig(kubeconfig, master)
    if master:
        return ClusterAccess(server=master.rstrip("/"))
    try:
        return in_cluster()
    except KubeConfigError:
        # client-go falls back to the default loading rules (KUBECONFIG) outside a pod.
        if os.environ.get("KUBECONFIG"):
            return load_kubeconfig(None)
        raise

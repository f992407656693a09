"""deploy/: the manifests applied with kubectl 1.32 to a real kproxy-apiserver, then the real kproxy
(in a network namespace of its own) and the real kproxy-dns run with exactly what those manifests
grant: the ServiceAccounts' tokens minted by TokenRequest (as the kubelet mounts them), the
ConfigMaps' kubeconfig.conf and KubeProxyConfiguration read by kproxy's own loader. They work
(rules programmed, dig answers), and anything outside their roles is 403.

The pod is simulated only where no kubelet and container runtime run here: the files the pod
would see under /var/lib/kube-proxy and /var/run/secrets/kubernetes.io/serviceaccount are written
to a temporary directory and the manifests' absolute paths are relocated there, and the
API server's address replaces the CONTROL_PLANE_ENDPOINT placeholder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from helpers.kproxy_e2e import loopback_into, start_kproxy
from helpers.netns import fresh_netns
from helpers.procs import stop_process

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from kproxy._purepath import port_proto_hash
from kproxy.config import load_config_file

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount/"
NODE_IP = "192.168.77.2"
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.kubectl


def kubectl(cfg: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", "--kubeconfig", cfg, *args], input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)


class Cluster:
    def __init__(self, api: APIServerProcess, tmp: Path) -> None:
        self.api, self.tmp = api, tmp
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = api.ca_file

    def call(self, token: str, method: str, path: str, body: Any = None) -> requests.Response:
        return self.http.request(method, self.api.url + path, json=body, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"})

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = self.call(self.api.token, method, path, body)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
        return r.json()

    def mint(self, sa: str) -> str:
        """What the kubelet does for a pod's projected token volume: a TokenRequest."""
        r = kubectl(self.api.kubeconfig, "create", "token", sa, "-n", "kube-system", "--duration", "1h")
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def pod_files(self, name: str, token: str, configmap: str, mount: str) -> dict[str, Path]:
        """The pod's view: the ConfigMap's files at `mount` and the service-account volume, under
        tmp/name, with every absolute path in them relocated there."""
        root = self.tmp / name
        sa, cm_dir = root / "sa", root / mount.strip("/")
        sa.mkdir(parents=True)
        cm_dir.mkdir(parents=True)
        (sa / "token").write_text(token)
        shutil.copy(self.api.ca_file, sa / "ca.crt")
        (sa / "namespace").write_text("kube-system")
        data = self.admin("GET", f"/api/v1/namespaces/kube-system/configmaps/{configmap}")["data"]
        out = {}
        for key, text in data.items():
            text = (text.replace(SA_DIR, f"{sa}/").replace(mount.rstrip("/") + "/", f"{cm_dir}/")
                    .replace("https://CONTROL_PLANE_ENDPOINT:6443", self.api.url))
            (cm_dir / key).write_text(text)
            out[key] = cm_dir / key
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    with running_apiserver() as api:
        c = Cluster(api, tmp_path_factory.mktemp("deploy"))
        for manifest in ("kproxy.yaml", "kproxy-dns.yaml"):
            r = kubectl(api.kubeconfig, "apply", "-f", str(DEPLOY / manifest))
            assert r.returncode == 0, f"{manifest}: {r.stderr}"
        # A Service of one's own and endpoints for the DNS Service (no pods run here).
        c.admin("POST", "/api/v1/namespaces/default/services",
                {"metadata": {"name": "web"}, "spec": {"ports": [{"name": "http", "port": 80}]}})
        for ns, svc, port, proto in (("default", "web", 80, "TCP"), ("kube-system", "kube-dns", 53, "UDP")):
            c.admin("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", {
                "metadata": {"name": f"{svc}-1", "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4",
                "ports": [{"name": "http" if svc == "web" else "dns", "port": port, "protocol": proto}],
                "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}]})
        yield c


def test_manifests_are_accepted_as_written(cluster: Cluster) -> None:
    ds = cluster.admin("GET", "/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == "kube-proxy"
    assert pod["containers"][0]["securityContext"] == {"privileged": True}
    mounts = {v["name"]: v for v in pod["volumes"]}
    assert mounts["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["lib-modules"]["hostPath"]["path"] == "/lib/modules"
    crb = cluster.admin("GET", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/kproxy:node-proxier")
    assert crb["roleRef"]["name"] == "system:node-proxier"
    svc = cluster.admin("GET", "/api/v1/namespaces/kube-system/services/kube-dns")
    assert svc["metadata"]["labels"]["k8s-app"] == "kube-dns" and svc["spec"]["clusterIP"] == "10.96.0.10"
    assert [(p["name"], p["port"], p["protocol"]) for p in svc["spec"]["ports"]] == [
        ("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("metrics", 9153, "TCP")]
    dep = cluster.admin("GET", "/apis/apps/v1/namespaces/kube-system/deployments/coredns")
    assert dep["spec"]["template"]["metadata"]["labels"] == {"k8s-app": "kube-dns"}
    # Re-applying changes nothing (kubectl apply's three-way merge finds no difference).
    r = kubectl(cluster.api.kubeconfig, "apply", "-f", str(DEPLOY))
    assert r.returncode == 0 and "configured" not in r.stdout, r.stdout + r.stderr


def _netns() -> Iterator[str]:
    with fresh_netns("kptDep", {"eth0": f"{NODE_IP}/24"}, up=True) as name:
        yield name


@pytest.fixture
def node() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a network namespace")
    yield from _netns()


def _forbidden(cluster: Cluster, token: str, method: str, path: str, body: Any = None) -> None:
    r = cluster.call(token, method, path, body)
    assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text[:200]}"
    assert r.json()["reason"] == "Forbidden"


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_kproxy_runs_with_its_daemonset_identity(cluster: Cluster, node: str) -> None:
    token = cluster.mint("kube-proxy")
    files = cluster.pod_files("kproxy", token, "kube-proxy", "/var/lib/kube-proxy/")
    # kproxy's own loader reads the ConfigMap's KubeProxyConfiguration as the DaemonSet gives it.
    loaded = load_config_file(str(files["config.conf"]))
    assert loaded["mode"] == "iptables" and loaded["cluster_cidr"] == "10.244.0.0/16"
    assert loaded["kubeconfig"] == str(files["kubeconfig.conf"])
    # The API server on the root namespace's loopback, carried into the node's (as tests/iptables).
    port = int(cluster.api.url.rsplit(":", 1)[1])
    with loopback_into(node, port):
        log_path = cluster.tmp / "kproxy.log"
        # The DaemonSet's command line, $(NODE_NAME) expanded as the kubelet does.
        ds = cluster.admin("GET", "/apis/apps/v1/namespaces/kube-system/daemonsets/kube-proxy")
        argv = [a.replace("$(NODE_NAME)", "node-1").replace("/var/lib/kube-proxy/", f"{files['config.conf'].parent}/")
                for a in ds["spec"]["template"]["spec"]["containers"][0]["command"][1:]]
        proc = start_kproxy(node, [*argv, "--v=2"], log_path)
        try:
            want = {"KUBE-SVC-" + port_proto_hash(n, p) for n, p in (
                ("default/kubernetes:https", "tcp"), ("default/web:http", "tcp"), ("kube-system/kube-dns:dns", "udp"))}
            deadline, chains = time.monotonic() + 60, set()
            while time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                out = subprocess.run(["ip", "netns", "exec", node, "iptables-save", "-t", "nat"], capture_output=True,
                                     text=True, timeout=30, check=False).stdout
                chains = {ln[1:].split()[0] for ln in out.splitlines() if ln.startswith(":KUBE-SVC-")}
                if want <= chains:
                    break
                time.sleep(0.3)
            assert want <= chains, (chains, log_path.read_text(errors="replace")[-3000:])
            health = subprocess.run(["ip", "netns", "exec", node, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                     "http://127.0.0.1:10256/healthz"], capture_output=True, text=True, timeout=30)
            assert health.stdout == "200"
            # The same token, outside system:node-proxier: 403.
            _forbidden(cluster, token, "GET", "/api/v1/namespaces/kube-system/secrets")
            _forbidden(cluster, token, "POST", "/api/v1/namespaces/default/services",
                       {"metadata": {"name": "evil"}, "spec": {"ports": [{"port": 1}]}})
            _forbidden(cluster, token, "PATCH", "/api/v1/nodes/node-1", {})
            _forbidden(cluster, token, "GET", "/api/v1/namespaces/default/pods")
            _forbidden(cluster, token, "POST", "/api/v1/namespaces/kube-system/serviceaccounts/kube-proxy/token",
                       {"spec": {}})
            assert cluster.call(token, "GET", "/apis/discovery.k8s.io/v1/endpointslices").status_code == 200
        finally:
            stop_process(proc)
    text = log_path.read_text(errors="replace")
    # Everything kproxy needed was granted: the server never refused it (a refusal is logged as
    # "403 Forbidden ..."; the word is searched, not the number, which timestamps' milliseconds hold).
    assert "forbidden" not in text.lower() and "Traceback" not in text, text[-3000:]


@pytest.mark.timeout(90)
def test_dns_runs_with_its_deployment_identity(cluster: Cluster) -> None:
    dns = shutil.which("kproxy-dns", path=BIN)
    if dns is None or shutil.which("dig") is None:
        pytest.skip("kproxy-dns or dig is not installed")
    token = cluster.mint("coredns")
    files = cluster.pod_files("dns", token, "kproxy-dns", "/etc/kproxy-dns/")
    dep = cluster.admin("GET", "/apis/apps/v1/namespaces/kube-system/deployments/coredns")
    argv = [a.replace("/etc/kproxy-dns/", f"{files['kubeconfig.conf'].parent}/")
            for a in dep["spec"]["template"]["spec"]["containers"][0]["command"][1:]]
    port_file = cluster.tmp / "dns.port"
    # Here only the listening addresses differ from the Deployment's (later flags win): loopback,
    # any free port (other tests run beside this one), no health port and no upstream.
    argv += ["--dns-bind-address=127.0.0.1", "--dns-port=0", "--health-port=0", f"--port-file={port_file}",
             "--upstream=127.0.0.1:9"]
    log_path = cluster.tmp / "dns.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([dns, *argv], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, answers = time.monotonic() + 30, {}
        names = {"kube-dns.kube-system.svc.cluster.local": "10.96.0.10",
                 "kubernetes.default.svc.cluster.local": "10.96.0.1"}
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().strip()
                answers = {n: subprocess.run(["dig", "@127.0.0.1", "-p", port, "+short", "+time=1", "+tries=1", n],
                                             capture_output=True, text=True, timeout=10).stdout.strip()
                           for n in names}
                if answers == names:
                    break
            time.sleep(0.2)
        assert answers == names, (answers, log_path.read_text(errors="replace")[-3000:])
        web = cluster.admin("GET", "/api/v1/namespaces/default/services/web")["spec"]["clusterIP"]
        srv = subprocess.run(["dig", "@127.0.0.1", "-p", port, "+short", "SRV",
                              "_http._tcp.web.default.svc.cluster.local"], capture_output=True, text=True, timeout=10)
        assert srv.stdout.split() == ["0", "100", "80", "web.default.svc.cluster.local."], srv.stdout
        assert web
        _forbidden(cluster, token, "GET", "/api/v1/namespaces/kube-system/secrets")
        _forbidden(cluster, token, "GET", "/api/v1/nodes")
        _forbidden(cluster, token, "GET", "/api/v1/namespaces/default/services/web")  # list/watch only
        _forbidden(cluster, token, "POST", "/api/v1/namespaces/kube-system/configmaps", {"metadata": {"name": "x"}})
        _forbidden(cluster, token, "DELETE", "/api/v1/namespaces/default/services/web")
        r = kubectl(str(files["kubeconfig.conf"]), "auth", "can-i", "watch", "endpointslices.discovery.k8s.io")
        assert r.stdout.strip() == "yes", r.stderr
        r = kubectl(str(files["kubeconfig.conf"]), "auth", "can-i", "list", "secrets")
        assert r.stdout.strip() == "no", r.stderr
    finally:
        stop_process(proc)
    text = log_path.read_text(errors="replace")
    assert "forbidden" not in text.lower() and "Traceback" not in text, text[-3000:]


def test_manifest_yaml_parses_into_the_kinds_documented() -> None:
    kinds = {m: [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all((DEPLOY / m).read_text()) if d]
             for m in ("kproxy.yaml", "kproxy-dns.yaml")}
    assert kinds == {
        "kproxy.yaml": [("ServiceAccount", "kube-proxy"), ("ClusterRoleBinding", "kproxy:node-proxier"),
                        ("ConfigMap", "kube-proxy"), ("DaemonSet", "kube-proxy")],
        "kproxy-dns.yaml": [("ServiceAccount", "coredns"), ("ClusterRole", "system:coredns"),
                            ("ClusterRoleBinding", "system:coredns"), ("ConfigMap", "kproxy-dns"),
                            ("Deployment", "coredns"), ("Service", "kube-dns")],
    }
    json.dumps(kinds)

"""The real kubectl binary against the server, with the kubeconfig the server wrote."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from controlplane_stub.apiserver.testing import APIServerProcess

SEED = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "seed")
KUBECTL = shutil.which("kubectl")
# The old client (Debian 12's kubernetes-client 1.20) conflicts with the image's kubectl, so it is not
# installed; point KPROXY_KUBECTL_OLD at an extracted binary to run the seed tests with it too
# (apt-get download kubernetes-client && dpkg-deb -x kubernetes-client_*.deb DIR).
KUBECTL_OLD = os.environ.get("KPROXY_KUBECTL_OLD", "")

pytestmark = [pytest.mark.kubectl, pytest.mark.timeout(120),
              pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH")]

_BINARIES = [pytest.param(KUBECTL, id="kubectl"),
             pytest.param(KUBECTL_OLD, id="kubectl-old", marks=pytest.mark.skipif(
                 not KUBECTL_OLD, reason="KPROXY_KUBECTL_OLD (an old kubectl, e.g. 1.20) is not set"))]


def kubectl(api: APIServerProcess, *args: str, check: bool = True, stdin: str | None = None,
            kubeconfig: str | None = None, binary: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = binary or KUBECTL
    assert binary
    env = {"PATH": os.environ.get("PATH", ""), "HOME": api.data_dir, "KUBECONFIG": kubeconfig or api.kubeconfig}
    p = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=60, input=stdin,
                       check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.mark.parametrize("binary", _BINARIES)
def test_seed_lifecycle(apiserver: APIServerProcess, binary: str) -> None:
    def k(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return kubectl(apiserver, *args, binary=binary, **kw)

    seed = os.path.join(SEED, "flask-kubernetes.yaml")
    out = k("apply", "-f", seed).stdout
    assert "service/flask-kubernetes-service created" in out
    assert "deployment.apps/flask-kubernetes created" in out

    wide = k("get", "svc,deploy", "-o", "wide").stdout
    lines = wide.splitlines()
    assert any(line.startswith("service/flask-kubernetes-service") for line in lines)
    assert any(line.startswith("deployment.apps/flask-kubernetes") for line in lines)

    svc = yaml.safe_load(k("get", "svc", "flask-kubernetes-service", "-o", "yaml").stdout)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"][0]["port"] == 6000 and svc["spec"]["ports"][0]["targetPort"] == 5000
    assert svc["spec"]["selector"] == {"app": "flask-kubernetes"}
    assert "kubectl.kubernetes.io/last-applied-configuration" in svc["metadata"]["annotations"]

    assert "scaled" in k("scale", "deploy", "flask-kubernetes", "--replicas=2").stdout
    dep = yaml.safe_load(k("get", "deploy", "flask-kubernetes", "-o", "yaml").stdout)
    assert dep["spec"]["replicas"] == 2 and dep["metadata"]["generation"] == 2

    assert "labeled" in k("label", "svc", "flask-kubernetes-service", "tier=web").stdout
    got = k("get", "svc", "-l", "tier=web", "-o", "name").stdout.split()
    assert got == ["service/flask-kubernetes-service"]

    # apply again after an edit: the three-way patch changes the port and keeps the label
    with open(seed) as f:
        edited = f.read().replace("port: 6000", "port: 6001")
    out = k("apply", "-f", "-", stdin=edited).stdout
    assert "service/flask-kubernetes-service configured" in out
    svc = yaml.safe_load(k("get", "svc", "flask-kubernetes-service", "-o", "yaml").stdout)
    assert svc["spec"]["ports"][0]["port"] == 6001 and svc["metadata"]["labels"] == {"tier": "web"}

    out = k("delete", "-f", seed).stdout
    assert 'service "flask-kubernetes-service" deleted' in out
    assert 'deployment.apps "flask-kubernetes" deleted' in out
    # What is left is the API server's own Service, present in every cluster.
    assert k("get", "svc,deploy", "-o", "name").stdout.split() == ["service/kubernetes"]


@pytest.mark.parametrize("binary", _BINARIES)
def test_seed_as_written_gets_the_real_errors(apiserver: APIServerProcess, binary: str) -> None:
    p = kubectl(apiserver, "apply", "-f", os.path.join(SEED, "flask-kubernetes-as-written.yaml"), check=False,
                binary=binary)
    assert p.returncode != 0
    err = p.stderr
    assert 'Service "flask-kubernetes -service" is invalid: metadata.name: Invalid value: ' \
           '"flask-kubernetes -service": a DNS-1035 label must consist of lower case alphanumeric characters' in err
    assert 'Deployment.apps "flask-kubernetes" is invalid' in err
    assert "spec.selector: Required value" in err
    assert kubectl(apiserver, "get", "deploy", "flask-kubernetes", check=False, binary=binary).returncode != 0


def test_readonly_kubeconfig_and_short_names(apiserver: APIServerProcess) -> None:
    out = kubectl(apiserver, "get", "svc,deploy,rs,po,ns,no,ep,cm,ev", "-A", "-o", "name").stdout
    assert "namespace/kube-system" in out.split()
    out = kubectl(apiserver, "get", "ns", "kube-system", kubeconfig=apiserver.readonly_kubeconfig).stdout
    assert "kube-system" in out
    p = kubectl(apiserver, "create", "configmap", "x", "--from-literal=a=b", check=False,
                kubeconfig=apiserver.readonly_kubeconfig)
    assert p.returncode != 0 and "forbidden" in p.stderr.lower()


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_leaves(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def test_typed_create_commands_send_protobuf(apiserver: APIServerProcess) -> None:
    """kubectl create <kind> sends protobuf bodies: every field kubectl set must arrive intact."""
    import json

    ns = "kubectl-pb"
    kubectl(apiserver, "create", "namespace", ns)
    commands = [
        ["create", "configmap", "c1", "--from-literal=a=b", "--from-literal=x=y"],
        ["create", "secret", "generic", "s1", "--from-literal=user=admin", "--type=Opaque"],
        ["create", "service", "clusterip", "s2", "--tcp=80:8080", "--tcp=443:https"],
        ["create", "service", "nodeport", "s3", "--tcp=81:8081", "--node-port=30333"],
        ["create", "service", "loadbalancer", "s4", "--tcp=82:8082"],
        ["create", "deployment", "web", "--image=nginx:1.27", "--replicas=3", "--port=80"],
    ]
    wanted = []
    for cmd in commands:
        wanted.append(json.loads(kubectl(apiserver, *cmd, "-n", ns, "--dry-run=client", "-o", "json").stdout))
        kubectl(apiserver, *cmd, "-n", ns)
    items = json.loads(kubectl(apiserver, "get", "cm,secret,svc,deploy", "-n", ns, "-o", "json").stdout)["items"]
    stored_by = {(i["kind"], i["metadata"]["name"]): _leaves(i) for i in items}
    for cmd, obj in zip(commands, wanted):
        stored = stored_by[(obj["kind"], obj["metadata"]["name"])]
        for path, value in _leaves(obj).items():
            if path == "metadata.creationTimestamp" or path.startswith("status"):
                continue
            assert stored.get(path) == value, f"{' '.join(cmd)}: {path} sent {value!r}, stored {stored.get(path)!r}"
    out = kubectl(apiserver, "get", "svc", "-n", ns, "-o", "wide").stdout
    assert "81:30333/TCP" in out
    kubectl(apiserver, "delete", "namespace", ns)

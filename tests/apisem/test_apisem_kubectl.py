"""The semantics through the real kproxy-apiserver process, driven by the real kubectl binary."""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

SEED = Path(__file__).resolve().parents[2] / "examples" / "seed"
KUBECTL = shutil.which("kubectl")
# Debian's kubernetes-client (1.20) is the old client the issue names; it is not installed next to
# the image's 1.32 (it would replace it): point KPROXY_KUBECTL_OLD at an extracted binary to run it too.
KUBECTL_OLD = os.environ.get("KPROXY_KUBECTL_OLD", "")
CLIENTS = [pytest.param("current", id="kubectl"),
           pytest.param("old", id="kubectl-old", marks=pytest.mark.skipif(
               not KUBECTL_OLD, reason="KPROXY_KUBECTL_OLD (an old kubectl, e.g. 1.20) is not set"))]

pytestmark = [pytest.mark.kubectl,
              pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH (the image ships 1.32)")]

DNS1035 = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
           "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
           "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")


@pytest.fixture(scope="module")
def api(storage_backend: str) -> Iterator[APIServerProcess]:
    with running_apiserver() as server:
        yield server


def run_kubectl(api: APIServerProcess, *args: str, stdin: str | None = None,
                client: str = "current") -> subprocess.CompletedProcess[str]:
    binary = KUBECTL_OLD if client == "old" else KUBECTL
    assert binary
    return subprocess.run([binary, "--kubeconfig", api.kubeconfig, "--request-timeout=20s", *args],
                          capture_output=True, text=True, input=stdin, timeout=60)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.timeout(90)
def test_seed_as_written_gets_the_real_messages(api: APIServerProcess, client: str) -> None:
    kubectl = functools.partial(run_kubectl, client=client)
    out = kubectl(api, "apply", "-f", str(SEED / "flask-kubernetes-as-written.yaml"))
    assert out.returncode == 1
    source = SEED / "flask-kubernetes-as-written.yaml"
    assert (f'Error from server (Invalid): error when creating "{source}": Service "flask-kubernetes -service" is '
            f'invalid: metadata.name: Invalid value: "flask-kubernetes -service": {DNS1035}') in out.stderr
    assert (f'Error from server (Invalid): error when creating "{source}": Deployment.apps "flask-kubernetes" is '
            'invalid: [spec.selector: Required value, spec.template.metadata.labels: Invalid value: '
            'map[string]string{"app":"flask-kubernetes"}: `selector` does not match template `labels`]') in out.stderr
    # A rejected request changes nothing.
    listed = kubectl(api, "get", "svc,deploy", "-o", "name")
    assert listed.returncode == 0 and "flask" not in listed.stdout


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.timeout(120)
def test_apply_get_wide_edit_reapply_scale_label_delete(api: APIServerProcess, client: str) -> None:
    kubectl = functools.partial(run_kubectl, client=client)
    manifest = (SEED / "flask-kubernetes.yaml").read_text()
    out = kubectl(api, "apply", "-f", "-", stdin=manifest)
    assert out.returncode == 0, out.stderr
    assert "service/flask-kubernetes-service created" in out.stdout

    wide = kubectl(api, "get", "svc,deploy", "-o", "wide")
    assert wide.returncode == 0, wide.stderr
    lines = wide.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE", "SELECTOR"]
    svc_row = next(line.split() for line in lines if line.startswith("service/flask-kubernetes-service"))
    assert svc_row[1] == "LoadBalancer" and svc_row[3] == "<pending>"
    assert re.fullmatch(r"10\.(9[6-9]|10[0-9]|11[01])\.\d+\.\d+", svc_row[2])  # inside 10.96.0.0/12
    assert re.fullmatch(r"6000:3\d{4}/TCP", svc_row[4]) and svc_row[6] == "app=flask-kubernetes"
    deploy_header = next(line.split() for line in lines if line.startswith("NAME") and "READY" in line)
    assert deploy_header == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"]
    cluster_ip, node_port = svc_row[2], svc_row[4].split(":")[1].split("/")[0]

    # Edit the manifest and apply again: kubectl sends a strategic merge patch.
    edited = manifest.replace("replicas: 4", "replicas: 3").replace("containerPort: 5000",
                                                                     "containerPort: 5001\n          name: http")
    out = kubectl(api, "apply", "-f", "-", stdin=edited)
    assert out.returncode == 0, out.stderr
    ports = kubectl(api, "get", "deploy", "flask-kubernetes", "-o",
                    "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].ports}")
    assert ports.stdout == '3 [{"containerPort":5001,"name":"http","protocol":"TCP"}]'
    same = kubectl(api, "get", "svc", "flask-kubernetes-service", "-o",
                   "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}")
    assert same.stdout == f"{cluster_ip} {node_port}"  # allocations survive the update

    assert kubectl(api, "scale", "deploy/flask-kubernetes", "--replicas=2").returncode == 0
    assert kubectl(api, "label", "svc/flask-kubernetes-service", "tier=web").returncode == 0
    got = kubectl(api, "get", "deploy,svc", "-o", "jsonpath={.items[0].spec.replicas} {.items[1].metadata.labels}")
    assert got.stdout == '2 {"tier":"web"}'

    # Immutable clusterIP, with the real server's words.
    bad = kubectl(api, "patch", "svc", "flask-kubernetes-service", "-p", '{"spec":{"clusterIP":"10.96.0.77",'
                                                                        '"clusterIPs":["10.96.0.77"]}}')
    assert bad.returncode == 1
    assert ('The Service "flask-kubernetes-service" is invalid: spec.clusterIPs[0]: Invalid value: '
            '[]string{"10.96.0.77"}: may not change once set') in bad.stderr

    out = kubectl(api, "delete", "-f", "-", stdin=edited)
    assert out.returncode == 0, out.stderr
    assert "flask" not in kubectl(api, "get", "svc,deploy", "-o", "name").stdout


@pytest.mark.timeout(90)
def test_strict_field_validation_and_decode_errors(api: APIServerProcess) -> None:
    kubectl = run_kubectl
    manifest = (SEED / "flask-kubernetes.yaml").read_text().replace("flask-kubernetes", "strict-demo")
    typo = manifest.replace("replicas: 4", "replicas: 4\n  replicaz: 1").replace(
        "        imagePullPolicy", "        imagee: x\n        imagePullPolicy")
    out = kubectl(api, "apply", "-f", "-", stdin=typo)
    assert out.returncode == 1
    assert ('Error from server (BadRequest): error when creating "STDIN": Deployment in version "v1" cannot be '
            'handled as a Deployment: strict decoding error: unknown field "spec.replicaz", unknown field '
            '"spec.template.spec.containers[0].imagee"') in out.stderr
    warned = kubectl(api, "apply", "--validate=warn", "-f", "-", stdin=typo)
    assert warned.returncode == 0, warned.stderr
    assert 'Warning: unknown field "spec.replicaz"' in warned.stderr
    wrong_type = kubectl(api, "create", "-f", "-", stdin=manifest.replace("strict-demo-service", "typed").replace(
        "port: 6000", 'port: "6000"'))
    assert ('Service in version "v1" cannot be handled as a Service: json: cannot unmarshal string into Go struct '
            "field ServicePort.spec.ports.port of type int32") in wrong_type.stderr
    assert kubectl(api, "delete", "-f", "-", stdin=manifest).returncode == 0


DUAL_STACK = """apiVersion: v1
kind: Service
metadata:
  name: web-dual
spec:
  ipFamilyPolicy: PreferDualStack
  selector:
    app: web
  ports:
  - port: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web-six
spec:
  ipFamilies: [IPv6]
  clusterIP: fd00:10:96::53
  selector:
    app: web
  ports:
  - port: 53
    protocol: UDP
"""


@pytest.mark.timeout(90)
def test_dual_stack_service_cluster_ip_range() -> None:
    with running_apiserver(extra_args=["--service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/112"]) as dual:
        out = run_kubectl(dual, "apply", "-f", "-", stdin=DUAL_STACK)
        assert out.returncode == 0, out.stderr
        got = run_kubectl(dual, "get", "svc", "web-dual", "web-six", "-o",
                          "jsonpath={range .items[*]}{.spec.ipFamilyPolicy} {.spec.ipFamilies} {.spec.clusterIPs}|"
                          "{end}").stdout.split("|")
        policy, families, ips = got[0].split(" ", 2)
        assert policy == "PreferDualStack" and families == '["IPv4","IPv6"]'
        v4, v6 = json.loads(ips)
        assert ipaddress.ip_address(v4) in ipaddress.ip_network("10.96.0.0/16")
        assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:10:96::/112")
        assert got[1] == 'SingleStack ["IPv6"] ["fd00:10:96::53"]'
        taken = run_kubectl(dual, "create", "-f", "-", stdin=DUAL_STACK.split("---\n")[1].replace("web-six", "dup"))
        assert ('spec.clusterIPs: Invalid value: []string{"fd00:10:96::53"}: failed to allocate IP fd00:10:96::53: '
                "provided IP is already allocated") in taken.stderr

"""apps/v1 DaemonSet served by kproxy-apiserver: defaulting and validation as upstream's
(pkg/apis/apps/v1/defaults.go, pkg/apis/apps/validation), the status subresource, discovery and
`kubectl get ds`. The controller that runs their pods in kproxy-cluster is tested in
tests/cluster/test_cluster_e2e.py."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from controlplane_stub.apiserver.defaults import apply_defaults
from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.apiserver.validation import validate_create, validate_update

DS = "daemonsets.apps"


def ds(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "selector": {"matchLabels": {"k8s-app": "kproxy"}},
        "template": {"metadata": {"labels": {"k8s-app": "kproxy"}},
                     "spec": {"containers": [{"name": "kproxy", "image": "kproxy:dev"}]}},
    }
    base.update(spec)
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "kproxy", "namespace": "kube-system"},
            "spec": {k: v for k, v in base.items() if v is not None}}


def causes(obj: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        apply_defaults(DS, obj)
        validate_create(DS, obj)
    except StatusError as e:
        return [(c["field"], c["reason"]) for c in e.causes]
    return []


def test_defaults_as_upstream() -> None:
    obj = ds()
    apply_defaults(DS, obj)
    spec = obj["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert spec["revisionHistoryLimit"] == 10
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Always" and pod["dnsPolicy"] == "ClusterFirst"
    ondelete = ds(updateStrategy={"type": "OnDelete"})
    apply_defaults(DS, ondelete)
    assert ondelete["spec"]["updateStrategy"] == {"type": "OnDelete"}


CASES: list[tuple[str, dict[str, Any], list[tuple[str, str]]]] = [
    ("valid", ds(), []),
    ("no selector", ds(selector=None), [("spec.selector", "FieldValueRequired"),
                                        ("spec.template.metadata.labels", "FieldValueInvalid")]),
    ("selector does not match", ds(selector={"matchLabels": {"app": "x"}}),
     [("spec.template.metadata.labels", "FieldValueInvalid")]),
    # An absent template is the zero PodTemplateSpec after defaulting, as in Go.
    ("no template", ds(template=None), [("spec.template.metadata.labels", "FieldValueInvalid"),
                                        ("spec.template.spec.containers", "FieldValueRequired")]),
    ("restartPolicy", ds(template={"metadata": {"labels": {"k8s-app": "kproxy"}},
                                   "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}),
     [("spec.template.spec.restartPolicy", "FieldValueNotSupported")]),
    ("strategy type", ds(updateStrategy={"type": "Sometimes"}), [("spec.updateStrategy.type", "FieldValueNotSupported")]),
    ("both zero", ds(updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}),
     [("spec.updateStrategy.rollingUpdate.maxUnavailable", "FieldValueInvalid")]),
    ("bad percent", ds(updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "ten%"}}),
     [("spec.updateStrategy.rollingUpdate.maxUnavailable", "FieldValueInvalid")]),
    ("over 100%", ds(updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "150%"}}),
     [("spec.updateStrategy.rollingUpdate.maxUnavailable", "FieldValueInvalid")]),
    ("negative history", ds(revisionHistoryLimit=-1), [("spec.revisionHistoryLimit", "FieldValueInvalid")]),
]


@pytest.mark.parametrize(("why", "obj", "want"), CASES, ids=[c[0] for c in CASES])
def test_validation(why: str, obj: dict[str, Any], want: list[tuple[str, str]]) -> None:
    assert causes(obj) == want


def test_selector_is_immutable() -> None:
    old = ds()
    apply_defaults(DS, old)
    new = copy.deepcopy(old)
    new["spec"]["selector"] = {"matchLabels": {"k8s-app": "kproxy", "v": "2"}}
    new["spec"]["template"]["metadata"]["labels"]["v"] = "2"
    with pytest.raises(StatusError) as e:
        validate_update(DS, new, old)
    assert [c["field"] for c in e.value.causes] == ["spec.selector"]


@pytest.fixture(scope="module")
def api() -> Iterator[APIServerProcess]:
    with running_apiserver() as a:
        yield a


def test_served_with_status_subresource(api: APIServerProcess) -> None:
    s = requests.Session()
    s.trust_env = False
    s.verify = api.ca_file
    s.headers["Authorization"] = f"Bearer {api.token}"
    base = api.url + "/apis/apps/v1/namespaces/kube-system/daemonsets"
    r = s.post(base, json=ds())
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["metadata"]["generation"] == 1
    assert created["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    # The main resource ignores status; the status subresource changes only status.
    status = {"currentNumberScheduled": 3, "desiredNumberScheduled": 3, "numberMisscheduled": 0, "numberReady": 2,
              "observedGeneration": 1}
    r = s.put(f"{base}/kproxy/status", json={**created, "status": status, "spec": {**created["spec"],
                                                                                   "minReadySeconds": 9}})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == status and "minReadySeconds" not in r.json()["spec"]
    assert r.json()["metadata"]["generation"] == 1
    r = s.get(base + "/kproxy")
    r = s.put(base + "/kproxy", json={**r.json(), "status": {}, "spec": {**r.json()["spec"], "minReadySeconds": 5}})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == status and r.json()["metadata"]["generation"] == 2
    # A bad update is a 422 naming the field, and changes nothing.
    bad = {**r.json(), "spec": {**r.json()["spec"], "updateStrategy": {"type": "Never"}}}
    r = s.put(base + "/kproxy", json=bad)
    assert r.status_code == 422 and r.json()["details"]["causes"][0]["field"] == "spec.updateStrategy.type"
    disc = s.get(api.url + "/apis/apps/v1").json()
    names = {x["name"]: x for x in disc["resources"]}
    assert names["daemonsets"]["shortNames"] == ["ds"] and "daemonsets/status" in names


@pytest.mark.kubectl
def test_kubectl_get_daemonsets(api: APIServerProcess) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    manifest = json.dumps({**ds(), "metadata": {"name": "wide", "namespace": "default"}})
    r = subprocess.run(["kubectl", "--kubeconfig", api.kubeconfig, "apply", "-f", "-"], input=manifest,
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["kubectl", "--kubeconfig", api.kubeconfig, "get", "ds", "-o", "wide"],
                       capture_output=True, text=True, timeout=30, check=False)
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE"], r.stderr
    assert row.split()[0] == "wide" and "kproxy:dev" in row

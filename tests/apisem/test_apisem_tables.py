from __future__ import annotations

from typing import Any

import pytest

from controlplane_stub.apiserver.tables import format_selector, human_duration, to_table

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
CREATED = "2027-01-15T07:57:00Z"  # 3m before NOW


def cells(table: dict[str, Any]) -> list[list[Any]]:
    return [row["cells"] for row in table["rows"]]


def names(table: dict[str, Any], priority: int | None = None) -> list[str]:
    return [c["name"] for c in table["columnDefinitions"] if priority is None or c["priority"] == priority]


@pytest.mark.parametrize("seconds,text", [
    (-5, "<invalid>"), (-1, "0s"), (0, "0s"), (5, "5s"), (119, "119s"), (120, "2m"), (182, "3m2s"), (599, "9m59s"),
    (600, "10m"), (10799, "179m"), (3 * 3600, "3h"), (3 * 3600 + 60 * 7, "3h7m"), (8 * 3600, "8h"), (47 * 3600, "47h"),
    (48 * 3600, "2d"), (2 * 86400 + 5 * 3600, "2d5h"), (8 * 86400, "8d"), (400 * 86400, "400d"),
    (730 * 86400, "2y"), (800 * 86400, "2y70d"), (3000 * 86400, "8y"),
])
@pytest.mark.timeout(10)
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.timeout(10)
def test_services_table() -> None:
    lb = {"metadata": {"name": "flask-kubernetes-service", "creationTimestamp": CREATED},
          "spec": {"type": "LoadBalancer", "clusterIP": "10.96.12.7", "selector": {"app": "flask", "tier": "web"},
                   "ports": [{"port": 6000, "nodePort": 31234, "protocol": "TCP"}]}}
    served = {"metadata": {"name": "lb2", "creationTimestamp": CREATED},
              "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.9", "ports": [{"port": 80, "nodePort": 30001,
                                                                                  "protocol": "TCP"}]},
              "status": {"loadBalancer": {"ingress": [{"ip": "172.18.0.10"}]}}}
    dns = {"metadata": {"name": "kube-dns", "creationTimestamp": CREATED},
           "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}}
    ext = {"metadata": {"name": "db", "creationTimestamp": CREATED},
           "spec": {"type": "ExternalName", "externalName": "db.example.com"}}
    table = to_table("services", [lb, served, dns, ext], now=NOW)
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert names(table, 0) == ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age"]
    assert names(table, 1) == ["Selector"]
    assert table["columnDefinitions"][0]["format"] == "name"
    assert cells(table) == [
        ["flask-kubernetes-service", "LoadBalancer", "10.96.12.7", "<pending>", "6000:31234/TCP", "3m", "app=flask,tier=web"],
        ["lb2", "LoadBalancer", "10.96.0.9", "172.18.0.10", "80:30001/TCP", "3m", "<none>"],
        ["kube-dns", "ClusterIP", "10.96.0.10", "<none>", "53/UDP,53/TCP", "3m", "<none>"],
        ["db", "ExternalName", "<none>", "db.example.com", "<none>", "3m", "<none>"],
    ]
    row_obj = table["rows"][0]["object"]
    assert row_obj["kind"] == "PartialObjectMetadata" and row_obj["metadata"]["name"] == "flask-kubernetes-service"
    assert "object" not in to_table("services", [lb], "None", now=NOW)["rows"][0]
    assert to_table("services", [lb], "Object", now=NOW)["rows"][0]["object"] is lb


@pytest.mark.timeout(10)
def test_deployments_and_replicasets() -> None:
    d = {"metadata": {"name": "flask", "creationTimestamp": CREATED},
         "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "flask"}},
                  "template": {"spec": {"containers": [{"name": "web", "image": "flask:latest"},
                                                       {"name": "log", "image": "busybox"}]}}},
         "status": {"readyReplicas": 3, "updatedReplicas": 4, "availableReplicas": 3}}
    table = to_table("deployments.apps", [d], now=NOW)
    assert names(table) == ["Name", "Ready", "Up-to-date", "Available", "Age", "Containers", "Images", "Selector"]
    assert cells(table) == [["flask", "3/4", 4, 3, "3m", "web,log", "flask:latest,busybox", "app=flask"]]
    rs = {"metadata": {"name": "flask-5d4f", "creationTimestamp": CREATED}, "spec": d["spec"],
          "status": {"replicas": 4, "readyReplicas": 2}}
    assert cells(to_table("replicasets.apps", [rs], now=NOW)) == [
        ["flask-5d4f", 4, 4, 2, "3m", "web,log", "flask:latest,busybox", "app=flask"]]


@pytest.mark.timeout(10)
def test_selector_rendering() -> None:
    assert format_selector({"matchLabels": {"b": "2", "a": "1"},
                            "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "dev"]},
                                                 {"key": "gone", "operator": "DoesNotExist"}]}) == \
        "a=1,b=2,env in (dev,prod),!gone"
    assert format_selector(None) == "<none>"


@pytest.mark.timeout(10)
def test_pod_status_column() -> None:
    base: dict[str, Any] = {"metadata": {"name": "p", "creationTimestamp": CREATED},
                            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "node-1"}}
    running = dict(base, status={
        "phase": "Running", "podIPs": [{"ip": "10.244.1.5"}],
        "containerStatuses": [
            {"name": "a", "ready": True, "restartCount": 2, "state": {"running": {}},
             "lastState": {"terminated": {"finishedAt": "2027-01-15T07:59:00Z"}}},
            {"name": "b", "ready": True, "restartCount": 0, "state": {"running": {}}}]})
    crash = dict(base, status={"phase": "Running", "containerStatuses": [
        {"name": "a", "ready": False, "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
        {"name": "b", "ready": True, "restartCount": 0, "state": {"running": {}}}]})
    pending = dict(base, spec={"containers": [{"name": "a"}]}, status={"phase": "Pending"})
    deleting = dict(base, metadata={"name": "p", "creationTimestamp": CREATED, "deletionTimestamp": CREATED},
                    status={"phase": "Running"})
    done = dict(base, spec={"containers": [{"name": "a"}]}, status={"phase": "Succeeded", "containerStatuses": [
        {"name": "a", "ready": False, "restartCount": 0, "state": {"terminated": {"reason": "Completed"}}}]})
    failed = dict(base, spec={"containers": [{"name": "a"}]}, status={"phase": "Failed", "containerStatuses": [
        {"name": "a", "ready": False, "restartCount": 0, "state": {"terminated": {"exitCode": 2}}}]})
    table = to_table("pods", [running, crash, pending, deleting, done, failed], now=NOW)
    assert names(table, 0) == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert names(table, 1) == ["IP", "Node", "Nominated Node", "Readiness Gates"]
    assert cells(table) == [
        ["p", "2/2", "Running", "2 (60s ago)", "3m", "10.244.1.5", "node-1", "<none>", "<none>"],
        ["p", "1/2", "CrashLoopBackOff", "5", "3m", "<none>", "node-1", "<none>", "<none>"],
        ["p", "0/1", "Pending", "0", "3m", "<none>", "<none>", "<none>", "<none>"],
        ["p", "0/2", "Terminating", "0", "3m", "<none>", "node-1", "<none>", "<none>"],
        ["p", "0/1", "Completed", "0", "3m", "<none>", "<none>", "<none>", "<none>"],
        ["p", "0/1", "ExitCode:2", "0", "3m", "<none>", "<none>", "<none>", "<none>"],
    ]


@pytest.mark.timeout(10)
def test_other_tables() -> None:
    node = {"metadata": {"name": "node-1", "creationTimestamp": CREATED,
                         "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "spec": {"unschedulable": True},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": "10.0.0.2"}],
                       "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Debian GNU/Linux 12 (bookworm)",
                                    "kernelVersion": "6.1.0", "containerRuntimeVersion": "kproxy://0.1"}}}
    assert cells(to_table("nodes", [node], now=NOW)) == [[
        "node-1", "Ready,SchedulingDisabled", "control-plane", "3m", "v1.32.0", "10.0.0.2", "<none>",
        "Debian GNU/Linux 12 (bookworm)", "6.1.0", "kproxy://0.1"]]
    ep = {"metadata": {"name": "web", "creationTimestamp": CREATED},
          "subsets": [{"addresses": [{"ip": f"10.0.0.{i}"} for i in range(1, 6)], "ports": [{"port": 80}]}]}
    assert cells(to_table("endpoints", [ep], now=NOW)) == [
        ["web", "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 + 2 more...", "3m"]]
    eps = {"metadata": {"name": "web-abc", "creationTimestamp": CREATED}, "addressType": "IPv4",
           "ports": [{"port": 80}], "endpoints": [{"addresses": ["10.0.0.1"]}]}
    assert cells(to_table("endpointslices.discovery.k8s.io", [eps], now=NOW)) == [
        ["web-abc", "IPv4", "80", "10.0.0.1", "3m"]]
    ns = {"metadata": {"name": "default", "creationTimestamp": "2027-01-13T08:00:00Z"}, "status": {"phase": "Active"}}
    assert cells(to_table("namespaces", [ns], now=NOW)) == [["default", "Active", "2d"]]
    cm = {"metadata": {"name": "c", "creationTimestamp": CREATED}, "data": {"a": "1", "b": "2"}}
    secret = {"metadata": {"name": "s", "creationTimestamp": CREATED}, "type": "Opaque", "data": {"k": "dg=="}}
    assert cells(to_table("configmaps", [cm], now=NOW)) == [["c", 2, "3m"]]
    assert cells(to_table("secrets", [secret], now=NOW)) == [["s", "Opaque", 1, "3m"]]
    lease = {"metadata": {"name": "node-1", "creationTimestamp": CREATED}, "spec": {"holderIdentity": "node-1"}}
    assert cells(to_table("leases.coordination.k8s.io", [lease], now=NOW)) == [["node-1", "node-1", "3m"]]
    event = {"metadata": {"name": "p.1"}, "type": "Warning", "reason": "BackOff", "message": " restarting ",
             "involvedObject": {"kind": "Pod", "name": "p"}, "count": 3, "firstTimestamp": "2027-01-15T07:50:00Z",
             "lastTimestamp": CREATED, "source": {"component": "kubelet", "host": "node-1"}}
    table = to_table("events", [event], now=NOW)
    assert names(table, 0) == ["Last Seen", "Type", "Reason", "Object", "Message"]
    assert cells(table) == [["3m", "Warning", "BackOff", "pod/p", "", "kubelet, node-1", "restarting", "10m", 3, "p.1"]]
    generic = to_table("widgets.example.com", [{"metadata": {"name": "w", "creationTimestamp": CREATED}}], now=NOW)
    assert names(generic) == ["Name", "Age"] and cells(generic) == [["w", "3m"]]
    # No creationTimestamp: kubectl's <unknown>.
    assert cells(to_table("configmaps", [{"metadata": {"name": "x"}}], now=NOW)) == [["x", 0, "<unknown>"]]

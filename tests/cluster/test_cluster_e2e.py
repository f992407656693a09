"""The one-machine cluster end to end: `kproxy-cluster up` with 3 netns nodes, the seed app as
real Flask processes in pod namespaces, kubectl, real HTTP across nodes, and `down`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import Cluster, LoopThread, wait_for

from controlplane_stub import client as api
from controlplane_stub.agent.pods import pod_netns_name

pytestmark = [pytest.mark.e2e, pytest.mark.kubectl, pytest.mark.timeout(180)]
SEED = Path(__file__).resolve().parents[2] / "examples" / "seed" / "flask-kubernetes.yaml"
SVC = "flask-kubernetes-service"
Obj = dict[str, Any]


def seed_pods(c: Cluster) -> list[Obj]:
    return [
        p
        for p in c.json("pods", "-l", "app=flask-kubernetes")["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]


def slice_endpoints(c: Cluster) -> list[Obj]:
    items = c.json("endpointslices", "-l", f"kubernetes.io/service-name={SVC}")["items"]
    return [e for s in items for e in s.get("endpoints") or []]


def is_ready(p: Obj) -> bool:
    return any(
        x["type"] == "Ready" and x["status"] == "True"
        for x in (p.get("status") or {}).get("conditions") or []
    )


def curl_from_client(c: Cluster, url: str) -> subprocess.CompletedProcess[str]:
    return c.cli("exec", "--", "curl", "-s", "-m", "3", url, timeout=20)


class SliceRecorder:
    """Watches the Service's EndpointSlices and records every state: (ready IPs, not-ready IPs)."""

    def __init__(self, c: Cluster) -> None:
        self.loop = LoopThread()
        self.client = api.Client(api.load_kubeconfig(c.kubeconfig))
        self.history: list[tuple[float, frozenset[str], frozenset[str]]] = []
        self.slices: dict[str, Obj] = {}
        self.fut = self.loop.spawn(self._run())

    async def _run(self) -> None:
        url = api.path("endpointslices", "default")
        params = {"labelSelector": f"kubernetes.io/service-name={SVC}"}
        items, rv = await self.client.list(url, params)
        for s in items:
            self.slices[s["metadata"]["name"]] = s
        self._record()
        while True:
            async for ev in self.client.watch(url, rv, params):
                obj = ev["object"]
                rv = obj["metadata"].get("resourceVersion", rv)
                if ev["type"] == "DELETED":
                    self.slices.pop(obj["metadata"]["name"], None)
                elif ev["type"] in ("ADDED", "MODIFIED"):
                    self.slices[obj["metadata"]["name"]] = obj
                else:
                    continue
                self._record()

    def _record(self) -> None:
        eps = [e for s in self.slices.values() for e in s.get("endpoints") or []]
        ready = frozenset(e["addresses"][0] for e in eps if e["conditions"]["ready"])
        not_ready = frozenset(e["addresses"][0] for e in eps if not e["conditions"]["ready"])
        self.history.append((time.monotonic(), ready, not_ready))

    def stop(self) -> None:
        self.fut.cancel()
        self.loop.run(self.client.close(), 5)
        self.loop.stop()


def test_seed_runs_four_ready_pods_across_three_nodes(cluster: Cluster) -> None:
    c = cluster
    c.kubectl("apply", "-f", str(SEED))
    out = c.kubectl("rollout", "status", "deployment/flask-kubernetes", "--timeout=90s", timeout=100)
    assert 'deployment "flask-kubernetes" successfully rolled out' in out
    pods = seed_pods(c)
    assert len(pods) == 4 and all(p["status"]["phase"] == "Running" and is_ready(p) for p in pods)
    assert {p["spec"]["nodeName"] for p in pods} == {"node-1", "node-2", "node-3"}
    for p in pods:
        cs = p["status"]["containerStatuses"][0]
        pid = int(cs["containerID"].removeprefix("kpc://"))
        # A real process, and it lives in the pod's own network namespace, not the host's.
        assert Path(f"/proc/{pid}").exists()
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        # its own UTS namespace too, named after the pod
        uts = subprocess.run(
            ["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True, timeout=10
        )
        assert uts.stdout.strip() == p["metadata"]["name"], uts
        # The seed app asks for no user: it runs as nobody (Flask binds its port 5000 unprivileged).
        uids = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
        assert uids.split()[1:] == ["65534"] * 4, uids
        assert p["status"]["podIP"].startswith("10.244.")
    eps = wait_for(
        lambda: (e := slice_endpoints(c)) and sum(x["conditions"]["ready"] for x in e) == 4 and e,
        what="4 ready endpoints",
    )
    assert sorted(e["addresses"][0] for e in eps) == sorted(p["status"]["podIP"] for p in pods)
    assert {e["nodeName"] for e in eps} == {"node-1", "node-2", "node-3"}
    # Real HTTP from the outside client netns to every pod, across the node network and routes.
    for p in pods:
        r = curl_from_client(c, f"http://{p['status']['podIP']}:5000/")
        assert r.stdout == "Hello from Kubernetes!\n", r
    svc = c.json("svc", SVC)
    lb_ip = wait_for(
        lambda: (c.json("svc", SVC).get("status") or {}).get("loadBalancer", {}).get("ingress"),
        what="LoadBalancer IP",
    )[0]["ip"]
    assert lb_ip.startswith("10.251.0.") and svc["spec"]["type"] == "LoadBalancer"
    c.refresh()
    if not c.state["components"].get("kproxy", "").startswith("running"):
        pytest.skip(f"kproxy not running in this cluster: {c.state['components'].get('kproxy')}")
    r = wait_for(
        lambda: (x := curl_from_client(c, f"http://{lb_ip}:6000/")).stdout and x,
        timeout=30,
        what="an answer through the LoadBalancer IP",
    )
    assert r.stdout == "Hello from Kubernetes!\n"


def test_pods_resolve_services_through_the_cluster_dns(cluster: Cluster) -> None:
    c = cluster
    c.refresh()
    comps = c.state["components"]
    if not comps.get("dns", "").startswith("running") or not comps.get("kproxy", "").startswith("running"):
        pytest.skip(
            f"cluster DNS needs kproxy-dns and kproxy: dns={comps.get('dns')!r} kproxy={comps.get('kproxy')!r}"
        )
    pod = seed_pods(c)[0]
    pod_ns = pod_netns_name(c.state["prefix"], pod["metadata"]["uid"])
    resolv = subprocess.run(
        ["ip", "netns", "exec", pod_ns, "cat", "/etc/resolv.conf"], capture_output=True, text=True, timeout=10
    ).stdout
    assert (
        "nameserver 10.96.0.10" in resolv and "search default.svc.cluster.local svc.cluster.local" in resolv
    )
    cluster_ip = c.json("svc", SVC)["spec"]["clusterIP"]

    def lookup() -> str:
        r = subprocess.run(
            ["ip", "netns", "exec", pod_ns, "getent", "hosts", SVC],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return r.stdout

    out = wait_for(lambda: lookup(), timeout=30, what="the Service name to resolve inside the pod")
    assert out.split()[0] == cluster_ip, out
    # and the name works end to end: pod -> DNS -> ClusterIP -> (kproxy) -> some pod.
    r = subprocess.run(
        ["ip", "netns", "exec", pod_ns, "curl", "-s", "-m", "3", f"http://{SVC}:6000/whoami"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert r.stdout.strip() in {p["metadata"]["name"] for p in seed_pods(c)}, r


def test_kubectl_get_wide_and_describe(cluster: Cluster) -> None:
    c = cluster
    pods = seed_pods(c)
    wide = c.kubectl("get", "pods", "-o", "wide")
    header = wide.splitlines()[0].split()
    assert (
        header[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"] and "IP" in header and "NODE" in header
    ), wide
    rows = {line.split()[0]: line.split() for line in wide.splitlines()[1:]}
    for p in pods:
        row = rows[p["metadata"]["name"]]
        assert row[1:3] == ["1/1", "Running"], row
        assert (
            row[header.index("IP")] == p["status"]["podIP"]
            and row[header.index("NODE")] == p["spec"]["nodeName"]
        )
    name = pods[0]["metadata"]["name"]
    desc = c.kubectl("describe", "pod", name)
    for needle in (
        f"Name:         {name}",
        f"Node:         {pods[0]['spec']['nodeName']}/",
        "Status:       Running",
        f"IP:           {pods[0]['status']['podIP']}",
        "Image:          flask-kubernetes:latest",
        "Controlled By:  ReplicaSet/flask-kubernetes-",
    ):
        assert needle in desc, f"{needle!r} not in:\n{desc}"
    assert any(line.split()[:2] == ["Ready", "True"] for line in desc.splitlines()), desc
    # describe lists events by involvedObject name, namespace and uid: the scheduler's event is there.
    events = desc.split("Events:", 1)[1]
    assert "Scheduled" in events and f"Successfully assigned default/{name} to" in events, desc
    logs = c.cli("logs", name)
    assert logs.returncode == 0 and "Running on http://" in logs.stdout, logs  # Flask's own start line
    nodes = c.kubectl("get", "nodes")
    assert all(f"node-{i}" in nodes for i in (1, 2, 3))


def test_scale_to_two_and_the_slice_follows(cluster: Cluster) -> None:
    c = cluster
    before = {p["metadata"]["uid"] for p in seed_pods(c)}
    c.kubectl("scale", "deployment/flask-kubernetes", "--replicas=2")
    wait_for(
        lambda: len(seed_pods(c)) == 2 and len(slice_endpoints(c)) == 2,
        timeout=40,
        what="2 pods, 2 endpoints",
    )
    pods = seed_pods(c)
    assert {p["metadata"]["uid"] for p in pods} <= before  # scaled down, nothing replaced
    assert sorted(e["addresses"][0] for e in slice_endpoints(c)) == sorted(p["status"]["podIP"] for p in pods)
    prefix = c.state["prefix"]
    wait_for(
        lambda: (
            len(
                [
                    n
                    for n in subprocess.run(
                        ["ip", "netns", "list"], capture_output=True, text=True
                    ).stdout.split()
                    if n.startswith(prefix + "p")
                ]
            )
            == 2
        ),
        what="2 pod netns left",
    )


def test_rolling_update_with_max_unavailable_zero_keeps_ready_endpoints(cluster: Cluster) -> None:
    c = cluster
    rec = SliceRecorder(c)
    try:
        wait_for(lambda: rec.history, what="the slice watch")
        patch = {
            "spec": {
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "flask-kubernetes",
                                "image": "flask-kubernetes:latest",
                                "imagePullPolicy": "Never",
                                "ports": [{"containerPort": 5000}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/healthz", "port": 5000},
                                    "periodSeconds": 1,
                                    "failureThreshold": 1,
                                },
                            }
                        ]
                    }
                },
            }
        }
        old_ips = set(rec.history[-1][1])
        c.kubectl("patch", "deployment/flask-kubernetes", "--type=strategic", "-p", json.dumps(patch))
        out = c.kubectl("rollout", "status", "deployment/flask-kubernetes", "--timeout=90s", timeout=100)
        assert "successfully rolled out" in out
        wait_for(
            lambda: len(rec.history[-1][1]) == 2 and not rec.history[-1][1] & old_ips,
            timeout=30,
            what="2 new ready endpoints",
        )
    finally:
        rec.stop()
    ready_counts = [len(r) for _, r, _ in rec.history]
    assert min(ready_counts) >= 1, f"the Service had no ready endpoint at some point: {ready_counts}"
    assert min(ready_counts) >= 2, f"maxUnavailable 0 with 2 replicas: {ready_counts}"
    assert any(nr for _, _, nr in rec.history), "new pods never showed as not-ready (probe) endpoints"


def test_killed_container_restarts_and_its_endpoint_flaps(cluster: Cluster) -> None:
    c = cluster
    pod = seed_pods(c)[0]
    ip = pod["status"]["podIP"]
    pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("kpc://"))
    rec = SliceRecorder(c)
    try:
        wait_for(lambda: rec.history and ip in rec.history[-1][1], what="the pod's ready endpoint")
        os.kill(pid, signal.SIGKILL)

        def restarted() -> Obj | None:
            p = c.json("pod", pod["metadata"]["name"])
            cs = p["status"]["containerStatuses"][0]
            return p if cs["restartCount"] == 1 and cs["ready"] and "running" in cs["state"] else None

        p = wait_for(restarted, timeout=40, what="restartCount 1 and ready again")
        wait_for(lambda: ip in rec.history[-1][1], what="the endpoint ready again")
    finally:
        rec.stop()
    cs = p["status"]["containerStatuses"][0]
    assert cs["lastState"]["terminated"]["exitCode"] == 137  # 128 + SIGKILL
    assert int(cs["containerID"].removeprefix("kpc://")) != pid
    states = [("ready" if ip in r else "not-ready" if ip in nr else "absent") for _, r, nr in rec.history]
    compact = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert compact[:1] == ["ready"] and "not-ready" in compact and compact[-1] == "ready", compact


def apply_pod(c: Cluster, name: str, spec: Obj) -> None:
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"test": "pods"}},
            "spec": spec,
        }
    )


def pod_status(c: Cluster, name: str) -> Obj:
    return c.json("pod", name).get("status") or {}


def test_restart_policies_exit_codes_and_probes(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    apply_pod(
        c,
        "never",
        {
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 3"]}],
        },
    )
    apply_pod(
        c,
        "onfailure",
        {
            "restartPolicy": "OnFailure",
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 0"]}],
        },
    )
    flag = tmp_path / "unhealthy"
    apply_pod(
        c,
        "probed",
        {
            "containers": [
                {
                    "name": "web",
                    "image": "busybox",
                    "command": [sys.executable, "-m", "http.server", "8000"],
                    "workingDir": str(tmp_path),
                    # The host's Python and tmp_path lie below 0700 directories: root only.
                    "securityContext": {"runAsUser": 0},
                    "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1},
                    # Fails exactly once, when it finds the flag (and removes it): one restart,
                    # however late the test looks (with `test ! -e flag` every probe until the
                    # test removed the flag restarted it again, each after a longer back-off).
                    "livenessProbe": {
                        "exec": {"command": ["sh", "-c", f"! rm {flag} 2>/dev/null"]},
                        "periodSeconds": 1,
                        "failureThreshold": 1,
                    },
                }
            ]
        },
    )
    st = wait_for(lambda: (x := pod_status(c, "never")).get("phase") == "Failed" and x, what="never: Failed")
    assert st["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert st["containerStatuses"][0]["restartCount"] == 0
    st = wait_for(
        lambda: (x := pod_status(c, "onfailure")).get("phase") == "Succeeded" and x, what="Succeeded"
    )
    assert st["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    # tcpSocket readiness: Ready once the server listens; http.server answers real HTTP on the pod IP.
    st = wait_for(
        lambda: (
            (x := pod_status(c, "probed")).get("containerStatuses")
            and x["containerStatuses"][0]["ready"]
            and x
        ),
        what="probed: ready",
    )
    r = curl_from_client(c, f"http://{st['podIP']}:8000/")
    assert r.returncode == 0 and "Directory listing" in r.stdout
    # exec liveness: failing it restarts the container.
    flag.write_text("x")
    st = wait_for(
        lambda: (x := pod_status(c, "probed"))["containerStatuses"][0]["restartCount"] >= 1 and x,
        timeout=30,
        what="liveness restart",
    )
    assert not flag.exists()
    cs = wait_for(lambda: (x := pod_status(c, "probed")["containerStatuses"][0])["ready"] and x, timeout=30,
                  what="ready again")
    assert cs["restartCount"] == 1, cs
    # startupProbe: not started and not ready (readiness not even probed) until it succeeds.
    gate = tmp_path / "started"
    apply_pod(
        c,
        "slowstart",
        {
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["sh", "-c", "while :; do sleep 0.2; done"],
                    "securityContext": {"runAsUser": 0},  # its exec probe reads tmp_path (0700)
                    "startupProbe": {
                        "exec": {"command": ["test", "-e", str(gate)]},
                        "periodSeconds": 1,
                        "failureThreshold": 60,
                    },
                    "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
                }
            ]
        },
    )
    cs = wait_for(
        lambda: (
            (x := pod_status(c, "slowstart").get("containerStatuses")) and "running" in x[0]["state"] and x[0]
        ),
        what="slowstart running",
    )
    time.sleep(2.0)
    cs = pod_status(c, "slowstart")["containerStatuses"][0]
    assert cs["started"] is False and cs["ready"] is False, cs
    gate.write_text("x")
    cs = wait_for(
        lambda: (x := pod_status(c, "slowstart")["containerStatuses"][0])["ready"] and x,
        what="started and ready after the startup probe",
    )
    assert cs["started"] is True and cs["restartCount"] == 0
    c.kubectl("delete", "pod", "never", "onfailure", "probed", "slowstart", "--wait=false")


# Answers GET with the pod's name (its UTS namespace is named after the pod).
WHOAMI = """import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = socket.gethostname().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("", 8080), H).serve_forever()
"""


def curl_from_pod(c: Cluster, pod: str, url: str) -> str:
    """One HTTP GET from a pod's network namespace: its packets go through its node's kproxy."""
    uid = c.json("pod", pod)["metadata"]["uid"]
    r = subprocess.run(
        ["ip", "netns", "exec", pod_netns_name(c.state["prefix"], uid), "curl", "-s", "-m", "3", url],
        capture_output=True, text=True, timeout=10,
    )
    return r.stdout


def test_prefer_close_sends_each_nodes_traffic_to_its_zone(cluster: Cluster) -> None:
    """`up --zones 2` spreads 3 nodes over zone-a (node-1, node-3) and zone-b (node-2). A
    PreferClose Service with one pod on node-2 and one on node-3; a client pod on every node:
    node-1's traffic goes to the node-3 pod (same zone, another node), node-2's to the node-2
    pod, node-3's to the node-3 pod, real packets through each node's kproxy. Without
    PreferClose node-1's client reaches both (so the check can fail). Then the topology-mode Auto
    annotation: no hints with two endpoints (overload threshold), hints with a third."""
    c = cluster
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/zone") for n in c.json("nodes")["items"]}
    assert nodes == {"node-1": "zone-a", "node-2": "zone-b", "node-3": "zone-a"}
    c.refresh()
    if not c.state["components"].get("kproxy", "").startswith("running"):
        pytest.skip(f"kproxy not running in this cluster: {c.state['components'].get('kproxy')}")
    # The containers run as nobody: the system's python3, not the test's virtualenv.
    pods = {"zoned-b": ("node-2", "zoned", ["/usr/bin/python3", "-c", WHOAMI]),
            "zoned-a": ("node-3", "zoned", ["/usr/bin/python3", "-c", WHOAMI]),
            **{f"zclient-{i}": (f"node-{i}", "zclient", ["/bin/sh", "-c", "sleep 3600"]) for i in (1, 2, 3)}}
    for pod, (node, app, command) in pods.items():
        c.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": "busybox", "command": command}]},
        })
    c.apply({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "zoned", "namespace": "default"},
        "spec": {"selector": {"app": "zoned"}, "ports": [{"port": 80, "targetPort": 8080}],
                 "trafficDistribution": "PreferClose"},
    })
    try:
        def hinted(n: int) -> list[Obj]:
            items = c.json("endpointslices", "-l", "kubernetes.io/service-name=zoned")["items"]
            eps = [e for s in items for e in s.get("endpoints") or []]
            ok = len(eps) == n and all(e["conditions"]["ready"] and e.get("hints") for e in eps)
            return eps if ok else []

        eps = wait_for(lambda: hinted(2), timeout=60, what="2 ready endpoints with zone hints")
        assert {e["nodeName"]: e["hints"]["forZones"][0]["name"] for e in eps} == {"node-2": "zone-b", "node-3": "zone-a"}
        url = f"http://{c.json('svc', 'zoned')['spec']['clusterIP']}/"
        want = {"zclient-1": "zoned-a", "zclient-2": "zoned-b", "zclient-3": "zoned-a"}
        wait_for(lambda: all(is_ready(c.json("pod", p)) for p in want), timeout=60, what="client pods ready")
        # kproxy on each node catches up with the slice; then every answer is the same-zone pod.
        for client, pod in want.items():
            wait_for(lambda: curl_from_pod(c, client, url) == pod, timeout=30, what=f"{client} answered by {pod}")
        for client, pod in want.items():
            answers = {curl_from_pod(c, client, url) for _ in range(12)}
            assert answers == {pod}, (client, answers)
        # The control: without PreferClose the hints go and node-1 reaches both pods.
        c.kubectl("patch", "svc", "zoned", "--type=json",
                  "-p", '[{"op": "remove", "path": "/spec/trafficDistribution"}]')
        wait_for(lambda: (e := c.json("endpointslices", "-l", "kubernetes.io/service-name=zoned")["items"])
                 and not any(x.get("hints") for s in e for x in s.get("endpoints") or []), what="hints removed")
        seen: set[str] = set()
        wait_for(lambda: seen.add(curl_from_pod(c, "zclient-1", url)) or seen >= {"zoned-a", "zoned-b"},
                 timeout=30, interval=0.05, what="zclient-1 answered by both pods")
        # topology-mode Auto: zone-a has 2 of the 3 nodes' CPU, which 2 endpoints (one a zone) cannot
        # serve within the 20% overload threshold: no hints, and a Warning Event says why.
        c.kubectl("annotate", "svc", "zoned", "service.kubernetes.io/topology-mode=Auto")
        wait_for(lambda: [e for e in c.json("events")["items"] if e["involvedObject"]["name"] == "zoned"
                          and e["reason"] == "TopologyAwareHintsDisabled"
                          and e["message"].startswith("Unable to allocate minimum required endpoints")],
                 what="Disabled Event")
        assert not any(x.get("hints") for s in c.json("endpointslices", "-l", "kubernetes.io/service-name=zoned")["items"]
                       for x in s.get("endpoints") or [])
        # A third endpoint in zone-a (on node-1) gives both zones their share: hints, and node-2's
        # client reaches only zone-b's pod, node-1's only zone-a's two.
        c.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "zoned-a2", "namespace": "default", "labels": {"app": "zoned"}},
            "spec": {"nodeName": "node-1", "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": "busybox", "command": ["/usr/bin/python3", "-c", WHOAMI]}]},
        })
        eps = wait_for(lambda: hinted(3), timeout=60, what="3 ready endpoints with Auto hints")
        assert {e["nodeName"]: e["hints"]["forZones"][0]["name"] for e in eps} == {
            "node-1": "zone-a", "node-2": "zone-b", "node-3": "zone-a"}
        # each node's kproxy catches up with the hints; then every answer stays in the zone
        for client, allowed in (("zclient-2", {"zoned-b"}), ("zclient-1", {"zoned-a", "zoned-a2"})):
            wait_for(lambda: {curl_from_pod(c, client, url) for _ in range(6)} <= allowed,  # noqa: B023
                     timeout=30, what=f"{client} answered in its zone")
        wait_for(lambda: curl_from_pod(c, "zclient-1", url) == "zoned-a2", timeout=30, what="zclient-1 reaches zoned-a2")
        assert {curl_from_pod(c, "zclient-2", url) for _ in range(12)} == {"zoned-b"}
        assert {curl_from_pod(c, "zclient-1", url) for _ in range(12)} <= {"zoned-a", "zoned-a2"}
    finally:
        c.kubectl("delete", "svc", "zoned", "--ignore-not-found", check=False)
        c.kubectl("delete", "pod", *pods, "zoned-a2", "--ignore-not-found", "--wait=false", check=False)


def test_graceful_termination_sigterm_then_sigkill_after_grace(cluster: Cluster) -> None:
    c = cluster
    # A container that ignores SIGTERM: it must be SIGKILLed once terminationGracePeriodSeconds pass.
    apply_pod(
        c,
        "stubborn",
        {
            "terminationGracePeriodSeconds": 3,
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "command": ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"],
                }
            ],
        },
    )
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "stubborn"},
        "spec": {"selector": {"test": "pods"}, "ports": [{"port": 80}]},
    }
    subprocess.run(
        ["kubectl", "apply", "-f", "-"],
        input=json.dumps(svc),
        text=True,
        check=True,
        capture_output=True,
        env=c.env,
    )
    st = wait_for(
        lambda: (
            (x := pod_status(c, "stubborn")).get("containerStatuses")
            and "running" in x["containerStatuses"][0]["state"]
            and x
        ),
        what="stubborn running",
    )
    pid = int(st["containerStatuses"][0]["containerID"].removeprefix("kpc://"))

    def endpoint() -> Obj | None:
        items = c.json("endpointslices", "-l", "kubernetes.io/service-name=stubborn")["items"]
        eps = [e for s in items for e in s.get("endpoints") or [] if e["addresses"] == [st["podIP"]]]
        return eps[0] if eps else None

    wait_for(lambda: (e := endpoint()) and e["conditions"]["ready"], what="stubborn's endpoint ready")
    t0 = time.monotonic()
    c.kubectl("delete", "pod", "stubborn", "--wait=false")
    pod = c.json("pod", "stubborn")
    graceful = bool(pod["metadata"].get("deletionTimestamp"))
    if graceful:
        # The API server keeps the pod while its node agent stops it: the endpoint turns terminating.
        e = wait_for(
            lambda: (x := endpoint()) and x["conditions"]["terminating"] and x, what="terminating endpoint"
        )
        assert e["conditions"]["ready"] is False
    time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
    assert Path(f"/proc/{pid}").exists(), (
        "the container died before its grace period although it ignores SIGTERM"
    )
    wait_for(
        lambda: not Path(f"/proc/{pid}").exists(), timeout=15, interval=0.05, what="SIGKILL after the grace"
    )
    assert time.monotonic() - t0 >= 2.8
    # Then the agent confirms the deletion: pod object and endpoint are gone.
    wait_for(lambda: "stubborn" not in c.kubectl("get", "pods", "-o", "name"), what="the pod object removed")
    wait_for(lambda: endpoint() is None, what="the endpoint removed")
    c.kubectl("delete", "svc", "stubborn")


def test_daemonset_runs_one_pod_on_each_fitting_node(cluster: Cluster) -> None:
    """The DaemonSet controller: a pod on every node, status counted, a nodeSelector shrinks the set,
    a template change rolls one node at a time, deleting the DaemonSet deletes its pods."""
    c = cluster
    zones = {n["metadata"]["name"]: n["metadata"]["labels"].get("topology.kubernetes.io/zone")
             for n in c.json("nodes")["items"]}
    c.apply({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "everywhere", "namespace": "default"},
             "spec": {"selector": {"matchLabels": {"app": "everywhere"}},
                      "template": {"metadata": {"labels": {"app": "everywhere"}},
                                   "spec": {"containers": [{"name": "web", "image": "flask-kubernetes:latest",
                                                            "imagePullPolicy": "Never"}]}}}})

    def pods() -> list[Obj]:
        return [p for p in c.json("pods", "-l", "app=everywhere")["items"] if not p["metadata"].get("deletionTimestamp")]

    def placed(want: set[str]) -> bool:
        ps = pods()
        return sorted(p["spec"]["nodeName"] for p in ps) == sorted(want) and all(is_ready(p) for p in ps)

    wait_for(lambda: placed(set(zones)), timeout=90, what="one ready pod per node")
    st = wait_for(lambda: (s := c.json("ds", "everywhere").get("status") or {}).get("numberAvailable") == 3 and s,
                  what="status counts")
    assert (st["desiredNumberScheduled"], st["currentNumberScheduled"], st["numberReady"],
            st["updatedNumberScheduled"], st["numberMisscheduled"]) == (3, 3, 3, 3, 0)
    c.kubectl("patch", "ds", "everywhere", "--type=merge", "-p",
              json.dumps({"spec": {"template": {"spec": {"nodeSelector": {"topology.kubernetes.io/zone": "zone-a"}}}}}))
    wait_for(lambda: placed({n for n, z in zones.items() if z == "zone-a"}), timeout=90, what="pods only in zone-a")
    c.kubectl("delete", "ds", "everywhere")
    wait_for(lambda: not c.json("pods", "-l", "app=everywhere")["items"], timeout=90, what="pods deleted with it")


def test_running_cluster_components_use_their_identities(cluster: Cluster) -> None:
    """In the real cluster every component's command line names its own kubeconfig, none admin's."""
    state = json.loads((Path(cluster.home) / cluster.name / "state.json").read_text())
    seen: dict[str, str] = {}
    for name, pid in (state.get("pids") or {}).items():
        if pid and Path(f"/proc/{pid}/cmdline").exists():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--kubeconfig" in argv:
                seen[name] = argv[argv.index(b"--kubeconfig") + 1].decode()
    assert {"controllers", "dns"} <= set(seen) and any(n.startswith("agent-") for n in seen) and any(
        n.startswith("kproxy-") for n in seen), seen
    for name, kc in seen.items():
        assert re.search(r"/identities/[^/]+\.kubeconfig$", kc), (name, kc)
    # By now the cluster ran the seed app, scaled, rolled, restarted and resolved names: with least
    # privilege, no component was ever refused anything it tried (a missing rule shows as a 403).
    for log in (Path(cluster.home) / cluster.name / "logs").glob("*.log"):
        if log.name.startswith(("controllers", "agent-", "kproxy-", "dns")):
            text = log.read_text(errors="replace")
            # A refusal reads "403 Forbidden ..." (kproxy.kube's ApiError) or "... is forbidden: User":
            # the word, not the number (log timestamps have milliseconds such as ",403").
            assert "forbidden" not in text.lower(), (log.name, text[-2000:])


def test_a_crashed_node_agent_is_restarted_and_its_pods_come_back_with_their_ips(cluster: Cluster) -> None:
    c = cluster
    c.refresh()
    before = {p["metadata"]["name"]: p["status"]["podIP"] for p in seed_pods(c)}
    on_node = [p for p in seed_pods(c) if p["spec"]["nodeName"] == "node-1"] or seed_pods(c)
    node = on_node[0]["spec"]["nodeName"]
    agent = int(c.state["pids"][f"agent-{node}"])
    old_pid = int(on_node[0]["status"]["containerStatuses"][0]["containerID"].removeprefix("kpc://"))
    os.kill(agent, signal.SIGKILL)

    def back() -> bool:
        c.refresh()
        new_agent = int(c.state["pids"][f"agent-{node}"])
        pods = seed_pods(c)
        p = next((x for x in pods if x["metadata"]["name"] == on_node[0]["metadata"]["name"]), None)
        if new_agent == agent or p is None or not is_ready(p):
            return False
        cid = p["status"]["containerStatuses"][0].get("containerID", "")
        return bool(cid) and int(cid.removeprefix("kpc://")) != old_pid

    wait_for(back, timeout=60, interval=0.5, what="the agent restarted and the pod running again")
    assert {p["metadata"]["name"]: p["status"]["podIP"] for p in seed_pods(c)} == before
    wait_for(
        lambda: sum(e["conditions"]["ready"] for e in slice_endpoints(c)) == len(before),
        what="endpoints ready",
    )


def test_down_after_a_crash_leaves_no_namespace_link_or_process(cluster: Cluster) -> None:
    c = cluster
    c.refresh()
    prefix, pids = c.state["prefix"], dict(c.state["pids"])
    pod_pids = [
        int(p["status"]["containerStatuses"][0]["containerID"].removeprefix("kpc://")) for p in seed_pods(c)
    ]
    # A crash first: the supervisor dies with SIGKILL, so none of its shutdown code runs and the API
    # server, controllers, agents, kproxies and pods are left running. `down` must find them anyway.
    sup = int(c.state["supervisor_pid"])
    assert sup > 1 and "_supervise" in Path(f"/proc/{sup}/cmdline").read_bytes().decode(errors="replace")
    os.kill(sup, signal.SIGKILL)
    wait_for(
        lambda: (
            not Path(f"/proc/{sup}").exists()
            or "Z" in Path(f"/proc/{sup}/stat").read_text().split(")")[-1][:3]
        ),
        what="the supervisor gone",
    )
    assert all(Path(f"/proc/{pid}").exists() for pid in pod_pids), (
        "pods should outlive the crashed supervisor"
    )
    # `status` says what happened (no "up", no traceback) and what removes the rest.
    st = c.cli("status", timeout=60)
    assert st.returncode != 0 and "Traceback" not in st.stdout + st.stderr, st
    assert f"cluster {c.name}: down (its supervisor is not running)" in st.stdout, st.stdout
    assert "kproxy-cluster down" in st.stdout and "(not supervised: nothing restarts it)" in st.stdout, (
        st.stdout
    )
    r = c.cli("down", timeout=120)
    assert r.returncode == 0 and "is down" in r.stdout, r
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in netns.split() if n.startswith(prefix)]
    assert (
        not [d for d in os.listdir("/etc/netns") if d.startswith(prefix)]
        if os.path.isdir("/etc/netns")
        else True
    )
    for name, pid in list(pids.items()) + [(f"pod pid {p}", p) for p in pod_pids]:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
        ), f"{name} (pid {pid}) survived down"
    marker = f"KPC_CLUSTER={c.state['prefix']}{c.state['instance']}".encode()
    assert c.state["instance"]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                assert marker not in d.joinpath("environ").read_bytes().split(b"\0"), (
                    f"pid {d.name} survived down"
                )
            except OSError:
                pass
    # Nothing is left in the root namespace: no link that was not there before `up`.
    after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = lambda s: {line.split(":")[1].strip().split("@")[0] for line in s.splitlines()}  # noqa: E731
    assert not {n for n in names(after) - names(c.root_links) if n.startswith(("v", "kp", "cbr", "br"))}
    # `down` again is a no-op.
    r2 = c.cli("down", timeout=60)
    assert r2.returncode == 0 and "removed 0 netns" in r2.stdout

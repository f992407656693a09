"""`kproxy-cluster up --ip-family dual` (and `ipv6`): nodes, pods and Services of both families, end to end.

Real network namespaces, real Flask pods, kubectl, curl and dig: the nodes' podCIDRs and addresses,
pods with an address of each family (IPv6 added without DAD), routes between nodes per family,
EndpointSlices per family, the cluster DNS answering AAAA over IPv6, and the seed app through its
LoadBalancer IP and NodePorts of each family (kproxy's per-family proxiers: iptables and ip6tables)."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import Cluster, wait_for

from controlplane_stub.agent.pods import pod_netns_name

pytestmark = [pytest.mark.e2e, pytest.mark.kubectl, pytest.mark.timeout(180)]
SEED = Path(__file__).resolve().parents[2] / "examples" / "seed" / "flask-kubernetes.yaml"
SVC = "flask-kubernetes-service"
HELLO = "Hello from Kubernetes!\n"
DNS6 = "fd00:10:250::1"  # kproxy-dns on the node network (bound to "::")
Obj = dict[str, Any]


def url(ip: str, port: int, path: str = "/") -> str:
    return f"http://[{ip}]:{port}{path}" if ":" in ip else f"http://{ip}:{port}{path}"


def curl_in(ns: str, target: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-g", "-m", "3", target],
                       capture_output=True, text=True, timeout=15, check=False)
    return r.stdout


def dig_in(ns: str, server: str, *args: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "dig", f"@{server}", "+short", "+tries=2", "+time=2", *args],
                       capture_output=True, text=True, timeout=20, check=False)
    return r.stdout.strip()


def ready_pods(c: Cluster) -> list[Obj]:
    return [p for p in c.json("pods", "-l", "app=flask-kubernetes")["items"]
            if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIPs")]


@pytest.fixture(scope="module")
def seeded(dual_cluster: Cluster) -> Cluster:
    """The seed app applied, rolled out, and its Service made dual-stack (PreferDualStack: the
    cluster's default for a Service that asks nothing is SingleStack of the primary family)."""
    c = dual_cluster
    c.refresh()
    assert c.state["components"]["dns"].startswith("running"), c.state["components"]
    c.kubectl("apply", "-f", str(SEED))
    c.kubectl("patch", "svc", SVC, "--type", "merge", "-p", '{"spec":{"ipFamilyPolicy":"PreferDualStack"}}')
    out = c.kubectl("rollout", "status", "deployment/flask-kubernetes", "--timeout=90s", timeout=100)
    assert "successfully rolled out" in out
    return c


def test_dual_nodes_pods_slices_and_dns(seeded: Cluster) -> None:
    c = seeded
    c.refresh()
    assert c.state["ip_family"] == "dual"
    status = c.cli("status").stdout
    assert "ip-family: dual  LoadBalancer pool: 10.251.0.0/24,fd00:10:251::/120" in status, status
    nodes = {n["metadata"]["name"]: n for n in c.json("nodes")["items"]}
    assert sorted(nodes) == ["node-1", "node-2"]
    for i, name in ((1, "node-1"), (2, "node-2")):
        n = nodes[name]
        assert n["spec"]["podCIDRs"] == [f"10.244.{i}.0/24", f"fd00:10:244:{i}::/64"]
        internal = [a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP"]
        assert internal == [f"10.250.0.{10 + i}", f"fd00:10:250::{10 + i:x}"]

    svc = c.json("svc", SVC)
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"] and len(svc["spec"]["clusterIPs"]) == 2
    cluster_ip6 = svc["spec"]["clusterIPs"][1]
    assert ipaddress.ip_address(cluster_ip6) in ipaddress.ip_network("fd00:10:96::/112")

    pods = ready_pods(c)
    assert len(pods) == 4
    for p in pods:
        v4, v6 = (x["ip"] for x in p["status"]["podIPs"])
        assert p["status"]["podIP"] == v4
        i = int(p["spec"]["nodeName"].split("-")[1])
        assert ipaddress.ip_address(v4) in ipaddress.ip_network(f"10.244.{i}.0/24")
        assert ipaddress.ip_address(v6) in ipaddress.ip_network(f"fd00:10:244:{i}::/64")
        assert [h["ip"] for h in p["status"]["hostIPs"]] == [f"10.250.0.{10 + i}", f"fd00:10:250::{10 + i:x}"]

    # one slice per family, each with every pod's address of that family
    def by_family() -> dict[str, list[str]]:
        got: dict[str, list[str]] = {}
        for s in c.json("endpointslices", "-l", f"kubernetes.io/service-name={SVC}")["items"]:
            got.setdefault(s["addressType"], []).extend(
                e["addresses"][0] for e in s.get("endpoints") or [] if e["conditions"].get("ready"))
        return {k: sorted(v) for k, v in got.items()}

    want = {"IPv4": sorted(p["status"]["podIPs"][0]["ip"] for p in pods),
            "IPv6": sorted(p["status"]["podIPs"][1]["ip"] for p in pods)}
    wait_for(lambda: by_family() == want, timeout=30, what=f"EndpointSlices per family {want}")

    # pod to pod over IPv6, across the nodes (node routes per family), and from the client netns
    prefix = c.state["prefix"]
    src = next(p for p in pods if p["spec"]["nodeName"] == "node-1")
    src_ns = pod_netns_name(prefix, src["metadata"]["uid"])
    for p in pods:
        assert curl_in(src_ns, url(p["status"]["podIPs"][1]["ip"], 5000)) == HELLO, p["metadata"]["name"]
    dst6 = next(p for p in pods if p["spec"]["nodeName"] == "node-2")["status"]["podIPs"][1]["ip"]
    assert c.cli("exec", "--", "curl", "-s", "-g", "-m", "3", url(dst6, 5000), timeout=20).stdout == HELLO

    # the cluster DNS from a pod, over IPv6 to its node-network address: AAAA of the dual-stack
    # Service, its A, the kube-dns Service's two ClusterIPs, an IPv6 pod name
    name = f"{SVC}.default.svc.cluster.local"
    assert wait_for(lambda: dig_in(src_ns, DNS6, name, "AAAA"), timeout=20, what="AAAA answer") == cluster_ip6
    assert dig_in(src_ns, DNS6, name, "A") == svc["spec"]["clusterIPs"][0]
    assert sorted(dig_in(src_ns, DNS6, "kube-dns.kube-system.svc.cluster.local", "A").split()) == ["10.96.0.10"]
    assert dig_in(src_ns, DNS6, "kube-dns.kube-system.svc.cluster.local", "AAAA") == "fd00:10:96::a"
    v6 = src["status"]["podIPs"][1]["ip"]
    assert dig_in(src_ns, DNS6, f"{v6.replace(':', '-')}.default.pod.cluster.local", "AAAA") == v6


def _lb_ips(c: Cluster) -> list[str]:
    def ingress() -> list[str] | None:
        ing = (c.json("svc", SVC).get("status") or {}).get("loadBalancer", {}).get("ingress") or []
        return [x["ip"] for x in ing] if len(ing) == 2 else None

    return wait_for(ingress, timeout=30, what="a LoadBalancer IP of each family")


def _kproxy_running(c: Cluster) -> None:
    c.refresh()
    if not c.state["components"].get("kproxy", "").startswith("running"):
        pytest.skip(f"kproxy not running in this cluster: {c.state['components'].get('kproxy')}")


def test_dual_seed_over_ipv4_lb_and_nodeports(seeded: Cluster) -> None:
    """"Hello from Kubernetes!" through the IPv4 LoadBalancer IP and the NodePort on each node's
    IPv4 address, in the dual-stack cluster (and from the client netns, as an outside client)."""
    c = seeded
    _kproxy_running(c)
    lb4, lb6 = _lb_ips(c)
    assert ipaddress.ip_address(lb4).version == 4 and ipaddress.ip_address(lb6) in ipaddress.ip_network(
        "fd00:10:251::/120")
    node_port = c.json("svc", SVC)["spec"]["ports"][0]["nodePort"]
    for target in [url(lb4, 6000)] + [url(f"10.250.0.{10 + i}", node_port) for i in (1, 2)]:
        r = wait_for(lambda t=target: c.cli("exec", "--", "curl", "-s", "-m", "3", t, timeout=20).stdout or None,
                     timeout=30, what=f"an answer from {target}")
        assert r == HELLO, target


def test_dual_seed_over_ipv6_lb_and_nodeports(seeded: Cluster) -> None:
    """The same through the IPv6 LoadBalancer IP and each node's IPv6 NodePort (kproxy's IPv6
    proxier: ip6tables in the default iptables mode)."""
    c = seeded
    _kproxy_running(c)
    _, lb6 = _lb_ips(c)
    node_port = c.json("svc", SVC)["spec"]["ports"][0]["nodePort"]
    for target in [url(lb6, 6000)] + [url(f"fd00:10:250::{10 + i:x}", node_port) for i in (1, 2)]:
        r = wait_for(lambda t=target: c.cli("exec", "--", "curl", "-s", "-g", "-m", "3", t, timeout=20).stdout or None,
                     timeout=30, what=f"an answer from {target}")
        assert r == HELLO, target


def test_ipv6_only_cluster(ipv6_cluster: Cluster) -> None:
    """`up --ip-family ipv6`: the node, its pod CIDR, the Services and a pod are IPv6 only; the pod
    answers HTTP on its IPv6 address from the client netns, sees its addresses through the downward
    API, resolves names with the cluster DNS over IPv6 (kube-dns's ClusterIP is IPv6), and is reached
    through a LoadBalancer Service's IPv6 LB IP and NodePort (kproxy's IPv6 proxier alone)."""
    c = ipv6_cluster
    node = c.json("nodes")["items"][0]
    assert node["spec"]["podCIDRs"] == ["fd00:10:244:1::/64"]
    assert [a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP"] == ["fd00:10:250::b"]
    api_svc = c.json("svc", "kubernetes")["spec"]
    assert api_svc["ipFamilies"] == ["IPv6"] and api_svc["clusterIPs"] == ["fd00:10:96::1"]
    c.refresh()
    assert c.state["components"]["dns"].startswith("running"), c.state["components"]
    assert c.json("svc", "kube-dns", "-n", "kube-system")["spec"]["clusterIPs"] == ["fd00:10:96::a"]
    c.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web6", "labels": {"app": "web6"}},
        "spec": {"containers": [{
            "name": "web", "image": "flask-kubernetes:latest",
            "env": [{"name": "IPS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIPs"}}},
                    {"name": "HOSTS", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIPs"}}}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 5000}, "periodSeconds": 1},
        }]},
    })

    def ready() -> Obj | None:
        st = c.json("pod", "web6").get("status") or {}
        return st if (st.get("containerStatuses") or [{}])[0].get("ready") else None

    st = wait_for(ready, timeout=60, what="pod web6 ready (an HTTP readiness probe over IPv6)")
    assert st is not None
    ip = st["podIP"]
    assert [x["ip"] for x in st["podIPs"]] == [ip] and ipaddress.ip_address(ip) in ipaddress.ip_network(
        "fd00:10:244:1::/64")
    pid = int(st["containerStatuses"][0]["containerID"].removeprefix("kpc://"))
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert env["IPS"] == ip and env["HOSTS"] == "fd00:10:250::b"
    assert c.cli("exec", "--", "curl", "-s", "-g", "-m", "3", url(ip, 5000), timeout=20).stdout == HELLO
    pod_ns = pod_netns_name(c.state["prefix"], c.json("pod", "web6")["metadata"]["uid"])
    resolv = subprocess.run(["ip", "netns", "exec", pod_ns, "cat", "/etc/resolv.conf"], capture_output=True,
                            text=True, timeout=10, check=False).stdout
    assert "nameserver fd00:10:96::a" in resolv, resolv
    got = wait_for(lambda: dig_in(pod_ns, DNS6, "kubernetes.default.svc.cluster.local", "AAAA"), timeout=20,
                   what="AAAA of the kubernetes Service")
    assert got == "fd00:10:96::1"
    # a LoadBalancer Service of the IPv6-only cluster, through kproxy's IPv6 proxier: its LB IP
    # and the node's IPv6 NodePort from the client netns
    c.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web6"},
             "spec": {"type": "LoadBalancer", "selector": {"app": "web6"},
                      "ports": [{"port": 6000, "targetPort": 5000, "protocol": "TCP"}]}})

    def lb() -> list[str] | None:
        svc = c.json("svc", "web6")
        ing = (svc.get("status") or {}).get("loadBalancer", {}).get("ingress") or []
        return [ing[0]["ip"], str(svc["spec"]["ports"][0]["nodePort"])] if ing else None

    got_lb = wait_for(lb, timeout=30, what="web6's LoadBalancer IP")
    assert got_lb is not None
    lb6, node_port = got_lb
    assert ipaddress.ip_address(lb6) in ipaddress.ip_network("fd00:10:251::/120")
    for target in (url(lb6, 6000), url("fd00:10:250::b", int(node_port))):
        r = wait_for(lambda t=target: c.cli("exec", "--", "curl", "-s", "-g", "-m", "3", t, timeout=20).stdout or None,
                     timeout=30, what=f"an answer from {target}")
        assert r == HELLO, target

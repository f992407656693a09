"""The seed example on a 3-node cluster of User-Mode Linux VMs (one kernel per node), each node
provisioned by vagrant/provision.sh (tests/vm/vm_cluster.py). The client is the bed's namespace on
the node network. CI runs the IPVS mode; `./run test --vm-full` (KPROXY_VM_FULL=1) adds the
iptables mode. The tests of one mode share one boot and run in file order; the node kill is last.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
from vm_cluster import CLIENT_IP, REPO, Bed, VMCannotStart, node_ip, node_of_pod_ip, ok_body

MODES = ["ipvs", "iptables"] if os.environ.get("KPROXY_VM_FULL") == "1" else ["ipvs"]
NODES = 3
HELLO = "Hello from Kubernetes!"
SEED = "flask-kubernetes-service"
# The node lifecycle controller's defaults (controlplane_stub/controllers/manager.py), as
# kube-controller-manager's: a node is NotReady once its Lease is 40 s old, checked every 5 s.
NODE_GRACE, NODE_MONITOR = 40.0, 5.0
# New connections must reach only surviving nodes within this many seconds of the kill: the grace
# and one monitor period, plus what the controllers and kproxy take to react (measured: see the
# README of tests/vm), with room for a loaded 2-core machine.
KILL_BOUND = NODE_GRACE + NODE_MONITOR + 30


def _started(mode: str) -> Iterator[Bed]:
    bed = Bed(mode=mode, nodes=NODES, vm_timeout=900)
    t0 = time.monotonic()
    try:
        bed.start()
        try:
            took = bed.wait_ready(240)
        except VMCannotStart as e:
            pytest.skip(f"User-Mode Linux VM cannot start here: {e}")
        print(f"\n[{mode}] {NODES} VM nodes Ready {took:.1f} s after the bed started")
        yield bed
    finally:
        print(f"[{mode}] bed ran {time.monotonic() - t0:.1f} s; logs:\n{bed.logs(8)}")
        bed.stop()


@pytest.fixture(scope="module", params=MODES)
def bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    yield from _started(request.param)


def _node_port(bed: Bed, svc: str) -> int:
    return int(bed.service_field(svc, "{.spec.ports[0].nodePort}"))


@pytest.mark.vm
@pytest.mark.timeout(400)
def test_vm_cluster_seed_app_through_provision_seed_step(bed: Bed) -> None:
    # provision.sh's own `seed` step (kube-dns, the seed manifest, rollout, curl of the
    # LoadBalancer IP), run from the client as the last node would run it.
    r = bed.client("bash", str(REPO / "vagrant" / "provision.sh"), "--role", "node", "--node-ip", node_ip(NODES),
                   "--server-ip", node_ip(1), "--nodes", str(NODES), "--repo", str(REPO),
                   "--cluster-dir", str(bed.dir), "--steps", "seed", timeout=300, check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{bed.logs()}"
    assert r.stdout.strip().endswith(HELLO)
    pods = bed.pods("app=flask-kubernetes")
    assert len(pods) == 4 and {phase for phase, _, _ in pods.values()} == {"Running"}, pods
    # Spread over the nodes (the scheduler spreads a ReplicaSet), each pod in its node's CIDR.
    assert {node for _, node, _ in pods.values()} == {f"node-{i}" for i in range(1, NODES + 1)}, pods
    for _, node, ip in pods.values():
        assert f"node-{node_of_pod_ip(ip)}" == node
    bed.kubectl("apply", "-f", str(REPO / "tests" / "vm" / "cluster" / "echo.yaml"))
    bed.kubectl("rollout", "status", "deployment/echo-one", "deployment/echo-spread", "deployment/prober",
                "--timeout", "180s", timeout=200)


@pytest.mark.vm
@pytest.mark.timeout(200)
def test_vm_cluster_loadbalancer_and_every_nodeport(bed: Bed) -> None:
    lb = bed.service_field(SEED, "{.status.loadBalancer.ingress[0].ip}")
    assert bed.curl_until(f"http://{lb}:6000/", lambda b: b.strip() == HELLO).strip() == HELLO
    np = _node_port(bed, SEED)
    for i in range(1, NODES + 1):
        body = bed.curl_until(f"http://{node_ip(i)}:{np}/", lambda b: b.strip() == HELLO)
        assert body.strip() == HELLO, f"NodePort {np} on node-{i}: {body!r}"


@pytest.mark.vm
@pytest.mark.timeout(200)
def test_vm_cluster_nodeport_without_local_pod_forwards_masqueraded(bed: Bed) -> None:
    # echo's only pod is on node-1: node-2's and node-3's NodePorts forward to another kernel, and
    # the pod sees the forwarding node's address (masquerade), so that its reply goes back there.
    (pod_ip,) = [ip for _, _, ip in bed.pods("app=echo-one").values()]
    assert node_of_pod_ip(pod_ip) == 1
    np = _node_port(bed, "echo")
    for i in range(2, NODES + 1):
        want = [pod_ip, node_ip(i)]
        body = bed.curl_until(f"http://{node_ip(i)}:{np}/", lambda b, want=want: b.split() == want)
        assert body.split() == want, f"node-{i}: {body!r}"
    # Through node-1 itself the pod is local; the client is outside the cluster CIDR, so the
    # Cluster policy masquerades there too.
    body = bed.curl_until(f"http://{node_ip(1)}:{np}/", lambda b: b.split()[:1] == [pod_ip])
    assert body.split()[:1] == [pod_ip], body


@pytest.mark.vm
@pytest.mark.timeout(200)
def test_vm_cluster_external_traffic_policy_local(bed: Bed) -> None:
    (pod_ip,) = [ip for _, _, ip in bed.pods("app=echo-one").values()]
    np = _node_port(bed, "echo-local")
    hc = int(bed.service_field("echo-local", "{.spec.healthCheckNodePort}"))
    # The node with the endpoint: the client's own address reaches the pod.
    want = [pod_ip, CLIENT_IP]
    body = bed.curl_until(f"http://{node_ip(1)}:{np}/", lambda b: b.split() == want)
    assert body.split() == want, body
    health = json.loads(bed.curl_until(f"http://{node_ip(1)}:{hc}/", lambda b: '"localEndpoints"' in b))
    assert health["localEndpoints"] == 1, health
    for i in range(2, NODES + 1):
        r = bed.curl(f"http://{node_ip(i)}:{hc}/")
        assert r.stdout.rpartition("\n")[2] == "503", f"node-{i} health check: {r.stdout!r}"
        # ... and does not forward: no answer through its NodePort.
        r = bed.curl(f"http://{node_ip(i)}:{np}/", max_time=2)
        assert not ok_body(r), f"node-{i} forwarded an externalTrafficPolicy Local connection: {r.stdout!r}"


@pytest.mark.vm
@pytest.mark.timeout(200)
def test_vm_cluster_pod_to_cluster_ip_across_nodes(bed: Bed) -> None:
    # From a pod on node-2 (the prober fetches for the client): a ClusterIP reaches the pods of
    # every node, each seeing the prober's own pod address (no masquerade inside the cluster
    # CIDR: node-1's kernel routes the reply back to node-2, which un-NATs it); with
    # internalTrafficPolicy Local only node-2's pod answers, and with no endpoint on node-2 the
    # connection fails although other nodes have one.
    (prober_ip,) = [ip for _, _, ip in bed.pods("app=prober").values()]
    assert node_of_pod_ip(prober_ip) == 2

    def via_prober(svc: str) -> str:
        return ok_body(bed.curl(f"http://{prober_ip}:8080/?to=http://{bed.service_field(svc, '{.spec.clusterIP}')}:80/",
                                max_time=5))

    bed.curl_until(f"http://{prober_ip}:8080/?to=http://127.0.0.1:8080/", lambda b: b != "")
    # Until every node's pod answered (iptables picks at random), at most 40 connections.
    answers: list[list[str]] = []
    while len(answers) < 40 and {node_of_pod_ip(a[0]) for a in answers if len(a) == 2} != {1, 2, 3}:
        answers.append(via_prober("echo-spread").split())
    assert {node_of_pod_ip(a[0]) for a in answers if len(a) == 2} == {1, 2, 3}, answers
    assert {a[1] for a in answers} == {prober_ip}, answers
    local = [via_prober("echo-spread-itp-local").split() for _ in range(6)]
    assert {node_of_pod_ip(a[0]) for a in local if len(a) == 2} == {2} and all(len(a) == 2 for a in local), local
    none = via_prober("echo-one-itp-local")
    assert none.startswith("error "), f"internalTrafficPolicy Local without a local endpoint answered: {none!r}"


@pytest.mark.vm
@pytest.mark.timeout(100)
def test_vm_cluster_dns_on_the_server(bed: Bed) -> None:
    cip = bed.service_field(SEED, "{.spec.clusterIP}")
    r = bed.client("dig", "+short", "+time=2", "+tries=2", f"@{node_ip(1)}",
                   f"{SEED}.default.svc.cluster.local", timeout=20)
    assert r.stdout.split() == [cip]


@pytest.mark.vm
@pytest.mark.timeout(300)
def test_vm_cluster_node_killed(bed: Bed) -> None:
    # Power node-3 off; then, through node-1's NodePort of echo-spread (one pod per node), probe
    # with a new connection every second and record which node's pod answers.
    spread = bed.pods("app=echo-spread")
    assert {node for _, node, _ in spread.values()} == {f"node-{i}" for i in range(1, NODES + 1)}, spread
    np = _node_port(bed, "echo-spread")
    url = f"http://{node_ip(1)}:{np}/"
    bed.curl_until(url, lambda b: b != "")
    seen: set[int] = set()
    for _ in range(40):  # until node-3's pod answered (iptables picks at random)
        body = ok_body(bed.curl(url))
        seen |= {node_of_pod_ip(body.split()[0])} if body else set()
        if 3 in seen:
            break
    assert 3 in seen, f"before the kill, node-3's pod never answered: {seen}"
    dead = 3
    bed.kill_node(dead)
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    probes: list[tuple[float, int]] = []  # (seconds after the kill, node that answered or 0)
    while time.monotonic() - t0 < KILL_BOUND + 30:
        t = time.monotonic() - t0
        body = ok_body(bed.curl(url, max_time=1.5))
        probes.append((t, node_of_pod_ip(body.split()[0]) if body else 0))
        if "not_ready" not in marks and f"node-{dead}" not in bed.ready_nodes():
            marks["not_ready"] = time.monotonic() - t0
        if "slices" not in marks and not any(node_of_pod_ip(a) == dead for a in bed.slice_addresses("echo-spread")):
            marks["slices"] = time.monotonic() - t0
        tail = probes[-10:]
        if "slices" in marks and len(tail) == 10 and {n for _, n in tail} == {1, 2}:
            break
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0 - t)))
    bad = [t for t, n in probes if n not in (1, 2)]
    converged = next((t for t, _ in probes if t > bad[-1]), 0.0) if bad else 0.0
    print(f"\n[{bed.mode}] node-{dead} killed: NotReady after {marks.get('not_ready', -1):.1f} s, its endpoints "
          f"out of the slices after {marks.get('slices', -1):.1f} s, new connections only to surviving nodes "
          f"from {converged:.1f} s on ({len(probes)} probes, {len(bad)} failed or reached node-{dead})")
    assert "not_ready" in marks and marks["not_ready"] >= NODE_GRACE - 10, marks
    assert "slices" in marks, f"node-{dead}'s endpoints never left the slices: {marks}"
    tail = probes[-10:]
    assert len(tail) == 10 and all(n in (1, 2) for _, n in tail), probes
    assert {n for _, n in tail} == {1, 2}, f"not both surviving nodes answer: {tail}"
    assert converged <= KILL_BOUND, f"new connections still failed {converged:.1f} s after the kill: {probes}"

"""Controllers against a real kproxy-apiserver; the nodes are simulated (they report pods Ready
without running processes; the e2e tests in test_cluster_e2e.py run real ones)."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest
from cluster_helpers import ControlPlane, wait_for

from controlplane_stub import client as api
from controlplane_stub.controllers.common import resolve_int_or_percent
from controlplane_stub.controllers.deployment import template_hash
from controlplane_stub.controllers.loadbalancer import parse_pool

Obj = dict[str, Any]
pytestmark = pytest.mark.timeout(60)


def ns_name(cp: ControlPlane) -> str:
    ns = "kpt-" + secrets.token_hex(3)
    cp.create(api.path("namespaces"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return ns


def deployment(
    name: str,
    replicas: int,
    labels: dict[str, str],
    port_name: str = "http",
    port: int = 8080,
    strategy: Obj | None = None,
) -> Obj:
    d: Obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "busybox",
                            "ports": [{"name": port_name, "containerPort": port}],
                        }
                    ]
                },
            },
        },
    }
    if strategy:
        d["spec"]["strategy"] = strategy
    return d


def service(name: str, selector: dict[str, str], target: Any = "http", **spec: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": selector, "ports": [{"name": "web", "port": 80, "targetPort": target}], **spec},
    }


def slices(cp: ControlPlane, ns: str, svc: str) -> list[Obj]:
    return cp.items(api.path("endpointslices", ns), labelSelector=f"kubernetes.io/service-name={svc}")


def ready_ips(sl: list[Obj]) -> list[str]:
    return sorted(e["addresses"][0] for s in sl for e in s.get("endpoints") or [] if e["conditions"]["ready"])


def debug_state(cp: ControlPlane, ns: str) -> str:
    pods = [
        (
            p["metadata"]["name"],
            p["spec"].get("nodeName"),
            (p.get("status") or {}).get("phase"),
            (p.get("status") or {}).get("podIP"),
        )
        for p in cp.items(api.path("pods", ns))
    ]
    sl = [
        (s["metadata"]["name"], [(e["addresses"], e["conditions"]) for e in s.get("endpoints") or []])
        for s in cp.items(api.path("endpointslices", ns))
    ]
    q = {n: len(q) for n, q, _ in cp.manager.workers}
    return f"pods={pods}\nslices={sl}\nqueues={q}"


def test_pure_helpers() -> None:
    assert resolve_int_or_percent("25%", 10, True) == 3
    assert resolve_int_or_percent("25%", 10, False) == 2
    assert resolve_int_or_percent(1, 10, False) == 1
    t = {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    h = template_hash(t)
    assert h == template_hash({"spec": t["spec"], "metadata": t["metadata"]})  # key order does not matter
    assert h != template_hash(t, 1) and h.isalnum() and not set(h) & set("aeiou")
    assert list(parse_pool("10.0.0.1-10.0.0.3, 10.0.1.0/30")) == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.1.1",
        "10.0.1.2",
    ]
    with pytest.raises(ValueError, match="--lb-pool"):
        parse_pool("10.0.0.5-10.0.0.1")


def test_slices_capped_named_ports_and_low_churn(controlplane: ControlPlane) -> None:
    cp = controlplane
    ns = ns_name(cp)
    cp.create(api.path("services", ns), service("web", {"app": "web"}))
    cp.create(api.path("deployments", ns), deployment("web", 7, {"app": "web"}))
    sl = wait_for(
        lambda: (s := slices(cp, ns, "web")) and len(ready_ips(s)) == 7 and s,
        timeout=40,
        what="7 ready endpoints",
        dump=lambda: debug_state(cp, ns),
    )
    assert len(sl) == 3 and all(len(s["endpoints"]) <= 3 for s in sl)
    for s in sl:
        md = s["metadata"]
        assert md["labels"]["endpointslice.kubernetes.io/managed-by"] == "endpointslice-controller.k8s.io"
        assert "endpoints.kubernetes.io/last-change-trigger-time" in md["annotations"]
        assert md["ownerReferences"][0]["kind"] == "Service"
        assert s["ports"] == [{"name": "web", "port": 8080, "protocol": "TCP"}]  # named targetPort resolved
        for e in s["endpoints"]:
            assert (
                e["targetRef"]["kind"] == "Pod"
                and e["nodeName"].startswith("sim-")
                and e["zone"].startswith("zone-")
            )
    # Legacy Endpoints mirror the slices.
    wait_for(
        lambda: (
            sorted(
                a["ip"]
                for a in (cp.get(api.path("endpoints", ns, "web")).get("subsets") or [{}])[0].get(
                    "addresses", []
                )
            )
            == ready_ips(sl)
        ),
        what="the Endpoints object to follow",
    )
    # One pod replaced: only the slice that held it is rewritten.
    before = {s["metadata"]["name"]: s["metadata"]["resourceVersion"] for s in sl}
    full = next(s for s in sl if len(s["endpoints"]) == 3)  # (a slice emptied by the delete would go)
    victim = full["endpoints"][0]["targetRef"]["name"]
    cp.delete(api.path("pods", ns, victim))

    def replaced() -> list[Obj] | None:
        s = slices(cp, ns, "web")
        names = {e["targetRef"]["name"] for x in s for e in x["endpoints"]}
        return s if len(ready_ips(s)) == 7 and victim not in names else None

    after = wait_for(replaced, what="the replacement pod's endpoint", dump=lambda: debug_state(cp, ns))
    time.sleep(0.5)
    after = slices(cp, ns, "web")
    changed = [
        s["metadata"]["name"]
        for s in after
        if before.get(s["metadata"]["name"]) != s["metadata"]["resourceVersion"]
    ]
    assert changed == [full["metadata"]["name"]], (changed, before)


def test_named_port_resolved_per_pod_groups_slices(controlplane: ControlPlane) -> None:
    cp = controlplane
    ns = ns_name(cp)
    cp.create(api.path("services", ns), service("multi", {"tier": "x"}))
    cp.create(api.path("deployments", ns), deployment("a", 1, {"tier": "x", "v": "a"}, port=9090))
    cp.create(api.path("deployments", ns), deployment("b", 1, {"tier": "x", "v": "b"}, port=9091))
    sl = wait_for(lambda: (s := slices(cp, ns, "multi")) and len(ready_ips(s)) == 2 and s, what="2 endpoints")
    assert sorted(s["ports"][0]["port"] for s in sl) == [9090, 9091]


def test_not_ready_pods_headless_hostname_and_publish_not_ready(controlplane: ControlPlane) -> None:
    cp = controlplane
    ns = ns_name(cp)
    # A pod bound to a node no agent runs: its status is written here, Running but not Ready.
    pod = cp.create(
        api.path("pods", ns),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "db-0", "labels": {"app": "db"}},
            "spec": {
                "nodeName": "ghost",
                "hostname": "db-0",
                "subdomain": "db",
                "containers": [{"name": "c", "image": "busybox"}],
            },
        },
    )
    cp.patch(
        api.obj_path("pods", pod, "status"),
        {
            "status": {
                "phase": "Running",
                "podIP": "10.9.9.9",
                "podIPs": [{"ip": "10.9.9.9"}],
                "conditions": [{"type": "Ready", "status": "False"}],
            }
        },
    )
    cp.create(api.path("services", ns), service("db", {"app": "db"}, target=5432, clusterIP="None"))
    cp.create(
        api.path("services", ns), service("db-all", {"app": "db"}, target=5432, publishNotReadyAddresses=True)
    )
    sl = wait_for(lambda: (s := slices(cp, ns, "db")) and s[0].get("endpoints") and s, what="db slice")
    e = sl[0]["endpoints"][0]
    assert e["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert e["hostname"] == "db-0"
    assert "service.kubernetes.io/headless" in sl[0]["metadata"]["labels"]
    ep = wait_for(
        lambda: (cp.items(api.path("endpoints", ns), fieldSelector="metadata.name=db") or [{}])[0].get(
            "subsets"
        ),
        what="db Endpoints",
    )
    assert ep[0]["notReadyAddresses"][0]["ip"] == "10.9.9.9" and "addresses" not in ep[0]
    sl2 = wait_for(
        lambda: (s := slices(cp, ns, "db-all")) and s[0].get("endpoints") and s, what="db-all slice"
    )
    assert sl2[0]["endpoints"][0]["conditions"]["ready"] is True
    # Ready now: the endpoint follows.
    cp.patch(
        api.obj_path("pods", pod, "status"), {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    wait_for(lambda: ready_ips(slices(cp, ns, "db")) == ["10.9.9.9"], what="db endpoint ready")
    # A Service whose pods are all gone keeps one empty placeholder slice.
    # Grace 0: no agent runs on "ghost" to confirm a graceful deletion.
    cp.call(cp.client.delete(api.path("pods", ns, "db-0"), grace_seconds=0))
    wait_for(
        lambda: (s := slices(cp, ns, "db")) and len(s) == 1 and not s[0].get("endpoints"), what="placeholder"
    )


def test_scheduler_spreads_and_honors_node_selector(controlplane: ControlPlane) -> None:
    cp = controlplane
    ns = ns_name(cp)
    cp.create(api.path("deployments", ns), deployment("spread", 6, {"app": "spread"}))
    pods = wait_for(
        lambda: (
            (p := cp.items(api.path("pods", ns)))
            and len(p) == 6
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        what="6 scheduled pods",
    )
    per_node: dict[str, int] = {}
    for p in pods:
        per_node[p["spec"]["nodeName"]] = per_node.get(p["spec"]["nodeName"], 0) + 1
    assert sorted(per_node.values()) == [2, 2, 2], per_node
    d = deployment("pinned", 2, {"app": "pinned"})
    d["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "sim-2"}
    cp.create(api.path("deployments", ns), d)
    pinned = wait_for(
        lambda: (
            (p := cp.items(api.path("pods", ns), labelSelector="app=pinned"))
            and len(p) == 2
            and all(x["spec"].get("nodeName") for x in p)
            and p
        ),
        what="pinned pods",
    )
    assert {p["spec"]["nodeName"] for p in pinned} == {"sim-2"}
    d = deployment("nowhere", 1, {"app": "nowhere"})
    d["spec"]["template"]["spec"]["nodeSelector"] = {"disk": "ssd"}
    cp.create(api.path("deployments", ns), d)

    def unschedulable() -> Obj | None:
        for p in cp.items(api.path("pods", ns), labelSelector="app=nowhere"):
            for c in (p.get("status") or {}).get("conditions") or []:
                if c["type"] == "PodScheduled" and c["status"] == "False":
                    return c
        return None

    c = wait_for(unschedulable, what="Unschedulable condition")
    assert c["reason"] == "Unschedulable" and "0/3 nodes are available" in c["message"]


def test_rolling_update_respects_surge_and_availability(controlplane: ControlPlane) -> None:
    cp = controlplane
    ns = ns_name(cp)
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    cp.create(api.path("deployments", ns), deployment("roll", 4, {"app": "roll"}, strategy=strategy))
    wait_for(
        lambda: (
            (cp.get(api.path("deployments", ns, "roll")).get("status") or {}).get("availableReplicas") == 4
        ),
        what="4 available",
    )
    seen: list[tuple[int, int]] = []  # (active pods, ready active pods) at every pod event

    def on_pod(ev: str, pod: Obj, old: Obj | None) -> None:
        if pod["metadata"]["namespace"] != ns:
            return
        active = [
            p
            for p in cp.manager.pods.cache.values()
            if p["metadata"]["namespace"] == ns and not p["metadata"].get("deletionTimestamp")
        ]
        ready = [
            p
            for p in active
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        ]
        seen.append((len(active), len(ready)))

    cp.manager.pods.add_handler(on_pod)
    try:
        cp.patch(
            api.path("deployments", ns, "roll"),
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "c",
                                    "image": "busybox:1.36",
                                    "ports": [{"name": "http", "containerPort": 8080}],
                                }
                            ]
                        }
                    }
                }
            },
        )

        def done() -> bool:
            d = cp.get(api.path("deployments", ns, "roll"))
            st = d.get("status") or {}
            return (
                st.get("observedGeneration") == d["metadata"]["generation"] == 2
                and st.get("updatedReplicas") == 4
                and st.get("availableReplicas") == 4
                and st.get("replicas") == 4
            )

        wait_for(done, timeout=30, what="rollout complete")
    finally:
        cp.manager.pods.handlers.remove(on_pod)
    assert seen, "no pod events during the rollout"
    assert max(a for a, _ in seen) <= 5, f"maxSurge 1 exceeded: {seen}"
    assert min(r for _, r in seen) >= 4, f"maxUnavailable 0 violated: {seen}"
    d = cp.get(api.path("deployments", ns, "roll"))
    assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    conds = {c["type"]: c for c in d["status"]["conditions"]}
    assert (
        conds["Progressing"]["reason"] == "NewReplicaSetAvailable" and conds["Available"]["status"] == "True"
    )
    rss = cp.items(api.path("replicasets", ns))
    assert sorted(r["spec"]["replicas"] for r in rss) == [0, 4]
    assert all(r["metadata"]["labels"].get("pod-template-hash") for r in rss)
    # Deleting the Deployment takes its ReplicaSets and pods with it: our garbage collector's work
    # (Orphan keeps kproxy-apiserver's own synchronous cascade out of it).
    cp.call(cp.client.delete(api.path("deployments", ns, "roll"), propagation="Orphan"))
    wait_for(
        lambda: not cp.items(api.path("replicasets", ns)) and not cp.items(api.path("pods", ns)),
        what="dependents collected",
    )


def test_rollback_reuses_the_old_replicaset(controlplane: ControlPlane) -> None:
    """What `kubectl rollout undo` does: write an old ReplicaSet's template back (with the
    `creationTimestamp: null` kubectl adds); the controller scales that ReplicaSet up again."""
    cp = controlplane
    ns = ns_name(cp)
    d = deployment("undo", 2, {"app": "undo"})
    cp.create(api.path("deployments", ns), d)

    def settled(gen: int) -> bool:
        x = cp.get(api.path("deployments", ns, "undo"))
        st = x.get("status") or {}
        return (
            st.get("observedGeneration") == x["metadata"]["generation"] == gen
            and st.get("updatedReplicas") == 2
            and st.get("availableReplicas") == 2
            and st.get("replicas") == 2
        )

    wait_for(lambda: settled(1), what="revision 1 rolled out")
    first = cp.items(api.path("replicasets", ns))[0]
    cp.patch(
        api.path("deployments", ns, "undo"),
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "c",
                                "image": "busybox:2",
                                "ports": [{"name": "http", "containerPort": 8080}],
                            }
                        ]
                    }
                }
            }
        },
    )
    wait_for(lambda: settled(2), what="revision 2 rolled out")
    old_template = cp.get(api.obj_path("replicasets", first))["spec"]["template"]
    old_template["metadata"]["labels"].pop("pod-template-hash")
    old_template["metadata"]["creationTimestamp"] = None
    cp.call(
        cp.client.patch(
            api.path("deployments", ns, "undo"),
            [{"op": "replace", "path": "/spec/template", "value": old_template}],
            kind="json",
        )
    )
    wait_for(lambda: settled(3), what="the rollback rolled out")
    rss = {r["metadata"]["name"]: r for r in cp.items(api.path("replicasets", ns))}
    assert len(rss) == 2, sorted(rss)
    back = rss[first["metadata"]["name"]]
    assert back["spec"]["replicas"] == 2
    assert back["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"


def test_loadbalancer_pool(controlplane: ControlPlane) -> None:
    cp = controlplane
    ns = ns_name(cp)

    def ingress(name: str) -> list[str]:
        st = cp.get(api.path("services", ns, name)).get("status") or {}
        return [i["ip"] for i in (st.get("loadBalancer") or {}).get("ingress") or []]

    for n in ("lb1", "lb2", "lb3"):
        cp.create(api.path("services", ns), service(n, {"app": n}, target=80, type="LoadBalancer"))
    got = wait_for(lambda: (a := ingress("lb1") + ingress("lb2")) and len(a) == 2 and a, what="two LB IPs")
    assert sorted(got) == ["10.251.0.10", "10.251.0.11"]
    # The pool (2 IPs) is exhausted: the controller has looked at lb3 once it said so on it.
    wait_for(lambda: [e for e in cp.items(api.path("events", ns))
                      if e["involvedObject"]["name"] == "lb3" and e["reason"] == "AllocationFailed"],
             what="lb3's AllocationFailed Event")
    assert ingress("lb3") == []
    freed = ingress("lb1")[0]
    cp.delete(api.path("services", ns, "lb1"))
    assert wait_for(lambda: ingress("lb3"), what="lb3 gets the freed IP") == [freed]
    # Switching a Service away from LoadBalancer releases its IP.
    cp.patch(
        api.path("services", ns, "lb2"),
        {"spec": {"type": "ClusterIP", "externalTrafficPolicy": None, "allocateLoadBalancerNodePorts": None}},
    )
    wait_for(lambda: ingress("lb2") == [], what="lb2 ingress cleared")


def test_prefer_close_sets_zone_hints(controlplane: ControlPlane) -> None:
    """spec.trafficDistribution PreferClose: ready endpoints are hinted for their node's zone
    (kproxy.proxy then prefers them); without it, or once a node has no zone, no hints."""
    cp = controlplane
    ns = ns_name(cp)
    zones = {"sim-1": "zone-a", "sim-2": "zone-b", "sim-3": "zone-a"}
    for node, zone in zones.items():
        cp.patch(api.path("nodes", name=node), {"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}})
    cp.create(api.path("services", ns), service("near", {"app": "near"}, trafficDistribution="PreferClose"))
    cp.create(api.path("services", ns), service("plain", {"app": "near"}))
    cp.create(api.path("deployments", ns), deployment("near", 3, {"app": "near"}))
    sl = wait_for(lambda: (s := slices(cp, ns, "near")) and len(ready_ips(s)) == 3
                  and all(e.get("hints") for x in s for e in x["endpoints"]) and s, what="3 hinted endpoints")
    for e in (e for x in sl for e in x["endpoints"]):
        assert e["hints"] == {"forZones": [{"name": zones[e["nodeName"]]}]}
        assert e["zone"] == zones[e["nodeName"]]
    plain = wait_for(lambda: (s := slices(cp, ns, "plain")) and len(ready_ips(s)) == 3 and s, what="plain slice")
    assert not any(e.get("hints") for x in plain for e in x["endpoints"])
    # The Service stops asking: the hints go.
    cp.patch(api.path("services", ns, "near"), {"spec": {"trafficDistribution": None}})
    wait_for(lambda: not any(e.get("hints") for x in slices(cp, ns, "near") for e in x["endpoints"]),
             what="hints removed")


def test_topology_mode_auto_sets_proportional_hints(controlplane: ControlPlane) -> None:
    """service.kubernetes.io/topology-mode: Auto: hints in proportion to the zones' allocatable
    CPU (topology.py has the rules), an Event when they are enabled and when they are dropped."""
    cp = controlplane
    ns = ns_name(cp)
    zones = {"sim-1": "zone-a", "sim-2": "zone-b", "sim-3": "zone-a"}
    for node, zone in zones.items():
        cp.patch(api.path("nodes", name=node), {"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}})
    # zone-b (sim-2) has 8 of the 12 CPUs: of 6 endpoints, 2 per node, it should get 4.
    cp.patch(api.path("nodes", name="sim-2") + "/status", {"status": {"allocatable": {"cpu": "8"}}})
    svc = service("auto", {"app": "auto"})
    svc["metadata"]["annotations"] = {"service.kubernetes.io/topology-mode": "Auto"}
    cp.create(api.path("services", ns), svc)
    cp.create(api.path("deployments", ns), deployment("auto", 6, {"app": "auto"}))

    def hinted() -> dict[str, int]:
        eps = [e for x in slices(cp, ns, "auto") for e in x["endpoints"] if e["conditions"]["ready"]]
        count: dict[str, int] = {}
        for e in eps:
            for z in (e.get("hints") or {}).get("forZones") or []:
                count[z["name"]] = count.get(z["name"], 0) + 1
        return count if len(eps) == 6 and sum(count.values()) == 6 else {}

    try:
        assert wait_for(hinted, what="6 hinted endpoints") == {"zone-a": 2, "zone-b": 4}, debug_state(cp, ns)

        def events(reason: str) -> list[Obj]:
            return [e for e in cp.items(api.path("events", ns))
                    if e["involvedObject"].get("name") == "auto" and e["reason"] == reason]

        enabled = wait_for(lambda: events("TopologyAwareHintsEnabled"), what="Enabled Event")
        assert enabled[0]["message"] == "Topology Aware Hints has been enabled, addressType: IPv4"
        assert enabled[0]["involvedObject"]["kind"] == "Service"
        # Two endpoints cannot serve zone-b's 2/3 share within the 20% overload threshold: no hints.
        cp.patch(api.path("deployments", ns, "auto"), {"spec": {"replicas": 2}})
        wait_for(lambda: (s := slices(cp, ns, "auto")) and len(ready_ips(s)) == 2
                 and not any(e.get("hints") for x in s for e in x["endpoints"]), what="hints dropped")
        # (while old pods terminate, fewer endpoints are ready: other Warnings may come first)
        want = ("Unable to allocate minimum required endpoints to each zone without exceeding overload "
                "threshold (2 endpoints, 2 zones), addressType: IPv4")
        disabled = wait_for(lambda: [e for e in events("TopologyAwareHintsDisabled") if e["message"] == want],
                            what="Disabled Event")
        assert disabled[0]["type"] == "Warning"
    finally:
        cp.patch(api.path("nodes", name="sim-2") + "/status", {"status": {"allocatable": {"cpu": "2"}}})


def test_informer_relists_after_410(controlplane: ControlPlane) -> None:
    """A watch from a resourceVersion older than the server's window gets 410; the informer relists."""
    cp = controlplane

    async def scenario() -> tuple[int, int]:
        # Push resourceVersion 1 out of the server's 300-event window.
        ns = "kpt-" + secrets.token_hex(3)
        await cp.client.create(
            api.path("namespaces"), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        )
        for i in range(0, 320, 40):
            await asyncio.gather(
                *(
                    cp.client.create(
                        f"/api/v1/namespaces/{ns}/configmaps",
                        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"c{i + j}"}},
                    )
                    for j in range(40)
                )
            )
        inf = api.Informer(cp.client, "namespaces")
        inf.rv = "1"  # far older than anything the window holds after the tests above
        task = asyncio.create_task(inf.run())
        try:
            for _ in range(200):
                if inf.relists:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
        return inf.relists, len(inf.cache)

    relists, n = cp.call(scenario())
    assert relists >= 1, "a watch from resourceVersion 1 should have got 410 Gone and relisted"
    assert n >= 4  # default, kube-system, kube-public, kube-node-lease at least


def test_node_without_lease_renewal_turns_unknown_and_its_endpoints_not_ready(
    controlplane: ControlPlane,
) -> None:
    """Runs last in this module: it takes node sim-3 down for good."""
    cp = controlplane
    ns = ns_name(cp)
    cp.create(api.path("services", ns), service("lc", {"app": "lc"}))
    cp.create(api.path("deployments", ns), deployment("lc", 3, {"app": "lc"}))
    sl = wait_for(
        lambda: (s := slices(cp, ns, "lc")) and len(ready_ips(s)) == 3 and s, what="3 ready endpoints"
    )
    on_sim3 = {e["addresses"][0] for s in sl for e in s["endpoints"] if e["nodeName"] == "sim-3"}
    assert on_sim3, "spreading put no pod on sim-3"
    # Leases are renewed every 0.5 s with a 10 s grace: nothing may have turned Unknown so far.
    assert all(
        c["status"] == "True"
        for n in cp.items(api.path("nodes"))
        for c in n["status"]["conditions"]
        if c["type"] == "Ready"
    )
    cp.sim.silent.add("sim-3")
    node = wait_for(
        lambda: (
            (n := cp.get(api.path("nodes", name="sim-3")))
            and any(c["type"] == "Ready" and c["status"] == "Unknown" for c in n["status"]["conditions"])
            and n
        ),
        timeout=30,
        what="sim-3 Ready=Unknown",
    )
    assert (
        next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["reason"] == "NodeStatusUnknown"
    )
    after = wait_for(
        lambda: (s := slices(cp, ns, "lc")) and set(ready_ips(s)).isdisjoint(on_sim3) and s,
        what="sim-3's endpoints not ready",
    )
    assert len(ready_ips(after)) == 3 - len(on_sim3)
    assert cp.get(api.path("nodes", name="sim-1"))["status"]["conditions"][0]["status"] == "True"

"""Several kproxy-apiserver processes on one etcd: one consistent API (issue 16).

Real processes, a real etcd member, real HTTP: a write through one server is seen by a watch on
another in order; concurrent Service creates through two servers get unique ClusterIPs and
NodePorts (the allocation keys in etcd); default/kubernetes lists every live server; an RBAC
binding written through one server authorizes on the other as soon as that one has it.
"""
from __future__ import annotations

import ipaddress
import os
import threading
import time

from etcd_helpers import Client, apiservers, configmap, read_events

from controlplane_stub.apiserver.pki import load_tokens
from controlplane_stub.store.etcd_process import EtcdCluster


def test_a_write_through_one_server_is_seen_in_order_by_a_watch_on_the_other(etcd1: EtcdCluster, prefix: str) -> None:
    with apiservers(etcd1, 2, prefix) as (a, b):
        ca, cb = Client(a), Client(b)
        code, listed = cb.call("GET", "/api/v1/namespaces/default/configmaps")
        assert code == 200
        watch = cb.watch("/api/v1/namespaces/default/configmaps",
                         resourceVersion=listed["metadata"]["resourceVersion"], timeoutSeconds="30")
        sent = []
        for i in range(20):
            code, obj = ca.call("POST", "/api/v1/namespaces/default/configmaps", configmap(f"cm-{i}"))
            assert code == 201, obj
            sent.append(("ADDED", f"cm-{i}", int(obj["metadata"]["resourceVersion"])))
            if i % 2:
                obj["data"]["k"] = "changed"
                code, obj = ca.call("PUT", f"/api/v1/namespaces/default/configmaps/cm-{i}", obj)
                assert code == 200, obj
                sent.append(("MODIFIED", f"cm-{i}", int(obj["metadata"]["resourceVersion"])))
        code, obj = ca.call("DELETE", "/api/v1/namespaces/default/configmaps/cm-0")
        assert code == 200, obj
        got = read_events(watch, len(sent) + 1)
        watch.close()
        seen = [(e["type"], e["object"]["metadata"]["name"], int(e["object"]["metadata"]["resourceVersion"]))
                for e in got]
        assert seen[:-1] == sent  # same events, same order, same resourceVersions as the writer got
        assert seen[-1][:2] == ("DELETED", "cm-0") and seen[-1][2] > sent[-1][2]
        # The other server's reads agree too (its mirror caught up with the watch).
        code, one = cb.call("GET", "/api/v1/namespaces/default/configmaps/cm-1")
        assert code == 200 and one["data"]["k"] == "changed"
        # An update through b with the resourceVersion a handed out: optimistic concurrency across servers.
        stale = dict(one, data={"k": "x"})
        code, _ = cb.call("PUT", "/api/v1/namespaces/default/configmaps/cm-1", stale)
        assert code == 200
        code, body = ca.call("PUT", "/api/v1/namespaces/default/configmaps/cm-1", stale)
        assert code == 409, body


def test_concurrent_service_creates_through_two_servers_get_unique_ips_and_node_ports(etcd1: EtcdCluster,
                                                                                      prefix: str) -> None:
    # Small ranges and the same allocator start on both servers: they pick the same values and race.
    extra = ("--service-cluster-ip-range", "10.97.0.0/24", "--service-node-port-range", "30000-30299")
    per_thread, threads_per_server = 25, 2
    with apiservers(etcd1, 2, prefix, *extra) as servers:
        results: list[tuple[int, object]] = []
        lock = threading.Lock()

        def create(server_i: int, t: int) -> None:
            c = Client(servers[server_i])
            for i in range(per_thread):
                name = f"s{server_i}-{t}-{i}"
                body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                        "spec": {"type": "NodePort", "selector": {"app": name}, "ports": [{"port": 80}]}}
                code, obj = c.call("POST", "/api/v1/namespaces/default/services", body)
                with lock:
                    results.append((code, obj))

        workers = [threading.Thread(target=create, args=(s, t)) for s in range(2) for t in range(threads_per_server)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        total = 2 * threads_per_server * per_thread
        assert len(results) == total
        assert all(code == 201 for code, _ in results), [(c, o.get("message") if isinstance(o, dict) else o) for c, o in results if c != 201][:3]
        code, listed = Client(servers[0]).call("GET", "/api/v1/services")
        assert code == 200
        svcs = listed["items"]
        assert len(svcs) == total + 1  # + default/kubernetes
        ips = [s["spec"]["clusterIP"] for s in svcs]
        ports = [s["spec"]["ports"][0]["nodePort"] for s in svcs if s["spec"]["type"] == "NodePort"]
        assert len(set(ips)) == len(ips), "a ClusterIP was handed out twice"
        assert len(set(ports)) == len(ports) == total, "a NodePort was handed out twice"
        assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.97.0.0/24") for ip in ips)
        conflicts = sum(open(s.log_path).read().count("etcd_reservation_conflict") for s in servers)
        print(f"\nreservation conflicts resolved by re-picking: {conflicts}")
        # Deleting through one server frees the values for the other: it can take every freed port.
        c0, c1 = Client(servers[0]), Client(servers[1])
        freed = []
        for s in svcs[:30]:
            if s["metadata"]["name"] == "kubernetes":
                continue
            code, _ = c0.call("DELETE", f"/api/v1/namespaces/default/services/{s['metadata']['name']}")
            assert code == 200
            freed.append(s["spec"]["ports"][0]["nodePort"])
        time.sleep(0.5)
        for i, port in enumerate(freed):
            body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"again-{i}"},
                    "spec": {"type": "NodePort", "selector": {"app": "x"}, "ports": [{"port": 80, "nodePort": port}]}}
            code, obj = c1.call("POST", "/api/v1/namespaces/default/services", body)
            assert code == 201, obj
        # And a value the client asks for that the other server holds is the usual 422.
        body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dup"},
                "spec": {"type": "NodePort", "selector": {"app": "x"}, "ports": [{"port": 80, "nodePort": freed[0]}]}}
        code, obj = c0.call("POST", "/api/v1/namespaces/default/services", body)
        assert code == 422 and "already allocated" in obj["message"], obj


def _endpoint_ports(c: Client) -> set[int]:
    code, ep = c.call("GET", "/api/v1/namespaces/default/endpoints/kubernetes")
    assert code == 200, ep
    return {p["port"] for s in ep.get("subsets") or [] for p in s["ports"]}


def test_kubernetes_endpoints_list_every_live_api_server(etcd1: EtcdCluster, prefix: str) -> None:
    with apiservers(etcd1, 2, prefix, "--bootstrap-reconcile-interval", "1") as (a, b):
        ca = Client(a)
        want = {a.port, b.port}
        deadline = time.monotonic() + 20
        while _endpoint_ports(ca) != want and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _endpoint_ports(ca) == want
        b.kill()  # kill -9: no goodbye, its lease expires (TTL 3 s here)
        deadline = time.monotonic() + 20
        while _endpoint_ports(ca) != {a.port} and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _endpoint_ports(ca) == {a.port}
        b.start()
        deadline = time.monotonic() + 20
        while _endpoint_ports(ca) != {a.port, b.port} and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _endpoint_ports(ca) == {a.port, b.port}


def _until(check: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_binding_written_through_one_server_takes_effect_on_the_other_as_soon_as_it_has_it(
        etcd1: EtcdCluster, prefix: str) -> None:
    """The policy cache is invalidated by the store's events, not by this server's requests: once
    server b serves the RoleBinding written through a (its mirror has it), b's very next request
    is authorized with it, and likewise once the binding is gone. With a refresh interval instead
    (the cache before), b refused (or allowed) for up to that interval after it had the change."""
    with apiservers(etcd1, 2, prefix) as (a, b):
        ca, cb = Client(a), Client(b)
        ro = Client(b)
        ro.s.headers["Authorization"] = f"Bearer {b.readonly_token}"
        user = load_tokens(os.path.join(b.data_dir, "tokens.csv"))[b.readonly_token].name
        assert ca.call("POST", "/api/v1/namespaces", {"metadata": {"name": "xrbac"}})[0] == 201
        role = {"metadata": {"name": "cm-writer"},
                "rules": [{"verbs": ["create"], "apiGroups": [""], "resources": ["configmaps"]}]}
        assert ca.call("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/xrbac/roles", role)[0] == 201
        bindings = "/apis/rbac.authorization.k8s.io/v1/namespaces/xrbac/rolebindings"
        for i in range(5):
            cm = "/api/v1/namespaces/xrbac/configmaps"
            assert ro.call("POST", cm, configmap(f"x{i}-before"))[0] == 403
            body = {"metadata": {"name": f"rb-{i}"}, "subjects": [{"kind": "User", "name": user}],
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-writer"}}
            assert ca.call("POST", bindings, body)[0] == 201
            _until(lambda: cb.call("GET", f"{bindings}/rb-{i}")[0] == 200, "b never got the binding")
            code, out = ro.call("POST", cm, configmap(f"x{i}"))
            assert code == 201, (i, out)
            assert ca.call("DELETE", f"{bindings}/rb-{i}")[0] == 200
            _until(lambda: cb.call("GET", f"{bindings}/rb-{i}")[0] == 404, "b never saw the delete")
            assert ro.call("POST", cm, configmap(f"x{i}-after"))[0] == 403, i

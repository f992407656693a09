"""ServiceCIDRs with two kproxy-apiserver processes on one etcd: one default "kubernetes" ServiceCIDR
whichever server made it, and a ServiceCIDR created through one server widens the other's ClusterIP
allocator (it follows the store's events), the address still unique across both."""
from __future__ import annotations

import time

from etcd_helpers import Client, apiservers

from controlplane_stub.store.etcd_process import EtcdCluster

PATH = "/apis/networking.k8s.io/v1/servicecidrs"


def test_servicecidrs_across_two_api_servers(etcd1: EtcdCluster, prefix: str) -> None:
    with apiservers(etcd1, 2, prefix) as (one, two):
        a, b = Client(one), Client(two)
        code, listed = a.call("GET", PATH)
        assert code == 200 and [o["metadata"]["name"] for o in listed["items"]] == ["kubernetes"]
        assert b.call("GET", f"{PATH}/kubernetes")[1]["metadata"]["uid"] == listed["items"][0]["metadata"]["uid"]

        assert a.call("POST", PATH, {"metadata": {"name": "more"}, "spec": {"cidrs": ["10.100.0.0/24"]}})[0] == 201
        svc = {"metadata": {"name": "web"}, "spec": {"clusterIP": "10.100.0.9", "ports": [{"port": 80}]}}
        deadline = time.monotonic() + 15
        while (got := b.call("POST", "/api/v1/namespaces/default/services", svc))[0] != 201:
            assert got[0] == 422 and time.monotonic() < deadline, got  # until B's allocator has the range
            time.sleep(0.1)
        svc["metadata"]["name"] = "web2"
        deadline = time.monotonic() + 15
        while True:  # A has the range too, and the address is taken (etcd's allocation key)
            code, status = a.call("POST", "/api/v1/namespaces/default/services", svc)
            assert code == 422, status
            if "provided IP is already allocated" in status["message"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)

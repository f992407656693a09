"""The bootstrap controller: default/kubernetes Service, its endpoints and the system namespaces,
as a fresh kube-apiserver has them (`kubectl get svc` -> kubernetes ClusterIP 10.96.0.1 443/TCP)."""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import urllib3
from apiserver_helpers import Client, service
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from test_apiserver_kubectl import KUBECTL, kubectl

from controlplane_stub.apiserver.allocators import ServiceAllocator
from controlplane_stub.apiserver.bootstrap import default_advertise_address
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")
INTERVAL = 1.0  # --bootstrap-reconcile-interval of these servers (upstream: 10 s)
SMALL_RANGE = "10.0.0.0/28"  # 14 usable addresses: a test can fill it
ADVERTISE = "192.0.2.10"


@pytest.fixture(scope="module")
def fresh(storage_backend: str) -> Iterator[APIServerProcess]:
    """Default flags but a short reconcile interval: default range, advertise = the bind address."""
    urllib3.disable_warnings()
    with running_apiserver(extra_args=["--bootstrap-reconcile-interval", str(INTERVAL)]) as api:
        yield api


@pytest.fixture(scope="module")
def small(storage_backend: str) -> Iterator[APIServerProcess]:
    """A service range that can be filled, and an explicit --advertise-address."""
    with running_apiserver(extra_args=["--bootstrap-reconcile-interval", str(INTERVAL), "--service-cluster-ip-range",
                                       SMALL_RANGE, "--advertise-address", ADVERTISE]) as api:
        yield api


def _api_client(api: APIServerProcess) -> client.ApiClient:
    cfg = client.Configuration()
    config.load_kube_config(config_file=api.kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg)


def _wait_for(fn: Callable[[], T], timeout: float) -> T:
    """fn() once it stops raising 404."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = fn()
        except ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
        else:
            return value
        time.sleep(0.1)


def _check_endpoints(api: APIServerProcess, ac: client.ApiClient, address: str) -> None:
    es = client.DiscoveryV1Api(ac).read_namespaced_endpoint_slice("kubernetes", "default")
    assert es.metadata.labels["kubernetes.io/service-name"] == "kubernetes"
    assert "endpointslice.kubernetes.io/managed-by" not in (es.metadata.labels or {})  # no controller owns it
    assert es.address_type == "IPv4"
    assert [(e.addresses, e.conditions.ready) for e in es.endpoints] == [([address], True)]
    assert [(p.name, p.port, p.protocol) for p in es.ports] == [("https", api.port, "TCP")]
    ep = client.CoreV1Api(ac).read_namespaced_endpoints("kubernetes", "default")
    assert ep.metadata.labels["endpointslice.kubernetes.io/skip-mirror"] == "true"
    assert [[a.ip for a in s.addresses] for s in ep.subsets] == [[address]]
    assert [[(p.name, p.port, p.protocol) for p in s.ports] for s in ep.subsets] == [[("https", api.port, "TCP")]]


@pytest.mark.kubectl
@pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH")
def test_fresh_server_lists_the_kubernetes_service_with_kubectl(fresh: APIServerProcess) -> None:
    rows = [line.split() for line in kubectl(fresh, "get", "svc").stdout.splitlines()]
    assert rows[0] == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert [r[:5] for r in rows[1:]] == [["kubernetes", "ClusterIP", "10.96.0.1", "<none>", "443/TCP"]]
    ns = kubectl(fresh, "get", "ns", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= set(ns)
    ep = kubectl(fresh, "get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[0].addresses[0].ip}").stdout
    assert ep == "127.0.0.1"  # --bind-address 127.0.0.1 and no --advertise-address


def test_kubernetes_service_spec_with_the_python_client(fresh: APIServerProcess) -> None:
    with _api_client(fresh) as ac:
        svc = client.CoreV1Api(ac).read_namespaced_service("kubernetes", "default")
        assert svc.metadata.labels == {"component": "apiserver", "provider": "kubernetes"}
        assert svc.spec.type == "ClusterIP" and svc.spec.cluster_ip == "10.96.0.1"
        assert svc.spec.cluster_ips == ["10.96.0.1"] and svc.spec.ip_family_policy == "SingleStack"
        assert svc.spec.session_affinity == "None" and not svc.spec.selector
        assert [(p.name, p.port, p.protocol, p.target_port) for p in svc.spec.ports] == [
            ("https", 443, "TCP", fresh.port)]
        _check_endpoints(fresh, ac, "127.0.0.1")


def test_advertise_address_flag_and_first_ip_of_the_range(small: APIServerProcess) -> None:
    with _api_client(small) as ac:
        svc = client.CoreV1Api(ac).read_namespaced_service("kubernetes", "default")
        assert svc.spec.cluster_ip == "10.0.0.1"
        _check_endpoints(small, ac, ADVERTISE)


def test_deleted_service_and_endpoints_come_back(fresh: APIServerProcess) -> None:
    admin = Client(fresh, fresh.token)
    with _api_client(fresh) as ac:
        v1, disc = client.CoreV1Api(ac), client.DiscoveryV1Api(ac)
        before = v1.read_namespaced_service("kubernetes", "default")
        v1.delete_namespaced_service("kubernetes", "default")
        disc.delete_namespaced_endpoint_slice("kubernetes", "default")
        v1.delete_namespaced_endpoints("kubernetes", "default")
        # While it is gone its address stays reserved: nobody else may take it.
        code, body = admin.post("/api/v1/namespaces/default/services", service("squatter", clusterIP="10.96.0.1"))
        assert code == 422 and "provided IP is already allocated" in body["message"], body
        started = time.monotonic()
        again = _wait_for(lambda: v1.read_namespaced_service("kubernetes", "default"), 3 * INTERVAL + 5)
        assert time.monotonic() - started <= 2 * INTERVAL + 1  # within one reconcile period (plus slack)
        assert again.metadata.uid != before.metadata.uid  # a new object, same address
        assert again.spec.cluster_ip == "10.96.0.1" and again.spec.ports[0].target_port == fresh.port
        _wait_for(lambda: disc.read_namespaced_endpoint_slice("kubernetes", "default"), 3 * INTERVAL + 5)
        _check_endpoints(fresh, ac, "127.0.0.1")


def test_kube_node_lease_namespace_is_recreated(fresh: APIServerProcess) -> None:
    with _api_client(fresh) as ac:
        v1 = client.CoreV1Api(ac)
        v1.delete_namespace("kube-node-lease")
        deadline = time.monotonic() + 3 * INTERVAL + 5
        while time.monotonic() < deadline:
            try:
                ns = v1.read_namespace("kube-node-lease")
            except ApiException as e:
                assert e.status == 404
            else:
                if ns.status.phase == "Active" and not ns.metadata.deletion_timestamp:
                    return
            time.sleep(0.1)
        raise AssertionError("kube-node-lease was not re-created")


def test_user_services_never_get_the_first_ip(small: APIServerProcess) -> None:
    """Fill the whole range: every other address is handed out, the first never is."""
    admin = Client(small, small.token)
    code, body = admin.post("/api/v1/namespaces/default/services", service("wants-first", clusterIP="10.0.0.1"))
    assert code == 422 and "provided IP is already allocated" in body["message"], body
    got = []
    for i in range(13):  # 14 usable addresses, one of them the kubernetes Service's
        code, body = admin.post("/api/v1/namespaces/default/services", service(f"fill-{i}"))
        assert code == 201, body
        got.append(body["spec"]["clusterIP"])
    assert sorted(got, key=ipaddress.ip_address) == [f"10.0.0.{n}" for n in range(2, 15)]
    code, body = admin.post("/api/v1/namespaces/default/services", service("one-too-many"))
    assert code == 500 and "range is full" in body["message"], body
    # A Service deleted and created again does not free the address for others either.
    code, _ = admin.delete("/api/v1/namespaces/default/services/kubernetes")
    assert code == 200
    code, body = admin.post("/api/v1/namespaces/default/services", service("one-too-many"))
    assert code == 500 and "range is full" in body["message"], body
    for i in range(13):
        admin.delete(f"/api/v1/namespaces/default/services/fill-{i}")


def test_allocator_reservation() -> None:
    alloc = ServiceAllocator([SMALL_RANGE])
    assert alloc.reserve_for(alloc.first_ip(), "default", "kubernetes", held_by_owner=False)
    # Specs as the API server's defaulting hands them to the allocator (clusterIPs follows clusterIP);
    # the allocator checks the pair as upstream's initIPFamilyFields does.
    spec = {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"]}
    owner = {"metadata": {"name": "kubernetes", "namespace": "default"}, "spec": dict(spec)}
    alloc.assign(owner, None)
    assert owner["spec"]["clusterIPs"] == ["10.0.0.1"]
    alloc.release(owner)  # deleted: the address stays held
    other = {"metadata": {"name": "kubernetes", "namespace": "other"}, "spec": dict(spec)}
    with pytest.raises(Exception, match="already allocated"):
        alloc.assign(other, None)
    # A store written before the reservation: someone else holds the address already.
    alloc2 = ServiceAllocator([SMALL_RANGE])
    alloc2.load([other])
    assert not alloc2.reserve_for("10.0.0.1", "default", "kubernetes", held_by_owner=False)
    assert alloc2.reserve_for("10.0.0.1", "default", "kubernetes", held_by_owner=True)  # its own, stored before


def test_default_advertise_address() -> None:
    assert default_advertise_address("10.1.2.3") == "10.1.2.3"
    assert default_advertise_address("::1") == "::1"
    for bind in ("0.0.0.0", "", "::"):
        ip = ipaddress.ip_address(default_advertise_address(bind))
        assert ip.version == 4 and not ip.is_unspecified
        assert not ip.is_loopback or str(ip) == "127.0.0.1"

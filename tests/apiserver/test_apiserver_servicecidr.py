"""ServiceCIDR (networking.k8s.io/v1) on the real kproxy-apiserver, through kubectl 1.32: the default
"kubernetes" one from --service-cluster-ip-range (Ready), create/get/list, upstream's validation
errors as a Status, immutable CIDRs (a second family may be added), the ClusterIP allocator
taking addresses from another Ready ServiceCIDR, and kube-proxy's RBAC to list/watch them.
CIDR grammar (apimachinery's strict IsValidCIDR) as properties beside it."""
from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from apiserver_helpers import Client
from hypothesis import given, settings
from hypothesis import strategies as st
from test_apiserver_kubectl import KUBECTL, kubectl

from controlplane_stub.apiserver.rbac import Attributes, bootstrap_policy
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver
from controlplane_stub.apiserver.validation.networking import cidr_errors

PATH = "/apis/networking.k8s.io/v1/servicecidrs"


@pytest.fixture(scope="module")
def dual() -> Iterator[APIServerProcess]:
    with running_apiserver(extra_args=["--service-cluster-ip-range", "10.96.0.0/16,fd00:10:96::/108"]) as api:
        yield api


def _manifest(name: str, *cidrs: str) -> str:
    return yaml.safe_dump({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": name},
                           "spec": {"cidrs": list(cidrs)}})


def _until_ready(admin: Client, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        code, obj = admin.get(f"{PATH}/{name}")
        assert code == 200, obj
        conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        if conds.get("Ready", {}).get("status") == "True":
            return obj
        assert time.monotonic() < deadline, f"{name} not Ready: {obj}"
        time.sleep(0.05)


@pytest.mark.kubectl
@pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH")
def test_servicecidrs_with_kubectl(dual: APIServerProcess) -> None:
    rows = [line.split() for line in kubectl(dual, "get", "servicecidrs").stdout.splitlines()]
    assert rows[0] == ["NAME", "CIDRS", "AGE"]
    assert [r[:2] for r in rows[1:]] == [["kubernetes", "10.96.0.0/16,fd00:10:96::/108"]]
    default = yaml.safe_load(kubectl(dual, "get", "servicecidr", "kubernetes", "-o", "yaml").stdout)
    assert default["apiVersion"] == "networking.k8s.io/v1" and default["kind"] == "ServiceCIDR"
    assert default["spec"] == {"cidrs": ["10.96.0.0/16", "fd00:10:96::/108"]}
    [ready] = default["status"]["conditions"]
    assert (ready["type"], ready["status"], ready["message"]) == ("Ready", "True",
                                                                  "Kubernetes default Service CIDR is ready")
    assert "networking.k8s.io/v1" in kubectl(dual, "api-resources", "--api-group=networking.k8s.io").stdout

    out = kubectl(dual, "apply", "-f", "-", stdin=_manifest("extra", "10.100.0.0/24")).stdout
    assert out.strip() == "servicecidr.networking.k8s.io/extra created"
    admin = Client(dual, dual.token)
    extra = _until_ready(admin, "extra")
    assert extra["status"]["conditions"][0]["message"] == "Kubernetes Service CIDR is ready"
    names = kubectl(dual, "get", "servicecidrs", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert names == ["extra", "kubernetes"]

    # Validation errors come back as the real server's Status, printed by kubectl as upstream's.
    cases = {
        ("bad1", "10.100.0.5/24"):
            'spec.cidrs[0]: Invalid value: "10.100.0.5/24": must not have bits set beyond the prefix length',
        ("bad2", "010.1.0.0/16"):
            'spec.cidrs[0]: Invalid value: "010.1.0.0/16": must not have leading 0s in IP or prefix length',
        ("bad3", "FD00::/64"): 'spec.cidrs[0]: Invalid value: "FD00::/64": must be in canonical form ("fd00::/64")',
        ("bad4", "10.1.0.0/16", "10.2.0.0/16"):
            'spec.cidrs: Invalid value: []string{"10.1.0.0/16", "10.2.0.0/16"}: may specify no more than one IP for '
            "each IP family, i.e 192.168.0.0/24 and 2001:db8::/64",
        ("bad5", "10.1.0.0/16", "fd00::/64", "10.3.0.0/16"):
            'spec.cidrs: Invalid value: networking.ServiceCIDRSpec{CIDRs:[]string{"10.1.0.0/16", "fd00::/64", '
            '"10.3.0.0/16"}}: may only hold up to 2 values',
        ("bad6",): "spec.cidrs: Required value: at least one CIDR required",
        ("bad7", "10.1.0.0"):
            'spec.cidrs[0]: Invalid value: "10.1.0.0": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)',
    }
    for (name, *cidrs), message in cases.items():
        p = kubectl(dual, "apply", "-f", "-", stdin=_manifest(name, *cidrs), check=False)
        assert p.returncode == 1 and f'The ServiceCIDR "{name}" is invalid: {message}' in p.stderr, p.stderr
    code, status = admin.post(PATH, json.loads(json.dumps(yaml.safe_load(_manifest("bad1", "10.100.0.5/24")))))
    assert code == 422 and status["kind"] == "Status" and status["reason"] == "Invalid"
    assert status["details"] == {"name": "bad1", "group": "networking.k8s.io", "kind": "ServiceCIDR",
                                 "causes": [{"reason": "FieldValueInvalid", "field": "spec.cidrs[0]",
                                             "message": 'Invalid value: "10.100.0.5/24": must not have bits set '
                                                        "beyond the prefix length"}]}

    # The CIDRs are immutable; a CIDR of the other family may be added (kubernetes#131261).
    p = kubectl(dual, "apply", "-f", "-", stdin=_manifest("extra", "10.101.0.0/24"), check=False)
    assert 'spec.cidrs[0]: Invalid value: "10.101.0.0/24": field is immutable' in p.stderr, p.stderr
    out = kubectl(dual, "apply", "-f", "-", stdin=_manifest("extra", "10.100.0.0/24", "fd00:100::/120")).stdout
    assert out.strip() == "servicecidr.networking.k8s.io/extra configured"
    p = kubectl(dual, "apply", "-f", "-", stdin=_manifest("extra", "10.100.0.0/24"), check=False)
    assert 'spec.cidrs: Invalid value: []string{"10.100.0.0/24"}: field is immutable' in p.stderr, p.stderr

    assert 'servicecidr.networking.k8s.io "extra" deleted' in kubectl(dual, "delete", "servicecidr", "extra").stdout


def test_cluster_ips_come_from_every_ready_servicecidr(dual: APIServerProcess) -> None:
    admin = Client(dual, dual.token)

    def svc(name: str, ip: str) -> tuple[int, Any]:
        return admin.post("/api/v1/namespaces/default/services", {
            "metadata": {"name": name}, "spec": {"clusterIP": ip, "ports": [{"port": 80}]}})

    code, status = svc("before", "10.102.0.10")
    assert code == 422, status
    assert "The range of valid IPs is 10.96.0.0/16" in status["message"]
    code, _ = admin.post(PATH, {"metadata": {"name": "more"}, "spec": {"cidrs": ["10.102.0.0/24"]}})
    assert code == 201
    _until_ready(admin, "more")
    deadline = time.monotonic() + 10
    while (got := svc("inside", "10.102.0.10"))[0] != 201:  # the allocator follows the store's events
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    code, status = svc("taken", "10.102.0.10")
    assert code == 422 and "provided IP is already allocated" in status["message"], status
    for name in ("inside",):
        assert admin.delete(f"/api/v1/namespaces/default/services/{name}")[0] == 200
    assert admin.delete(f"{PATH}/more")[0] == 200


def _gone(admin: Client, name: str) -> None:
    deadline = time.monotonic() + 10
    while (code := admin.get(f"{PATH}/{name}")[0]) != 404:
        assert code == 200 and time.monotonic() < deadline, f"{name} not deleted"
        time.sleep(0.05)


def test_default_servicecidr_comes_back_after_a_delete_and_follows_the_flag_to_dual_stack() -> None:
    with running_apiserver(extra_args=["--bootstrap-reconcile-interval", "0.5"]) as api:
        admin = Client(api, api.token)
        first = _until_ready(admin, "kubernetes")
        assert first["spec"] == {"cidrs": ["10.96.0.0/12"]}
        assert first["metadata"]["finalizers"] == ["networking.k8s.io/service-cidr-finalizer"]
        # The kubernetes Service's address is covered by another ServiceCIDR: the default may go.
        assert admin.post(PATH, {"metadata": {"name": "cover"}, "spec": {"cidrs": ["10.96.0.0/12"]}})[0] == 201
        _until_ready(admin, "cover")
        assert admin.delete(f"{PATH}/kubernetes")[0] == 200
        deadline = time.monotonic() + 10
        while True:
            code, again = admin.get(f"{PATH}/kubernetes")
            if code == 200 and again["metadata"]["uid"] != first["metadata"]["uid"]:
                break
            assert time.monotonic() < deadline, "the default ServiceCIDR was not re-created"
            time.sleep(0.1)
        assert _until_ready(admin, "kubernetes")["spec"] == {"cidrs": ["10.96.0.0/12"]}
        assert admin.delete(f"{PATH}/cover")[0] == 200
        _gone(admin, "cover")
        # The flag turned dual-stack (same primary range): the default ServiceCIDR gains the second
        # family, as upstream; a flag that changed the primary range leaves the object alone.
        api.extra_args += ["--service-cluster-ip-range", "10.96.0.0/12,fd00:10:96::/108"]
        api.restart()
        assert _until_ready(admin, "kubernetes")["spec"] == {"cidrs": ["10.96.0.0/12", "fd00:10:96::/108"]}
        api.extra_args[-1] = "10.100.0.0/16"
        api.restart()
        assert admin.get(f"{PATH}/kubernetes")[1]["spec"] == {"cidrs": ["10.96.0.0/12", "fd00:10:96::/108"]}


def test_a_servicecidr_in_use_is_held_terminating_until_its_services_are_gone(dual: APIServerProcess) -> None:
    admin = Client(dual, dual.token)
    assert admin.post(PATH, {"metadata": {"name": "held"}, "spec": {"cidrs": ["10.103.0.0/24"]}})[0] == 201
    _until_ready(admin, "held")
    svc = {"metadata": {"name": "user"}, "spec": {"clusterIP": "10.103.0.10", "ports": [{"port": 80}]}}
    deadline = time.monotonic() + 10
    while (got := admin.post("/api/v1/namespaces/default/services", svc))[0] != 201:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    code, deleting = admin.delete(f"{PATH}/held")
    assert code == 200 and deleting["metadata"]["deletionTimestamp"]
    deadline = time.monotonic() + 10
    while True:
        conds = admin.get(f"{PATH}/held")[1].get("status", {}).get("conditions", [])
        if [(c["type"], c["status"], c["reason"]) for c in conds] == [("Ready", "False", "Terminating")]:
            break
        assert time.monotonic() < deadline, conds
        time.sleep(0.05)
    assert conds[0]["message"] == ("There are still IPAddresses referencing the ServiceCIDR, please remove them or "
                                   "create a new ServiceCIDR")
    svc["metadata"]["name"], svc["spec"]["clusterIP"] = "late", "10.103.0.11"
    code, status = admin.post("/api/v1/namespaces/default/services", svc)  # no new addresses from it
    assert code == 422 and "is not in the valid range" in status["message"], status
    assert admin.delete("/api/v1/namespaces/default/services/user")[0] == 200
    _gone(admin, "held")


def test_kube_proxy_may_list_and_watch_servicecidrs_and_no_more() -> None:
    policy = bootstrap_policy()

    def may(verb: str) -> bool:
        return policy.authorize(Attributes("system:kube-proxy", frozenset(), verb, api_group="networking.k8s.io",
                                           resource="servicecidrs"))[0]

    assert may("list") and may("watch")
    assert not may("create") and not may("delete") and not may("update")


# --- apimachinery's IsValidCIDR (strict, 1.33) as properties ---------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_canonical_ipv4_networks_are_valid_and_host_bits_are_not(addr: ipaddress.IPv4Address, plen: int) -> None:
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    assert cidr_errors(str(net)) == []
    if addr != net.network_address:
        assert cidr_errors(f"{addr}/{plen}") == ["must not have bits set beyond the prefix length"]


@settings(max_examples=60, deadline=None)
@given(st.ip_addresses(v=6), st.integers(0, 128))
def test_ipv6_networks_must_be_canonical(addr: ipaddress.IPv6Address, plen: int) -> None:
    net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    if net.network_address.ipv4_mapped is not None:
        assert cidr_errors(str(net)) == ["must not have an IPv4-mapped IPv6 address"]
        return
    assert cidr_errors(str(net)) == []
    exploded = f"{net.network_address.exploded}/{plen}"
    if exploded != str(net):
        assert cidr_errors(exploded) == [f'must be in canonical form ("{net}")']


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="0123456789abcdefABCDEF.:/%", max_size=40)))
def test_anything_else_is_refused_with_one_message(text: str) -> None:
    errors = cidr_errors(text)
    try:
        net = ipaddress.ip_network(text, strict=True)
        valid = str(net) == text and "/" in text and "%" not in text and \
            not (isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None)
    except ValueError:
        valid = False
    assert (errors == []) == valid and len(errors) <= 1


def test_overlapping_servicecidrs_never_hand_out_an_address_twice() -> None:
    from controlplane_stub.apiserver.allocators import ServiceAllocator
    from controlplane_stub.apiserver.errors import StatusError

    alloc = ServiceAllocator(["10.96.0.0/24"])
    held = {"spec": {"clusterIP": "10.97.0.2", "clusterIPs": ["10.97.0.2"], "ports": [{"port": 80}]}}
    # a subnet of the flag range, a new /30, its supernet, a /32 (no usable address)
    alloc.set_extra_ranges(["10.96.0.0/25", "10.97.0.0/30", "10.97.0.0/29", "10.98.0.1/32"], lambda: [held])
    assert list(alloc.extra) == ["10.97.0.0/30"]
    got = []
    with pytest.raises(StatusError) as full:
        for i in range(300):
            svc = {"metadata": {"name": f"s{i}", "namespace": "default"}, "spec": {"ports": [{"port": 80}]}}
            alloc.assign(svc, None)
            got.append(svc["spec"]["clusterIP"])
    assert full.value.code == 500 and "range is full" in str(full.value)
    assert len(got) == len(set(got)) == 254 + 1  # the /24's usable addresses, then 10.97.0.1 (.2 is held)
    assert got[-1] == "10.97.0.1"

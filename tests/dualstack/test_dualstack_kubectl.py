"""Dual-stack Services and IPv6 EndpointSlices through the real kproxy-apiserver process started with two
service CIDRs, driven by kubectl 1.32 (apply, create, patch, get -o jsonpath), checked against the rules
of the Kubernetes "IPv4/IPv6 dual-stack" documentation and kube-apiserver's messages."""
from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver

KUBECTL = shutil.which("kubectl")
V4_CIDR, V6_CIDR = "10.96.0.0/12", "fd00:10:96::/108"

pytestmark = [pytest.mark.kubectl,
              pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary on PATH (the image ships 1.32)")]


@pytest.fixture(scope="module")
def api(storage_backend: str) -> Iterator[APIServerProcess]:
    with running_apiserver(extra_args=["--service-cluster-ip-range", f"{V4_CIDR},{V6_CIDR}"]) as server:
        yield server


@pytest.fixture(scope="module")
def api_v4(storage_backend: str) -> Iterator[APIServerProcess]:
    with running_apiserver(extra_args=["--service-cluster-ip-range", V4_CIDR]) as server:
        yield server


def kubectl(api: APIServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert KUBECTL
    return subprocess.run([KUBECTL, "--kubeconfig", api.kubeconfig, "--request-timeout=20s", *args],
                          capture_output=True, text=True, input=stdin, timeout=60, check=False)


def ok(api: APIServerProcess, *args: str, stdin: str | None = None) -> str:
    out = kubectl(api, *args, stdin=stdin)
    assert out.returncode == 0, out.stderr
    return out.stdout


def manifest(name: str, **spec: object) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                       "spec": {"selector": {"app": name}, "ports": [{"port": 80}], **spec}})


def fields(api: APIServerProcess, name: str) -> tuple[str, list[str], list[str]]:
    """(ipFamilyPolicy, ipFamilies, clusterIPs) as kubectl get -o jsonpath prints them."""
    out = ok(api, "get", "svc", name, "-o",
             "jsonpath={.spec.ipFamilyPolicy} {.spec.ipFamilies[*]} | {.spec.clusterIPs[*]}")
    head, ips = out.split(" | ")
    policy, *families = head.split()
    return policy, families, ips.split()


def in_cidr(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


@pytest.mark.timeout(120)
def test_create_defaults_and_family_order(api: APIServerProcess) -> None:
    ok(api, "create", "service", "clusterip", "plain", "--tcp=80:8080")
    policy, families, ips = fields(api, "plain")
    assert (policy, families) == ("SingleStack", ["IPv4"]) and len(ips) == 1 and in_cidr(ips[0], V4_CIDR)

    ok(api, "apply", "-f", "-", stdin=manifest("prefer", ipFamilyPolicy="PreferDualStack"))
    policy, families, ips = fields(api, "prefer")
    assert (policy, families) == ("PreferDualStack", ["IPv4", "IPv6"])
    assert in_cidr(ips[0], V4_CIDR) and in_cidr(ips[1], V6_CIDR)
    # clusterIP is the primary (first family's) address.
    assert ok(api, "get", "svc", "prefer", "-o", "jsonpath={.spec.clusterIP}") == ips[0]

    ok(api, "apply", "-f", "-", stdin=manifest("six-first", ipFamilyPolicy="RequireDualStack",
                                                 ipFamilies=["IPv6", "IPv4"]))
    policy, families, ips = fields(api, "six-first")
    assert families == ["IPv6", "IPv4"] and in_cidr(ips[0], V6_CIDR) and in_cidr(ips[1], V4_CIDR)

    ok(api, "apply", "-f", "-", stdin=manifest("only-six", ipFamilies=["IPv6"]))
    assert fields(api, "only-six")[:2] == ("SingleStack", ["IPv6"])

    # Two clusterIPs but no policy: a create defaults to SingleStack, so it is refused (no silent switch).
    out = kubectl(api, "apply", "-f", "-", stdin=manifest("two-ips", clusterIP="10.96.7.7",
                                                           clusterIPs=["10.96.7.7", "fd00:10:96::77"]))
    assert out.returncode == 1
    assert ('spec.ipFamilyPolicy: Invalid value: "SingleStack": must be \'RequireDualStack\' or '
            "'PreferDualStack' when multiple cluster IPs are specified") in out.stderr
    ok(api, "apply", "-f", "-", stdin=manifest("two-ips", clusterIP="10.96.7.7", ipFamilyPolicy="PreferDualStack",
                                                 clusterIPs=["10.96.7.7", "fd00:10:96::77"]))
    assert fields(api, "two-ips") == ("PreferDualStack", ["IPv4", "IPv6"], ["10.96.7.7", "fd00:10:96::77"])

    ok(api, "apply", "-f", "-", stdin=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "headless"},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}))
    assert fields(api, "headless") == ("RequireDualStack", ["IPv4", "IPv6"], ["None"])


@pytest.mark.timeout(120)
def test_invalid_combinations_are_refused_with_upstream_messages(api: APIServerProcess,
                                                                 api_v4: APIServerProcess) -> None:
    out = kubectl(api, "apply", "-f", "-", stdin=manifest("bad1", ipFamilyPolicy="SingleStack",
                                                           ipFamilies=["IPv4", "IPv6"]))
    assert out.returncode == 1
    assert ('The Service "bad1" is invalid: spec.ipFamilyPolicy: Invalid value: "SingleStack": must be '
            "'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified") in out.stderr
    out = kubectl(api, "apply", "-f", "-", stdin=manifest("bad2", ipFamilies=["IPv6"], clusterIP="10.96.0.50",
                                                           clusterIPs=["10.96.0.50"]))
    assert out.returncode == 1
    assert ('spec.clusterIPs[0]: Invalid value: "10.96.0.50": expected an IPv6 value as indicated by '
            "`ipFamilies[0]`") in out.stderr
    out = kubectl(api, "apply", "-f", "-", stdin=manifest("bad3", ipFamilyPolicy="SomeStack"))
    assert out.returncode == 1 and 'spec.ipFamilyPolicy: Unsupported value: "SomeStack"' in out.stderr
    out = kubectl(api, "apply", "-f", "-", stdin=manifest("bad4", ipFamilyPolicy="PreferDualStack",
                                                           ipFamilies=["IPv4", "IPv4"]))
    assert out.returncode == 1 and 'spec.ipFamilies[1]: Duplicate value: "IPv4"' in out.stderr
    # A single-stack cluster refuses RequireDualStack and IPv6, takes PreferDualStack as one family.
    out = kubectl(api_v4, "apply", "-f", "-", stdin=manifest("req", ipFamilyPolicy="RequireDualStack"))
    assert out.returncode == 1
    assert ('spec.ipFamilyPolicy: Invalid value: "RequireDualStack": this cluster is not configured for '
            "dual-stack services") in out.stderr
    out = kubectl(api_v4, "apply", "-f", "-", stdin=manifest("six", ipFamilies=["IPv6"]))
    assert out.returncode == 1
    assert 'spec.ipFamilies[0]: Invalid value: "IPv6": not configured on this cluster' in out.stderr
    ok(api_v4, "apply", "-f", "-", stdin=manifest("pref", ipFamilyPolicy="PreferDualStack"))
    assert fields(api_v4, "pref")[:2] == ("PreferDualStack", ["IPv4"])
    # Nothing refused was stored.
    names = ok(api, "get", "svc", "-o", "name")
    assert not any(f"service/bad{i}\n" in names for i in range(1, 5))


@pytest.mark.timeout(120)
def test_upgrade_downgrade_and_update_rules(api: APIServerProcess) -> None:
    ok(api, "apply", "-f", "-", stdin=manifest("web"))
    _, _, (primary,) = fields(api, "web")

    # Upgrade: SingleStack -> RequireDualStack allocates a secondary IP of the other family.
    ok(api, "patch", "svc", "web", "--type=merge", "-p", '{"spec":{"ipFamilyPolicy":"RequireDualStack"}}')
    policy, families, ips = fields(api, "web")
    assert (policy, families, ips[0]) == ("RequireDualStack", ["IPv4", "IPv6"], primary)
    assert in_cidr(ips[1], V6_CIDR)
    secondary = ips[1]

    # Dropping the secondary IP without SingleStack is refused.
    out = kubectl(api, "patch", "svc", "web", "--type=json",
                  "-p", '[{"op":"remove","path":"/spec/clusterIPs/1"},{"op":"remove","path":"/spec/ipFamilies/1"}]')
    assert out.returncode == 1
    assert ('spec.ipFamilyPolicy: Invalid value: "RequireDualStack": must be \'SingleStack\' to release the '
            "secondary cluster IP") in out.stderr

    # The primary family may not change: the allocated clusterIPs no longer match the families.
    out = kubectl(api, "patch", "svc", "web", "--type=merge", "-p", '{"spec":{"ipFamilies":["IPv6","IPv4"]}}')
    assert out.returncode == 1
    assert (f'spec.clusterIPs[0]: Invalid value: "{primary}": expected an IPv6 value as indicated by '
            "`ipFamilies[0]`") in out.stderr
    # Nor may the primary clusterIP.
    out = kubectl(api, "patch", "svc", "web", "--type=merge", "-p",
                  json.dumps({"spec": {"clusterIP": "10.96.9.9", "clusterIPs": ["10.96.9.9", secondary]}}))
    assert out.returncode == 1 and "spec.clusterIPs[0]: Invalid value: " in out.stderr
    assert "may not change once set" in out.stderr

    # Downgrade: SingleStack drops the secondary IP (and frees it: another Service may take it).
    ok(api, "patch", "svc", "web", "--type=merge", "-p", '{"spec":{"ipFamilyPolicy":"SingleStack"}}')
    assert fields(api, "web") == ("SingleStack", ["IPv4"], [primary])
    ok(api, "apply", "-f", "-", stdin=manifest("taker", ipFamilies=["IPv6"], clusterIP=secondary,
                                                 clusterIPs=[secondary]))
    assert fields(api, "taker")[2] == [secondary]

    # Re-applying the original manifest (no policy, no IPs) keeps what is stored.
    ok(api, "patch", "svc", "web", "--type=merge", "-p", '{"spec":{"ipFamilyPolicy":"PreferDualStack"}}')
    before = fields(api, "web")
    assert before[0] == "PreferDualStack" and len(before[2]) == 2
    ok(api, "replace", "-f", "-", stdin=manifest("web"))
    assert fields(api, "web") == before

    # ExternalName has no families; turning it back into ClusterIP allocates afresh.
    ok(api, "patch", "svc", "web", "--type=merge", "-p",
       '{"spec":{"type":"ExternalName","externalName":"example.com","clusterIP":null,"clusterIPs":null,'
       '"ipFamilies":null,"ipFamilyPolicy":null}}')
    assert ok(api, "get", "svc", "web", "-o", "jsonpath={.spec.ipFamilyPolicy}{.spec.ipFamilies}") == ""


@pytest.mark.timeout(120)
def test_ipv6_endpointslices(api: APIServerProcess) -> None:
    def slice_manifest(name: str, address_type: str, address: str) -> str:
        return json.dumps({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                           "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "six-first"}},
                           "addressType": address_type, "ports": [{"port": 80, "protocol": "TCP"}],
                           "endpoints": [{"addresses": [address], "conditions": {"ready": True}}]})

    ok(api, "apply", "-f", "-", stdin=slice_manifest("six-a", "IPv6", "fd00:10:244::5"))
    assert ok(api, "get", "endpointslice", "six-a", "-o",
              "jsonpath={.addressType} {.endpoints[0].addresses[0]}") == "IPv6 fd00:10:244::5"
    out = kubectl(api, "apply", "-f", "-", stdin=slice_manifest("six-b", "IPv6", "10.244.0.5"))
    assert out.returncode == 1
    assert 'endpoints[0].addresses[0]: Invalid value: "10.244.0.5": must be a valid IPv6 address' in out.stderr
    out = kubectl(api, "apply", "-f", "-", stdin=slice_manifest("six-a", "IPv4", "10.244.0.5"))
    assert out.returncode == 1 and 'addressType: Invalid value: "IPv4": field is immutable' in out.stderr
    wide = ok(api, "get", "endpointslice", "six-a")
    assert wide.splitlines()[1].split()[:4] == ["six-a", "IPv6", "80", "fd00:10:244::5"]

"""Pure pieces of the cluster: image catalog semantics, pod IPAM, scale-down order, topology."""

from __future__ import annotations

import ipaddress
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.agent.catalog import Catalog, ImageError
from controlplane_stub.agent.netns import Topology, route_over_nodes, routes_to_pods
from controlplane_stub.agent.node import Ipam
from controlplane_stub.cluster import main as cluster_main
from controlplane_stub.cluster.state import MAX_ZONES, default_lb_pool, lb_routes, node_zone
from controlplane_stub.controllers.replicaset import deletion_rank
from controlplane_stub.controllers.scheduler import fits

pytestmark = pytest.mark.timeout(30)


def test_catalog_command_and_args_override_like_entrypoint_and_cmd(tmp_path: Path) -> None:
    cat = tmp_path / "images.yaml"
    cat.write_text(
        "images:\n  app:v1:\n    command: ['{python}', '{dir}/app.py']\n    args: ['--port', '1']\n"
        "    env: {A: b}\n    workingDir: '{dir}'\n"
    )
    c = Catalog.load(cat)
    argv, env, cwd = c.resolve({"name": "x", "image": "app:v1"})
    assert (
        argv == [sys.executable, f"{tmp_path}/app.py", "--port", "1"]
        and env == {"A": "b"}
        and cwd == str(tmp_path)
    )
    # args replace the image's args; command replaces both (Kubernetes' ENTRYPOINT/CMD rules).
    assert c.resolve({"name": "x", "image": "app:v1", "args": ["--port", "2"]})[0][-2:] == ["--port", "2"]
    assert c.resolve({"name": "x", "image": "app:v1", "command": ["sh"]})[0] == ["sh"]
    # An unknown image runs only with an explicit command.
    assert c.resolve({"name": "x", "image": "nope", "command": ["true"], "args": ["a"]})[0] == ["true", "a"]
    with pytest.raises(ImageError) as e:
        c.resolve({"name": "x", "image": "nope:1"})
    assert e.value.reason == "ErrImageNeverPull"


def test_default_catalog_runs_the_seed_image() -> None:
    argv, _, _ = Catalog.load().resolve({"name": "f", "image": "flask-kubernetes:latest"})
    assert argv[0] == sys.executable and Path(argv[1]).name == "app.py" and Path(argv[1]).exists()
    with pytest.raises(ValueError, match="--image-catalog"):
        Catalog.load("/nonexistent/images.yaml")


def test_ipam_never_hands_out_the_gateway_and_reuses_late() -> None:
    ipam = Ipam("10.244.7.0/29")  # hosts .1-.6, .1 is the bridge
    got = [ipam.allocate(f"u{i}") for i in range(5)]
    assert got == [f"10.244.7.{i}" for i in range(2, 7)]
    assert ipam.allocate("u0") == "10.244.7.2"  # idempotent per pod
    with pytest.raises(RuntimeError, match="exhausted"):
        ipam.allocate("u9")
    ipam.release("u0")
    assert ipam.allocate("u10") == "10.244.7.2"
    ipam.release("u3")
    assert ipam.allocate("u11", prefer="10.244.7.5") == "10.244.7.5"  # an agent restart keeps pod IPs


def test_scale_down_removes_unscheduled_then_pending_then_unready_first() -> None:
    def pod(name: str, node: str, phase: str, ready: bool, created: str) -> dict[str, object]:
        return {
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]},
        }

    pods = [
        pod("ready-old", "n1", "Running", True, "2026-01-01T00:00:00Z"),
        pod("ready-new", "n1", "Running", True, "2026-01-02T00:00:00Z"),
        pod("unready", "n1", "Running", False, "2026-01-01T00:00:00Z"),
        pod("pending", "n1", "Pending", False, "2026-01-01T00:00:00Z"),
        pod("unscheduled", "", "Pending", False, "2026-01-01T00:00:00Z"),
    ]
    order = [p["metadata"]["name"] for p in sorted(pods, key=deletion_rank)]  # type: ignore[arg-type, index]
    assert order == ["unscheduled", "pending", "unready", "ready-new", "ready-old"]


def test_scheduler_filters() -> None:
    node = {
        "metadata": {"name": "n", "labels": {"disk": "ssd"}},
        "spec": {"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    pod = {"spec": {"nodeSelector": {"disk": "ssd"}}}
    assert "taint" in fits(pod, node)
    pod["spec"]["tolerations"] = [
        {"key": "dedicated", "operator": "Equal", "value": "x", "effect": "NoSchedule"}
    ]
    assert fits(pod, node) == ""
    pod["spec"]["nodeSelector"] = {"disk": "hdd"}
    assert "selector" in fits(pod, node)
    node["status"]["conditions"][0]["status"] = "Unknown"  # type: ignore[index]
    assert "not ready" in fits(pod, node)


def test_topology_addresses() -> None:
    t = Topology(prefix="kptab-")
    n2 = t.node(2)
    assert (n2.netns, n2.ip, n2.pod_cidr, n2.gateway) == (
        "kptab-n2",
        "10.250.0.12",
        "10.244.2.0/24",
        "10.244.2.1",
    )
    assert t.client_ns == "kptab-client" and t.net_ns == "kptab-net"
    assert n2.all_ips == ("10.250.0.12",) and n2.all_pod_cidrs == ("10.244.2.0/24",)  # ipv4: as before


def test_topology_dual_and_ipv6_addresses_and_routes() -> None:
    t = Topology(prefix="kptab-", ip_family="dual")
    n1, n2 = t.node(1), t.node(2)
    assert (n2.ip, n2.pod_cidr, n2.gateway) == ("10.250.0.12", "10.244.2.0/24", "10.244.2.1")
    assert n2.all_ips == ("10.250.0.12", "fd00:10:250::c")
    assert n2.all_pod_cidrs == ("10.244.2.0/24", "fd00:10:244:2::/64")
    assert t.pod_cidr_bases == ["10.244.0.0/16", "fd00:10:244::/56"]
    assert t.node_network_ips(1) == ["10.250.0.1", "fd00:10:250::1"]
    # each family's pod CIDR via the node's address of that family; ECMP routes per family
    assert routes_to_pods([n2]) == [
        "route replace 10.244.2.0/24 via 10.250.0.12 dev eth0\n",
        "route replace fd00:10:244:2::/64 via fd00:10:250::c dev eth0\n",
    ]
    assert route_over_nodes("fd00:10:251::/120", [n1, n2]) == (
        "route replace fd00:10:251::/120 nexthop via fd00:10:250::b dev eth0 nexthop via fd00:10:250::c dev eth0\n"
    )
    v6 = Topology(prefix="kptab-", ip_family="ipv6").node(3)
    assert (v6.ip, v6.pod_cidr, v6.gateway, v6.all_ips) == (
        "fd00:10:250::d", "fd00:10:244:3::/64", "fd00:10:244:3::1", ("fd00:10:250::d",))
    assert route_over_nodes("10.96.0.0/12", [v6]) == ""  # no node of that family: no route
    with pytest.raises(ValueError, match="--ip-family"):
        Topology(prefix="x-", ip_family="ipv5")


def test_lb_pool_defaults_and_routes() -> None:
    assert default_lb_pool("dual") == "10.251.0.0/24,fd00:10:251::/120"
    assert lb_routes(default_lb_pool("dual")) == ["10.251.0.0/24", "fd00:10:251::/120"]
    # a range is routed as the smallest CIDR that covers it
    assert lb_routes("10.251.0.10-10.251.0.11, fd00::5-fd00::9") == ["10.251.0.10/31", "fd00::/124"]
    with pytest.raises(ValueError, match="--lb-pool"):
        lb_routes("10.251.0.9-fd00::1")


def test_ipam_dual_stack() -> None:
    ipam = Ipam(["10.244.7.0/30", "fd00:10:244:7::/64"])  # IPv4: only .2 is free
    assert ipam.allocate_all("a") == ("10.244.7.2", "fd00:10:244:7::2")
    with pytest.raises(RuntimeError, match="exhausted"):
        ipam.allocate_all("b")
    assert ipam.allocate_all("a") == ("10.244.7.2", "fd00:10:244:7::2")  # idempotent per pod
    ipam.release("a")
    # after an agent restart a pod keeps both its addresses; a preferred one out of range is ignored
    assert ipam.allocate_all("a2", ["fd00:10:244:7::2", "10.244.7.2", "10.9.9.9"]) == ("10.244.7.2", "fd00:10:244:7::2")
    ipam.release("a2")
    assert ipam.allocate_all("d") == ("10.244.7.2", "fd00:10:244:7::3")  # a freed IPv6 address waits
    tiny = Ipam(["10.244.8.0/29", "fd00:8::/127"])  # no IPv6 address to hand out
    with pytest.raises(RuntimeError, match="exhausted"):
        tiny.allocate_all("x")
    assert not tiny.taken and not tiny.used  # the IPv4 address it had taken is given back


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60))
def test_ipam_never_hands_out_an_address_twice(ops: list[tuple[bool, int]]) -> None:
    """Any sequence of allocations and releases: the pods hold distinct addresses, one per
    family, each inside its CIDR and never the network's or the bridge's (an IPv6 /64 included)."""
    cidrs = ["10.244.7.0/29", "fd00:10:244:7::/64"]
    ipam = Ipam(cidrs)
    for alloc, pod in ops:
        if alloc:
            try:
                ipam.allocate_all(f"p{pod}")
            except RuntimeError:
                pass
        else:
            ipam.release(f"p{pod}")
        held = [ip for ips in ipam.used.values() for ip in ips]
        assert len(held) == len(set(held))
        for ips in ipam.used.values():
            for ip, cidr in zip(ips, cidrs, strict=True):
                net = ipaddress.ip_network(cidr)
                assert ipaddress.ip_address(ip) in net and int(ipaddress.ip_address(ip)) - int(net.network_address) >= 2


@settings(max_examples=200, deadline=None)
@given(nodes=st.integers(1, 200), zones=st.integers(1, MAX_ZONES))
def test_zones_spread_nodes_round_robin(nodes: int, zones: int) -> None:
    """`up --zones N`: every zone gets a node before any gets a second (counts differ by <= 1)."""
    got = Counter(node_zone(i, zones) for i in range(1, nodes + 1))
    assert len(got) == min(nodes, zones)
    assert max(got.values()) - min(got.values()) <= 1
    assert all(z.startswith("zone-") and len(z) == 6 for z in got)


def test_zones_zero_means_no_label_and_out_of_range_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert node_zone(1, 0) == ""
    with pytest.raises(ValueError):
        node_zone(1, MAX_ZONES + 1)
    rc = cluster_main(["up", "--name", "kptz", "--data-dir", str(tmp_path / "d"), "--zones", str(MAX_ZONES + 1)])
    assert rc == 2 and "--zones: between 0 and 26" in capsys.readouterr().err

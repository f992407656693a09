"""A one-node topology for the iptables tests, in network namespaces this suite creates.

    client (kptC..) 192.168.50.2 ── veth ── 192.168.50.1 node (kptN..) runs the rules
                                             br0 10.1.0.1/24 ── pod1 10.1.0.2, pod2 10.1.0.3 (local)
                                             r0  10.2.0.1/24 ── pod3 10.2.0.2 (a "remote" endpoint)

Every name carries a random suffix; the fixture deletes only the namespaces it created, in
finally, even when a test fails. Nothing is done in the root namespace except `ip netns add/del`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "iptables_netpeer.py")
NODE_IP = "192.168.50.1"
CLIENT_IP = "192.168.50.2"
POD_GW = "10.1.0.1"
PODS = {"pod1": "10.1.0.2", "pod2": "10.1.0.3", "pod3": "10.2.0.2"}
# The same topology in IPv6 (dual-stack tests): node network fd00:50::/64, pods in fd01::/16.
NODE_IP6 = "fd00:50::1"
CLIENT_IP6 = "fd00:50::2"
POD_GW6 = "fd01:1::1"
PODS6 = {"pod1": "fd01:1::2", "pod2": "fd01:1::3", "pod3": "fd01:2::2"}


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


def _have_root_netns() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "iptables-nft-restore", "iptables-legacy-restore", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return ""


SKIP_REASON = _have_root_netns()


@dataclass
class Topology:
    suffix: str
    node: str
    client: str
    pods: dict[str, str]  # pod name -> netns
    servers: list[subprocess.Popen[str]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def node_exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.node, *args, check=check)

    def _peer(self, ns: str, *args: str, timeout: float = 60) -> list[dict[str, object]]:
        out = sh("ip", "netns", "exec", ns, sys.executable, PEER, *args, timeout=timeout)
        result: list[dict[str, object]] = json.loads(out.stdout)
        return result

    def tcp(
        self, host: str, port: int, count: int = 1, timeout: float = 2.0, ns: str = ""
    ) -> list[dict[str, object]]:
        return self._peer(ns or self.client, "tcp", host, str(port), str(count), str(timeout))

    def udp(
        self, host: str, port: int, count: int = 1, timeout: float = 2.0, src: int = 0, ns: str = ""
    ) -> list[dict[str, object]]:
        return self._peer(ns or self.client, "udp", host, str(port), str(count), str(timeout), str(src))


def _build(suffix: str) -> Topology:
    node, client = f"kptN{suffix}", f"kptC{suffix}"
    pods = {name: f"kpt{name[-1]}P{suffix}" for name in PODS}
    topo = Topology(suffix, node, client, pods)
    for ns in (node, client, *pods.values()):
        sh("ip", "netns", "add", ns)
        topo.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    n = ("ip", "-n", node)
    sh(*n, "link", "add", "n0", "type", "veth", "peer", "name", "eth0", "netns", client)
    sh(*n, "addr", "add", f"{NODE_IP}/24", "dev", "n0")
    # nodad: usable at once (duplicate address detection would hold them tentative for a second).
    sh(*n, "addr", "add", f"{NODE_IP6}/64", "dev", "n0", "nodad")
    sh(*n, "link", "set", "n0", "up")
    sh("ip", "-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    sh("ip", "-n", client, "link", "set", "eth0", "up")
    sh("ip", "-n", client, "route", "add", "default", "via", NODE_IP)
    sh("ip", "-n", client, "addr", "add", f"{CLIENT_IP6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", client, "-6", "route", "add", "default", "via", NODE_IP6)
    sh(*n, "link", "add", "br0", "type", "bridge")
    sh(*n, "addr", "add", f"{POD_GW}/24", "dev", "br0")
    sh(*n, "addr", "add", f"{POD_GW6}/64", "dev", "br0", "nodad")
    sh(*n, "link", "set", "br0", "up")
    for i, (name, ip) in enumerate(PODS.items()):
        ns = pods[name]
        dev = f"p{i}"
        sh(*n, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        if ip.startswith("10.1."):
            sh(*n, "link", "set", dev, "master", "br0")
            # As the bridge CNI plugin's hairpinMode / kubelet's hairpin-veth: a pod reaching
            # itself through its service must get its frame back on the port it came from.
            sh(*n, "link", "set", dev, "type", "bridge_slave", "hairpin", "on")
            gw, gw6 = POD_GW, POD_GW6
        else:
            sh(*n, "addr", "add", "10.2.0.1/24", "dev", dev)
            sh(*n, "addr", "add", "fd01:2::1/64", "dev", dev, "nodad")
            gw, gw6 = "10.2.0.1", "fd01:2::1"
        sh(*n, "link", "set", dev, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", gw)
        sh("ip", "-n", ns, "addr", "add", f"{PODS6[name]}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", gw6)
    # A real node has a default route; without one an unmatched VIP would be "net unreachable"
    # before the filter table's REJECT could answer. (No dummy module here: point it at the client.)
    sh(*n, "route", "add", "default", "via", CLIENT_IP)
    # Routing back out n0 would make the node send an ICMP redirect first, and the redirect
    # shares the per-peer ICMP rate limit with REJECT's port-unreachable, silencing it.
    for conf in ("all", "default", "n0"):
        sh("ip", "netns", "exec", node, "sysctl", "-qw", f"net.ipv4.conf.{conf}.send_redirects=0")
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    sh(*n, "-6", "route", "add", "default", "via", CLIENT_IP6)
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    # ICMPv6 errors (REJECT's port unreachable) are rate limited per peer, 1 s by default.
    sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv6.icmp.ratelimit=0")
    for name, ns in pods.items():
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, PEER, "serve", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        topo.servers.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until bound; the server exits on its own in 600 s
        assert line.strip() == "ready", f"backend {name} did not start"
    return topo


def _destroy(topo: Topology) -> None:
    for proc in topo.servers:
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    for ns in topo.namespaces:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


def wait_until(pred: object, timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return True
        time.sleep(step)
    return False

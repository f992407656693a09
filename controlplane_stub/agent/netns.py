"""Network namespaces for the one-machine cluster: the node network, nodes, pods, the client.

Every namespace and link name starts with the cluster's prefix (e.g. `kpc-`), and every namespace
is written to the cluster's record (record.py) before it is made, so that `down`, even after a
crash, removes exactly what the cluster made and nothing else of that name. A namespace that
exists already and is not in the record is never adopted. Links live only inside those
namespaces and go with them. Nothing is ever configured in the root namespace: links are created
directly inside their target namespaces (`ip link add ... netns A type veth peer ... netns B`),
and sysctls, addresses and routes are set with `ip -n NS` / `ip netns exec NS`.

Topology (N nodes):
    PREFIX-net      bridge br0 10.250.0.1/24: the node network (an L2 segment)
    PREFIX-nI       eth0 10.250.0.(10+I)/24 on the node network, bridge cbr0 10.244.I.1/24 for its
                    pods, ip_forward on, routes to every other node's pod CIDR via that node
    PREFIX-client   eth0 10.250.0.2/24 on the node network: the "outside" client (`exec`)
    pod namespaces  eth0 10.244.I.x/24 on their node's cbr0, default route via 10.244.I.1
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controlplane_stub.agent.record import Owned, Record

NETNS_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")
CLONE_NEWNET = 0x40000000


class NetnsError(RuntimeError):
    pass


def ip(*args: str, ns: str | None = None, check: bool = True, batch: str | None = None) -> str:
    cmd = ["ip"] + (["-n", ns] if ns else []) + (["-batch", "-"] if batch is not None else list(args))
    r = subprocess.run(cmd, input=batch, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        shown = batch.strip().replace("\n", "; ") if batch is not None else " ".join(args)
        raise NetnsError(f"ip {'-n ' + ns + ' ' if ns else ''}{shown}: {r.stderr.strip()}")
    return r.stdout


def netns_exec(ns: str, *cmd: str, check: bool = True) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"ip netns exec {ns} {' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def add(ns: str, record: Record | None) -> None:
    """Makes netns ns and records it; an existing ns is reused only if the record says it is ours."""
    if exists(ns):
        if record is not None and not record.load().owns_netns(ns):
            raise NetnsError(
                f"netns {ns} exists and this cluster did not make it (not in {record.path}); "
                "remove it or choose another --name"
            )
    else:
        if record is not None:
            record.netns_intent(ns)
        ip("netns", "add", ns)
        if record is not None:
            record.netns_made(ns)
    ip("link", "set", "lo", "up", ns=ns)


def pids(ns: str) -> list[int]:
    if not exists(ns):
        return []
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_all(ns: str, sig: int = signal.SIGKILL) -> int:
    n = 0
    for pid in pids(ns):
        try:
            os.kill(pid, sig)
            n += 1
        except ProcessLookupError:
            pass
    return n


def delete(ns: str) -> None:
    """Kills whatever still runs inside, then removes the namespace (its veth ends go with it)."""
    for _ in range(50):
        if kill_all(ns) == 0:
            break
        time.sleep(0.02)
    if exists(ns):
        ip("netns", "del", ns, check=False)
    etc = ETC_NETNS / ns
    if etc.is_dir():
        for f in etc.iterdir():
            f.unlink(missing_ok=True)
        etc.rmdir()


def remove_owned(owned: Owned) -> list[str]:
    """Removes the recorded namespaces that still exist and are still the ones recorded (the
    processes inside first); a namespace of a recorded name but another inode is not ours."""
    gone = [ns for ns in sorted(owned.netns) if exists(ns) and owned.owns_netns(ns)]
    for ns in gone:
        kill_all(ns)
    for ns in gone:
        delete(ns)
    for ns in owned.netns:  # a pod's resolv.conf dir whose namespace was never made
        etc = ETC_NETNS / ns
        if not exists(ns) and etc.is_dir():
            for f in etc.iterdir():
                f.unlink(missing_ok=True)
            etc.rmdir()
    return gone


def sysctl(ns: str, *settings: str) -> None:
    for s in settings:
        netns_exec(ns, "sysctl", "-q", "-w", s, check=False)


@dataclass(frozen=True)
class NodeNet:
    """Addresses of one node: its netns, its node-network IP and its pod CIDR."""

    name: str
    netns: str
    ip: str
    pod_cidr: str

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))


@dataclass(frozen=True)
class Topology:
    prefix: str
    node_cidr: str = "10.250.0.0/24"
    pod_cidr_base: str = "10.244.0.0/16"

    @property
    def net_ns(self) -> str:
        return f"{self.prefix}net"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}client"

    def node_network_ip(self, offset: int) -> str:
        return str(ipaddress.ip_network(self.node_cidr).network_address + offset)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.node_cidr).prefixlen

    def node(self, index: int) -> NodeNet:
        base = ipaddress.ip_network(self.pod_cidr_base)
        pod_cidr = list(base.subnets(new_prefix=24))[index]
        return NodeNet(
            name=f"node-{index}",
            netns=f"{self.prefix}n{index}",
            ip=self.node_network_ip(10 + index),
            pod_cidr=str(pod_cidr),
        )


def setup_node_network(t: Topology, record: Record | None) -> None:
    add(t.net_ns, record)
    if "br0" not in ip("-o", "link", "show", ns=t.net_ns):
        ip(
            ns=t.net_ns,
            batch="link add br0 type bridge\nlink set br0 up\n"
            f"addr add {t.node_network_ip(1)}/{t.prefixlen} dev br0\n",
        )


def _attach_to_node_network(t: Topology, ns: str, port: str, addr: str) -> None:
    """A veth from ns (as eth0) to the node network bridge (as `port` there)."""
    if "eth0" in ip("-o", "link", "show", ns=ns):
        return
    ip("link", "add", port, "netns", t.net_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip(ns=t.net_ns, batch=f"link set {port} master br0\nlink set {port} up\n")
    ip(ns=ns, batch=f"addr add {addr}/{t.prefixlen} dev eth0\nlink set eth0 up\n")


def setup_node(t: Topology, node: NodeNet, others: list[NodeNet], record: Record | None) -> None:
    add(node.netns, record)
    _attach_to_node_network(t, node.netns, f"v{node.name}"[:15], node.ip)
    plen = ipaddress.ip_network(node.pod_cidr).prefixlen
    if "cbr0" not in ip("-o", "link", "show", ns=node.netns):
        ip(
            ns=node.netns,
            batch=f"link add cbr0 type bridge\nlink set cbr0 up\naddr add {node.gateway}/{plen} dev cbr0\n",
        )
    # Forwarding between pods, other nodes and the node network; bridged pod traffic through
    # iptables so that a pod reaching a Service backed by a pod on the same bridge gets un-DNATed.
    sysctl(
        node.netns,
        "net.ipv4.ip_forward=1",
        "net.bridge.bridge-nf-call-iptables=1",
        "net.ipv4.conf.all.route_localnet=1",
    )
    routes = "".join(
        f"route replace {o.pod_cidr} via {o.ip} dev eth0\n" for o in others if o.name != node.name
    )
    if routes:
        ip(ns=node.netns, batch=routes)


def setup_client(t: Topology, nodes: list[NodeNet], routed: list[str], record: Record | None) -> None:
    """The outside client: routes to every pod CIDR via its node, and to `routed` CIDRs (Service
    and LoadBalancer ranges) spread over all nodes (ECMP), as a router in front of a cluster does."""
    add(t.client_ns, record)
    _attach_to_node_network(t, t.client_ns, "vclient", t.node_network_ip(2))
    lines = [f"route replace {n.pod_cidr} via {n.ip} dev eth0" for n in nodes]
    hops = " ".join(f"nexthop via {n.ip} dev eth0" for n in nodes)
    lines += [f"route replace {c} {hops}" for c in routed]
    ip(ns=t.client_ns, batch="\n".join(lines) + "\n")


def setup_pod(
    node: NodeNet,
    pod_ns: str,
    veth: str,
    pod_ip: str,
    record: Record | None,
    resolv_conf: str | None = None,
) -> None:
    """A pod: its own netns with eth0 on the node's bridge and a default route via the bridge."""
    if record is not None and not exists(pod_ns):
        record.netns_intent(pod_ns)  # before /etc/netns/NAME too, so `down` finds that as well
    if resolv_conf is not None:
        d = ETC_NETNS / pod_ns
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(resolv_conf)
    add(pod_ns, record)
    if "eth0" not in ip("-o", "link", "show", ns=pod_ns):
        ip("link", "del", veth, ns=node.netns, check=False)  # a leftover of an earlier attempt
        ip("link", "add", veth, "netns", node.netns, "type", "veth", "peer", "name", "eth0", "netns", pod_ns)
        ip(ns=node.netns, batch=f"link set {veth} master cbr0\nlink set {veth} up\n")
        plen = ipaddress.ip_network(node.pod_cidr).prefixlen
        ip(
            ns=pod_ns,
            batch=f"addr add {pod_ip}/{plen} dev eth0\nlink set eth0 up\n"
            f"route replace default via {node.gateway} dev eth0\n",
        )


def _setns_thread(ns: str, fn: Callable[[], object]) -> object:
    """Runs fn in a short-lived thread that has joined netns ns: sockets it creates live there.

    setns(CLONE_NEWNET) changes only the calling thread, so the rest of the process stays put.
    """
    result: list[object] = []
    error: list[BaseException] = []

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed back to the caller's thread
            error.append(e)

    th = threading.Thread(target=body, name=f"setns-{ns}")
    th.start()
    th.join()
    if error:
        raise error[0]
    return result[0]


def socket_in(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    s = _setns_thread(ns, lambda: socket.socket(family, type))
    assert isinstance(s, socket.socket)
    return s


def listener_in(ns: str, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound inside netns ns (for relays between namespaces)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
        s.setblocking(False)
        return s

    s = _setns_thread(ns, make)
    assert isinstance(s, socket.socket)
    return s

"""Network namespaces for the one-machine cluster: the node network, nodes, pods, the client.

Every namespace and link name starts with the cluster's prefix (e.g. `kpc-`), and every namespace
is written to the cluster's record (record.py) before it is made, so that `down`, even after a
crash, removes exactly what the cluster made and nothing else of that name. A namespace that
exists already and is not in the record is never adopted. Links live only inside those
namespaces and go with them. Nothing is ever configured in the root namespace: links are created
directly inside their target namespaces (`ip link add ... netns A type veth peer ... netns B`),
and sysctls, addresses and routes are set with `ip -n NS` / `ip netns exec NS`.

Topology (N nodes), IPv4 (`--ip-family ipv4`, the default):
    PREFIX-net      bridge br0 10.250.0.1/24: the node network (an L2 segment)
    PREFIX-nI       eth0 10.250.0.(10+I)/24 on the node network, bridge cbr0 10.244.I.1/24 for its
                    pods, ip_forward on, routes to every other node's pod CIDR via that node
    PREFIX-client   eth0 10.250.0.2/24 on the node network: the "outside" client (`exec`)
    pod namespaces  eth0 10.244.I.x/24 on their node's cbr0, default route via 10.244.I.1
IPv6 (`ipv6`; `dual` has both, IPv4 primary) is the same shape: node network fd00:10:250::/64
(br0 ::1, node I ::(10+I) hex, client ::2), pod CIDR fd00:10:244:I::/64 per node (cbr0 ::1).
IPv6 addresses are added `nodad` and DAD is off in the nodes (accept_dad=0): a duplicate cannot
happen on these private links, and a tentative address would drop the first packets for ~1 s.
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


IP_FAMILIES = ("ipv4", "ipv6", "dual")
# Per family: node network, pod CIDR base and each node's pod CIDR prefix length.
_V4 = ("10.250.0.0/24", "10.244.0.0/16", 24)
_V6 = ("fd00:10:250::/64", "fd00:10:244::/56", 64)


def family_of(addr: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for an address (or a CIDR) that has been parsed already."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _addr_line(addr: str, dev: str) -> str:
    """An `ip addr add` batch line; IPv6 without DAD (see the module docstring)."""
    return f"addr add {addr} dev {dev}{' nodad' if ':' in addr else ''}\n"


def _gateway(cidr: str) -> str:
    """The first address after the network's: the bridge's (cbr0) in a pod CIDR."""
    net = ipaddress.ip_network(cidr)
    return str(net.network_address + 1)


@dataclass(frozen=True)
class NodeNet:
    """Addresses of one node: its netns, its node-network IP and its pod CIDR (of the primary
    family), and those of every family of the cluster, primary first (() means just ip/pod_cidr)."""

    name: str
    netns: str
    ip: str
    pod_cidr: str
    ips: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()

    @property
    def all_ips(self) -> tuple[str, ...]:
        return self.ips or (self.ip,)

    @property
    def all_pod_cidrs(self) -> tuple[str, ...]:
        return self.pod_cidrs or (self.pod_cidr,)

    @property
    def gateway(self) -> str:
        return _gateway(self.pod_cidr)

    def ip_of(self, family: socket.AddressFamily) -> str | None:
        """This node's node-network address of that family, if the cluster has the family."""
        return next((a for a in self.all_ips if family_of(a) == family), None)


@dataclass(frozen=True)
class Topology:
    prefix: str
    node_cidr: str = _V4[0]
    pod_cidr_base: str = _V4[1]
    ip_family: str = "ipv4"  # ipv4 | ipv6 | dual (IPv4 primary)
    node_cidr6: str = _V6[0]
    pod_cidr_base6: str = _V6[1]

    def __post_init__(self) -> None:
        if self.ip_family not in IP_FAMILIES:
            raise ValueError(f"--ip-family {self.ip_family!r}: one of {', '.join(IP_FAMILIES)}")

    @property
    def net_ns(self) -> str:
        return f"{self.prefix}net"

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}client"

    @property
    def _families(self) -> list[tuple[str, str, int]]:
        """(node network, pod CIDR base, per-node prefix) of each family, primary first."""
        v4 = (self.node_cidr, self.pod_cidr_base, _V4[2])
        v6 = (self.node_cidr6, self.pod_cidr_base6, _V6[2])
        return {"ipv4": [v4], "ipv6": [v6], "dual": [v4, v6]}[self.ip_family]

    @property
    def pod_cidr_bases(self) -> list[str]:
        """The cluster CIDR of each family (kproxy's --cluster-cidr), primary first."""
        return [base for _, base, _ in self._families]

    @property
    def node_cidrs(self) -> list[str]:
        return [net for net, _, _ in self._families]

    def node_network_ips(self, offset: int) -> list[str]:
        """The address at offset in the node network of each family, primary first."""
        return [str(ipaddress.ip_network(net).network_address + offset) for net in self.node_cidrs]

    def node_network_ip(self, offset: int) -> str:
        return self.node_network_ips(offset)[0]

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.node_cidrs[0]).prefixlen

    def _with_prefix(self, addrs: list[str]) -> list[str]:
        return [f"{a}/{ipaddress.ip_network(net).prefixlen}" for a, net in zip(addrs, self.node_cidrs, strict=True)]

    def node(self, index: int) -> NodeNet:
        ips = self.node_network_ips(10 + index)
        # the index-th subnet, computed (an IPv6 /56 has 256 /64s: never listed)
        cidrs = []
        for _, base, plen in self._families:
            net = ipaddress.ip_network(base)
            first = net.network_address + index * (1 << (net.max_prefixlen - plen))
            cidrs.append(str(ipaddress.ip_network((first, plen))))
        return NodeNet(
            name=f"node-{index}",
            netns=f"{self.prefix}n{index}",
            ip=ips[0],
            pod_cidr=cidrs[0],
            ips=tuple(ips),
            pod_cidrs=tuple(cidrs),
        )


def _no_dad(ns: str, families: list[str]) -> None:
    """DAD off in ns for the links made after this (their link-local addresses are usable at once)."""
    if any(":" in a for a in families):
        sysctl(ns, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")


def setup_node_network(t: Topology, record: Record | None) -> None:
    add(t.net_ns, record)
    _no_dad(t.net_ns, t.node_cidrs)
    if "br0" not in ip("-o", "link", "show", ns=t.net_ns):
        ip(
            ns=t.net_ns,
            batch="link add br0 type bridge\nlink set br0 up\n"
            + "".join(_addr_line(a, "br0") for a in t._with_prefix(t.node_network_ips(1))),
        )


def _attach_to_node_network(t: Topology, ns: str, port: str, addrs: list[str]) -> None:
    """A veth from ns (as eth0) to the node network bridge (as `port` there)."""
    if "eth0" in ip("-o", "link", "show", ns=ns):
        return
    ip("link", "add", port, "netns", t.net_ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip(ns=t.net_ns, batch=f"link set {port} master br0\nlink set {port} up\n")
    ip(ns=ns, batch="".join(_addr_line(a, "eth0") for a in t._with_prefix(addrs)) + "link set eth0 up\n")


def setup_node(t: Topology, node: NodeNet, others: list[NodeNet], record: Record | None) -> None:
    add(node.netns, record)
    v6 = any(":" in c for c in node.all_pod_cidrs)
    _no_dad(node.netns, list(node.all_ips))
    _attach_to_node_network(t, node.netns, f"v{node.name}"[:15], list(node.all_ips))
    if "cbr0" not in ip("-o", "link", "show", ns=node.netns):
        addrs = [f"{_gateway(c)}/{ipaddress.ip_network(c).prefixlen}" for c in node.all_pod_cidrs]
        ip(
            ns=node.netns,
            batch="link add cbr0 type bridge\nlink set cbr0 up\n" + "".join(_addr_line(a, "cbr0") for a in addrs),
        )
    # Forwarding between pods, other nodes and the node network; bridged pod traffic through
    # iptables (ip6tables) so that a pod reaching a Service backed by a pod on the same bridge
    # gets un-DNATed.
    sysctl(
        node.netns,
        "net.ipv4.ip_forward=1",
        "net.bridge.bridge-nf-call-iptables=1",
        "net.ipv4.conf.all.route_localnet=1",
        *(["net.ipv6.conf.all.forwarding=1", "net.bridge.bridge-nf-call-ip6tables=1"] if v6 else []),
    )
    routes = "".join(routes_to_pods([o for o in others if o.name != node.name]))
    if routes:
        ip(ns=node.netns, batch=routes)


def routes_to_pods(nodes: list[NodeNet], dev: str = "eth0") -> list[str]:
    """Each node's pod CIDR of each family via that node's address of the same family."""
    return [
        f"route replace {cidr} via {n.ip_of(family_of(cidr))} dev {dev}\n"
        for n in nodes
        for cidr in n.all_pod_cidrs
        if n.ip_of(family_of(cidr))
    ]


def route_over_nodes(cidr: str, nodes: list[NodeNet], dev: str = "eth0") -> str:
    """A route for cidr spread over every node's address of its family (ECMP)."""
    hops = " ".join(f"nexthop via {a} dev {dev}" for n in nodes if (a := n.ip_of(family_of(cidr))))
    return f"route replace {cidr} {hops}\n" if hops else ""


def setup_client(t: Topology, nodes: list[NodeNet], routed: list[str], record: Record | None) -> None:
    """The outside client: routes to every pod CIDR via its node, and to `routed` CIDRs (Service
    and LoadBalancer ranges, of either family) spread over all nodes (ECMP), as a router in front
    of a cluster does."""
    add(t.client_ns, record)
    _no_dad(t.client_ns, t.node_cidrs)
    _attach_to_node_network(t, t.client_ns, "vclient", t.node_network_ips(2))
    lines = routes_to_pods(nodes) + [route_over_nodes(c, nodes) for c in routed]
    ip(ns=t.client_ns, batch="".join(lines))


def setup_pod(
    node: NodeNet,
    pod_ns: str,
    veth: str,
    pod_ips: str | list[str] | tuple[str, ...],
    record: Record | None,
    resolv_conf: str | None = None,
) -> None:
    """A pod: its own netns with eth0 on the node's bridge, an address of each of the node's pod
    CIDRs' families (pod_ips, in the order of node.all_pod_cidrs) and a default route per family
    via the bridge."""
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
        ips = [pod_ips] if isinstance(pod_ips, str) else list(pod_ips)
        lines = []
        for addr, cidr in zip(ips, node.all_pod_cidrs, strict=False):
            lines.append(_addr_line(f"{addr}/{ipaddress.ip_network(cidr).prefixlen}", "eth0"))
        lines.append("link set eth0 up\n")
        for _, cidr in zip(ips, node.all_pod_cidrs, strict=False):
            lines.append(f"route replace default via {_gateway(cidr)} dev eth0\n")
        ip(ns=pod_ns, batch="".join(lines))


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
        s = socket.socket(family_of(host), socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(128)
        s.setblocking(False)
        return s

    s = _setns_thread(ns, make)
    assert isinstance(s, socket.socket)
    return s

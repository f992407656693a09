"""The IPVS proxier: upstream's pkg/proxy/ipvs syncProxyRules, diffed and batched.

Per ServicePort it programs, as upstream does:
  - every ClusterIP, externalIP and LoadBalancer ingress IP as an address on the dummy link
    kube-ipvs0 (kept down; the addresses are still local, so IPVS sees their packets at LOCAL_IN);
  - one IPVS virtual server per service IP:port, and one per node address for a NodePort, with
    a masquerading real server per endpoint kproxy.proxy selects for that traffic (ready ones,
    the serving+terminating fallback, traffic policies and zone hints as in every mode), the
    configured scheduler, and ClientIP affinity as persistence;
  - ipset entries (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, KUBE-EXTERNAL-IP[-LOCAL],
    KUBE-LOAD-BALANCER[-LOCAL|-FW|-SOURCE-CIDR], KUBE-NODE-PORT[-LOCAL]-TCP/UDP, KUBE-IPVS-IPS)
    that a constant handful of iptables rules match on (masquerade, NodePort, hairpin, the
    source-range firewall, and rejecting non-service ports on service IPs).
externalTrafficPolicy Local keeps only local endpoints behind NodePort/LB/externalIP servers and
skips masquerade for them; internalTrafficPolicy Local does the same for the ClusterIP server.

How a sync works: each ServicePort's desired state is a `_Fragment`; a partial sync rebuilds only
the fragments of the changed ServicePorts, reference-counts the shared parts (addresses and set
entries can be shared by several ports of one Service) and diffs against the kernel state it
holds in memory. A full sync re-reads the kernel (one IPVS service dump, one dest dump per
service, one address dump, one `ipset save`), so a restarted kproxy converges live state without
flushing it. IPVS changes go out batched (backends/ipvs.py): hundreds of messages per sendmsg.

Graceful termination (upstream's gracefulTerminationManager): a TCP real server whose endpoint
went away gets weight 0 (no new connections, established ones continue) and is deleted by a
later sync once its active and inactive connection counts are 0; UDP/SCTP ones are deleted at
once. Sysctls, as upstream: ip_forward, vs/conntrack (masquerade needs conntrack of IPVS'd
traffic), vs/expire_nodest_conn, vs/expire_quiescent_template, and vs/conn_reuse_mode left as the
kernel has it on kernels >= 5.9 (the 1-second SYN drop upstream hit is fixed there; a VM test
proves reuse is immediate) and set to 0 on older ones.

After a successful sync, as upstream: the health check node port listeners of
externalTrafficPolicy Local Services follow their local ready endpoint counts (healthcheck.py),
and UDP conntrack entries NATed to a removed real server, or recorded while a UDP Service had no
endpoint, are deleted (backends/conntrack.py).

Config attributes read by new_proxier (kproxy.config.KProxyConfig, or any object with them):
ipvs_scheduler (default "rr"), ipvs_strict_arp, ipvs_tcp_timeout, ipvs_tcpfin_timeout,
ipvs_udp_timeout (seconds, 0 = kernel default), ipvs_exclude_cidrs (virtual servers there are
never deleted as stale), cluster_cidr, masquerade_all, masquerade_bit, nodeport_addresses (CIDRs),
hostname_override, healthcheck_bind_address, node_zone; optional: iptables_backend (default:
detected as in iptables mode), node_ips (explicit NodePort addresses).
"""
from __future__ import annotations

import errno
import gc
import ipaddress
import logging
import os
import platform
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from kproxy.backends import ipvs as nl
from kproxy.backends.conntrack import Conntrack
from kproxy.backends.ipset import IPSets, SetSpec
from kproxy.backends.iptables import Backend, IPTables, IPTablesError, detect_backend
from kproxy.healthcheck import ServiceHealthServer
from kproxy.model import IP, Endpoint, IPFamily, Port, ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import new_proxier_for_families
from kproxy.config import KProxyConfig
from kproxy.proxy import apply_cleanup, nodeport_cidrs, service_endpoints, sync_health_server, udp_conntrack_cleanup

log = logging.getLogger(__name__)

DUMMY_DEVICE = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf")

KUBE_CLUSTER_IP = "KUBE-CLUSTER-IP"
KUBE_LOOP_BACK = "KUBE-LOOP-BACK"
KUBE_EXTERNAL_IP = "KUBE-EXTERNAL-IP"
KUBE_EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
KUBE_LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
KUBE_LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
KUBE_NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
KUBE_NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
KUBE_NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
KUBE_NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
KUBE_HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
KUBE_IPVS_IPS = "KUBE-IPVS-IPS"

SET_SPECS = (
    SetSpec(KUBE_CLUSTER_IP, "hash:ip,port"),
    SetSpec(KUBE_LOOP_BACK, "hash:ip,port,ip"),
    SetSpec(KUBE_EXTERNAL_IP, "hash:ip,port"),
    SetSpec(KUBE_EXTERNAL_IP_LOCAL, "hash:ip,port"),
    SetSpec(KUBE_LOAD_BALANCER, "hash:ip,port"),
    SetSpec(KUBE_LOAD_BALANCER_LOCAL, "hash:ip,port"),
    SetSpec(KUBE_LOAD_BALANCER_FW, "hash:ip,port"),
    SetSpec(KUBE_LOAD_BALANCER_SOURCE_CIDR, "hash:ip,port,net"),
    SetSpec(KUBE_NODE_PORT_TCP, "bitmap:port"),
    SetSpec(KUBE_NODE_PORT_LOCAL_TCP, "bitmap:port"),
    SetSpec(KUBE_NODE_PORT_UDP, "bitmap:port"),
    SetSpec(KUBE_NODE_PORT_LOCAL_UDP, "bitmap:port"),
    SetSpec(KUBE_HEALTH_CHECK_NODE_PORT, "bitmap:port"),
    SetSpec(KUBE_IPVS_IPS, "hash:ip"),
)
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-IPVS-FILTER")
# (table, built-in chain, our chain, extra match): the jumps upstream's IPVS mode installs.
JUMPS = (
    ("nat", "PREROUTING", "KUBE-SERVICES", ""),
    ("nat", "OUTPUT", "KUBE-SERVICES", ""),
    ("nat", "POSTROUTING", "KUBE-POSTROUTING", ""),
    ("filter", "FORWARD", "KUBE-FORWARD", ""),
    ("filter", "INPUT", "KUBE-NODE-PORT", ""),
    ("filter", "INPUT", "KUBE-IPVS-FILTER", ""),
    ("filter", "INPUT", "KUBE-PROXY-FIREWALL", "-m conntrack --ctstate NEW"),
    ("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "-m conntrack --ctstate NEW"),
    ("filter", "OUTPUT", "KUBE-PROXY-FIREWALL", "-m conntrack --ctstate NEW"),
)
GRACEFUL_PROTOCOLS = ("TCP",)  # UDP/SCTP real servers go at once (expire_nodest_conn drops flows)

VSKey = tuple[str, int, str]
RSKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class IPVSOptions:
    scheduler: str = DEFAULT_SCHEDULER
    strict_arp: bool = False
    tcp_timeout: int = 0
    tcpfin_timeout: int = 0
    udp_timeout: int = 0
    cluster_cidr: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    nodeport_addresses: tuple[str, ...] = ()
    # --ipvs-exclude-cidrs: virtual servers in these CIDRs are never deleted as stale (someone
    # else's, e.g. a node-local load balancer's), as upstream's cleanLegacyService.
    exclude_cidrs: tuple[str, ...] = ()
    node_zone: str = ""  # the Node's topology.kubernetes.io/zone: zone hints need it
    # The proxier's IP family (one proxier per family, kproxy.proxiers.meta): its virtual
    # servers, kube-ipvs0 addresses, ipsets (KUBE-6- names, family inet6) and ip6tables rules.
    family: IPFamily = "IPv4"


def set_specs(family: IPFamily) -> tuple[SetSpec, ...]:
    """The family's sets: SET_SPECS as IPv4 has them, or their IPv6 twins (upstream's names)."""
    return SET_SPECS if family == "IPv4" else tuple(s.for_family("inet6") for s in SET_SPECS)


def set_names(family: IPFamily) -> dict[str, str]:
    """SET_SPECS' names -> the family's names (build_fragment speaks the former)."""
    return {base.name: own.name for base, own in zip(SET_SPECS, set_specs(family), strict=True)}


@dataclass(slots=True)
class _Fragment:
    """What one ServicePort wants in the kernel. Tuples (sorted, distinct) rather than sets:
    10,000 of these live for the process' life, and a frozenset costs 3-4x the memory of a
    tuple, which under UML is time too (every newly touched page is a ~55 us fault)."""

    servers: dict[VSKey, tuple[nl.VirtualServer, tuple[RSKey, ...]]] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()
    entries: tuple[tuple[str, str], ...] = ()  # (set name, entry in `ipset add` syntax)

    def set_entries(self, name: str) -> set[str]:
        return {e for s, e in self.entries if s == name}

    def real_server_ips(self) -> set[str]:
        return {ip for _vs, rs in self.servers.values() for ip, _port in rs}

    def node_port(self, protocol_set: str) -> int:
        return next((int(e) for s, e in self.entries if s == protocol_set), 0)


class _RefSet:
    """Reference-counted members: several ServicePorts can share an address or a set entry."""

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: Counter[str] = Counter()

    def add(self, items: Iterable[str]) -> bool:
        """True if a member appeared."""
        changed = False
        for i in items:
            n = self.refs[i]
            self.refs[i] = n + 1
            changed = changed or n == 0
        return changed

    def remove(self, items: Iterable[str]) -> bool:
        """True if a member disappeared."""
        changed = False
        for i in items:
            n = self.refs[i] - 1
            if n > 0:
                self.refs[i] = n
            else:
                del self.refs[i]
                changed = True
        return changed

    def members(self) -> AbstractSet[str]:
        return self.refs.keys()


def _diff(old: tuple[Any, ...], new: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(gone, came) between two tuples of distinct items; cheap when one side is empty (every
    Service of a sync from an empty node)."""
    if not old or not new:
        return old, new
    o, n = set(old), set(new)
    return tuple(x for x in old if x not in n), tuple(x for x in new if x not in o)


def _proto(sp: ServicePort) -> str:
    return sp.protocol.lower()


def build_fragment(sp: ServicePort, eps: Iterable[Endpoint], node_ips: Iterable[str], opts: IPVSOptions) -> _Fragment:
    """The desired kernel state of one ServicePort (sans I/O, unit-testable)."""
    frag = _Fragment()
    if sp.is_headless or sp.type == "ExternalName":
        return frag
    family_v6 = ":" in sp.cluster_ips[0]
    # Which endpoints serve which traffic is kproxy.proxy's decision, the same in every mode.
    decision = service_endpoints(sp, [e for e in eps if (":" in e.ip) == family_v6], opts.node_zone)
    cluster_rs = tuple(sorted({(e.ip, e.port) for e in decision.internal}))
    external_rs = tuple(sorted({(e.ip, e.port) for e in decision.external}))
    flags = nl.IP_VS_SVC_F_PERSISTENT if sp.session_affinity_timeout is not None else 0
    timeout = sp.session_affinity_timeout or 0
    proto = _proto(sp)
    entries: dict[str, set[str]] = {}
    addresses: set[str] = set()

    def server(ip: str, port: int, rs: tuple[RSKey, ...]) -> None:
        vs = nl.VirtualServer(ip, port, sp.protocol, opts.scheduler, flags, timeout)
        frag.servers[vs.key] = (vs, rs)

    def entry(name: str, value: str) -> None:
        entries.setdefault(name, set()).add(value)

    cip = sp.cluster_ips[0]
    server(cip, sp.port, cluster_rs)
    addresses.add(cip)
    entry(KUBE_CLUSTER_IP, f"{cip},{proto}:{sp.port}")
    for eip in sp.external_ips:
        if (":" in eip) != family_v6:
            continue
        server(eip, sp.port, external_rs)
        addresses.add(eip)
        entry(KUBE_EXTERNAL_IP_LOCAL if sp.external_policy_local else KUBE_EXTERNAL_IP, f"{eip},{proto}:{sp.port}")
    for lip in sp.load_balancer_ips:
        if (":" in lip) != family_v6:
            continue
        server(lip, sp.port, external_rs)
        addresses.add(lip)
        entry(KUBE_LOAD_BALANCER, f"{lip},{proto}:{sp.port}")
        if sp.external_policy_local:
            entry(KUBE_LOAD_BALANCER_LOCAL, f"{lip},{proto}:{sp.port}")
        if sp.load_balancer_source_ranges:
            entry(KUBE_LOAD_BALANCER_FW, f"{lip},{proto}:{sp.port}")
            for cidr in sp.load_balancer_source_ranges:
                entry(KUBE_LOAD_BALANCER_SOURCE_CIDR, f"{lip},{proto}:{sp.port},{cidr}")
    if sp.node_port and sp.protocol in ("TCP", "UDP"):
        for nip in node_ips:
            if (":" in nip) == family_v6:
                server(nip, sp.node_port, external_rs)
        entry(KUBE_NODE_PORT_TCP if sp.protocol == "TCP" else KUBE_NODE_PORT_UDP, str(sp.node_port))
        if sp.external_policy_local:
            entry(KUBE_NODE_PORT_LOCAL_TCP if sp.protocol == "TCP" else KUBE_NODE_PORT_LOCAL_UDP, str(sp.node_port))
    if sp.health_check_node_port and sp.external_policy_local:
        entry(KUBE_HEALTH_CHECK_NODE_PORT, str(sp.health_check_node_port))
    for e in decision.reachable:
        if e.is_local:  # hairpin: a pod reaching itself through its own service
            entry(KUBE_LOOP_BACK, f"{e.ip},{proto}:{e.port},{e.ip}")
    for a in addresses:
        entry(KUBE_IPVS_IPS, a)
    frag.addresses = tuple(sorted(addresses))
    frag.entries = tuple(sorted((k, v) for k, vs in entries.items() for v in vs))
    return frag


def render_iptables(opts: IPVSOptions, jumps_missing: Iterable[tuple[str, str, str, str]]) -> bytes:
    """The constant iptables (ip6tables for IPv6) rules of IPVS mode (one restore; sets do the
    per-service work): the same chains in both families, matching the family's sets."""
    n = set_names(opts.family)
    v6 = opts.family == "IPv6"
    mark = 1 << opts.masquerade_bit
    m = f"{mark:#x}/{mark:#x}"
    missing = list(jumps_missing)
    nat = ["*nat", *(f":{c} - [0:0]" for c in NAT_CHAINS)]
    nat += [f"-I {src} 1 {extra + ' ' if extra else ''}-j {dst}" for t, src, dst, extra in missing if t == "nat"]
    nat += [
        f'-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" -m set --match-set {n[KUBE_LOOP_BACK]} dst,dst,src -j MASQUERADE',
        f"-A KUBE-POSTROUTING -m mark ! --mark {m} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {mark:#x}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {mark:#x}",
    ]
    if opts.masquerade_all:
        nat.append(f"-A KUBE-SERVICES -m set --match-set {n[KUBE_CLUSTER_IP]} dst,dst -j KUBE-MARK-MASQ")
    elif opts.cluster_cidr:
        # ip6tables gets the IPv6 CIDR of --cluster-cidr, iptables the IPv4 one.
        for cidr in (c for c in opts.cluster_cidr.split(",") if c.strip() and (":" in c) == v6):
            nat.append(f"-A KUBE-SERVICES -m set --match-set {n[KUBE_CLUSTER_IP]} dst,dst ! -s {cidr.strip()} -j KUBE-MARK-MASQ")
    nat += [
        f"-A KUBE-SERVICES -m set --match-set {n[KUBE_EXTERNAL_IP_LOCAL]} dst,dst -j ACCEPT",
        f"-A KUBE-SERVICES -m set --match-set {n[KUBE_EXTERNAL_IP]} dst,dst -j KUBE-MARK-MASQ",
        f"-A KUBE-SERVICES -m set --match-set {n[KUBE_EXTERNAL_IP]} dst,dst -j ACCEPT",
        f"-A KUBE-SERVICES -m set --match-set {n[KUBE_LOAD_BALANCER]} dst,dst -j KUBE-LOAD-BALANCER",
        f"-A KUBE-LOAD-BALANCER -m set --match-set {n[KUBE_LOAD_BALANCER_LOCAL]} dst,dst -j RETURN",
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
    ]
    for proto, full, local in (("tcp", KUBE_NODE_PORT_TCP, KUBE_NODE_PORT_LOCAL_TCP),
                               ("udp", KUBE_NODE_PORT_UDP, KUBE_NODE_PORT_LOCAL_UDP)):
        nat.append(f"-A KUBE-NODE-PORT -p {proto} -m set --match-set {n[local]} dst -j RETURN")
        nat.append(f"-A KUBE-NODE-PORT -p {proto} -m set --match-set {n[full]} dst -j KUBE-MARK-MASQ")
    nat += [
        f"-A KUBE-SERVICES -m set --match-set {n[KUBE_CLUSTER_IP]} dst,dst -j ACCEPT",
        f"-A KUBE-SERVICES -m set --match-set {n[KUBE_LOAD_BALANCER]} dst,dst -j ACCEPT",
        "COMMIT",
    ]
    flt = ["*filter", *(f":{c} - [0:0]" for c in FILTER_CHAINS)]
    flt += [f"-I {src} 1 {extra + ' ' if extra else ''}-j {dst}" for t, src, dst, extra in missing if t == "filter"]
    flt += [
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {m} -j ACCEPT',
        "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        f"-A KUBE-NODE-PORT -m set --match-set {n[KUBE_HEALTH_CHECK_NODE_PORT]} dst -j ACCEPT",
        (f"-A KUBE-PROXY-FIREWALL -m set --match-set {n[KUBE_LOAD_BALANCER_FW]} dst,dst"
         f" -m set ! --match-set {n[KUBE_LOAD_BALANCER_SOURCE_CIDR]} dst,dst,src -j DROP"),
    ]
    for s in (KUBE_LOAD_BALANCER, KUBE_CLUSTER_IP, KUBE_EXTERNAL_IP, KUBE_EXTERNAL_IP_LOCAL):
        flt.append(f"-A KUBE-IPVS-FILTER -m set --match-set {n[s]} dst,dst -j RETURN")
    flt += [
        f"-A KUBE-IPVS-FILTER -m set --match-set {n[KUBE_HEALTH_CHECK_NODE_PORT]} dst -j RETURN",
        f"-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set {n[KUBE_IPVS_IPS]} dst -j REJECT",
        "COMMIT",
    ]
    return ("\n".join(nat + flt) + "\n").encode()


def _write_sysctl(key: str, value: int) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(path) as f:
            if f.read().strip() == str(value):
                return
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        log.warning("msg=%s key=%s err=%s", "cannot set sysctl", key, e)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = platform.release().split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


class IPVSProxier(Proxier):
    mode = "ipvs"

    def __init__(
        self,
        opts: IPVSOptions,
        iptables: IPTables,
        ipsets: IPSets | None = None,
        node_ips: Callable[[], list[str]] | None = None,
        conntrack: Conntrack | None = None,
        health_server: ServiceHealthServer | None = None,
    ) -> None:
        if opts.scheduler not in SCHEDULERS:
            raise ValueError(f"--ipvs-scheduler {opts.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        self.opts = opts
        self._exclude = [ipaddress.ip_network(c, strict=False) for c in opts.exclude_cidrs]
        self.iptables = iptables
        self.conntrack = conntrack
        self.health_server = health_server
        # ServicePorts with a health check node port: a partial sync touching none of them
        # leaves the health server alone.
        self._health: set[ServicePortName] = set()
        # The last state of each UDP ServicePort: a deleted one's stale conntrack entries need it.
        self._udp: dict[ServicePortName, ServicePort] = {}
        self.family: IPFamily = opts.family
        self._af = socket.AF_INET6 if opts.family == "IPv6" else socket.AF_INET
        self._set_names = set_names(opts.family)
        self.ipsets = ipsets or IPSets(set_specs(opts.family))
        self._node_ips_fn = node_ips
        self.ipvs = nl.IPVS()
        self.addrs = nl.Addresses()
        self.ifindex = 0
        self._fragments: dict[ServicePortName, _Fragment] = {}
        self._addresses = _RefSet()
        self._entries: dict[str, _RefSet] = {s.name: _RefSet() for s in SET_SPECS}
        self._servers: dict[VSKey, tuple[nl.VirtualServer, tuple[RSKey, ...]]] = {}
        # What the kernel holds, as last read or written: services, dests (with weights), addresses.
        self._k_services: dict[VSKey, nl.VirtualServer] = {}
        self._k_dests: dict[VSKey, dict[RSKey, int]] = {}
        self._k_addresses: set[str] = set()
        self._terminating: dict[tuple[VSKey, RSKey], float] = {}
        self._node_ips: list[str] = []
        self._rules_applied = False
        self._need_full = True
        self._deep_read = True  # read every kept service's real servers from the kernel
        self.last_timings: dict[str, float] = {}
        self.last_messages = 0  # IPVS netlink messages the last sync sent
        self._setup_kernel()

    # --- one-time node setup ----------------------------------------------------------------
    def _setup_kernel(self) -> None:
        # The IPVS sysctls live under net.ipv4.vs but govern both families (one table per netns).
        _write_sysctl("net.ipv6.conf.all.forwarding" if self.family == "IPv6" else "net.ipv4.ip_forward", 1)
        _write_sysctl("net.ipv4.vs.conntrack", 1)
        _write_sysctl("net.ipv4.vs.expire_nodest_conn", 1)
        _write_sysctl("net.ipv4.vs.expire_quiescent_template", 1)
        if not _kernel_at_least(5, 9):
            _write_sysctl("net.ipv4.vs.conn_reuse_mode", 0)
        if self.opts.strict_arp:
            _write_sysctl("net.ipv4.conf.all.arp_ignore", 1)
            _write_sysctl("net.ipv4.conf.all.arp_announce", 2)
        if self.opts.tcp_timeout or self.opts.tcpfin_timeout or self.opts.udp_timeout:
            self.ipvs.set_timeouts(self.opts.tcp_timeout, self.opts.tcpfin_timeout, self.opts.udp_timeout)

    def node_ips(self) -> list[str]:
        """NodePort addresses: the explicit list, else this node's local addresses of the
        proxier's family outside kube-ipvs0, loopback and (IPv6) link-local, filtered by
        --nodeport-addresses CIDRs."""
        if self._node_ips_fn is not None:
            return self._node_ips_fn()
        ips: set[str] = set()
        dummy = nl.link_index(DUMMY_DEVICE)
        for payload in self.addrs._nl.dump(nl.RTM_GETADDR, nl._IFADDRMSG.pack(self._af, 0, 0, 0, 0)):
            family, _p, _f, _scope, index = nl._IFADDRMSG.unpack_from(payload)
            if index == dummy or family != self._af:
                continue
            a = nl._attrs(payload, nl._IFADDRMSG.size)
            raw = a.get(nl.IFA_LOCAL) or a.get(nl.IFA_ADDRESS)
            ip = ipaddress.ip_address(raw) if raw and len(raw) in (4, 16) else None
            if ip is not None and not ip.is_loopback and not ip.is_link_local:
                ips.add(str(ip))
        if self.opts.nodeport_addresses:
            nets = [ipaddress.ip_network(c, strict=False) for c in self.opts.nodeport_addresses]
            ips = {ip for ip in ips if any(ipaddress.ip_address(ip) in n for n in nets)}
        return sorted(ips)

    # --- reading the kernel -----------------------------------------------------------------
    def _read_kernel(self) -> None:
        self.ifindex = nl.ensure_dummy_link(DUMMY_DEVICE)
        # Only this family's: kube-ipvs0 and the IPVS table hold the other family's proxier's too.
        self._k_addresses = self.addrs.addresses(self.ifindex, self._af)
        self._k_services = {vs.key: vs for vs in self.ipvs.services(self._af)}
        # Real servers: a netlink dump per service costs ~2 ms under UML (20 s at 10,000
        # services, and /proc/net/ip_vs is quadratic), so they are read only on the first sync
        # and after a failure (`_read_dests`, for the services we keep); later full syncs trust
        # what this process wrote, for services the kernel still has.
        self._k_dests = {k: d for k, d in self._k_dests.items() if k in self._k_services}
        if self._deep_read:
            self.ipsets.forget()  # `ipset save` of 20,000 entries: only when state is unknown

    def _read_dests(self, keys: Iterable[VSKey]) -> None:
        for key in keys:
            vs = self._k_services[key]
            # A real server not masquerading (someone else's, or pyroute2's direct-routing
            # default) is recorded with weight -1 so the diff rewrites it.
            self._k_dests[key] = {rs.key: (rs.weight if fwd == nl.FWD_MASQ else -1)
                                  for rs, fwd in self.ipvs.dests_with_method(vs)}

    # --- sync -------------------------------------------------------------------------------
    def sync(self, request: SyncRequest) -> SyncResult:
        t0 = time.perf_counter()
        full = request.full or self._need_full
        # The cyclic GC walks every tracked object each time ~700 new containers appear: a full
        # sync of 10,000 Services creates ~300,000 (none in a cycle), and the walks were half
        # of its Python time. Reference counting still frees everything as usual meanwhile.
        gc_enabled = gc.isenabled()
        gc.disable()
        try:
            result = self._sync(request, full)
        except Exception as e:
            log.exception("msg=%s", "ipvs sync failed")
            self._need_full = self._deep_read = True
            return SyncResult(ok=False, error=f"{type(e).__name__}: {e}")
        finally:
            if gc_enabled:
                gc.enable()
        self.last_timings["total"] = time.perf_counter() - t0
        return result

    def _sync(self, request: SyncRequest, full: bool) -> SyncResult:
        timings = self.last_timings = {}
        t = time.perf_counter()
        if full:
            self._read_kernel()
            self._node_ips = self.node_ips()
            names: Iterable[ServicePortName] = set(self._fragments) | set(request.services)
        else:
            names = request.changed
        timings["read"] = time.perf_counter() - t
        t = time.perf_counter()
        dirty: set[VSKey] = set()
        dirty_sets: set[str] = set()
        addr_candidates: set[str] = set()
        empty = _Fragment()
        udp_changes: list[tuple[ServicePortName, _Fragment, _Fragment]] = []
        health_changed = False
        for name in names:
            sp = request.services.get(name)
            eps = request.endpoints.get(name, ())
            new = build_fragment(sp, eps, self._node_ips, self.opts) if sp is not None else empty
            old = self._fragments.pop(name, empty)
            if name.protocol == "UDP" and self.conntrack is not None and old.servers != new.servers:
                udp_changes.append((name, old, new))
            if self.health_server is not None:
                health_changed |= self._track_health(name, sp)
            # Only what differs between the old and new fragment touches the shared state, so
            # a one-endpoint change never rescans 10,000 addresses or set entries.
            if old.addresses != new.addresses:
                gone, came = _diff(old.addresses, new.addresses)
                self._addresses.remove(gone)
                self._addresses.add(came)
                addr_candidates.update(gone)
                addr_candidates.update(came)
            if old.entries != new.entries:
                gone_e, came_e = _diff(old.entries, new.entries)
                for set_name, e in gone_e:
                    self._entries[set_name].remove((e,))
                    dirty_sets.add(set_name)
                for set_name, e in came_e:
                    self._entries[set_name].add((e,))
                    dirty_sets.add(set_name)
            for k in old.servers:
                if k not in new.servers:
                    self._servers.pop(k, None)
                dirty.add(k)
            if new.servers or new.addresses:
                self._fragments[name] = new
            self._servers.update(new.servers)
            dirty.update(new.servers)
        if full:
            dirty.update(self._k_services)
        timings["build"] = time.perf_counter() - t
        if self._deep_read:
            t = time.perf_counter()
            self._read_dests([k for k in self._servers if k in self._k_services])
            timings["read"] += time.perf_counter() - t

        # 1. addresses for new service IPs, 2. sets, 3. constant iptables rules (they reference
        # the sets), 4. IPVS, 5. stale addresses last (no window where a live VIP is not local).
        t = time.perf_counter()
        self.ifindex = self.ifindex or nl.ensure_dummy_link(DUMMY_DEVICE)
        want_addrs = self._addresses.members()
        check = want_addrs | self._k_addresses if full else addr_candidates
        add_addrs = [a for a in check if a in want_addrs and a not in self._k_addresses]
        errors: list[tuple[bytes, int]] = self.addrs.change(self.ifindex, add_addrs, ())
        self._k_addresses.update(add_addrs)
        timings["addresses"] = time.perf_counter() - t
        t = time.perf_counter()
        names_of = self._set_names
        set_lines = self.ipsets.sync({names_of[s]: r.members() for s, r in self._entries.items()},
                                     None if full else {names_of[s] for s in dirty_sets})
        timings["ipset"] = time.perf_counter() - t
        t = time.perf_counter()
        if full or not self._rules_applied:
            self.iptables.restore(render_iptables(self.opts, self._missing_jumps()))
            self._rules_applied = True
        timings["iptables"] = time.perf_counter() - t
        t = time.perf_counter()
        # Built lazily while the batch sends them: timed together (building is most of it).
        self.last_messages = 0
        failed = self.ipvs.apply(self._counted(self._ipvs_messages(dirty)))
        timings["ipvs"] = time.perf_counter() - t
        stale_addrs = [a for a in check if a in self._k_addresses and a not in want_addrs]
        errors += self.addrs.change(self.ifindex, (), stale_addrs)
        self._k_addresses.difference_update(stale_addrs)
        failed += errors
        if failed:
            self._need_full = self._deep_read = True
            detail = ", ".join(f"{os.strerror(e)}" for _, e in failed[:5])
            return SyncResult(ok=False, error=f"{len(failed)} netlink requests failed: {detail}")
        self._need_full = False
        self._deep_read = False
        if udp_changes or request.stale_endpoints:
            self._clean_conntrack(udp_changes, request)
        if self.health_server is not None and (health_changed or full):
            sync_health_server(self.health_server, request.services, request.endpoints)
        for name in names:
            sp = request.services.get(name)
            if sp is not None and sp.protocol == "UDP":
                self._udp[name] = sp
            else:
                self._udp.pop(name, None)
        return SyncResult(ok=True, rules_total={
            "ipvs_virtual_servers": len(self._k_services),
            "ipvs_real_servers": sum(len(d) for d in self._k_dests.values()),
            "ipset_lines": set_lines,
        })

    def _counted(self, messages: Iterator[bytes]) -> Iterator[bytes]:
        for m in messages:
            self.last_messages += 1
            yield m

    def _ipvs_messages(self, dirty: Iterable[VSKey]) -> Iterator[bytes]:
        """Diff desired servers against the kernel's for the dirty keys; update the cache to what
        the messages will make true (a failure forces a full re-read). A generator, consumed by
        the batch as it sends: 110,000 messages are never held at once. Counts into
        last_messages."""
        now = time.monotonic()
        for key in dirty:
            want = self._servers.get(key)
            have = self._k_services.get(key)
            if want is None:
                if have is not None and not self._excluded(have.address):
                    yield self.ipvs.delete_service(have)
                    del self._k_services[key]
                    self._k_dests.pop(key, None)
                continue
            vs, rs_keys = want
            if have is None:
                yield self.ipvs.add_service(vs)
                self._k_services[key] = vs
            elif have != vs:
                yield self.ipvs.update_service(vs)
                self._k_services[key] = vs
            dests = self._k_dests.setdefault(key, {})
            new = [rk for rk in rs_keys if rk not in dests]
            if new:
                yield from self.ipvs.add_dests(vs, new)
                dests.update(dict.fromkeys(new, 1))
            for rk in rs_keys:
                if dests[rk] != 1:  # weight 0 (terminating, now back) or a foreign setting
                    yield self.ipvs.update_dest(vs, nl.RealServer(rk[0], rk[1], 1))
                    dests[rk] = 1
            if self._terminating:
                for rk in rs_keys:
                    self._terminating.pop((key, rk), None)
            # dests now holds every wanted real server; more entries means some are unwanted.
            stale: list[RSKey] = []
            if len(dests) != len(rs_keys):
                wanted = set(rs_keys)
                stale = [rk for rk in dests if rk not in wanted]
            for rk in stale:
                if vs.protocol in GRACEFUL_PROTOCOLS:
                    if dests[rk] != 0:
                        yield self.ipvs.update_dest(vs, nl.RealServer(rk[0], rk[1], 0))
                        dests[rk] = 0
                    self._terminating.setdefault((key, rk), now)
                else:
                    yield self.ipvs.delete_dest(vs, nl.RealServer(rk[0], rk[1]))
                    del dests[rk]
        # Reap drained real servers of every service with terminating ones (not only dirty): one
        # dump per such service, the terminating entries indexed by service once (scanning them
        # all per service was quadratic when many Services scale down together).
        by_service: dict[VSKey, list[RSKey]] = {}
        for key, rk in self._terminating:
            by_service.setdefault(key, []).append(rk)
        for key, rks in by_service.items():
            vs_t = self._k_services.get(key)
            if vs_t is None:  # the service itself is gone (deleted above, or by someone else)
                for rk in rks:
                    del self._terminating[(key, rk)]
                continue
            try:
                live = {rs.key: rs for rs in self.ipvs.dests(vs_t)}
            except nl.NetlinkError:
                continue
            for rk in rks:
                rs = live.get(rk)
                if rs is None or rs.active_conns + rs.inactive_conns == 0:
                    if rs is not None:
                        yield self.ipvs.delete_dest(vs_t, rs)
                    self._k_dests.get(key, {}).pop(rk, None)
                    del self._terminating[(key, rk)]

    def _excluded(self, address: str) -> bool:
        if not self._exclude:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self._exclude)

    def _track_health(self, name: ServicePortName, sp: ServicePort | None) -> bool:
        """True if this ServicePort has, or had, a health check node port: the health server's
        listeners and counts (kproxy.proxy.health_checks) must be brought up to date. The
        iptables rule KUBE-NODE-PORT accepts these ports (the KUBE-HEALTH-CHECK-NODE-PORT set)."""
        had = name in self._health
        if sp is not None and sp.health_check_node_port and sp.external_policy_local:
            self._health.add(name)
            return True
        self._health.discard(name)
        return had

    def _clean_conntrack(self, changes: list[tuple[ServicePortName, _Fragment, _Fragment]],
                         request: SyncRequest) -> None:
        """Stale UDP conntrack entries (kproxy.proxy.udp_conntrack_cleanup decides which): real
        servers that left a UDP service's fragment (endpoint gone, or no longer selected by a
        traffic policy), endpoints the trackers saw go, and services that got their first one."""
        if self.conntrack is None:
            return
        stale: list[tuple[ServicePortName, Endpoint]] = []
        newly_active: list[ServicePortName] = []
        for name, old, new in changes:
            before, after = old.real_server_ips(), new.real_server_ips()
            stale.extend((name, Endpoint(ip=IP(ip), port=Port(0))) for ip in sorted(before - after))
            if not before and after:
                newly_active.append(name)
        for name, ep in request.stale_endpoints:
            frag = self._fragments.get(name)
            if frag is None or ep.ip not in frag.real_server_ips():  # not back again
                stale.append((name, ep))
        # This family's table only (the Conntrack given is of this family: conntrack -f ipv6).
        apply_cleanup(self.conntrack, udp_conntrack_cleanup(request.services, stale, newly_active, self._udp,
                                                            self.family))

    def terminating(self) -> list[tuple[VSKey, RSKey]]:
        return sorted(self._terminating)

    def _builtin_rules(self) -> dict[tuple[str, str], list[str]]:
        """`-A` lines of the built-in chains, per (table, chain), from one save per table."""
        out: dict[tuple[str, str], list[str]] = {}
        table = ""
        # One iptables-save for every table (process starts are the cost here, not the bytes).
        for line in self.iptables.save_all().splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            elif line.startswith("-A "):
                out.setdefault((table, line.split()[1]), []).append(line)
            elif line.startswith(":"):
                out.setdefault((table, line[1:].split()[0]), [])
        return out

    def _missing_jumps(self) -> list[tuple[str, str, str, str]]:
        # Read from the kernel on the legacy back end (no iptables-save process: 50-70 ms of a
        # 1,000-Service sync from an empty node under User-Mode Linux).
        present = self.iptables.builtin_jumps(("nat", "filter"))
        return [(t, src, dst, extra) for t, src, dst, extra in JUMPS if (t, src, dst) not in present]

    # --- cleanup ----------------------------------------------------------------------------
    def cleanup(self) -> bool:
        """Removes everything IPVS mode programs in this family: its IPVS services, kube-ipvs0,
        its family's chains and the jumps to them, then its sets (they can only go once no rule
        references them). The metaproxier calls every family's (`--cleanup`: both)."""
        ok = True
        try:
            # One batch: a message per service (its real servers go with it); per-message
            # errors (a service someone else removed meanwhile) do not stop the others.
            failed = self.ipvs.apply([self.ipvs.delete_service(vs) for vs in self.ipvs.services(self._af)])
            if any(e != errno.ESRCH for _, e in failed):
                log.warning("msg=%s failed=%d", "ipvs cleanup", len(failed))
                ok = False
        except nl.NetlinkError as e:
            log.warning("msg=%s err=%s", "ipvs cleanup", e)
            ok = False
        nl.delete_link(DUMMY_DEVICE)
        try:
            rules = self._builtin_rules()
            lines: list[str] = []
            for table, chains in (("nat", NAT_CHAINS), ("filter", FILTER_CHAINS)):
                present = [c for c in chains if (table, c) in rules]
                jumps = [f"-D{line[2:]}" for t, src, dst, _e in JUMPS if t == table
                         for line in rules.get((table, src), []) if line.endswith(f"-j {dst}")]
                lines += [f"*{table}", *jumps, *(f":{c} - [0:0]" for c in present),
                          *(f"-X {c}" for c in present), "COMMIT"]
            self.iptables.restore(("\n".join(lines) + "\n").encode())
        except Exception as e:  # noqa: BLE001
            log.warning("msg=%s err=%s", "iptables cleanup", e)
            ok = False
        try:
            self.ipsets.destroy()
        except Exception as e:  # noqa: BLE001
            log.warning("msg=%s err=%s", "ipset cleanup", e)
            ok = False
        self._fragments.clear()
        self._servers.clear()
        self._addresses = _RefSet()
        self._entries = {s.name: _RefSet() for s in SET_SPECS}
        self._terminating.clear()
        self._health.clear()
        if self.health_server is not None:
            self.health_server.sync_services({})
        self._rules_applied = False
        self._need_full = self._deep_read = True
        self._k_dests.clear()
        return ok

    def close(self) -> None:
        if self.health_server is not None:
            self.health_server.close()
        self.ipvs.close()
        self.addrs.close()
        self.ipsets.close()


def options_from_config(config: KProxyConfig, family: IPFamily = "IPv4") -> IPVSOptions:
    """The IPVS options of one family's proxier from the validated configuration (flags and
    KubeProxyConfiguration)."""
    v6 = family == "IPv6"
    return IPVSOptions(
        scheduler=config.ipvs_scheduler or DEFAULT_SCHEDULER,
        strict_arp=config.ipvs_strict_arp,
        tcp_timeout=int(config.ipvs_tcp_timeout),
        tcpfin_timeout=int(config.ipvs_tcpfin_timeout),
        udp_timeout=int(config.ipvs_udp_timeout),
        cluster_cidr=config.cluster_cidr,
        masquerade_all=config.masquerade_all,
        masquerade_bit=config.masquerade_bit,  # 0 is valid (validation accepts 0..31)
        # "primary" means the node's own IPs, as in iptables mode (not every address).
        nodeport_addresses=tuple(c for c in nodeport_cidrs(config.nodeport_addresses, config.node_ips)
                                 if (":" in c) == v6),
        exclude_cidrs=config.ipvs_exclude_cidrs,
        node_zone=config.node_zone,
        family=family,
    )


def _backend(config: KProxyConfig) -> Backend:
    # Detected as in iptables mode (the back end that holds the node's KUBE- rules; nft unless
    # only legacy works on this kernel, as under the User-Mode Linux test VM). One for both families.
    backend = config.iptables_backend or detect_backend()
    if backend not in ("nft", "legacy"):
        raise ValueError(f"iptables backend {backend!r}: expected nft or legacy")
    return "nft" if backend == "nft" else "legacy"


def family_supported(config: KProxyConfig, family: IPFamily) -> bool:
    """Upstream's platformCheckSupported for IPVS (an iptables-based mode): the family's
    iptables tool can read its nat table here (for IPv6 that also means the kernel has IPv6)."""
    try:
        IPTables(backend=_backend(config), ipv6=family == "IPv6").save("nat")
    except (IPTablesError, OSError) as e:
        log.info("%s ip(6)tables not usable here err=%s", family, e)
        return False
    return True


def new_family_proxier(config: KProxyConfig, family: IPFamily) -> Proxier:
    """The IPVS proxier of one family from the validated configuration (see the module
    docstring); the Service health checks are kproxy.proxiers.meta's (one server per node)."""
    explicit = [ip for ip in config.node_ips if (":" in ip) == (family == "IPv6")]
    return IPVSProxier(
        options_from_config(config, family),
        IPTables(backend=_backend(config), ipv6=family == "IPv6"),
        node_ips=(lambda: list(explicit)) if explicit else None,
        conntrack=Conntrack(family=family),
    )


def new_proxier(config: KProxyConfig) -> Proxier:
    """One IPVS proxier per family this node can run (kproxy.proxiers.meta), as upstream's
    NewDualStackProxier: IPv4 and IPv6 virtual servers, sets and rules side by side."""
    return new_proxier_for_families(config, new_family_proxier, family_supported)


__all__ = ["IPVSOptions", "IPVSProxier", "build_fragment", "family_supported", "new_family_proxier", "new_proxier",
           "render_iptables", "set_names", "set_specs"]

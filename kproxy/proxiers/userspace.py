"""The userspace proxier: every ServicePort is a socket on this node, relayed by kproxy itself.

As upstream's userspace mode (pkg/proxy/userspace, removed in Kubernetes 1.26): each TCP/UDP
ServicePort gets a listener on a kernel-chosen "proxy port", and nat rules bring service traffic
to it:
  KUBE-PORTALS-CONTAINER (from PREROUTING)  ClusterIP / externalIP / LB ingress IP  -> REDIRECT
  KUBE-PORTALS-HOST      (from OUTPUT)      same destinations from the node itself -> DNAT node IP
  KUBE-NODEPORT-CONTAINER / -HOST           nodePort on a local address            -> same
OUTPUT uses DNAT to the node's IP rather than REDIRECT, as upstream did: REDIRECT of locally
generated packets lands on 127.0.0.1 while replies leave from the interface address.
All four chains are rewritten in ONE iptables-restore --noflush per sync (none when the rendered
rules did not change: endpoint changes only touch the relay); the jumps into them are ensured with
`iptables -C/-I` on full syncs only.

Which endpoints serve which traffic is kproxy.proxy's decision, as in every mode: ready ones,
the serving+terminating fallback, internal/external traffic policy Local (ClusterIP traffic and
external traffic get listeners of their own when the two policies differ; pod and node traffic
to an external address short-circuits to the cluster-wide listener, as upstream's), zone hints.
A filter chain (KUBE-USERSPACE-FIREWALL, from INPUT/FORWARD/OUTPUT for new connections) refuses
what the relay must never see: REJECT when a Service has no endpoint at all, DROP when a Local
policy has no local endpoint, DROP for LoadBalancer IP traffic from outside
loadBalancerSourceRanges (the nat rules redirect only sources inside them, so the relay never
dials a backend for the others). Health-check node ports: the shared ServiceHealthServer.

The relay (kproxy.relay: the compiled epoll/splice core, or its asyncio twin) does the rest: round
robin over the chosen endpoints, ClientIP affinity with its timeout, the next endpoint on a
refused connect, UDP sessions with an idle timeout, existing connections left alone when
endpoints go.

What this mode cannot do: keep the client's source address (every relayed connection is a new
one from the node: externalTrafficPolicy Local selects local endpoints, but they see the node's
address).

One proxier per IP family (kproxy.proxiers.meta, as upstream's metaproxier): the IPv6 one has
its own relay with IPv6 listeners and writes the same chains with ip6tables; the rule-free
localhost variant is IPv4 only (127.0.0.1).

`localhost_only` (--userspace-localhost-only) is the rule-free variant: NodePort and LoadBalancer
services are served on 127.0.0.1:nodePort (and LoadBalancer ones also on 127.0.0.1:port), as
Docker Desktop shows them, without touching the firewall; ClusterIPs are not reachable then.

new_proxier takes the validated kproxy.config.KProxyConfig (typed: no attribute is guessed): netns
(run in that network namespace: tests), userspace_localhost_only, bind_address (the node IP for
OUTPUT DNAT; "" or 0.0.0.0: the first IPv4 of node_ips, which the server fills from the Node object,
else the first non-loopback IPv4 address on the node), iptables_backend ("" detects), udp_idle_timeout
(upstream --udp-timeout), userspace_tcp_congestion, cluster_cidr (the first IPv4 CIDR: pod
traffic's short circuit), node_zone, node_ips, nodeport_addresses ("primary": the node's own IPs, as
in every mode), healthcheck_bind_address; the relay implementation is its own argument.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from kproxy.backends.iptables import Backend, IPTables, IPTablesError, detect_backend
from kproxy.config import KProxyConfig
from kproxy.healthcheck import ServiceHealthServer
from kproxy.model import EndpointsMap, IPFamily, ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxy import (
    ServiceEndpoints,
    SourceRanges,
    externally_accessible,
    nodeport_cidrs,
    service_endpoints,
    sync_health_server,
)
from kproxy.proxy.endpoints import Endpoints, external_policy_local
from kproxy.relay import Relay
from kproxy.trace import status

log = logging.getLogger(__name__)

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
# (parent chain, position, match, target): portals first in PREROUTING/OUTPUT, nodeports last.
JUMPS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("PREROUTING", "-I", ("-m", "comment", "--comment", "handle ClusterIPs; NOTE: this must be before the NodePort rules"), PORTALS_CONTAINER),
    ("OUTPUT", "-I", ("-m", "comment", "--comment", "handle ClusterIPs; NOTE: this must be before the NodePort rules"), PORTALS_HOST),
    ("PREROUTING", "-A", ("-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", "handle service NodePorts; NOTE: this must be the last rule in the chain"), NODEPORT_CONTAINER),
    ("OUTPUT", "-A", ("-m", "addrtype", "--dst-type", "LOCAL", "-m", "comment", "--comment", "handle service NodePorts; NOTE: this must be the last rule in the chain"), NODEPORT_HOST),
)
FIREWALL = "KUBE-USERSPACE-FIREWALL"
# filter: what the relay must never see (no endpoints: REJECT; Local policy without local
# endpoints, or a source outside loadBalancerSourceRanges: DROP). Packets the nat chains
# redirected have the proxy port as destination by then, so these rules only see the others.
FILTER_JUMPS: tuple[tuple[str, str, tuple[str, ...], str], ...] = tuple(
    (parent, "-I", ("-m", "conntrack", "--ctstate", "NEW", "-m", "comment", "--comment",
                    "kubernetes userspace service firewall"), FIREWALL)
    for parent in ("INPUT", "FORWARD", "OUTPUT")
)
LOCALHOST = "127.0.0.1"


def servable(svc: ServicePort) -> bool:
    return svc.type != "ExternalName" and svc.protocol in ("TCP", "UDP")


def _of_family(ips: tuple[str, ...], v6: bool = False) -> list[str]:
    return [ip for ip in ips if ip and (":" in ip) == v6]


@dataclass(frozen=True, slots=True)
class Portal:
    """One ServicePort as the rules see it: its relay ports and kproxy.proxy's decision.

    `internal_port` serves ClusterIP traffic (the internal policy's endpoints); `external_port`
    serves NodePort / external IP / LoadBalancer traffic (the external policy's), the same port
    when both policies pick the same endpoints; `cluster_port` is where traffic from pods
    (cluster CIDR) and from the node itself to an external address goes under
    externalTrafficPolicy Local (upstream's short circuit to the cluster-wide endpoints), 0 when
    no listener holds them (both policies Local)."""

    svc: ServicePort
    internal_port: int
    external_port: int
    cluster_port: int
    decision: ServiceEndpoints


def render_rules(portals: list[Portal], node_ip: str, cluster_cidr: str = "",
                 node_ips: tuple[str, ...] = (), nodeport_addresses: tuple[str, ...] = (), v6: bool = False) -> bytes:
    """The nat and filter tables for these portals: sans I/O, one restore buffer.
    `nodeport_addresses`: CIDRs of this family NodePorts answer on (empty: every local address);
    `v6`: the ip6tables tables (only the Services' IPv6 addresses, /128 hosts, [ip]:port)."""
    nat = ["*nat\n", *(f":{c} - [0:0]\n" for c in CHAINS)]
    filt = ["*filter\n", f":{FIREWALL} - [0:0]\n"]
    for p in sorted(portals, key=lambda p: (str(p.svc.name), p.svc.protocol)):
        _render_portal(p, node_ip, cluster_cidr, node_ips, nodeport_addresses, nat, filt, v6)
    return "".join([*nat, "COMMIT\n", *filt, "COMMIT\n"]).encode()


def _render_portal(p: Portal, node_ip: str, cluster_cidr: str, node_ips: tuple[str, ...],
                   nodeport_addresses: tuple[str, ...], nat: list[str], filt: list[str], v6: bool = False) -> None:
    svc, d = p.svc, p.decision
    proto = svc.protocol.lower()
    comment = f'-m comment --comment "{svc.name}"'
    host = "/128" if v6 else "/32"
    to_node = f"[{node_ip}]" if v6 else node_ip

    def redirect(port: int) -> str:
        return f"-j REDIRECT --to-ports {port}"

    def dnat(port: int) -> str:
        return f"-j DNAT --to-destination {to_node}:{port}"

    def refuse(match: str, drop: bool) -> None:
        reason = "has no local endpoints" if drop else "has no endpoints"
        filt.append(f'-A {FIREWALL} -m comment --comment "{svc.name} {reason}" {match} '
                    f"-j {'DROP' if drop else 'REJECT'}\n")

    def external(container: str, host: str, match: str, dst: str, sources: list[str] | None) -> None:
        """One external address (an IP, or the node port); `sources` restricts who may use it."""
        if not d.has_any:
            refuse(dst, drop=False)
            return
        short = p.cluster_port if external_policy_local(svc) else 0
        if sources is None:
            if short and cluster_cidr:
                nat.append(f"-A {container} {comment} -s {cluster_cidr} {match} {redirect(short)}\n")
            if not d.drops_external:
                nat.append(f"-A {container} {comment} {match} {redirect(p.external_port)}\n")
            if short or not d.drops_external:
                nat.append(f"-A {host} {comment} {match} {dnat(short or p.external_port)}\n")
            if d.drops_external:
                refuse(dst, drop=True)
            return
        if not d.drops_external:
            for src in sources:
                nat.append(f"-A {container} {comment} -s {src} {match} {redirect(p.external_port)}\n")
                nat.append(f"-A {host} {comment} -s {src} {match} {dnat(p.external_port)}\n")
        # Not redirected: a source outside the ranges (or no local endpoint) meets this DROP.
        filt.append(f'-A {FIREWALL} -m comment --comment "{svc.name} traffic not accepted by source ranges" '
                    f"{dst} -j DROP\n")

    for ip in dict.fromkeys(_of_family(svc.cluster_ips, v6)):
        match = f"-d {ip}{host} -p {proto} -m {proto} --dport {svc.port}"
        if not d.has_any:
            refuse(match, drop=False)
        elif d.drops_internal:
            refuse(match, drop=True)
        else:
            nat.append(f"-A {PORTALS_CONTAINER} {comment} {match} {redirect(p.internal_port)}\n")
            nat.append(f"-A {PORTALS_HOST} {comment} {match} {dnat(p.internal_port)}\n")
    for ip in dict.fromkeys(_of_family(svc.external_ips, v6)):
        match = f"-d {ip}{host} -p {proto} -m {proto} --dport {svc.port}"
        external(PORTALS_CONTAINER, PORTALS_HOST, match, match, None)
    ranges = SourceRanges.parse(svc.load_balancer_source_ranges)
    family: IPFamily = "IPv6" if v6 else "IPv4"
    for ip in dict.fromkeys(_of_family(svc.load_balancer_ips, v6)):
        match = f"-d {ip}{host} -p {proto} -m {proto} --dport {svc.port}"
        sources = None
        if ranges.restricted:
            # Upstream: a node inside the ranges also lets the LB IP itself in (hairpin).
            sources = ranges.cidrs(family) + ([f"{ip}{host}"] if ranges.contains_any(node_ips) else [])
        external(PORTALS_CONTAINER, PORTALS_HOST, match, match, sources)
    if svc.node_port and svc.type in ("NodePort", "LoadBalancer"):
        for cidr in nodeport_addresses or ("",):
            match = (f"-d {cidr} " if cidr else "") + f"-p {proto} -m {proto} --dport {svc.node_port}"
            external(NODEPORT_CONTAINER, NODEPORT_HOST, match, f"-m addrtype --dst-type LOCAL {match}", None)


def localhost_ports(svc: ServicePort) -> list[int]:
    """Where the rule-free variant serves a service on 127.0.0.1."""
    ports: list[int] = []
    if svc.type in ("NodePort", "LoadBalancer") and svc.node_port:
        ports.append(svc.node_port)
    if svc.type == "LoadBalancer" and svc.port not in ports:
        ports.append(svc.port)
    return ports


def _separate_external(svc: ServicePort) -> bool:
    """External traffic needs a listener of its own when the two policies differ."""
    return externally_accessible(svc) and external_policy_local(svc) != svc.internal_policy_local


@dataclass
class _Served:
    svc: ServicePort
    # relay listener ids by role; in localhost_only mode every listener is "cluster" (node traffic)
    listeners: dict[str, list[int]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # role -> proxy port
    decision: ServiceEndpoints | None = None

    def portal(self) -> Portal:
        assert self.decision is not None
        internal = self.ports.get("internal", 0)
        ext = self.ports.get("external", internal)
        cluster = internal if not self.svc.internal_policy_local else 0
        return Portal(self.svc, internal, ext, cluster, self.decision)


class UserspaceProxier(Proxier):
    mode = "userspace"

    def __init__(self, relay: Relay, iptables: IPTables | None, *, node_ip: str = "",
                 localhost_only: bool = False, udp_idle_timeout: float = 0.25, cluster_cidr: str = "",
                 node_zone: str = "", node_ips: tuple[str, ...] = (),
                 health_server: ServiceHealthServer | None = None,
                 nodeport_addresses: tuple[str, ...] = (), status_socket: str = "") -> None:
        if not localhost_only and (iptables is None or not node_ip):
            raise ValueError("userspace proxier: iptables and node_ip are needed unless localhost_only")
        self.relay = relay
        self.iptables = iptables
        # The family is the tools': ip6tables makes this the IPv6 proxier (IPv6 listeners).
        self.v6 = bool(getattr(iptables, "ipv6", False))
        self.node_ip = node_ip
        self.localhost_only = localhost_only
        self.udp_idle_timeout = udp_idle_timeout
        self.cluster_cidr = cluster_cidr
        self.node_zone = node_zone
        self.node_ips = tuple(dict.fromkeys((node_ip, *node_ips))) if node_ip else node_ips
        self.health_server = health_server
        self.nodeport_addresses = tuple(c for c in nodeport_addresses if (":" in c) == self.v6)
        self._served: dict[ServicePortName, _Served] = {}
        self._jumps_ok = False
        self._applied = b""  # the buffer the kernel holds, to skip restores that change nothing
        # The relay's table for `kproxy trace` (kproxy.trace.status): root-only, read-only.
        self._status: status.StatusServer | None = None
        if status_socket:
            try:
                self._status = status.StatusServer(status_socket)
            except OSError as exc:
                log.warning("userspace: no status socket for kproxy trace path=%s err=%s", status_socket, exc)

    # ---- listeners

    def _roles(self, svc: ServicePort) -> list[str]:
        if self.localhost_only:
            return ["cluster"]
        return ["internal", "external"] if _separate_external(svc) else ["internal"]

    def _open(self, svc: ServicePort) -> _Served:
        served = _Served(svc)
        try:
            for role in self._roles(svc):
                lids = served.listeners.setdefault(role, [])
                if self.localhost_only:
                    for port in localhost_ports(svc):
                        lid, _ = self.relay.listen(svc.protocol, LOCALHOST, port)  # type: ignore[arg-type]
                        lids.append(lid)
                else:
                    any_addr = "::" if self.v6 else "0.0.0.0"
                    lid, served.ports[role] = self.relay.listen(svc.protocol, any_addr, 0)  # type: ignore[arg-type]
                    lids.append(lid)
        except OSError:
            self._close(served)
            raise
        return served

    def _close(self, served: _Served) -> None:
        for lids in served.listeners.values():
            for lid in lids:
                self.relay.remove(lid)
        served.listeners.clear()

    def _needs_reopen(self, old: ServicePort, new: ServicePort) -> bool:
        if old.protocol != new.protocol or self._roles(old) != self._roles(new):
            return True
        return self.localhost_only and localhost_ports(old) != localhost_ports(new)

    def _set_endpoints(self, served: _Served, endpoints: EndpointsMap) -> None:
        mine = [e for e in endpoints.get(served.svc.name, ()) if (":" in e.ip) == self.v6]
        d = served.decision = service_endpoints(served.svc, mine, self.node_zone)
        chosen = _role_endpoints(d)
        for role, lids in served.listeners.items():
            eps: list[tuple[str, int]] = [(e.ip, e.port) for e in chosen[role]]
            for lid in lids:
                self.relay.set_endpoints(lid, eps, served.svc.session_affinity_timeout, self.udp_idle_timeout)

    # ---- sync

    def sync(self, request: SyncRequest) -> SyncResult:
        errors: list[str] = []
        wanted = {n: s for n, s in request.services.items() if servable(s)}
        if self.localhost_only:
            wanted = {n: s for n, s in wanted.items() if localhost_ports(s)}
        for name in [n for n in self._served if n not in wanted]:
            self._close(self._served.pop(name))
        for name, svc in wanted.items():
            served = self._served.get(name)
            fresh = served is None or self._needs_reopen(served.svc, svc)
            if fresh:
                if served is not None:
                    self._close(self._served.pop(name))
                try:
                    served = self._served[name] = self._open(svc)
                except OSError as exc:
                    errors.append(f"{name}: {exc}")
                    log.error("userspace: cannot open listener service=%s err=%s", name, exc)
                    continue
            assert served is not None
            changed = served.svc != svc
            served.svc = svc
            if fresh or changed or request.full or name in request.changed:
                self._set_endpoints(served, request.endpoints)
        if self.health_server is not None:
            # A health-check port that cannot be bound is logged by the server and retried on the
            # next sync (as upstream): it must not fail the sync of every other Service.
            sync_health_server(self.health_server, request.services, request.endpoints)
        rules = 0
        if not self.localhost_only:
            assert self.iptables is not None
            data = render_rules([s.portal() for s in self._served.values()], self.node_ip,
                                self.cluster_cidr, self.node_ips, self.nodeport_addresses, self.v6)
            rules = data.count(b"\n-A ")
            try:
                # Endpoint-only changes live in the relay: the rules stay as they are, unless
                # they decide what the rules do (none left, no local one left).
                if data != self._applied or request.full:
                    self._applied = b""
                    self.iptables.restore(data)
                    self._applied = data
                if not self._jumps_ok or request.full:
                    self._ensure_jumps()
            except (IPTablesError, OSError) as exc:
                log.error("userspace: iptables-restore failed err=%s", exc)
                return SyncResult(ok=False, error=str(exc))
        if self._status is not None:
            self._status.publish(status.render(self._relay_ports()))
        if errors:
            return SyncResult(ok=False, rules_total={"nat": rules}, error="; ".join(errors))
        return SyncResult(ok=True, rules_total={"nat": rules})

    def _relay_ports(self) -> list[status.RelayPort]:
        out = []
        for name, served in sorted(self._served.items(), key=lambda kv: str(kv[0])):
            d = served.decision
            if d is None:
                continue
            chosen = _role_endpoints(d)
            for role, port in served.ports.items():
                out.append(status.RelayPort(f"{name.namespace}/{name.name}:{name.port}", served.svc.protocol, role,
                                            port, tuple(e.addr for e in chosen[role]),
                                            float(served.svc.session_affinity_timeout or 0)))
        return out

    def _ensure_jumps(self) -> None:
        assert self.iptables is not None
        for table, jumps in (("nat", JUMPS), ("filter", FILTER_JUMPS)):
            for parent, how, match, target in jumps:
                args = [parent, *match, "-j", target]
                try:
                    self.iptables.command("-t", table, "-C", *args)
                except IPTablesError:
                    self.iptables.command("-t", table, how, *args)
        self._jumps_ok = True

    def cleanup(self) -> bool:
        """Remove the jumps and the four chains; listeners are closed by close()."""
        if self.iptables is None:
            return True
        ok = remove_rules(self.iptables)
        self._jumps_ok = False
        self._applied = b""
        return ok

    def close(self) -> None:
        for served in self._served.values():
            self._close(served)
        self._served.clear()
        self.relay.stop()
        if self._status is not None:
            self._status.close()
            self._status = None
        if self.health_server is not None:
            self.health_server.close()


def _role_endpoints(d: ServiceEndpoints) -> dict[str, Endpoints]:
    # Traffic the rules refuse or drop never reaches a listener: only its endpoints matter.
    return {"internal": d.internal, "external": d.external, "cluster": d.cluster or d.external}


def _node_ip(iptables: IPTables) -> str:
    """The first address of the table's family on the node that a Service's traffic can be
    DNATed to (not loopback; IPv6 link-local ones are already left out)."""
    for ip in iptables.local_addresses():
        if not ip.startswith("127.") and ip != "::1":
            return ip
    family = "IPv6" if iptables.ipv6 else "IPv4"
    raise ValueError(f"userspace proxier: no non-loopback {family} address on this node; set --bind-address")


def remove_rules(iptables: IPTables) -> bool:
    """Removes the jumps and the chains of this mode (nat and filter). True if clean."""
    for table, jumps in (("nat", JUMPS), ("filter", FILTER_JUMPS)):
        for parent, _, match, target in jumps:
            for _ in range(16):  # bounded: duplicates from older runs are deleted one by one
                try:
                    iptables.command("-t", table, "-D", parent, *match, "-j", target)
                except IPTablesError:
                    break
    body = "".join(f":{c} - [0:0]\n" for c in CHAINS) + "".join(f"-X {c}\n" for c in CHAINS)
    fbody = f":{FIREWALL} - [0:0]\n-X {FIREWALL}\n"
    try:
        iptables.restore(f"*nat\n{body}COMMIT\n*filter\n{fbody}COMMIT\n".encode())
    except (IPTablesError, OSError) as exc:
        log.error("userspace: cleanup failed err=%s", exc)
        return False
    return True


def cleanup_leftovers(config: KProxyConfig) -> bool:
    """`kproxy --cleanup` in another mode: what this mode leaves in the kernel is only its rules,
    so neither a relay nor the node's address is needed to remove them."""
    ok = True
    for v6 in (False, True):  # both families' tables
        iptables = IPTables(backend=_backend(config), netns=config.netns, ipv6=v6)
        try:
            present = any(f":{c} " in line for line in iptables.save("nat").splitlines() for c in CHAINS)
            present = present or any(line.startswith(f":{FIREWALL} ") for line in iptables.save("filter").splitlines())
        except (IPTablesError, OSError) as exc:
            # A back end (or family) this kernel cannot run (no nf_tables under User-Mode Linux) holds nothing.
            log.info("userspace: nothing to clean ipv6=%s, iptables-save failed err=%s", v6, exc)
            continue
        ok = (remove_rules(iptables) if present else True) and ok
    return ok


def _backend(config: KProxyConfig) -> Backend:
    backend = config.iptables_backend or detect_backend(config.netns)
    if backend not in ("nft", "legacy"):
        raise ValueError(f"iptables_backend {backend!r}: expected nft or legacy")
    return "nft" if backend == "nft" else "legacy"


def family_supported(config: KProxyConfig, family: IPFamily) -> bool:
    """The family's iptables can hold this mode's rules (upstream's platformCheckSupported)."""
    if config.userspace_localhost_only:
        return family == "IPv4"  # the rule-free variant serves 127.0.0.1 only
    from kproxy.proxiers.iptables import family_supported as iptables_family_supported

    if not iptables_family_supported(config, family):
        return False
    # The relay's OUTPUT rules DNAT to a node address of the family: a node without one (no
    # IPv6 configured) runs single-stack, as upstream's does when it detects no such node IP.
    if any((":" in ip) == (family == "IPv6") for ip in (*config.node_ips, config.bind_address)
           if ip not in ("", "0.0.0.0", "::")):
        return True
    try:
        _node_ip(IPTables(backend=_backend(config), netns=config.netns, ipv6=family == "IPv6"))
    except (ValueError, IPTablesError, OSError) as exc:
        log.info("userspace: family=%s not proxied: %s", family, exc)
        return False
    return True


RelayImpl = Literal["auto", "compiled", "pure"]


def new_family_proxier(config: KProxyConfig, family: IPFamily, relay_impl: RelayImpl = "auto") -> Proxier:
    """One family's userspace proxier (see the module docstring): its own relay and, unless
    localhost-only, the family's ip6tables/iptables; the Service health checks are the
    metaproxier's; the status socket for `kproxy trace` is the IPv4 proxier's."""
    if relay_impl not in ("auto", "compiled", "pure"):
        raise ValueError(f"relay_impl {relay_impl!r}: expected auto, compiled or pure")
    netns = config.netns
    v6 = family == "IPv6"
    iptables: IPTables | None = None
    node_ip = ""
    if not config.userspace_localhost_only:
        iptables = IPTables(backend=_backend(config), netns=netns, ipv6=v6)
        bind = config.bind_address
        known = [ip for ip in config.node_ips if (":" in ip) == v6]
        if bind and bind not in ("0.0.0.0", "::") and (":" in bind) == v6:
            node_ip = bind
        else:
            node_ip = known[0] if known else _node_ip(iptables)
    relay = Relay(relay_impl, netns=netns, tcp_congestion=config.userspace_tcp_congestion).start()
    # Pod traffic to an external address short-circuits (as upstream's) with this family's CIDR.
    cidrs = [c.strip() for c in config.cluster_cidr.split(",") if c.strip() and (":" in c) == v6]
    return UserspaceProxier(relay, iptables, node_ip=node_ip, localhost_only=config.userspace_localhost_only,
                            udp_idle_timeout=config.udp_idle_timeout or 0.25,
                            cluster_cidr=cidrs[0] if cidrs else "", node_zone=config.node_zone,
                            node_ips=tuple(ip for ip in config.node_ips if (":" in ip) == v6),
                            nodeport_addresses=nodeport_cidrs(config.nodeport_addresses, config.node_ips),
                            status_socket="" if v6 else status.socket_path(netns))


def new_proxier(config: KProxyConfig, relay_impl: RelayImpl = "auto") -> Proxier:
    """The userspace proxier of every family this node runs (kproxy.proxiers.meta);
    `relay_impl` picks the relay (tests run both; KPROXY_PURE=1 forces pure under auto)."""
    from kproxy.proxiers.meta import new_proxier_for_families

    def build(config: KProxyConfig, family: IPFamily) -> Proxier:
        return new_family_proxier(config, family, relay_impl)

    return new_proxier_for_families(config, build, family_supported,
                                    health=not config.userspace_localhost_only)

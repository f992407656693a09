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

The relay (kproxy.relay: the compiled epoll/splice core, or its asyncio twin) does the rest: round
robin over ready endpoints, ClientIP affinity with its timeout, the next endpoint on a refused
connect, UDP sessions with an idle timeout, existing connections left alone when endpoints go,
and an immediate reset when a service has no endpoints.

`localhost_only` (--userspace-localhost-only) is the rule-free variant: NodePort and LoadBalancer
services are served on 127.0.0.1:nodePort (and LoadBalancer ones also on 127.0.0.1:port), as
Docker Desktop shows them, without touching the firewall; ClusterIPs are not reachable then.

Config attributes read by new_proxier (kproxy.config.KProxyConfig, or any object with them), all
optional: netns (run in that network namespace: tests), userspace_localhost_only (bool),
bind_address (the node IP for OUTPUT DNAT; "" or 0.0.0.0: the first IPv4 of node_ips, which the
server fills from the Node object, else the first non-loopback IPv4 address on the node),
iptables_backend ("nft"|"legacy"|"" auto), udp_idle_timeout (seconds, upstream --udp-timeout,
default 0.25), relay_impl ("auto"|"compiled"|"pure"; KPROXY_PURE=1 forces pure under auto),
userspace_tcp_congestion (--userspace-tcp-congestion: the relayed TCP legs' congestion control).
Not done here (upstream's userspace mode did not either): IPv6 rules, source ranges, traffic policies.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from kproxy.backends.iptables import IPTables, IPTablesError, detect_backend
from kproxy.model import EndpointsMap, ServicePort, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.relay import Relay

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
LOCALHOST = "127.0.0.1"


def servable(svc: ServicePort) -> bool:
    return svc.type != "ExternalName" and svc.protocol in ("TCP", "UDP")


def _v4(ips: tuple[str, ...]) -> list[str]:
    return [ip for ip in ips if ip and ":" not in ip]


def render_rules(served: list[tuple[ServicePort, int]], node_ip: str) -> bytes:
    """The nat table for these (ServicePort, proxy port) pairs: sans I/O, one restore buffer."""
    out = ["*nat\n", *(f":{c} - [0:0]\n" for c in CHAINS)]
    for svc, proxy_port in sorted(served, key=lambda sp: (str(sp[0].name), sp[0].protocol)):
        proto = svc.protocol.lower()
        comment = f'-m comment --comment "{svc.name}"'
        redirect = f"-j REDIRECT --to-ports {proxy_port}"
        dnat = f"-j DNAT --to-destination {node_ip}:{proxy_port}"
        portal_ips = _v4(svc.cluster_ips) + _v4(svc.external_ips) + _v4(svc.load_balancer_ips)
        for ip in dict.fromkeys(portal_ips):
            match = f"{comment} -d {ip}/32 -p {proto} -m {proto} --dport {svc.port}"
            out.append(f"-A {PORTALS_CONTAINER} {match} {redirect}\n")
            out.append(f"-A {PORTALS_HOST} {match} {dnat}\n")
        if svc.node_port and svc.type in ("NodePort", "LoadBalancer"):
            match = f"{comment} -p {proto} -m {proto} --dport {svc.node_port}"
            out.append(f"-A {NODEPORT_CONTAINER} {match} {redirect}\n")
            out.append(f"-A {NODEPORT_HOST} {match} {dnat}\n")
    out.append("COMMIT\n")
    return "".join(out).encode()


def localhost_ports(svc: ServicePort) -> list[int]:
    """Where the rule-free variant serves a service on 127.0.0.1."""
    ports: list[int] = []
    if svc.type in ("NodePort", "LoadBalancer") and svc.node_port:
        ports.append(svc.node_port)
    if svc.type == "LoadBalancer" and svc.port not in ports:
        ports.append(svc.port)
    return ports


@dataclass
class _Served:
    svc: ServicePort
    listeners: list[int] = field(default_factory=list)  # relay listener ids
    proxy_port: int = 0


class UserspaceProxier(Proxier):
    mode = "userspace"

    def __init__(self, relay: Relay, iptables: IPTables | None, *, node_ip: str = "",
                 localhost_only: bool = False, udp_idle_timeout: float = 0.25) -> None:
        if not localhost_only and (iptables is None or not node_ip):
            raise ValueError("userspace proxier: iptables and node_ip are needed unless localhost_only")
        self.relay = relay
        self.iptables = iptables
        self.node_ip = node_ip
        self.localhost_only = localhost_only
        self.udp_idle_timeout = udp_idle_timeout
        self._served: dict[ServicePortName, _Served] = {}
        self._jumps_ok = False
        self._applied = b""  # the nat buffer the kernel holds, to skip restores that change nothing

    # ---- listeners

    def _open(self, svc: ServicePort) -> _Served:
        served = _Served(svc)
        try:
            if self.localhost_only:
                for port in localhost_ports(svc):
                    lid, _ = self.relay.listen(svc.protocol, LOCALHOST, port)  # type: ignore[arg-type]
                    served.listeners.append(lid)
            else:
                lid, served.proxy_port = self.relay.listen(svc.protocol, "0.0.0.0", 0)  # type: ignore[arg-type]
                served.listeners.append(lid)
        except OSError:
            self._close(served)
            raise
        return served

    def _close(self, served: _Served) -> None:
        for lid in served.listeners:
            self.relay.remove(lid)
        served.listeners.clear()

    def _needs_reopen(self, old: ServicePort, new: ServicePort) -> bool:
        if old.protocol != new.protocol:
            return True
        return self.localhost_only and localhost_ports(old) != localhost_ports(new)

    def _set_endpoints(self, served: _Served, endpoints: EndpointsMap) -> None:
        eps = [(e.ip, e.port) for e in endpoints.get(served.svc.name, ()) if e.ready]
        for lid in served.listeners:
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
            if fresh and not self.localhost_only and len(_v4(svc.cluster_ips + svc.external_ips)) < len(
                    [ip for ip in svc.cluster_ips + svc.external_ips if ip]):
                log.warning("userspace: IPv6 service IPs are not redirected (IPv4 only) service=%s", name)
            served.svc = svc
            if fresh or request.full or name in request.changed:
                self._set_endpoints(served, request.endpoints)
        rules = 0
        if not self.localhost_only:
            assert self.iptables is not None
            data = render_rules([(s.svc, s.proxy_port) for s in self._served.values()], self.node_ip)
            rules = data.count(b"\n-A ")
            try:
                # Endpoint-only changes live in the relay: the rules stay as they are.
                if data != self._applied or request.full:
                    self._applied = b""
                    self.iptables.restore(data)
                    self._applied = data
                if not self._jumps_ok or request.full:
                    self._ensure_jumps()
            except (IPTablesError, OSError) as exc:
                log.error("userspace: iptables-restore failed err=%s", exc)
                return SyncResult(ok=False, error=str(exc))
        if errors:
            return SyncResult(ok=False, rules_total={"nat": rules}, error="; ".join(errors))
        return SyncResult(ok=True, rules_total={"nat": rules})

    def _ensure_jumps(self) -> None:
        assert self.iptables is not None
        for parent, how, match, target in JUMPS:
            args = [parent, *match, "-j", target]
            try:
                self.iptables.command("-t", "nat", "-C", *args)
            except IPTablesError:
                self.iptables.command("-t", "nat", how, *args)
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


def _node_ipv4(iptables: IPTables) -> str:
    for ip in iptables.local_ipv4_addresses():
        if not ip.startswith("127."):
            return ip
    raise ValueError("userspace proxier: no non-loopback IPv4 address on this node; set --bind-address")


def remove_rules(iptables: IPTables) -> bool:
    """Removes the jumps and the four chains of this mode from the nat table. True if clean."""
    for parent, _, match, target in JUMPS:
        for _ in range(16):  # bounded: duplicates from older runs are deleted one by one
            try:
                iptables.command("-t", "nat", "-D", parent, *match, "-j", target)
            except IPTablesError:
                break
    body = "".join(f":{c} - [0:0]\n" for c in CHAINS) + "".join(f"-X {c}\n" for c in CHAINS)
    try:
        iptables.restore(f"*nat\n{body}COMMIT\n".encode())
    except (IPTablesError, OSError) as exc:
        log.error("userspace: cleanup failed err=%s", exc)
        return False
    return True


def cleanup_leftovers(config: Any) -> bool:
    """`kproxy --cleanup` in another mode: what this mode leaves in the kernel is only its rules,
    so neither a relay nor the node's address is needed to remove them."""
    netns = getattr(config, "netns", None) or None
    backend = getattr(config, "iptables_backend", "") or detect_backend(netns)
    iptables = IPTables(backend="nft" if backend == "nft" else "legacy", netns=netns)
    try:
        present = any(f":{c} " in line for line in iptables.save("nat").splitlines() for c in CHAINS)
    except (IPTablesError, OSError) as exc:
        # A back end this kernel cannot run (no nf_tables under User-Mode Linux) holds nothing.
        log.info("userspace: nothing to clean, iptables-save failed err=%s", exc)
        return True
    return remove_rules(iptables) if present else True


def new_proxier(config: Any) -> Proxier:
    """Build the userspace proxier from kproxy.config.KProxyConfig (see the module docstring)."""
    netns = getattr(config, "netns", None) or None
    localhost_only = bool(getattr(config, "userspace_localhost_only", False))
    impl: Literal["auto", "compiled", "pure"] = getattr(config, "relay_impl", "auto") or "auto"
    if impl not in ("auto", "compiled", "pure"):
        raise ValueError(f"relay_impl {impl!r}: expected auto, compiled or pure")
    udp_timeout = float(getattr(config, "udp_idle_timeout", 0.25) or 0.25)
    iptables: IPTables | None = None
    node_ip = ""
    if not localhost_only:
        backend = getattr(config, "iptables_backend", "") or detect_backend(netns)
        if backend not in ("nft", "legacy"):
            raise ValueError(f"iptables_backend {backend!r}: expected nft or legacy")
        iptables = IPTables(backend="nft" if backend == "nft" else "legacy", netns=netns)
        bind = str(getattr(config, "bind_address", "") or "")
        known = [ip for ip in getattr(config, "node_ips", ()) or () if ":" not in ip]
        if bind and bind not in ("0.0.0.0", "::"):
            node_ip = bind
        else:
            node_ip = known[0] if known else _node_ipv4(iptables)
    relay = Relay(impl, netns=netns, tcp_congestion=str(getattr(config, "userspace_tcp_congestion", "") or "")).start()
    return UserspaceProxier(relay, iptables, node_ip=node_ip, localhost_only=localhost_only,
                            udp_idle_timeout=udp_timeout)

"""Where does a new connection go in IPVS mode: iptables rules, ipsets and IPVS virtual servers.

IPVS mode splits the decision three ways, and the walk reads all three from the node:
  - the nat and filter rules kproxy programs (iptables-save, walked by kproxy.trace.iptables),
    whose matches are mostly ipset lookups: the sets are read with `ipset save` and parsed here;
  - the virtual servers and their real servers, over IPVS netlink (kproxy.backends.ipvs);
  - which addresses are the node's (kube-ipvs0 holds the Service addresses), from `ip addr`.
The kernel's order (net/netfilter/ipvs/ip_vs_core.c): a packet from outside passes nat
PREROUTING, is routed to a local address (the Service addresses are local), passes filter INPUT,
then IPVS takes it at LOCAL_IN and sends it to a real server, through nat POSTROUTING (the
masquerade mark, the KUBE-LOOP-BACK hairpin set). The node's own connections meet IPVS at
LOCAL_OUT, after nat OUTPUT. A virtual server without real servers (with weight) refuses the
connection (ip_vs_leave: ICMP port unreachable). Real servers are listed with the share of new
connections their weight gives them under the scheduler (exact for rr/wrr; for the
connection-count schedulers it is what they tend to with equal load); with persistence
(ClientIP affinity) each one is also listed as reachable through an existing entry.

IPVS holds no Kubernetes names, so the paths carry the virtual server ("TCP 10.96.0.10:53 rr")
instead of namespace/service:port. All of it is untrusted input: sizes bounded, every entry
parsed into typed values, a bad line an error naming it.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from kproxy.backends.ipvs import IP_VS_SVC_F_PERSISTENT, RealServer, VirtualServer
from kproxy.trace.iptables import MAX_LINE, Outcome, Packet, Path, TraceError, Tracer

__all__ = ["IPSet", "IPVSTracer", "parse_ipsets"]

MAX_SETS = 1024
_SET_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,31}$")
_SCHEDULER = re.compile(r"^[a-z]{1,16}$")
_COMPONENTS = {"ip", "port", "net"}
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
# One member's component: an address, (protocol, port) ("" protocol: any, bitmap:port), or a network.
Part = IPAddr | tuple[str, int] | Net


@dataclass
class IPSet:
    name: str
    components: tuple[str, ...]  # "hash:ip,port" -> ("ip", "port")
    bitmap: bool = False  # bitmap:port members are ports of any protocol
    exact: set[tuple[Part, ...]] = field(default_factory=set)
    nets: list[tuple[Part, ...]] = field(default_factory=list)  # members with a network component

    def has(self, key: tuple[IPAddr | tuple[str, int], ...]) -> bool:
        if key in self.exact:
            return True
        return any(all(_part_has(m, k) for m, k in zip(member, key)) for member in self.nets)


def _part_has(member: Part, value: IPAddr | tuple[str, int]) -> bool:
    if isinstance(member, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return not isinstance(value, tuple) and value in member
    return member == value


def _part(kind: str, text: str, line: str) -> Part:
    try:
        if kind == "ip":
            return ipaddress.ip_address(text)
        if kind == "net":
            return ipaddress.ip_network(text, strict=False)
        proto, _, port = text.rpartition(":")
        if proto not in ("", "tcp", "udp", "sctp") or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(text)
        return (proto, int(port))
    except ValueError:
        raise TraceError(f"ipset: bad {kind} {text!r} in: {line[:200]}") from None


def parse_ipsets(save: str) -> dict[str, IPSet]:
    """`ipset save` output -> the sets by name, members typed by the set's type."""
    sets: dict[str, IPSet] = {}
    for line in save.splitlines():
        if len(line) > MAX_LINE:
            raise TraceError(f"ipset: line of {len(line)} characters: {line[:80]}...")
        words = line.split()
        if not words:
            continue
        if words[0] == "create" and len(words) >= 3:
            method, _, comps = words[2].partition(":")
            parts = tuple(comps.split(","))
            if not _SET_NAME.match(words[1]) or method not in ("hash", "bitmap", "list") or \
                    not set(parts) <= _COMPONENTS:
                raise TraceError(f"ipset: bad set in: {line[:200]}")
            if len(sets) >= MAX_SETS:
                raise TraceError(f"ipset: more than {MAX_SETS} sets")
            sets[words[1]] = IPSet(words[1], parts, bitmap=method == "bitmap")
        elif words[0] == "add" and len(words) >= 3:
            s = sets.get(words[1])
            if s is None:
                raise TraceError(f"ipset: member of an undeclared set in: {line[:200]}")
            texts = words[2].split(",")
            if len(texts) != len(s.components):
                raise TraceError(f"ipset: member does not fit {s.name}'s type in: {line[:200]}")
            member = tuple(_part(k, t, line) for k, t in zip(s.components, texts))
            if "net" in s.components:
                s.nets.append(member)
            else:
                s.exact.add(member)
        else:
            raise TraceError(f"ipset: unexpected line: {line[:200]}")
    return sets


def _validated(services: Sequence[tuple[VirtualServer, Sequence[RealServer]]]) -> dict[tuple[IPAddr, int, str], tuple[VirtualServer, tuple[RealServer, ...]]]:
    out = {}
    for vs, dests in services:
        try:
            addr = ipaddress.ip_address(vs.address)
            for rs in dests:
                ipaddress.ip_address(rs.address)
        except ValueError as e:
            raise TraceError(f"ipvs: bad address: {e}") from None
        if vs.protocol not in ("TCP", "UDP", "SCTP") or not 0 <= vs.port <= 65535 or not _SCHEDULER.match(vs.scheduler) \
                or any(not 0 <= rs.port <= 65535 or not 0 <= rs.weight <= 0x7FFFFFFF for rs in dests):
            raise TraceError(f"ipvs: bad virtual server {vs}")
        out[(addr, vs.port, vs.protocol.lower())] = (vs, tuple(dests))
    return out


class IPVSTracer:
    def __init__(self, dump: str, local_ips: set[str], sets: dict[str, IPSet],
                 services: Sequence[tuple[VirtualServer, Sequence[RealServer]]]) -> None:
        self.ipsets = sets
        self.rules = Tracer(dump, local_ips, self._member)
        self.services = _validated(services)

    def _member(self, name: str, flags: str, pkt: Packet) -> bool:
        s = self.ipsets.get(name)
        if s is None:
            raise TraceError(f"a rule matches ipset {name}, which the node does not have")
        key: list[IPAddr | tuple[str, int]] = []
        for kind, flag in zip(s.components, flags.split(",")):
            if kind == "port" and flag == "src":
                raise TraceError(f"ipset {name}: a source-port match (the walk has no source port)")
            if kind == "port":
                key.append(("" if s.bitmap else pkt.proto, pkt.cur_dport))
            else:
                key.append(ipaddress.ip_address(pkt.src if flag == "src" else pkt.cur_dst))
        return s.has(tuple(key))

    def _filter(self, chain: str, p: Packet) -> tuple[str, Packet]:
        for p2, v in self.rules.run_chain("filter", chain, p):
            if v in ("DROP", "REJECT"):
                return v, p2
        return "ACCEPT", p

    def _masquerade(self, p: Packet) -> bool:
        return any(v == "MASQUERADE" for _, v in self.rules.run_chain("nat", "POSTROUTING", p))

    def paths(self, src: str, dst: str, dport: int, proto: str = "tcp") -> list[Path]:
        from_node = src in self.rules.local_ips
        out: list[Path] = []

        def done(p: Packet, verdict: str, masq: bool = False) -> None:
            out.append(Path(Outcome(verdict, p.dnat, masq), p.probability, p.affinity, p.service, p.hops))

        for p, verdict in self.rules.run_chain("nat", "OUTPUT" if from_node else "PREROUTING",
                                               Packet(src, dst, dport, proto)):
            if verdict in ("DROP", "REJECT"):
                done(p, verdict)
                continue
            local_dst = self.rules._is_local(dst)
            if not from_node and not local_dst:  # routed through the node: IPVS never sees it
                verdict, p = self._filter("FORWARD", p)
                done(p, verdict, verdict == "ACCEPT" and self._masquerade(p))
                continue
            if not from_node:
                verdict, p = self._filter("INPUT", p)
                if verdict != "ACCEPT":
                    done(p, verdict)
                    continue
            found = self.services.get((ipaddress.ip_address(dst), dport, proto))
            if found is None:  # not a virtual server: the node's own socket (or the route) gets it
                if from_node:
                    verdict, p = self._filter("OUTPUT", p)
                    if verdict == "ACCEPT" and local_dst:
                        verdict, p = self._filter("INPUT", p)
                done(p, verdict, verdict == "ACCEPT" and not local_dst and self._masquerade(p))
                continue
            vs, dests = found
            hop = f"ipvs/{vs.protocol} {dst}:{dport} {vs.scheduler}" + (
                f" persistent {vs.timeout}s" if vs.flags & IP_VS_SVC_F_PERSISTENT else "")
            p = replace(p, hops=(*p.hops, hop))
            live = [rs for rs in dests if rs.weight > 0]
            if not live:
                done(p, "REJECT")
                continue
            total = sum(rs.weight for rs in live)
            for rs in live:
                ep = f"[{rs.address}]:{rs.port}" if ":" in rs.address else f"{rs.address}:{rs.port}"
                # Past IPVS the packet is addressed to the real server (what POSTROUTING matches).
                q = replace(p, dst=rs.address, dport=rs.port, probability=p.probability * rs.weight / total)
                if from_node:
                    verdict, q = self._filter("OUTPUT", q)
                    if verdict != "ACCEPT":
                        done(replace(q, dnat=ep), verdict)
                        continue
                masq = self._masquerade(q)
                done(replace(q, dnat=ep), "ACCEPT", masq)
                if vs.flags & IP_VS_SVC_F_PERSISTENT:
                    done(replace(q, dnat=ep, affinity=True), "ACCEPT", masq)
        return out

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp") -> set[Outcome]:
        return {p.outcome for p in self.paths(src, dst, dport, proto)}

"""nftables rendering for one ServicePort: upstream's pkg/proxy/nftables syncProxyRules, per service.

One source for both paths: setup.py compiles this file with Cython (pure-Python mode), and
kproxy.proxiers.nftables loads the compiled module unless KPROXY_PURE=1, in which case it loads
this file as plain Python (tests/nftables compare the two byte for byte).

A ServicePort renders to:
  - chains: (name, rules) with stable names under upstream's prefixes (service-, local-,
    external-, firewall-, endpoint-) followed by an 8-character hash and the readable
    "namespace/name/protocol/port" (upstream's servicePortChainNameBase), each rule as
    statements (kproxy.backends.nftnl.Rule), not text: the encoder turns them into netlink
    expressions without parsing, and writes their text only when it is read (nftnl.rule_text);
    endpoint- chains only for Services with ClientIP affinity. Upstream has one chain per
    endpoint for every Service; here a Service without affinity DNATs in one rule,
    `dnat ip addr . port to numgen random mod N offset O map @endpoints-PROTO-K`, through maps
    shared by many Services where the proxier gives each dispatch chain a block of slots
    (kproxy.proxiers.nftables.Slots, ENDPOINT_MAPS). Replacing an endpoint then changes two
    map elements and no rule: a changed rule (it jumps or DNATs) makes the kernel validate the
    whole table at commit (~55 ms CPU at 10,000 Services), map elements without verdicts do
    not. Not one map per Service: the kernel finds a set by walking the table's list of sets
    (13 s of kernel time for a first sync with 10,000 maps), and an anonymous
    `numgen ... map { }` per Service also costs its naming scan (23 s at 10,000). The hairpin
    masquerade (upstream's per-endpoint `ip saddr EP jump mark-for-masquerade`) is one shared
    rule on the hairpin-ips set of "EP . EP" pairs. Why no chain per endpoint: the kernel's
    chain dump is quadratic in the chains of a table, and 110,000 chains at 10,000 Services x
    10 endpoints cost seconds per transaction through `nft` (bench/README.md, nftables);
    without them it is ~12,000;
  - elements: (map or set, key, value) of the shared verdict maps and sets (service-ips,
    service-nodeports, no-endpoint-services, no-endpoint-nodeports, firewall-ips, cluster-ips,
    hairpin-ips, cluster-ip-ports);
  - balance: (dispatch chain, its endpoints) of the chains without affinity;
  - sets: the dynamic affinity sets (name, timeout seconds), one per endpoint when the Service has
    sessionAffinity ClientIP.
What traffic goes where is kproxy.proxy's decision (service_endpoints); this only writes it down.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, NamedTuple

from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxy import SourceRanges, service_endpoints

if TYPE_CHECKING:
    from kproxy.backends.nftnl import Rule, Stmt

MARK_MASQ_CHAIN = "mark-for-masquerade"
REJECT_CHAIN = "reject-chain"
MASQ_SET = "cluster-ip-ports"
# Statements every Service's rules share.
_JUMP_MASQ = ("jump", MARK_MASQ_CHAIN)
_FIB_LOCAL = ("fib", "saddr")
_RETURN = ("return",)
_DROP = ("drop",)


class Rendered(NamedTuple):
    chains: tuple[tuple[str, tuple[Rule, ...]], ...]
    elements: tuple[tuple[str, str, str], ...]
    sets: tuple[tuple[str, int], ...]
    # (dispatch chain, its endpoints as "IP . PORT") for the chains without affinity: the
    # proxier places them in the shared endpoint map and adds the DNAT rule.
    balance: tuple[tuple[str, tuple[str, ...]], ...] = ()


def chain_base(name: ServicePortName) -> str:
    """HASH-namespace/name/protocol/port: stable across restarts, unique per ServicePort, and
    readable in `nft list` (upstream's servicePortChainNameBase)."""
    readable = f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port}"
    # The first 40 bits of the SHA-256 in base32 (base64.b32encode's first 8 characters, which
    # encodes all 32 bytes in pure Python: 14 us per ServicePort).
    v = int.from_bytes(hashlib.sha256(readable.encode()).digest()[:5], "big")
    return "".join([_B32[(v >> shift) & 31] for shift in (35, 30, 25, 20, 15, 10, 5, 0)]) + "-" + readable


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _endpoint_base(base: str, ep: Endpoint) -> str:
    # An IPv6 address's colons are not allowed in a chain name: dots instead (as upstream).
    return f"{base}__{ep.ip.replace(':', '.')}/{ep.port}"


def _dispatch(eps: tuple[Endpoint, ...], base: str, affinity: bool, ipx: str) -> list[Rule]:
    """The rules sending a new connection to one of `eps`, with ClientIP affinity: a client seen
    within the timeout goes back to the endpoint it had (its address is in that endpoint's
    dynamic set), others through a `numgen random` cascade (rule k takes the connection with
    probability 1/(n-k): uniform) to an endpoint chain that records them. Without affinity
    there is no rule here: the Rendered.balance entry says which endpoints, and the proxier
    adds the one DNAT rule through the shared endpoint map (see the module docstring)."""
    if not affinity:
        return []
    rules: list[Rule] = []
    for ep in eps:
        eb = _endpoint_base(base, ep)
        rules.append((("in", ipx, "saddr", f"affinity-{eb}"), ("goto", f"endpoint-{eb}")))
    n = len(eps)
    for k, ep in enumerate(eps):
        goto: Stmt = ("goto", f"endpoint-{_endpoint_base(base, ep)}")
        rules.append((("numgen", str(n - k), "0"), goto) if k < n - 1 else (goto,))
    return rules


def render_service_port(
    svc: ServicePort,
    eps: tuple[Endpoint, ...],
    masquerade_all: bool,
    cluster_cidr: str,
    node_ips: tuple[str, ...],
    node_zone: str,
    family: str = "IPv4",
) -> Rendered:
    """svc as the rules of the table of `family` (IPv4: `ip kube-proxy`, IPv6: `ip6 kube-proxy`;
    the Service's addresses of the other family are the other table's)."""
    name = svc.name
    v6 = family == "IPv6"
    ipx = "ip6" if v6 else "ip"
    base = chain_base(name)
    proto = svc.protocol.lower()
    port = int(svc.port)
    cluster_ip = svc.cluster_ip("IPv6" if v6 else "IPv4")
    affinity = svc.session_affinity_timeout is not None
    se = service_endpoints(svc, eps, node_zone)
    chains: list[tuple[str, tuple[Rule, ...]]] = []
    elements: list[tuple[str, str, str]] = []
    sets: list[tuple[str, int]] = []

    cluster_chain = f"service-{base}"
    local_chain = f"local-{base}"
    external_chain = f"external-{base}"
    firewall_chain = f"firewall-{base}"
    internal_chain = local_chain if svc.internal_policy_local else cluster_chain
    external_target = local_chain if svc.external_policy_local else cluster_chain
    # Which dispatch chains exist: one per policy that has endpoints to send to.
    dispatch: dict[str, tuple[Endpoint, ...]] = {}
    if se.internal:
        dispatch[internal_chain] = se.internal
    if se.external:
        dispatch[external_target] = se.external
    if se.external_traffic and se.cluster and svc.external_policy_local:
        dispatch[cluster_chain] = se.cluster  # the short-circuit target for pods and the node

    balance: list[tuple[str, tuple[str, ...]]] = []
    for chain in sorted(dispatch):
        rules = _dispatch(dispatch[chain], base, affinity, ipx)
        chains.append((chain, tuple(rules)))
        if not affinity:
            balance.append((chain, tuple(f"{ep.ip} . {int(ep.port)}" for ep in dispatch[chain])))

    # Every endpoint some traffic may reach: hairpin masquerade (a pod reaching itself through
    # the Service) by the shared hairpin-ips set; with affinity, its chain records the client.
    reachable: dict[str, Endpoint] = {}
    for eps_of in dispatch.values():
        for ep in eps_of:
            reachable.setdefault(_endpoint_base(base, ep), ep)
    for eb in sorted(reachable):
        ep = reachable[eb]
        elements.append(("hairpin-ips", f"{ep.ip} . {ep.ip}", ""))
        if affinity:
            sets.append((f"affinity-{eb}", int(svc.session_affinity_timeout or 10800)))
            dest = f"[{ep.ip}]" if v6 else ep.ip
            chains.append((f"endpoint-{eb}", ((("update", ipx, f"affinity-{eb}"),),
                                              (("l4proto", proto), ("dnat", ipx, f"{dest}:{int(ep.port)}")))))

    # Nothing anywhere: refuse (ICMP port unreachable). Endpoints, but none for this traffic:
    # drop, so a client retries elsewhere (upstream's filter verdicts).
    no_eps = f"goto {REJECT_CHAIN}" if not se.has_any else "drop"
    uses_external = se.has_any and se.external_traffic
    if uses_external:
        rules = []
        if not svc.external_policy_local:
            rules.append((_JUMP_MASQ,))
        else:
            if cluster_chain in dispatch:
                if cluster_cidr:
                    rules.append((("match", ipx, "saddr", cluster_cidr), ("goto", cluster_chain)))
                rules.append((_FIB_LOCAL, _JUMP_MASQ))
                rules.append((_FIB_LOCAL, ("goto", cluster_chain)))
        if se.external:
            rules.append((("goto", external_target),))
        chains.append((external_chain, tuple(rules)))

    if cluster_ip is not None:
        key = f"{cluster_ip} . {proto} . {port}"
        elements.append(("cluster-ips", cluster_ip, ""))
        if se.internal:
            elements.append(("service-ips", key, f"goto {internal_chain}"))
            if masquerade_all or cluster_cidr:
                # Upstream's first rule of the internal chain, `ip daddr CLUSTER_IP PROTO dport
                # PORT ip saddr != CLUSTER_CIDR jump mark-for-masquerade`, as this element of the
                # one rule in `services` that looks it up (kproxy.proxiers.nftables, MASQ_SET):
                # the same packets (see there), one element instead of one rule of 10 expressions.
                elements.append((MASQ_SET, key, ""))
        else:
            elements.append(("no-endpoint-services", key, no_eps))
    outside_ips = [ip for ip in (*svc.external_ips, *svc.load_balancer_ips) if (":" in ip) == v6]
    for ip in dict.fromkeys(outside_ips):
        key = f"{ip} . {proto} . {port}"
        if uses_external:
            elements.append(("service-ips", key, f"goto {external_chain}"))
        if not se.external:
            elements.append(("no-endpoint-services", key, no_eps))
    lb_ips = [ip for ip in dict.fromkeys(svc.load_balancer_ips) if (":" in ip) == v6]
    # (parsed only when there are ranges: most Services have none)
    ranges = SourceRanges.parse(svc.load_balancer_source_ranges if lb_ips else ())
    fam_ranges = ranges.cidrs("IPv6" if v6 else "IPv4") if svc.load_balancer_source_ranges and lb_ips else ()
    # Ranges of the other family do not restrict this table (upstream's proxier per family).
    if fam_ranges and lb_ips:
        allowed = list(fam_ranges)
        if ranges.contains_any(node_ips):
            # A hairpinning load balancer keeps its own address as the source (upstream).
            allowed.extend(lb_ips)
        # A cascade, not `ip saddr != { ... }`: an anonymous set per Service is costly to
        # create (see _dispatch) and the ranges are few.
        chains.append((firewall_chain, (*((("match", ipx, "saddr", cidr), _RETURN) for cidr in allowed), (_DROP,))))
        for ip in lb_ips:
            elements.append(("firewall-ips", f"{ip} . {proto} . {port}", f"goto {firewall_chain}"))
    if svc.node_port:
        key = f"{proto} . {int(svc.node_port)}"
        if uses_external:
            elements.append(("service-nodeports", key, f"goto {external_chain}"))
        if not se.external:
            elements.append(("no-endpoint-nodeports", key, no_eps))
    return Rendered(tuple(chains), tuple(elements), tuple(sets), tuple(balance))

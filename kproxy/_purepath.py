# cython: annotation_typing=False
"""The iptables renderer: ONE source, run as Python (this module) and compiled by Cython.

setup.py compiles this file in Cython's pure-Python mode as kproxy._fastpath, with the C types of
kproxy/_fastpath.pxd (typed locals let Cython build the f-strings with PyUnicode_Join and skip
attribute lookups on loop counters; the model records stay Python objects). kproxy.fastpath
imports the compiled module unless KPROXY_PURE=1; imported as kproxy._purepath the same text
runs interpreted. Nothing is kept in step by hand: tests/unit/test_fastpath_twins.py and
tests/iptables/test_iptables_render_twins.py check that both give the same bytes.

The iptables renderer follows upstream's pkg/proxy/iptables/proxier.go syncProxyRules: for one
ServicePort it produces the filter-table rules, the nat dispatch rules (KUBE-SERVICES and
KUBE-NODEPORTS) and the service's own nat chains (KUBE-SVC-/SVL-/EXT-/FW-/SEP-). The proxier
concatenates them; keeping them per service is what lets partial syncs reuse unchanged output.
"""

from __future__ import annotations

import ipaddress
from base64 import b32encode
from hashlib import sha256  # module-level names: one lookup per call on this hot path
from typing import Any

from kproxy.model import Endpoint, ServicePort
from kproxy.proxy.endpoints import categorize

# Upstream: largeClusterEndpointsThreshold; above it the per-endpoint comments are dropped.
LARGE_CLUSTER_ENDPOINTS = 1000
# Indexes into the tuple render_service_port returns (the compiled twin returns the same shape).
R_FILTER, R_DISPATCH, R_CHAINS, R_RULES, R_CHAIN_NAMES, R_HAS_ENDPOINTS = range(6)

# 1/n for the first endpoints: the common sizes never go through the float formatting.
_PROBS: list[str] = [""] + [f"{1.0 / n:.10f}" for n in range(1, 257)]


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """The 16-character suffix of kube-proxy's per-service chain names.

    Stable across restarts and releases because chain names must survive a kproxy upgrade
    without a flush: sha256 over name + protocol, base32, first 16 characters, as upstream.
    """
    digest = sha256((service_port_name + protocol).encode()).digest()
    return b32encode(digest)[:16].decode("ascii")


def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP- name: upstream hashes name + lower-case protocol + "ip:port"."""
    digest = sha256((service_port_name + protocol + endpoint).encode()).digest()
    return "KUBE-SEP-" + b32encode(digest)[:16].decode("ascii")


def probability(n: int) -> str:
    """statistic --probability for the i-th of n remaining endpoints: Go's %0.10f of 1/n."""
    if 0 < n <= 256:
        return _PROBS[n]
    return f"{1.0 / n:.10f}"


def _ep_key(ep: Any) -> str:
    return ep.addr  # type: ignore[no-any-return]


def _source_ranges_contain(ranges: tuple[str, ...], ips: tuple[str, ...]) -> bool:
    for cidr in ranges:
        try:
            net = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError:
            continue
        for ip in ips:
            try:
                if ipaddress.ip_address(ip) in net:
                    return True
            except ValueError:
                continue
    return False


def _service_to_endpoint_rules(
    out: list[str],
    spn: str,
    chain: str,
    eps: list[Any],
    sep_names: dict[str, str],
    affinity: int,
    large: bool,
) -> None:
    """upstream writeServiceToEndpointRules: affinity rcheck rules first, then the random split."""
    n = len(eps)
    if affinity >= 0:
        for ep in eps:
            addr = ep.addr
            sep = sep_names[addr]
            if large:
                out.append(f"-A {chain} -m recent --name {sep} --rcheck --seconds {affinity} --reap -j {sep}\n")
            else:
                out.append(
                    f'-A {chain} -m comment --comment "{spn} -> {addr}" -m recent --name {sep} '
                    f"--rcheck --seconds {affinity} --reap -j {sep}\n"
                )
    for i in range(n):
        addr = eps[i].addr
        sep = sep_names[addr]
        if large:
            head = f"-A {chain}"
        else:
            head = f'-A {chain} -m comment --comment "{spn} -> {addr}"'
        if i < n - 1:
            out.append(f"{head} -m statistic --mode random --probability {probability(n - i)} -j {sep}\n")
        else:
            out.append(f"{head} -j {sep}\n")


def render_service_port(
    svc: ServicePort,
    endpoints: tuple[Endpoint, ...],
    masquerade_all: bool,
    cluster_cidr: str,
    large_cluster: bool,
    node_ips: tuple[str, ...],
    node_zone: str = "",
    ipv6: bool = False,
) -> tuple[str, str, str, str, list[str], bool]:
    """Render one ServicePort of one family (ip6tables when `ipv6`) as upstream's
    syncProxyRules loop body does.

    Returns (filter rules, nat dispatch rules for KUBE-SERVICES/KUBE-NODEPORTS, nat chain
    declarations, nat chain rules, names of the nat chains it owns, has usable endpoints).
    `cluster_cidr` "" means no local-traffic detector (upstream's LocalTrafficDetector no-op);
    it, `node_ips` and `endpoints` are this family's (kproxy.proxiers.meta hands each family's
    proxier its own view). Only this family's Service addresses and source ranges are used, as
    upstream's per-family ServicePort info; the rules are the same text in both families
    (ip6tables' REJECT answers icmp6-port-unreachable by default, as iptables' answers
    icmp-port-unreachable; DNAT to "[ip]:port" through Endpoint.addr).
    """
    spn = str(svc.name)
    proto = svc.protocol.lower()
    vip = svc.cluster_ip("IPv6" if ipv6 else "IPv4")
    port = svc.port
    h = port_proto_hash(spn, proto)
    svc_chain = "KUBE-SVC-" + h
    svl_chain = "KUBE-SVL-" + h
    ext_chain = "KUBE-EXT-" + h
    fw_chain = "KUBE-FW-" + h
    external_ips = [ip for ip in svc.external_ips if (":" in ip) == ipv6]
    lb_ips = [ip for ip in svc.load_balancer_ips if (":" in ip) == ipv6]
    ranges = tuple([c for c in svc.load_balancer_source_ranges if (":" in c) == ipv6])
    node_port = svc.node_port
    externally_accessible = node_port != 0 or len(external_ips) > 0 or len(lb_ips) > 0
    ext_local = svc.external_policy_local and externally_accessible
    int_local = svc.internal_policy_local
    # Which endpoints serve which traffic: kproxy.proxy decides, the same in every mode (its
    # cluster list is empty when the service uses no cluster endpoints, and so is local).
    affinity = -1 if svc.session_affinity_timeout is None else svc.session_affinity_timeout

    eps = sorted(endpoints, key=_ep_key)
    cat = categorize(svc, eps, node_zone)
    cluster_eps = list(cat.cluster)
    local_eps = list(cat.local)
    reachable = list(cat.reachable)
    has_eps = cat.has_any
    if len(reachable) != len(cluster_eps):
        reachable.sort(key=_ep_key)
    uses_cluster_chain = len(cluster_eps) > 0
    uses_local_chain = len(local_eps) > 0

    internal_chain = svc_chain
    has_internal = has_eps
    if int_local:
        internal_chain = svl_chain
        if not local_eps:
            has_internal = False
    external_policy_chain = svc_chain
    has_external = has_eps
    if ext_local:
        external_policy_chain = svl_chain
        if not local_eps:
            has_external = False
    uses_ext_chain = has_eps and externally_accessible
    lb_chain = ext_chain
    uses_fw = has_eps and len(lb_ips) > 0 and len(ranges) > 0
    if uses_fw:
        lb_chain = fw_chain

    int_target = ""
    int_comment = ""
    ext_target = ""
    ext_comment = ""
    if not has_eps:
        int_target = "REJECT"
        int_comment = f'"{spn} has no endpoints"'
        ext_target = "REJECT"
        ext_comment = int_comment
    else:
        if not has_internal:
            int_target = "DROP"
            int_comment = f'"{spn} has no local endpoints"'
        if not has_external:
            ext_target = "DROP"
            ext_comment = f'"{spn} has no local endpoints"'

    filt: list[str] = []
    disp: list[str] = []
    chains: list[str] = []
    rules: list[str] = []
    names: list[str] = []
    match = f"-m {proto} -p {proto}"

    if vip is not None:
        if has_internal:
            disp.append(
                f'-A KUBE-SERVICES -m comment --comment "{spn} cluster IP" {match} -d {vip} --dport {port}'
                f" -j {internal_chain}\n"
            )
        else:
            filt.append(
                f"-A KUBE-SERVICES -m comment --comment {int_comment} {match} -d {vip} --dport {port}"
                f" -j {int_target}\n"
            )
    for ip in external_ips:
        if has_eps:
            disp.append(
                f'-A KUBE-SERVICES -m comment --comment "{spn} external IP" {match} -d {ip} --dport {port}'
                f" -j {ext_chain}\n"
            )
        if not has_external:
            filt.append(
                f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {ext_comment} {match} -d {ip} --dport {port}"
                f" -j {ext_target}\n"
            )
    for ip in lb_ips:
        if has_eps:
            disp.append(
                f'-A KUBE-SERVICES -m comment --comment "{spn} loadbalancer IP" {match} -d {ip} --dport {port}'
                f" -j {lb_chain}\n"
            )
        if uses_fw:
            filt.append(
                f'-A KUBE-PROXY-FIREWALL -m comment --comment "{spn} traffic not accepted by {fw_chain}"'
                f" {match} -d {ip} --dport {port} -j DROP\n"
            )
    if not has_external:
        for ip in lb_ips:
            filt.append(
                f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {ext_comment} {match} -d {ip} --dport {port}"
                f" -j {ext_target}\n"
            )
    if node_port != 0:
        if has_eps:
            disp.append(
                f"-A KUBE-NODEPORTS -m comment --comment {spn} {match} --dport {node_port} -j {ext_chain}\n"
            )
        if not has_external:
            filt.append(
                f"-A KUBE-EXTERNAL-SERVICES -m comment --comment {ext_comment} -m addrtype --dst-type LOCAL"
                f" {match} --dport {node_port} -j {ext_target}\n"
            )
    if svc.health_check_node_port != 0:
        filt.append(
            f'-A KUBE-NODEPORTS -m comment --comment "{spn} health check node port" -m tcp -p tcp'
            f" --dport {svc.health_check_node_port} -j ACCEPT\n"
        )

    if has_internal and vip is not None:
        head = f'-A {internal_chain} -m comment --comment "{spn} cluster IP" {match} -d {vip} --dport {port}'
        if masquerade_all:
            rules.append(f"{head} -j KUBE-MARK-MASQ\n")
        elif cluster_cidr:
            rules.append(f"{head} ! -s {cluster_cidr} -j KUBE-MARK-MASQ\n")

    if uses_ext_chain:
        chains.append(f":{ext_chain} - [0:0]\n")
        names.append(ext_chain)
        if not ext_local:
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade traffic for {spn} external destinations"'
                " -j KUBE-MARK-MASQ\n"
            )
        else:
            if cluster_cidr:
                rules.append(
                    f'-A {ext_chain} -m comment --comment "pod traffic for {spn} external destinations"'
                    f" -s {cluster_cidr} -j {svc_chain}\n"
                )
            rules.append(
                f'-A {ext_chain} -m comment --comment "masquerade LOCAL traffic for {spn} external destinations"'
                " -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n"
            )
            rules.append(
                f'-A {ext_chain} -m comment --comment "route LOCAL traffic for {spn} external destinations"'
                f" -m addrtype --src-type LOCAL -j {svc_chain}\n"
            )
        if has_external:
            rules.append(f"-A {ext_chain} -j {external_policy_chain}\n")

    if uses_fw:
        chains.append(f":{fw_chain} - [0:0]\n")
        names.append(fw_chain)
        fw_head = f'-A {fw_chain} -m comment --comment "{spn} loadbalancer IP"'
        for cidr in ranges:
            rules.append(f"{fw_head} -s {cidr.strip()} -j {ext_chain}\n")
        if _source_ranges_contain(ranges, node_ips):
            for ip in lb_ips:
                rules.append(f"{fw_head} -s {ip} -j {ext_chain}\n")
        rules.append(
            f'-A {fw_chain} -m comment --comment "other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"\n'
        )

    sep_names: dict[str, str] = {}
    for ep in reachable:
        addr = ep.addr
        sep_names[addr] = endpoint_chain_name(spn, proto, addr)
    if uses_cluster_chain:
        chains.append(f":{svc_chain} - [0:0]\n")
        names.append(svc_chain)
        _service_to_endpoint_rules(rules, spn, svc_chain, cluster_eps, sep_names, affinity, large_cluster)
    if uses_local_chain:
        chains.append(f":{svl_chain} - [0:0]\n")
        names.append(svl_chain)
        _service_to_endpoint_rules(rules, spn, svl_chain, local_eps, sep_names, affinity, large_cluster)

    for ep in reachable:
        addr = ep.addr
        sep = sep_names[addr]
        chains.append(f":{sep} - [0:0]\n")
        names.append(sep)
        if large_cluster:
            head = f"-A {sep}"
        else:
            head = f"-A {sep} -m comment --comment {spn}"
        rules.append(f"{head} -s {ep.ip} -j KUBE-MARK-MASQ\n")
        if affinity >= 0:
            rules.append(f"{head} -m recent --name {sep} --set {match} -j DNAT --to-destination {addr}\n")
        else:
            rules.append(f"{head} {match} -j DNAT --to-destination {addr}\n")

    return "".join(filt), "".join(disp), "".join(chains), "".join(rules), names, has_eps

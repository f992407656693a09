# cython: language_level=3
"""Compiled hot paths of kproxy. Every function has a twin in kproxy/_purepath.py.

The iptables renderer here must produce byte-identical output to _purepath.render_service_port;
tests/iptables/test_iptables_render_twins.py checks it over fixed and randomized services.
Typing the locals lets Cython build the f-strings with PyUnicode_Join and skip attribute lookups
on the loop counters; the model records stay Python objects (msgspec Structs).
"""
from hashlib import sha256
from base64 import b32encode
import ipaddress

from kproxy.proxy.endpoints import categorize

LARGE_CLUSTER_ENDPOINTS = 1000
R_FILTER, R_DISPATCH, R_CHAINS, R_RULES, R_CHAIN_NAMES, R_HAS_ENDPOINTS = range(6)

# 1/n for the first endpoints: the common sizes never go through the float formatting.
cdef list _PROBS = [""] + [f"{1.0 / n:.10f}" for n in range(1, 257)]


cpdef str port_proto_hash(str service_port_name, str protocol):
    cdef bytes digest = sha256((service_port_name + protocol).encode()).digest()
    return b32encode(digest)[:16].decode("ascii")


cpdef str endpoint_chain_name(str service_port_name, str protocol, str endpoint):
    cdef bytes digest = sha256((service_port_name + protocol + endpoint).encode()).digest()
    return "KUBE-SEP-" + b32encode(digest)[:16].decode("ascii")


cpdef str probability(long n):
    if 0 < n <= 256:
        return <str>_PROBS[n]
    return f"{1.0 / n:.10f}"


def _ep_key(ep):
    return ep.addr


cdef bint _source_ranges_contain(tuple ranges, tuple ips):
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


cdef void _service_to_endpoint_rules(list out, str spn, str chain, list eps, dict sep_names,
                                     long affinity, bint large):
    cdef Py_ssize_t n = len(eps)
    cdef Py_ssize_t i
    cdef str sep, head, addr
    if affinity >= 0:
        for ep in eps:
            addr = ep.addr
            sep = <str>sep_names[addr]
            if large:
                out.append(f"-A {chain} -m recent --name {sep} --rcheck --seconds {affinity} --reap -j {sep}\n")
            else:
                out.append(
                    f'-A {chain} -m comment --comment "{spn} -> {addr}" -m recent --name {sep} '
                    f"--rcheck --seconds {affinity} --reap -j {sep}\n"
                )
    for i in range(n):
        addr = eps[i].addr
        sep = <str>sep_names[addr]
        if large:
            head = f"-A {chain}"
        else:
            head = f'-A {chain} -m comment --comment "{spn} -> {addr}"'
        if i < n - 1:
            out.append(f"{head} -m statistic --mode random --probability {probability(n - i)} -j {sep}\n")
        else:
            out.append(f"{head} -j {sep}\n")


cpdef tuple render_service_port(object svc, tuple endpoints, bint masquerade_all, str cluster_cidr,
                                bint large_cluster, tuple node_ips, str node_zone=""):
    cdef str spn = str(svc.name)
    cdef str proto = svc.protocol.lower()
    cdef object vip = svc.cluster_ip("IPv4")
    cdef long port = svc.port
    cdef str h = port_proto_hash(spn, proto)
    cdef str svc_chain = "KUBE-SVC-" + h
    cdef str svl_chain = "KUBE-SVL-" + h
    cdef str ext_chain = "KUBE-EXT-" + h
    cdef str fw_chain = "KUBE-FW-" + h
    cdef list external_ips = [ip for ip in svc.external_ips if ":" not in ip]
    cdef list lb_ips = [ip for ip in svc.load_balancer_ips if ":" not in ip]
    cdef long node_port = svc.node_port
    cdef bint externally_accessible = node_port != 0 or len(external_ips) > 0 or len(lb_ips) > 0
    cdef bint ext_local = svc.external_policy_local and externally_accessible
    cdef bint int_local = svc.internal_policy_local
    # Which endpoints serve which traffic: kproxy.proxy decides, the same in every mode (its
    # cluster list is empty when the service uses no cluster endpoints, and so is local).
    cdef long affinity = -1 if svc.session_affinity_timeout is None else svc.session_affinity_timeout
    cdef list eps = sorted(endpoints, key=_ep_key)
    cat = categorize(svc, eps, node_zone)
    cdef list cluster_eps = list(cat.cluster)
    cdef list local_eps = list(cat.local)
    cdef list reachable = list(cat.reachable)
    cdef bint has_eps = cat.has_any
    if len(reachable) != len(cluster_eps):
        reachable.sort(key=_ep_key)
    cdef bint uses_cluster_chain = len(cluster_eps) > 0
    cdef bint uses_local_chain = len(local_eps) > 0

    cdef str internal_chain = svc_chain
    cdef bint has_internal = has_eps
    if int_local:
        internal_chain = svl_chain
        if not local_eps:
            has_internal = False
    cdef str external_policy_chain = svc_chain
    cdef bint has_external = has_eps
    if ext_local:
        external_policy_chain = svl_chain
        if not local_eps:
            has_external = False
    cdef bint uses_ext_chain = has_eps and externally_accessible
    cdef str lb_chain = ext_chain
    cdef bint uses_fw = has_eps and len(lb_ips) > 0 and len(svc.load_balancer_source_ranges) > 0
    if uses_fw:
        lb_chain = fw_chain

    cdef str int_target = ""
    cdef str int_comment = ""
    cdef str ext_target = ""
    cdef str ext_comment = ""
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

    cdef list filt = []
    cdef list disp = []
    cdef list chains = []
    cdef list rules = []
    cdef list names = []
    cdef str match = f"-m {proto} -p {proto}"
    cdef str head, sep, addr, fw_head
    cdef dict sep_names

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
            disp.append(f"-A KUBE-NODEPORTS -m comment --comment {spn} {match} --dport {node_port} -j {ext_chain}\n")
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
        for cidr in svc.load_balancer_source_ranges:
            rules.append(f"{fw_head} -s {cidr.strip()} -j {ext_chain}\n")
        if _source_ranges_contain(tuple(svc.load_balancer_source_ranges), node_ips):
            for ip in lb_ips:
                rules.append(f"{fw_head} -s {ip} -j {ext_chain}\n")
        rules.append(
            f'-A {fw_chain} -m comment --comment "other traffic to {spn} will be dropped by KUBE-PROXY-FIREWALL"\n'
        )

    sep_names = {}
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
        sep = <str>sep_names[addr]
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

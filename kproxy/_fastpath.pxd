# C types for kproxy/_purepath.py, the one renderer source, when setup.py compiles it as
# kproxy._fastpath (Cython finds this file by the module's name). Only types live here: the
# code is _purepath.py's, so there is nothing to keep in step but these signatures.
# (_purepath.py turns annotation_typing off: its annotations are for mypy, these are for C.)
cimport cython

cdef list _PROBS

cpdef str port_proto_hash(str service_port_name, str protocol)
cpdef str endpoint_chain_name(str service_port_name, str protocol, str endpoint)
cpdef str probability(long n)
cdef bint _source_ranges_contain(tuple ranges, tuple ips)

@cython.locals(n=Py_ssize_t, i=Py_ssize_t, sep=str, head=str, addr=str)
cdef void _service_to_endpoint_rules(list out, str spn, str chain, list eps, dict sep_names,
                                     long affinity, bint large)

@cython.locals(spn=str, proto=str, port=long, h=str, svc_chain=str, svl_chain=str, ext_chain=str,
               fw_chain=str, external_ips=list, lb_ips=list, node_port=long,
               externally_accessible=bint, ext_local=bint, int_local=bint, affinity=long, eps=list,
               cluster_eps=list, local_eps=list, reachable=list, has_eps=bint,
               uses_cluster_chain=bint, uses_local_chain=bint, internal_chain=str,
               has_internal=bint, external_policy_chain=str, has_external=bint,
               uses_ext_chain=bint, lb_chain=str, uses_fw=bint, int_target=str, int_comment=str,
               ext_target=str, ext_comment=str, filt=list, disp=list, chains=list, rules=list,
               names=list, match=str, head=str, sep=str, addr=str, fw_head=str, sep_names=dict,
               ranges=tuple)
cpdef tuple render_service_port(object svc, tuple endpoints, bint masquerade_all, str cluster_cidr,
                                bint large_cluster, tuple node_ips, str node_zone=*, bint ipv6=*)

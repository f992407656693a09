"""IP protocol numbers (IANA, as in /etc/protocols) by the lowercase names nft and ipset use: the
one table for every kernel encoder (kproxy.backends.nftnl, kproxy.backends.ipset) and the
nftables tracer (kproxy.trace.nftables)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Final

# The protocols a Service port can have (Kubernetes' TCP, UDP, SCTP).
SERVICE_PROTOCOLS: Final = MappingProxyType({"tcp": 6, "udp": 17, "sctp": 132})
# ... and the ones a packet the tracer follows may carry besides.
IP_PROTOCOLS: Final = MappingProxyType({**SERVICE_PROTOCOLS, "icmp": 1, "icmpv6": 58})

"""The nftables proxier: upstream's pkg/proxy/nftables (1.33) on kproxy.proxy's Service semantics.

One proxier per IP family (kproxy.proxiers.meta, as upstream's metaproxier): the IPv4 one owns the
table `ip kube-proxy`, the IPv6 one `ip6 kube-proxy` (the same chains, maps and sets with
ipv6_addr keys, `ip6 daddr`/`ip6 saddr` matches, ICMPv6 rejects, no NodePorts on ::1), and each
touches nothing outside its table: other tables (firewalld, iptables-nft's `ip filter`/`ip nat`)
keep their rules. Base chains sit at upstream's hooks and
priorities: the filter chains at dstnat-10 (they see the destination before DNAT), NAT at dstnat
and srcnat. Dispatch is O(1) per packet: `ip daddr . meta l4proto . th dport vmap @service-ips`
and `meta l4proto . th dport vmap @service-nodeports`; no-endpoint-services / no-endpoint-nodeports
reject or drop; firewall-ips sends LoadBalancer traffic through a source-range check; cluster-ips
rejects other ports of a ClusterIP, and an address of the service CIDRs that no Service has is
dropped (set_service_cidrs). Per-ServicePort chains (service-, local-, external-, firewall-,
endpoint-) are rendered by kproxy._nftpath; each dispatch chain DNATs through its block of a
shared endpoint map (Slots, ENDPOINT_MAPS), so an endpoint change is map elements only.

Syncs, as upstream, each ONE transaction, sent as an nfnetlink batch encoded by
kproxy.backends.nftnl (no `nft` process: bench/README.md, nftables, says why): the first sync
(and one after a refused full sync) replaces the whole table (`delete table` and the new table
in the same batch: atomic); the periodic full resync flushes and refills every chain and map of
the table, keeping the table and its affinity sets (upstream keeps them too); a partial sync
sends only the changes of the changed ServicePorts: new chains, changed chains flushed and
refilled, map and set elements deleted and added (elements shared by several ServicePorts, such
as a Service's ClusterIP in cluster-ips, are reference-counted), chains no longer used flushed at
once and deleted after a grace period. A partial sync's work is proportional to the changed
ServicePorts. A failed transaction changes nothing in the kernel and makes the next sync full.

The service CIDRs come from the ServiceCIDR objects (kproxy/servicecidrs.py, through
MetaProxier.set_service_cidrs, never during a sync).
"""
from __future__ import annotations

import gc
import hashlib
import ipaddress
import itertools
import logging
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple, Protocol

from kproxy._nftpath import MASQ_SET, Rendered
from kproxy.backends.conntrack import Conntrack
from kproxy.backends.nftables import Nft, NftError, nftnl
from kproxy.backends.nftnl import Rule
from kproxy.config import KProxyConfig
from kproxy.fastpath import pure_twin, want_pure
from kproxy.healthcheck import ServiceHealthServer
from kproxy.memtrim import release_free_memory
from kproxy.model import IP, Endpoint, EndpointsMap, IPFamily, Port, ServicePort, ServicePortMap, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import new_proxier_for_families
from kproxy.proxiers.udpstale import clean_udp_conntrack
from kproxy.proxy import HealthChecks, categorize
from kproxy.proxy.exposure import check_masquerade_bit, node_addresses

if TYPE_CHECKING:
    from kproxy.proxiers.nftelements import Element, SharedRefs, is_shared, pack, pack_counting, slot_key, unpack, unpack_set
else:  # compiled by Cython from its source, or that source as Python (KPROXY_PURE=1)
    from kproxy.proxiers import nftelements as _compiled_elements

    _elements = pure_twin(_compiled_elements) if want_pure() else _compiled_elements
    Element, SharedRefs, is_shared = _elements.Element, _elements.SharedRefs, _elements.is_shared
    pack, pack_counting, slot_key = _elements.pack, _elements.pack_counting, _elements.slot_key
    unpack, unpack_set = _elements.unpack, _elements.unpack_set

log = logging.getLogger(__name__)

NFT_FAMILIES: dict[IPFamily, str] = {"IPv4": "ip", "IPv6": "ip6"}
TABLE = "kube-proxy"
KEEP_TRANSACTION_BYTES = 1 << 20
STALE_CHAIN_GRACE = 1.0  # seconds a flushed chain stays before it is deleted (upstream: 1 s)


class Renderer(Protocol):
    def render_service_port(
        self, svc: ServicePort, eps: tuple[Endpoint, ...], masquerade_all: bool, cluster_cidr: str,
        node_ips: tuple[str, ...], node_zone: str, family: str = ...,
    ) -> Rendered: ...


def load_renderer(pure: bool | None = None) -> ModuleType:
    """The compiled renderer, or with KPROXY_PURE=1 (or pure=True) the same source as Python."""
    import kproxy._nftpath as compiled

    return pure_twin(compiled) if (want_pure() if pure is None else pure) else compiled


# The fixed sets and maps declared with a size (NFTA_SET_DESC_SIZE), from the elements they hold
# when declared. Why: without one the kernel starts an rhashtable at 4 buckets, and a first sync
# grows it through every doubling while inserting (most inserts on the slow path while a resize
# is pending): at 10,000 Services x 10 endpoints a size cut the first sync's kernel time by
# ~0.15 s (bench/README.md, nftables). A size is also a hard cap (the kernel refuses an element
# beyond it, ENFILE, and a declared set cannot be resized), so: room for half as many again,
# counted per set across syncs; a sync that would outgrow one is a full one (the table kept)
# that deletes it and declares it bigger, with the rules that look it up (SET_RULE_CHAINS)
# flushed and written again in the same transaction. Not the endpoint maps: 512 small ones whose
# contents move between them with every endpoint change.
SIZED = frozenset({"cluster-ips", "hairpin-ips", MASQ_SET, "service-ips", "service-nodeports",
                   "no-endpoint-services", "no-endpoint-nodeports", "firewall-ips"})
MIN_CAPACITY = 1024  # a fixed hash of 1024 has 2048 buckets: 16 KiB of kernel memory
CAPACITY_STEP = 1024
# The chains whose rules look up the fixed sets and maps (_set_rules writes all of them).
SET_RULE_CHAINS = ("masquerading", "services", "service-endpoints-check", "nodeport-endpoints-check",
                   "firewall-check", "cluster-ips-check")


def capacity(n: int) -> int:
    """The size to declare for a set of n elements: n and half as many again, in steps."""
    return max(MIN_CAPACITY, -(-(n + n // 2) // CAPACITY_STEP) * CAPACITY_STEP)


def needs_resize(n: int, declared: int | None) -> bool:
    """Over its size, or far under it (its fixed hash's buckets are kernel memory)."""
    return declared is not None and (n > declared or (declared > MIN_CAPACITY and capacity(n) * 2 < declared))


# (name, hook, priority) as upstream's nftablesBaseChains: dstnat-10, dstnat+10, dstnat, srcnat as
# numbers (nft 1.0.6 accepts the names only on the hooks where NAT happens).
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", "-110"),
    ("filter-input", "filter", "input", "-110"),
    ("filter-forward", "filter", "forward", "-110"),
    ("filter-output", "filter", "output", "-110"),
    ("filter-output-post-dnat", "filter", "output", "-90"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
)
# (chain, jumped to from, condition) as upstream's nftablesJumpChains.
JUMPS = (
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting", "ct state new"),
    ("firewall-check", "filter-output", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output-post-dnat", "ct state new"),
)
SETS = ("cluster-ips", "hairpin-ips", "nodeport-ips", MASQ_SET)
# Endpoint maps per protocol: numgen's slot -> address . port (Slots), each dispatch chain in one
# of them by a hash of its name. Why several: the kernel checks each data element of a map
# against every lookup bound to the map, when either is added (elements x lookups: 13 s of
# kernel time for one shared map at 10,000 Services); with N maps that is divided by N, while
# every set lookup by name walks the table's sets (the cost of one map per Service). The check
# runs when a DNAT rule binds its map (nf_tables_bind_set walks the map's elements): at 10,000
# Services 512 maps cut a first sync's kernel time from ~1.5 s (128 maps) to ~1.1 s; 1,024 and
# 2,048 were no better (the set-name walk grows), bench/README.md, nftables.
ENDPOINT_MAPS = 512


def endpoint_map(proto: str, chain: str) -> str:
    return f"endpoints-{proto}-{zlib.crc32(chain.encode()) % ENDPOINT_MAPS}"


def _map_line(t: str, name: str) -> str:
    # nft wants the protocol in the declaration, as the DNAT rules using the map match it; t is
    # "FAMILY TABLE", and the family's address match is `ip daddr` or `ip6 daddr`.
    proto = name.split("-")[1]
    return f"add map {t} {name} {{ typeof numgen random mod 1 : {t.split()[0]} daddr . {proto} dport ; }}\n"
# ADDR: the family's address type (ipv4_addr, ipv6_addr), as upstream's ipvX_addr.
MAPS = (
    ("service-ips", "ADDR . inet_proto . inet_service : verdict", "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    ("service-nodeports", "inet_proto . inet_service : verdict", "NodePort traffic"),
    ("no-endpoint-services", "ADDR . inet_proto . inet_service : verdict", "vmap to drop or reject packets to services with no endpoints"),
    ("no-endpoint-nodeports", "inet_proto . inet_service : verdict", "vmap to drop or reject packets to service nodeports with no endpoints"),
    ("firewall-ips", "ADDR . inet_proto . inet_service : verdict", "destinations that are subject to LoadBalancerSourceRanges"),
)
_MAP_NAMES = frozenset(name for name, _, _ in MAPS)


class Slots:
    """Blocks of slot numbers in the endpoint maps, one per dispatch chain: a power-of-two
    size, so a Service growing within its block keeps it; given-back blocks are reused. A
    failed transaction leaves this out of step with the kernel, which is fine: the next sync
    is full and starts anew."""

    LIMIT = 1 << 31

    def __init__(self) -> None:
        self._next = 0
        self._free: dict[int, list[int]] = {}

    def take(self, n: int) -> tuple[int, int]:
        size = 1 << max(0, (n - 1).bit_length())
        free = self._free.get(size)
        if free:
            return free.pop(), size
        offset, self._next = self._next, self._next + size
        if self._next > self.LIMIT:
            raise OverflowError("endpoint map slots exhausted")
        return offset, size

    def give_back(self, offset: int, size: int) -> None:
        self._free.setdefault(size, []).append(offset)


DIGEST = 16  # 128 bits: a collision (a changed chain taken as unchanged) is out of reach
# Not frozenset() per ServicePort: since Python 3.10 every empty frozenset is its own object.
_NONE_SERVING: frozenset[tuple[IP, Port]] = frozenset()


def _pack_programmed(chain_names: Iterable[str], digests: bytes, slots: dict[str, tuple[int, int]],
                     elements: str) -> str:
    """A ServicePort's chains, their digests, its endpoint-map blocks and its packed elements as
    one string: "CHAIN\tCHAIN\x1eCHAIN\tOFFSET\tSIZE;...\x1eDIGESTS IN HEX\x1eELEMENTS". Why one:
    small objects kept per ServicePort (a tuple of names, a bytes, tuples of blocks) were made
    between a full sync's short-lived ones and kept the interpreter's small-object pools they
    share from being freed (at 10,000 Services ~14 MiB of free blocks that RSS kept); one string of
    ~700 bytes is one allocation outside those pools. Chain names are Kubernetes names with a
    prefix: no tab, ';' or \x1e."""
    blocks = ";".join(f"{c}\t{o}\t{n}" for c, (o, n) in slots.items())
    return "\t".join(chain_names) + "\x1e" + blocks + "\x1e" + digests.hex() + "\x1e" + elements


@dataclass(slots=True)
class _Programmed:
    """What the kernel holds for one ServicePort after the last successful sync."""

    svc: ServicePort
    # its chains, their digests (DIGEST bytes each: all a later sync needs is "did it change";
    # the text, ~20 MiB at 10,000 Services, is written from the fresh render and dropped), its
    # endpoint-map blocks and its map and set elements (kproxy.proxiers.nftelements), packed
    data: str
    rules: int  # the rule count of its chains
    sets: tuple[tuple[str, int], ...]
    serving: frozenset[tuple[IP, Port]] = _NONE_SERVING  # UDP only: endpoints DNATed to, for conntrack

    @property
    def chain_names(self) -> list[str]:
        names = self.data[:self.data.index("\x1e")]
        return names.split("\t") if names else []

    @property
    def slots(self) -> list[tuple[str, int, int]]:
        """(dispatch chain, its block in the endpoint map: offset, size)"""
        blocks = self.data.split("\x1e", 2)[1]
        out = []
        for block in blocks.split(";") if blocks else ():
            chain, offset, size = block.split("\t")
            out.append((chain, int(offset), int(size)))
        return out

    @property
    def elements(self) -> str:
        return self.data.split("\x1e", 3)[3]

    @property
    def chains(self) -> dict[str, bytes]:
        """chain -> the digest of its rules."""
        digests = bytes.fromhex(self.data.split("\x1e", 3)[2])
        return {c: digests[i * DIGEST:(i + 1) * DIGEST] for i, c in enumerate(self.chain_names)}

    def slot_map(self) -> dict[str, tuple[int, int]]:
        return {chain: (offset, size) for chain, offset, size in self.slots}


def _rule_count(p: _Programmed | None) -> int:
    return 0 if p is None else p.rules


def _digest(rules: tuple[Rule, ...]) -> bytes:
    # Of the statements' repr: one string for the whole chain, unambiguous (quoted strings in tuples).
    return hashlib.blake2b(repr(rules).encode(), digest_size=DIGEST).digest()


def _eligible(svc: ServicePort | None, family: IPFamily) -> bool:
    # Headless and ExternalName services are not proxied; one table per family.
    return svc is not None and svc.type != "ExternalName" and svc.cluster_ip(family) is not None


def _rule_lines(t: str, chain: str, rules: tuple[Rule, ...]) -> list[str]:
    return [f"add rule {t} {chain} {nftnl.rule_text(rule)}\n" for rule in rules]


def _element(t: str, e: Element) -> str:
    body = f"{e[1]} : {e[2]}" if e[2] else e[1]
    return f"element {t} {e[0]} {{ {body} }}\n"


class _Elements:
    """Elements made while they are read (a full sync's, from the packed bookkeeping: the
    tuples of all 200,000 never exist at once), as often as they are read, with their count."""

    def __init__(self, make: Callable[[], Iterable[Element]], n: int) -> None:
        self._make, self._n = make, n

    def __iter__(self) -> Iterator[Element]:
        return iter(self._make())

    def __len__(self) -> int:
        return self._n


class _Placed(NamedTuple):
    """One ServicePort rendered and placed in the endpoint maps: what its transaction needs."""

    svc: ServicePort
    eps: tuple[Endpoint, ...]
    chains: dict[str, tuple[Rule, ...]]  # chain -> its rules as statements (the DNAT rules added)
    elements: tuple[Element, ...]  # the renderer's (the endpoint maps' are in blocks)
    blocks: tuple[tuple[str, int, tuple[str, ...]], ...]  # (endpoint map, first slot, its targets)
    slots: dict[str, tuple[int, int]]  # dispatch chain -> its block: offset, size
    sets: tuple[tuple[str, int], ...]

    def endpoint_elements(self) -> Iterator[Element]:
        for emap, offset, targets in self.blocks:
            for k, target in enumerate(targets):
                yield emap, slot_key(offset + k), target


class _Fresh(NamedTuple):
    """One ServicePort just rendered: what is kept, its chains' text, its elements (deduplicated)."""

    programmed: _Programmed
    chains: dict[str, tuple[Rule, ...]]  # chain -> its rules as statements
    elements: list[Element]


@dataclass(slots=True)
class Script:
    """A full sync's nft script whose element lines (200,000 at 10,000 Services, ~35 MiB as
    strings) are written while it is read: the netlink encoder turns each into bytes as it
    comes, so the whole text never exists at once. It can be read more than once (the `nft -f`
    fallback, the copy kept for logs); `chars` is the text's length once read through."""

    t: str  # "FAMILY TABLE"
    head: list[str]
    chains: list[str]  # the chains to add, after the head
    first_elements: _Elements  # the endpoint maps' elements, first of the elements (after the rules)
    rules: list[tuple[str, tuple[Rule, ...]]]  # (chain, its rules as statements)
    elements: _Elements
    chars: int = 0

    def parts(self) -> Iterator[nftnl.Part]:
        """The lines, the new chains as (chain,), the rules as (chain, rules) and the elements as
        runs of (set, key, value) for the netlink encoder to take without their text
        (kproxy.backends.nftnl.Parts): the same bytes, less work."""
        yield from self.head
        yield from zip(self.chains)
        yield from self.rules
        yield nftnl.ElementRun(self.first_elements)
        yield nftnl.ElementRun(self.elements)

    def __iter__(self) -> Iterator[str]:
        t, n = self.t, 0
        for line in self.head:
            n += len(line)
            yield line
        for chain in self.chains:
            line = f"add chain {t} {chain}\n"
            n += len(line)
            yield line
        for chain, rules in self.rules:
            for line in _rule_lines(t, chain, rules):
                n += len(line)
                yield line
        for part in (self.first_elements, self.elements):
            for e in part:
                line = "add " + _element(t, e)
                n += len(line)
                yield line
        self.chars = n

    def text_if_within(self, limit: int) -> str:
        """The whole text when it is at most `limit` characters, else "" (told by the line
        count before anything is written when it is far over: every line has 16 or more)."""
        lines = (len(self.head) + len(self.chains) + len(self.first_elements) + sum(len(rules) for _, rules in self.rules)
                 + len(self.elements))
        if lines * 16 > limit:
            return ""
        text = "".join(self)
        return text if len(text) <= limit else ""


class NftablesProxier(Proxier):
    mode = "nftables"

    def __init__(
        self,
        nft: Nft,
        *,
        cluster_cidr: str = "",
        nodeport_addresses: tuple[str, ...] = (),
        masquerade_all: bool = False,
        masquerade_bit: int = 14,
        conntrack: Conntrack | None = None,
        health_server: ServiceHealthServer | None = None,
        renderer: Renderer | None = None,
        node_ips: tuple[str, ...] = (),
        node_zone: str = "",
        table: str = TABLE,
        service_cidrs: tuple[str, ...] = (),
        family: IPFamily = "IPv4",
    ) -> None:
        check_masquerade_bit(masquerade_bit)
        if family not in NFT_FAMILIES:
            raise ValueError(f"nftables proxier: IP family {family!r}")
        addrs = node_addresses(nodeport_addresses, node_ips, cluster_cidr, log, family)
        self.nft = nft
        self.table = table
        self.family: IPFamily = family
        self.ipx = NFT_FAMILIES[family]  # "ip" or "ip6": the table's family and its address matches
        self.addr_type = "ipv6_addr" if family == "IPv6" else "ipv4_addr"
        self._t = f"{self.ipx} {table}"
        self.cluster_cidr = addrs.cluster_cidr
        self.nodeport_addresses = addrs.nodeport_cidrs
        self.masquerade_all = masquerade_all
        self.mark = f"0x{1 << masquerade_bit:08x}"
        self.conntrack = conntrack
        self.health_server = health_server
        self._health = HealthChecks()  # the Services with a health check, kept across syncs
        self.render: Renderer = renderer or load_renderer()
        self.node_zone = node_zone
        self.service_cidrs: tuple[str, ...] = ()
        self._config_node_ips = addrs.node_ips
        self._node_ips: tuple[str, ...] = addrs.node_ips
        self._programmed: dict[ServicePortName, _Programmed] = {}
        self._refs = SharedRefs()  # shared element -> ServicePorts that want it
        self._stale: dict[str, float] = {}  # chain or "set NAME" flushed, waiting for deletion -> when
        self._need_full = True
        self._table_known = False  # the kernel's table is what _programmed says (a full sync wrote it)
        self._rules = 0
        self._slots: dict[str, Slots] = {}  # endpoint map -> its blocks
        self._maps: set[str] = set()  # the endpoint maps in the kernel
        self._pending_maps: set[str] = set()  # ... once the transaction being made is applied
        self._capacity: dict[str, int] = {}  # SIZED set -> its declared size in the kernel
        self._counts: Counter[str] = Counter()  # SIZED set -> its elements in the kernel
        self._pending_capacity: dict[str, int] = {}  # ... once the transaction being made is applied
        self._pending_counts: Counter[str] = Counter()
        self.stale_grace = STALE_CHAIN_GRACE
        self.last_transaction = ""
        self.keep_transaction_bytes = KEEP_TRANSACTION_BYTES
        self.last_stats: dict[str, float] = {}
        self.set_service_cidrs(service_cidrs)

    # ---- rendering ----

    def _nodeport_ips(self) -> list[str]:
        nets = [ipaddress.ip_network(c, strict=False) for c in self.nodeport_addresses]
        return [ip for ip in self._node_ips if any(ipaddress.ip_address(ip) in n for n in nets)]

    def _skeleton(self, sizes: dict[str, int]) -> list[str]:
        """The table's fixed part: base chains, jumps, shared chains, maps and sets (`sizes`: the
        declared size of each of SIZED)."""
        t = self._t
        out = [f'add table {t} {{ comment "rules for kube-proxy" ; }}\n']
        for name, kind, hook, prio in BASE_CHAINS:
            out.append(f"add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}\n")
        for name in ("services", "service-endpoints-check", "nodeport-endpoints-check", "firewall-check",
                     "masquerading", "mark-for-masquerade", "cluster-ips-check", "reject-chain"):
            out.append(f"add chain {t} {name}\n")
        for dst, src, cond in JUMPS:
            out.append(f"add rule {t} {src} {cond + ' ' if cond else ''}jump {dst}\n")
        # Upstream drops INVALID forwarded packets (kubernetes#74839) unless tcp_be_liberal is set.
        out.append(f"add rule {t} filter-forward ct state invalid drop\n")
        out.extend(self._declarations(sizes, ("cluster-ips", "hairpin-ips", "nodeport-ips", MASQ_SET,
                                              *(name for name, _, _ in MAPS))))
        out.append(f"add rule {t} mark-for-masquerade meta mark set meta mark or {self.mark}\n")
        out.append(f"add rule {t} reject-chain reject\n")
        if self.nodeport_addresses:
            out.extend(f"add element {t} nodeport-ips {{ {ip} }}\n" for ip in self._nodeport_ips())
        out.extend(self._set_rules())
        return out

    def _declarations(self, sizes: dict[str, int], names: Iterable[str]) -> list[str]:
        """`add set` / `add map` of the fixed sets and maps in `names`."""
        t, addr = self._t, self.addr_type
        comments = {
            "cluster-ips": (addr, "Active ClusterIPs"),
            "hairpin-ips": (f"{addr} . {addr}", "endpoint . endpoint: a pod reaching itself"),
            "nodeport-ips": (addr, "IPs that accept NodePort traffic"),
            MASQ_SET: (f"{addr} . inet_proto . inet_service",
                       "ClusterIP . protocol . port of Services with endpoints: masquerade from outside"),
            **{name: (kind.replace("ADDR", addr), comment) for name, kind, comment in MAPS},
        }
        out = []
        for name in names:
            kind, comment = comments[name]
            obj = "map" if kind.endswith(": verdict") else "set"
            size = f"size {sizes[name]} ; " if name in sizes else ""
            out.append(f'add {obj} {t} {name} {{ type {kind} ; {size}comment "{comment}" ; }}\n')
        return out

    def _set_rules(self) -> list[str]:
        """The rules of SET_RULE_CHAINS: every rule that looks up a fixed set or map."""
        t, ipx, m = self._t, self.ipx, self.mark
        # Hairpin: a connection DNATed back to the address it came from (upstream marks it in
        # each endpoint chain; one lookup here does it without a chain per endpoint).
        out = [f"add rule {t} masquerading ct status dnat {ipx} saddr . {ipx} daddr @hairpin-ips masquerade fully-random\n",
               f"add rule {t} masquerading meta mark and {m} == 0 return\n",
               f"add rule {t} masquerading meta mark set meta mark xor {m}\n",
               f"add rule {t} masquerading masquerade fully-random\n"]
        out.extend(self._masquerade_cluster_ips())
        out.append(f"add rule {t} services {ipx} daddr . meta l4proto . th dport vmap @service-ips\n")
        out.append(f"add rule {t} service-endpoints-check {ipx} daddr . meta l4proto . th dport vmap @no-endpoint-services\n")
        out.append(f"add rule {t} firewall-check {ipx} daddr . meta l4proto . th dport vmap @firewall-ips\n")
        out.extend(self._cluster_ips_check())
        if self.nodeport_addresses:
            match = f"{ipx} daddr @nodeport-ips"
        else:
            # Every local address but loopback: upstream's nftables mode has no localhost NodePorts.
            match = "fib daddr type local " + ("ip6 daddr != ::1" if ipx == "ip6" else "ip daddr != 127.0.0.0/8")
        out.append(f"add rule {t} services {match} meta l4proto . th dport vmap @service-nodeports\n")
        out.append(f"add rule {t} nodeport-endpoints-check {match} meta l4proto . th dport vmap @no-endpoint-nodeports\n")
        return out

    def _refill(self, resize: dict[str, int]) -> list[str]:
        """The start of a full sync that keeps the table: every fixed set and map flushed, or
        (those in `resize`) deleted and declared anew with the new size, after the rules that
        look them up (a set in use cannot be deleted), which are then written again."""
        t = self._t
        out: list[str] = []
        if resize:
            out.extend(f"flush chain {t} {chain}\n" for chain in SET_RULE_CHAINS)
            out.extend(f"delete {'map' if name in _MAP_NAMES else 'set'} {t} {name}\n" for name in sorted(resize))
            out.extend(self._declarations(resize, sorted(resize)))
        out.extend(f"flush set {t} {name}\n" for name in SETS if name not in resize)
        out.extend(f"flush map {t} {name}\n" for name, _, _ in MAPS if name not in resize)
        out.extend(f"flush map {t} {name}\n" for name in sorted(self._maps))
        out.extend(f"add element {t} nodeport-ips {{ {ip} }}\n" for ip in self._nodeport_ips())
        if resize:
            out.extend(self._set_rules())
        else:
            out.append(f"flush chain {t} cluster-ips-check\n")
            out.extend(self._cluster_ips_check())
        return out

    def _masquerade_cluster_ips(self) -> list[str]:
        """Upstream's first rule of every internal (service- or local-) chain, `ip daddr CLUSTER_IP
        PROTO dport PORT ip saddr != CLUSTER_CIDR jump mark-for-masquerade` (every packet with
        --masquerade-all), as one rule before the dispatch, on the set of the ClusterIP . protocol
        . port keys that service-ips sends to an internal chain (kproxy._nftpath puts each such key
        in both). The same packets are marked: the `services` chain (nat prerouting and output)
        is the only way into an internal chain; a packet whose destination . protocol . port is
        one of these keys is sent by service-ips to that chain (service-ips is looked up first and
        holds one value per key), where the old rule matched it; any other packet reaching an
        internal chain (through an external- chain: an ExternalIP, LoadBalancer IP or NodePort
        key) has another destination . protocol . port, which the old rule did not match. Why:
        that rule, 10 expressions, was ~60% of a first sync's expressions, and the kernel's cost
        of a rule is mostly per expression (each finds its type by walking the list of all
        expression types): at 10,000 Services one set element each instead costs ~0.2 s less
        kernel time (bench/README.md, nftables)."""
        t, ipx = self._t, self.ipx
        lookup = f"{ipx} daddr . meta l4proto . th dport @{MASQ_SET} jump mark-for-masquerade"
        if self.masquerade_all:
            return [f"add rule {t} services {lookup}\n"]
        if self.cluster_cidr:
            return [f"add rule {t} services {ipx} saddr != {self.cluster_cidr} {lookup}\n"]
        return []

    def _cluster_ips_check(self) -> list[str]:
        """Traffic to a ClusterIP on a port no Service has: rejected; to an address of the
        service CIDRs that no Service has: dropped (upstream 1.33, from the ServiceCIDR objects)."""
        t, ipx = self._t, self.ipx
        out = [f'add rule {t} cluster-ips-check {ipx} daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"\n']
        # One rule per CIDR, not upstream's `ip daddr { CIDRs }`: an anonymous interval set per
        # change is what kproxy's netlink grammar does not write, and the CIDRs are one or two.
        out.extend(f'add rule {t} cluster-ips-check {ipx} daddr {cidr} drop comment "Drop traffic to unallocated ClusterIPs"\n'
                   for cidr in self.service_cidrs)
        return out

    def set_service_cidrs(self, cidrs: tuple[str, ...]) -> None:
        """The service CIDRs (upstream's OnServiceCIDRsChanged: this family's of them); the next
        sync is full."""
        v6 = self.family == "IPv6"
        parsed = tuple(str(ipaddress.ip_network(c, strict=False)) for c in cidrs if (":" in c) == v6)
        if parsed != self.service_cidrs:
            self.service_cidrs = parsed
            self._need_full = True

    def _place(self, svc: ServicePort, eps: tuple[Endpoint, ...], old: _Programmed | None) -> _Placed:
        """One ServicePort as the renderer writes it, plus each dispatch chain's DNAT rule through
        its block of the shared endpoint map (kept from `old` while it is big enough, so that an
        endpoint change is element changes only)."""
        r = self.render.render_service_port(svc, eps, self.masquerade_all, self.cluster_cidr,
                                            self._node_ips, self.node_zone, self.family)
        chains = dict(r.chains)
        slots: dict[str, tuple[int, int]] = {}
        blocks = []
        proto = svc.protocol.lower()
        old_slots = old.slot_map() if old is not None else {}
        for chain, targets in r.balance:
            n = len(targets)
            emap = endpoint_map(proto, chain)
            offset, size = old_slots.get(chain, (0, 0))
            if size < n:
                offset, size = self._slots.setdefault(emap, Slots()).take(n)
            slots[chain] = (offset, size)
            chains[chain] = (*chains[chain], (("l4proto", proto), ("dnat-map", self.ipx, str(n), str(offset), emap)))
            blocks.append((emap, offset, targets))
        for chain, block in old_slots.items():
            if slots.get(chain) != block:
                self._give_back(proto, chain, block)
        return _Placed(svc, eps, chains, r.elements, tuple(blocks), slots, r.sets)

    def _keep(self, placed: _Placed, packed: str, same_as: _Programmed | None) -> _Programmed:
        """What is kept of a placed ServicePort whose elements are `packed`; what equals
        `same_as` is that object itself."""
        svc, chains = placed.svc, placed.chains
        serving = _NONE_SERVING
        if svc.protocol == "UDP":
            serving = frozenset((e.ip, e.port) for e in categorize(svc, placed.eps, self.node_zone).reachable)
        digests = b"".join([_digest(body) for body in chains.values()])
        rules = sum(map(len, chains.values()))
        p = _Programmed(svc, _pack_programmed(chains, digests, placed.slots, packed), rules, placed.sets, serving)
        if same_as is not None and p == same_as:
            p = same_as  # the same: the new copy goes at once (a resync does not hold two bookkeepings)
        return p

    def _render(self, svc: ServicePort, eps: tuple[Endpoint, ...], old: _Programmed | None) -> _Fresh:
        """One ServicePort placed (_place), its elements and what is kept of it (_keep)."""
        placed = self._place(svc, eps, old)
        unique = list(dict.fromkeys(itertools.chain(placed.elements, placed.endpoint_elements())))
        return _Fresh(self._keep(placed, pack(unique), old), placed.chains, unique)

    def _give_back(self, proto: str, chain: str, block: tuple[int, int]) -> None:
        emap = endpoint_map(proto, chain)
        self._slots.setdefault(emap, Slots()).give_back(*block)


    def _set_line(self, name: str, timeout: int) -> str:
        return f"add set {self._t} {name} {{ type {self.addr_type} ; flags dynamic,timeout ; timeout {timeout}s ; }}\n"


    def _full(self, services: ServicePortMap, endpoints: EndpointsMap, recreate: bool) -> tuple[
            Script, dict[ServicePortName, _Programmed], SharedRefs, dict[str, float]]:
        """The whole table in one transaction. recreate: the table is deleted and written anew
        (the first sync, or when what the kernel holds is not known). Otherwise (the periodic
        resync, the sync after a failed partial one: a refused transaction changed nothing, so
        the bookkeeping still says what the kernel holds) every chain and map of the table is
        flushed and refilled, and the dynamic affinity sets are kept with their clients, as
        upstream does; chains no longer wanted are flushed and deleted after the grace period."""
        t = self._t
        # A full sync counts the shared elements anew and reads none of the old counts, and a
        # failed one is followed by another full one (_need_full): dropped first, so that the
        # periodic resync does not hold two sets of them (~6 MiB each at 10,000 Services).
        self._refs = SharedRefs()
        stale: dict[str, float] = {}
        if recreate:
            # Creating the table first makes the delete valid when it does not exist yet; the
            # whole input is one batch, so there is never a moment without the table.
            out = [f"add table {t}\n", f"delete table {t}\n"]  # and the skeleton, once sized (below)
        else:
            out = []  # and _refill's start (below)
            now = time.monotonic()
            stale = dict(self._stale)
            for old in self._programmed.values():
                out.extend(f"flush chain {t} {chain}\n" for chain in old.chain_names)
                stale.update((chain, now) for chain in old.chain_names)
                stale.update(("set " + name, now) for name, _ in old.sets)
        programmed: dict[ServicePortName, _Programmed] = {}
        refs = SharedRefs()
        # endpoint map -> the ServicePorts with elements in it: each map's elements are written
        # together (one netlink message per map and 64 KiB), from the packed bookkeeping.
        users: dict[str, list[_Programmed]] = {}
        n_first = 0
        own: list[Element] = []  # the other elements only one ServicePort wants (service-ips, ...)
        self._slots = {}  # every block anew: the endpoint maps are written whole
        empty: tuple[Endpoint, ...] = ()
        rule_parts: list[tuple[str, tuple[Rule, ...]]] = []
        new_chains: list[str] = []
        for name in sorted(n for n, s in services.items() if _eligible(s, self.family)):
            pl = self._place(services[name], tuple(endpoints.get(name, empty)), None)
            # Each element once: packed, counted if shared, else kept for the batch (the endpoint
            # maps' are written from the packed bookkeeping below).
            packed = pack_counting(pl.elements, pl.blocks, refs, {ep.ip: ep.ip for ep in pl.eps}, own)
            p = programmed[name] = self._keep(pl, packed, self._programmed.get(name))
            for set_name, timeout in pl.sets:
                out.append(self._set_line(set_name, timeout))
                stale.pop("set " + set_name, None)
            for chain in pl.chains:
                if chain not in stale:  # a chain in the old table was flushed above
                    new_chains.append(chain)
                stale.pop(chain, None)
            rule_parts.extend(pl.chains.items())
            for emap in dict.fromkeys(emap for emap, _, _ in pl.blocks):
                users.setdefault(emap, []).append(p)
            n_first += sum(len(targets) for _, _, targets in pl.blocks)
        used = set(users)
        out.extend(_map_line(t, m) for m in sorted(used - self._maps if not recreate else used))
        self._pending_maps = used if recreate else used | self._maps
        own.sort(key=itemgetter(0))  # grouped by set: one netlink message per set and 64 KiB
        # Each SIZED set's elements: its declared size (_skeleton), or whether it must be resized.
        counts = Counter(e[0] for e in own if e[0] in SIZED)
        counts.update(e[0] for e in refs.other if e[0] in SIZED)
        counts["cluster-ips"] += len(refs.cluster_ips)
        counts["hairpin-ips"] += len(refs.hairpin)
        self._pending_counts = counts
        if recreate:
            self._pending_capacity = {name: capacity(counts[name]) for name in SIZED}
            out[2:2] = self._skeleton(self._pending_capacity)
        else:
            resize = {name: capacity(counts[name]) for name in SIZED
                      if needs_resize(counts[name], self._capacity.get(name))}
            self._pending_capacity = {**self._capacity, **resize}
            out[0:0] = self._refill(resize)

        def endpoint_elements() -> Iterator[Element]:
            for emap in sorted(users):
                for p in users[emap]:
                    yield from unpack_set(p.elements, emap)

        # The endpoint maps' elements after the rules that look them up. Either way the kernel
        # checks each data element against each lookup bound to its map (see ENDPOINT_MAPS): with
        # the elements first, each DNAT rule binding its map walks the map's elements; with the
        # rules first, each element added is checked against the map's ~20 bindings. With one
        # map for all Services the walk was cheaper (14 s against 85 s); with 512 maps the
        # checks are: 0.91-1.09 s against 1.13-1.71 s of sendmsg at 10,000 Services (4 rounds
        # each, alternating, load 2.4), the same ruleset in the kernel.
        script = Script(t, out, new_chains, _Elements(endpoint_elements, n_first),
                        rule_parts,  # after every chain: a rule may jump to a chain declared later
                        _Elements(lambda: itertools.chain(own, refs.elements()), len(own) + len(refs)))
        return script, programmed, refs, stale

    def _partial(self, request: SyncRequest) -> tuple[list[str], dict[ServicePortName, _Programmed | None],
                                                      Counter[Element], dict[str, float]]:
        """The transaction of the changed ServicePorts, and the bookkeeping it brings about
        (ServicePort -> what is programmed now, or None; shared element reference count
        changes; the stale objects), applied only once the kernel took the transaction. The
        work is proportional to the changed ServicePorts, not to the table."""
        t = self._t
        updates: dict[ServicePortName, _Programmed | None] = {}
        delta: Counter[Element] = Counter()  # shared elements' reference changes
        own_gone: list[Element] = []
        own_added: list[Element] = []
        stale = dict(self._stale)
        now = time.monotonic()
        new_chains: list[str] = []
        rules: list[str] = []
        new_sets: list[str] = []
        new_maps: set[str] = set()
        flush_stale: list[str] = []
        empty: tuple[Endpoint, ...] = ()
        for name in sorted(request.changed):
            svc = request.services.get(name)
            old = self._programmed.get(name)
            cur = None
            cur_chains: dict[str, tuple[Rule, ...]] = {}
            if svc is not None and _eligible(svc, self.family):
                cur, cur_chains, _ = self._render(svc, tuple(request.endpoints.get(name, empty)), old)
            elif old is not None:
                for chain, offset, size in old.slots:
                    self._give_back(old.svc.protocol.lower(), chain, (offset, size))
            old_chains = old.chains if old is not None else {}
            cur_digests = cur.chains if cur is not None else {}
            for chain, body in cur_chains.items():
                if old_chains.get(chain) == cur_digests[chain]:
                    continue
                if chain not in old_chains:
                    new_chains.append(f"add chain {t} {chain}\n")
                    stale.pop(chain, None)
                rules.append(f"flush chain {t} {chain}\n")
                rules.extend(_rule_lines(t, chain, body))
            for chain in old_chains:
                if chain not in cur_chains:
                    flush_stale.append(f"flush chain {t} {chain}\n")
                    stale[chain] = now
            old_sets = dict(old.sets) if old is not None else {}
            cur_sets = dict(cur.sets) if cur is not None else {}
            for set_name, timeout in cur_sets.items():
                if old_sets.get(set_name) != timeout:
                    new_sets.append(self._set_line(set_name, timeout))
                    stale.pop("set " + set_name, None)
            for set_name in old_sets:
                if set_name not in cur_sets:
                    stale["set " + set_name] = now
            old_packed = old.elements if old is not None else ""
            cur_packed = cur.elements if cur is not None else ""
            if old_packed != cur_packed:
                old_elements, cur_elements = set(unpack(old_packed)), set(unpack(cur_packed))
                for e in old_elements - cur_elements:
                    if is_shared(e[0]):
                        delta[e] -= 1
                    else:
                        own_gone.append(e)
                for e in cur_elements - old_elements:
                    if is_shared(e[0]):
                        delta[e] += 1
                    else:
                        own_added.append(e)
                        if e[0].startswith("endpoints-") and e[0] not in self._maps and e[0] not in new_maps:
                            new_maps.add(e[0])
                            new_sets.append(_map_line(t, e[0]))
            updates[name] = cur
        count = self._refs.count
        # An element only one ServicePort can want (its own chain in the value, or a slot of its
        # block) is deleted and added as it is; a shared one when its last reference goes or
        # its first comes. An own element deleted by one ServicePort and added by another (a
        # slot block given back and taken again with the same endpoint) is deleted, then added.
        gone = own_gone + [e for e, d in delta.items() if d < 0 and count(e) + d <= 0 < count(e)]
        added = own_added + [e for e, d in delta.items() if d > 0 and count(e) <= 0 < count(e) + d]
        # Order: everything a rule or an element points to exists before it is referenced, and
        # an element whose value changed is deleted before it is added again.
        out = new_sets + new_chains + rules
        counts = Counter(self._counts)
        counts.update(e[0] for e in added if e[0] in SIZED)
        counts.subtract(e[0] for e in gone if e[0] in SIZED)
        self._pending_counts = counts
        out.extend("delete " + _element(t, e) for e in sorted(gone))
        out.extend("add " + _element(t, e) for e in sorted(added))
        out.extend(flush_stale)
        for obj, since in sorted(stale.items()):
            # A chain, set or map belongs to one ServicePort (its name says which), which took
            # it off this list when it wanted it again.
            if now - since >= self.stale_grace:
                kind, _, obj_name = obj.rpartition(" ")
                out.append(f"delete {kind or 'chain'} {t} {obj_name}\n")
                del stale[obj]
        self._pending_maps = self._maps | new_maps
        return out, updates, delta, stale

    # ---- applying ----

    def sync(self, request: SyncRequest) -> SyncResult:
        # A full sync makes ~500,000 short-lived tuples and strings at 10,000 Services, none in a
        # cycle: the cyclic GC would meanwhile walk the whole heap (Services, endpoints,
        # bookkeeping) a few times, 0.06-0.1 s of its ~1.4 s CPU. Paused for it (a partial sync
        # is too small to matter); reference counting still frees what dies.
        if not (request.full or self._need_full) or not gc.isenabled():
            return self._sync(request)
        gc.disable()
        try:
            return self._sync(request)
        finally:
            gc.enable()

    def _sync(self, request: SyncRequest) -> SyncResult:
        full = request.full or self._need_full
        recreate = full and not self._table_known
        start = time.perf_counter()
        lines: Script | list[str]
        try:
            if full:
                self._refresh_node_ips()
                lines, programmed, refs, stale = self._full(request.services, request.endpoints, recreate)
            else:
                lines, updates, delta, stale = self._partial(request)
                if any(n > self._capacity.get(name, n) for name, n in self._pending_counts.items()):
                    # It would outgrow a set's declared size (SIZED): a full sync declares it
                    # bigger instead, keeping the table (and the affinity sets' clients).
                    full = True
                    self._refresh_node_ips()
                    lines, programmed, refs, stale = self._full(request.services, request.endpoints, False)
        except Exception as e:  # a render bug must not leave the proxier believing it applied
            self._need_full = True
            log.exception("nftables sync failed while rendering")
            return SyncResult(ok=False, error=f"render: {e}")
        t_render = time.perf_counter()
        # Kept for logs and tests only while small (a 10,000-Service first sync is 25 MB).
        if isinstance(lines, Script):
            self.last_transaction = lines.text_if_within(self.keep_transaction_bytes)
        else:
            size = sum(map(len, lines))
            self.last_transaction = "".join(lines) if size <= self.keep_transaction_bytes else ""
        if lines:
            try:
                self.nft.apply(lines)
            except NftError as e:
                self._need_full = True
                # A refused full sync may mean the table is not what kproxy thinks (something
                # else changed it): the next one writes it anew.
                self._table_known = self._table_known and not full
                log.error("nft transaction failed full=%s err=%s", full, e)
                return SyncResult(ok=False, error=str(e))
        if isinstance(lines, Script):  # its text's length if it was read as text, else the batch's
            size = lines.chars or self.nft.last_batch_bytes
        del lines  # a full sync's script (25 MB at 10,000 Services) is not needed any more
        if full:
            old, new = self._programmed, programmed
            self._programmed, self._refs = programmed, refs
            self._rules = sum(_rule_count(p) for p in programmed.values())
        else:
            # Only the changed ServicePorts: the rest of the bookkeeping is as it was.
            old = {n: self._programmed[n] for n in updates if n in self._programmed}
            new = {n: p for n, p in updates.items() if p is not None}
            for n, p in updates.items():
                self._rules += _rule_count(p) - _rule_count(old.get(n))
                if p is None:
                    self._programmed.pop(n, None)
                else:
                    self._programmed[n] = p
            for elem, d in delta.items():
                self._refs.add(elem, d)
        self._stale = stale
        self._maps = self._pending_maps
        self._counts = self._pending_counts
        if full:
            self._capacity = self._pending_capacity
        self._need_full = False
        self._table_known = True
        self.last_stats = {"render_s": t_render - start, "apply_s": time.perf_counter() - t_render,
                           "bytes": float(size), "full": float(full), "recreate": float(recreate),
                           "way": 1.0 if getattr(self.nft, "last_way", "") == "netlink" else 0.0}
        if self.health_server is not None:
            self._health.update_request(request.services, request.endpoints, request.changed, full)
            self._health.sync(self.health_server)
        if self.conntrack is not None:
            clean_udp_conntrack(self.conntrack, request, old, new)
        if full:
            del old
            release_free_memory()  # the heap a full sync freed (script, batch, old bookkeeping)
        return SyncResult(ok=True, rules_total={"nftables": self._rules})

    def _refresh_node_ips(self) -> None:
        ips: tuple[str, ...] = ()
        try:
            ips = tuple(self.nft.local_addresses(self.family))
        except NftError as e:
            log.warning("cannot list node addresses err=%s", e)
        self._node_ips = tuple(dict.fromkeys(self._config_node_ips + ips))

    # ---- cleanup ----

    def cleanup(self) -> bool:
        self._programmed.clear()
        self._refs = SharedRefs()
        self._stale.clear()
        self._need_full = True
        self._table_known = False
        self._maps = set()
        self._capacity, self._counts = {}, Counter()
        return _delete_table(self.nft, self.ipx, self.table)

    def close(self) -> None:
        if self.health_server is not None:
            self.health_server.close()


def _delete_table(nft: Nft, family: str, table: str) -> bool:
    try:
        return nft.delete_table(family, table)
    except NftError as e:
        log.error("cleanup: cannot delete table %s %s err=%s", family, table, e)
        return False


def cleanup_leftovers(config: KProxyConfig) -> bool:
    """`kproxy --cleanup` in any mode: remove the nftables tables of both families (no proxier
    needed), as upstream's CleanupLeftovers. A node without the nft tool cannot have them."""
    nft = Nft(netns=config.netns or None)
    ok = True
    for family in NFT_FAMILIES.values():
        try:
            if not nft.table_exists(family, TABLE):
                continue
        except NftError:
            continue
        ok = _delete_table(nft, family, TABLE) and ok
    return ok


def family_supported(config: KProxyConfig, family: IPFamily) -> bool:
    """Upstream's platformCheckSupported for nftables: the kernel takes a transaction on a table
    of the family (an IPv6-less kernel has no ip6 family), checked with an empty batch creating
    and deleting a probe table, which leaves nothing."""
    nft = Nft(netns=config.netns or None)
    probe = f"{NFT_FAMILIES[family]} kproxy-probe-{os.getpid()}"
    try:
        nft.apply([f"add table {probe}\n", f"delete table {probe}\n"])
    except NftError as e:
        log.info("%s nftables not usable here err=%s", family, e)
        return False
    return True


def new_family_proxier(config: KProxyConfig, family: IPFamily) -> Proxier:
    """The nftables proxier of one family (`ip kube-proxy` or `ip6 kube-proxy`) from the
    validated configuration; the Service health checks are kproxy.proxiers.meta's."""
    netns = config.netns or None  # "" is no namespace too
    nft = Nft(netns=netns)
    try:
        nft.apply("")  # nft present and the kernel speaks nf_tables (an empty batch)
    except NftError as e:
        raise RuntimeError(f"nftables unavailable: {e}") from e
    return NftablesProxier(
        nft,
        cluster_cidr=config.cluster_cidr,
        nodeport_addresses=config.nodeport_addresses,
        masquerade_all=config.masquerade_all,
        masquerade_bit=config.masquerade_bit,  # 0 is valid (validation accepts 0..31)
        conntrack=Conntrack(netns=netns, family=family),
        node_ips=config.node_ips,
        node_zone=config.node_zone,
        family=family,
    )


def new_proxier(config: KProxyConfig) -> Proxier:
    """One nftables proxier per family this node can run (kproxy.proxiers.meta), as upstream's
    NewDualStackProxier for nftables."""
    return new_proxier_for_families(config, new_family_proxier, family_supported)

"""The iptables proxier: upstream's pkg/proxy/iptables syncProxyRules, in one restore per sync.

A sync renders (kproxy.fastpath: Cython, or the pure twin) the changed ServicePorts into
per-service fragments, assembles one `iptables-restore --noflush` buffer for filter and nat and
applies it in one transaction. What makes it fast, beyond the compiled renderer:
  - per-service fragments of the shared dispatch chains (KUBE-SERVICES, KUBE-NODEPORTS and the
    filter chains) are kept, so a partial sync re-renders only changed services, and rewrites
    the shared chains only when a changed service's dispatch rules really changed; an endpoint
    change therefore restores just that service's KUBE-SVC-/KUBE-SEP- chains;
  - the chains kproxy owns are tracked in memory after the first dump, so syncs need no
    iptables-save; stale chains are flushed and deleted (-X) in the same transaction.
A failed restore changes nothing in the kernel (atomic per table, per batch with nf_tables),
returns ok=False and makes the next sync a full one that re-reads the kernel's chain list.

One proxier per IP family (upstream's metaproxier, kproxy.proxiers.meta): new_proxier builds the
iptables one and, where ip6tables works, the ip6tables one; each renders only its family.
new_family_proxier takes the validated kproxy.config.KProxyConfig: hostname_override, cluster_cidr,
nodeport_addresses, masquerade_all, masquerade_bit, localhost_nodeports, iptables_backend
("nft"|"legacy"|"" detect), netns (run the tools in that network namespace),
healthcheck_bind_address, node_ips and node_zone (from the Node object).
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from kproxy import _purepath
from kproxy.backends.conntrack import Conntrack
from kproxy.backends.iptables import (
    Backend,
    IPTables,
    IPTablesError,
    RestoreStream,
    chains_in_dump,
    detect_backend,
)
from kproxy.config import KProxyConfig
from kproxy.fastpath import impl as fastpath
from kproxy.healthcheck import ServiceHealthServer
from kproxy.model import IP, Endpoint, EndpointsMap, IPFamily, Port, ServicePort, ServicePortMap, ServicePortName
from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult
from kproxy.proxiers.meta import new_proxier_for_families
from kproxy.proxiers.udpstale import clean_udp_conntrack
from kproxy.proxy import categorize, sync_health_server
from kproxy.proxy.exposure import check_masquerade_bit, node_addresses

log = logging.getLogger(__name__)

SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-")
CANARY = "KUBE-PROXY-CANARY"
FILTER_CHAINS = (
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
)
NAT_CHAINS = ("KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ")
BUILTIN_CHAINS = frozenset(("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"))
NAT_BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")
KUBELET_FIREWALL = "KUBE-FIREWALL"
# iptables-nft-restore (1.8.x) keeps the chains a transaction names in a sorted linked list
# (nft-cache.c cache_chain_list_insert), so a restore naming n chains costs O(n^2) string
# compares: 23 s instead of 1.5 s for 1,000 services here. A first command without a chain sets
# the cache request to "all chains" and skips that list; "-Z" (zero counters) is the only such
# command without lasting effect beyond the counters (-L/-S print the whole table: 3x slower).
# But -Z zeroes the counters of every chain in the table, other software's included, so it is
# used only while the nat table holds nothing but kproxy's chains and its jumps (checked before
# each such restore, see _zero_is_private); beside other software a restore names its chains
# one by one, slower and touching nothing else. Used only above this many chain lines.
NFT_ALL_CHAINS_THRESHOLD = 64
# last_plan keeps its restore input only up to this size.
KEEP_INPUT_BYTES = 4 << 20
NODEPORTS_TAIL_COMMENT = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'


@dataclass(frozen=True, slots=True)
class JumpChain:
    """A jump from a built-in chain into one of ours (upstream iptablesJumpChains)."""

    table: str
    src: str
    dst: str
    comment: str
    extra: str = ""

    def spec(self) -> str:
        parts = [self.extra] if self.extra else []
        if self.comment:
            parts.append(f'-m comment --comment "{self.comment}"')
        parts.append(f"-j {self.dst}")
        return " ".join(parts)


_NEW = "-m conntrack --ctstate NEW"
JUMP_CHAINS = (
    JumpChain(
        "filter", "INPUT", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals", _NEW
    ),
    JumpChain(
        "filter", "FORWARD", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals", _NEW
    ),
    JumpChain("filter", "INPUT", "KUBE-NODEPORTS", "kubernetes health check service ports"),
    JumpChain("filter", "FORWARD", "KUBE-SERVICES", "kubernetes service portals", _NEW),
    JumpChain("filter", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals", _NEW),
    JumpChain("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    JumpChain("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", "OUTPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", _NEW),
    JumpChain("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    JumpChain("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    JumpChain("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
)
# kubelet owns these upstream; kube-proxy ensures them too when localhost NodePorts are on.
KUBELET_JUMP_CHAINS = (
    JumpChain("filter", "INPUT", KUBELET_FIREWALL, ""),
    JumpChain("filter", "OUTPUT", KUBELET_FIREWALL, ""),
)


@dataclass(slots=True)
class _Programmed:
    """What the kernel holds for one ServicePort after the last successful sync."""

    svc: ServicePort
    filter: str
    dispatch: str
    # The chains this ServicePort owns, space-separated: one str instead of a tuple of ~11 (at
    # 10,000 Services x 10 endpoints that is ~8 MiB less RSS); split only when one is diffed.
    chains: str
    nat_rules: int
    serving: frozenset[tuple[IP, Port]] = frozenset()  # UDP only: endpoints DNATed to, for conntrack


@dataclass(slots=True)
class Plan:
    """One sync's restore input and the bookkeeping to commit when it succeeds."""

    chunks: list[str]  # streamed to iptables-restore: never joined on the sync path (peak RSS)
    programmed: dict[ServicePortName, _Programmed]
    full: bool
    rendered: int
    wrote_dispatch: bool
    wrote_filter: bool
    deleted_chains: list[str] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        """The whole restore input (tests, error context); the sync itself streams `chunks`."""
        return "".join(self.chunks).encode()


def only_kproxy_in(rules: Iterable[str], owned: Callable[[str], bool]) -> bool:
    """Whether every counter of a table is kproxy's: every rule (`-A CHAIN ...` lines) is in one
    of kproxy's chains or is a jump from a built-in chain into one. Only then may a restore zero
    the whole table's counters. (Another program's chain without rules has no counter: kubelet's
    KUBE-KUBELET-CANARY, on every node. iptables-nft's built-in chains have no policy counters.)"""
    for line in rules:
        if not line.startswith("-A "):
            continue
        parts = line.split()
        if parts[1] in BUILTIN_CHAINS:
            if not (parts[-2] == "-j" and owned(parts[-1])):
                return False
        elif not owned(parts[1]):
            return False
    return True


_OWNED_NAT_NAMES = frozenset((*NAT_CHAINS, CANARY))


def _owned_nat_chain(chain: str) -> bool:
    return chain in _OWNED_NAT_NAMES or chain.startswith(SERVICE_CHAIN_PREFIXES)


def _eligible(svc: ServicePort | None, family: IPFamily) -> bool:
    # Headless and ExternalName services are not proxied; one proxier per family (this one's).
    return svc is not None and svc.type != "ExternalName" and svc.cluster_ip(family) is not None


class IptablesProxier(Proxier):
    mode = "iptables"

    def __init__(
        self,
        iptables: IPTables,
        *,
        node_name: str = "",
        cluster_cidr: str = "",
        nodeport_addresses: tuple[str, ...] = (),
        masquerade_all: bool = False,
        masquerade_bit: int = 14,
        localhost_nodeports: bool = True,
        conntrack: Conntrack | None = None,
        health_server: ServiceHealthServer | None = None,
        pure_renderer: bool = False,
        node_ips: tuple[str, ...] = (),
        node_zone: str = "",
    ) -> None:
        check_masquerade_bit(masquerade_bit)
        # The table family is the tools': ip6tables-* make this the IPv6 proxier, which sees
        # only IPv6 Services and endpoints (kproxy.proxiers.meta hands it that view).
        self.family: IPFamily = "IPv6" if getattr(iptables, "ipv6", False) else "IPv4"  # tests' fakes: IPv4
        # kube-proxy's --nodeport-addresses primary: NodePorts only on the node's primary IPs
        # (the Node object's addresses), one meaning in every mode (kproxy.proxy.nodeport_cidrs).
        v4 = node_addresses(nodeport_addresses, node_ips, cluster_cidr, log, self.family)
        self.iptables = iptables
        self.node_name = node_name
        self.cluster_cidr = v4.cluster_cidr
        self.nodeport_addresses = v4.nodeport_cidrs
        self.masquerade_all = masquerade_all
        # Go's %#08x: the mark is written "0x004000", iptables-save shows it back as 0x4000.
        self.masquerade_mark = f"0x{1 << masquerade_bit:06x}"
        # Localhost NodePorts are IPv4 only (route_localnet); upstream never has them in IPv6.
        self.localhost_nodeports = localhost_nodeports and self.family == "IPv4"
        self.conntrack = conntrack
        self.health_server = health_server
        # Typed as the one renderer source (kproxy.fastpath): mypy checks every call.
        self.render = fastpath
        if pure_renderer:  # the same source interpreted (tests compare both on one proxier)
            self.render = _purepath
        self.node_zone = node_zone  # the Node's topology.kubernetes.io/zone: zone hints need it
        # What the kernel holds, per ServicePort; the chains kproxy owns are the union of their
        # `chains` (no separate 110,000-name set at 10,000 Services: chain names embed the
        # ServicePort's hash, so every owned chain belongs to exactly one entry).
        self._programmed: dict[ServicePortName, _Programmed] = {}
        self._need_full = True
        self._need_dump = True  # re-read the kernel's chain list before the next full sync
        self._large: bool | None = None
        self._config_node_ips = v4.node_ips
        self._node_ips: tuple[str, ...] = self._config_node_ips
        self.last_plan_stats: dict[str, float] = {}
        self.last_plan: Plan | None = None
        self.keep_input_bytes = KEEP_INPUT_BYTES
        # Seconds between canary checks on partial syncs (0: every sync). Full syncs recreate it.
        self.canary_interval = 30.0
        self._last_canary_check = time.monotonic()
        self._shared_logged = False
        self._others_empty: set[str] = set()  # other programs' chains the last nat dump found

    # ---- rendering (sans I/O apart from the first-sync dumps) ----

    def _large_cluster(self, services: ServicePortMap, endpoints: EndpointsMap) -> bool:
        total = 0
        for name in services:
            total += len(endpoints.get(name, ()))
        return total > int(self.render.LARGE_CLUSTER_ENDPOINTS)

    def _nodeports_tail(self) -> list[str]:
        head = f"-A KUBE-SERVICES -m comment --comment {NODEPORTS_TAIL_COMMENT}"
        if not self.nodeport_addresses:
            # As upstream: IPv6 localhost NodePorts never work, so ::1 is left out explicitly.
            if self.family == "IPv6":
                dst = "-m addrtype --dst-type LOCAL ! -d ::1/128"
            else:
                dst = "-m addrtype --dst-type LOCAL" + ("" if self.localhost_nodeports else " ! -d 127.0.0.0/8")
            return [f"{head} {dst} -j KUBE-NODEPORTS\n"]
        nets = [ipaddress.ip_network(c, strict=False) for c in self.nodeport_addresses]
        out = []
        for ip in self._node_ips:
            addr = ipaddress.ip_address(ip)
            if not any(addr in n for n in nets):
                continue
            if addr.is_loopback and not self.localhost_nodeports:
                if self.family == "IPv6":
                    continue  # never served, nothing to tell
                log.error(
                    "nodeport-addresses includes localhost but localhost NodePorts are off address=%s", ip
                )
                continue
            out.append(f"{head} -d {ip} -j KUBE-NODEPORTS\n")
        return out

    def _filter_globals(self) -> list[str]:
        rules = ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n"]
        m = self.masquerade_mark
        rules.append(
            f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {m}/{m} -j ACCEPT\n'
        )
        rules.append(
            '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
            " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        )
        if self.localhost_nodeports:
            rules.append(
                f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections"'
                " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
            )
        return rules

    def _missing_jumps(self) -> dict[str, list[str]]:
        """Restore lines (-I CHAIN 1 ...) for jumps absent from the built-in chains.

        Upstream checks each jump with `iptables -C` and prepends it outside the restore; doing
        the inserts inside the same restore makes them atomic with the chains they point to.
        """
        jumps = list(JUMP_CHAINS) + (list(KUBELET_JUMP_CHAINS) if self.localhost_nodeports else [])
        missing: dict[str, list[str]] = {"filter": [], "nat": []}
        cache: dict[tuple[str, str], list[str]] = {}
        for j in jumps:
            key = (j.table, j.src)
            if key not in cache:
                cache[key] = self.iptables.chain_rules(j.table, j.src)
            present = any(
                line.endswith(f"-j {j.dst}")
                and (not j.comment or f'"{j.comment}"' in line or j.comment in line)
                for line in cache[key]
            )
            if not present:
                missing[j.table].append(f"-I {j.src} 1 {j.spec()}\n")
        return missing

    def _zero_is_private(self, nat_dump: str | None) -> bool:
        """Whether "-Z" in the nat table would zero only kproxy's counters (NFT_ALL_CHAINS_THRESHOLD):
        every chain of the table is built in or kproxy's and the built-in chains hold only
        kproxy's jumps. Checked before every such restore (other software may come at any time):
        from this sync's dump when there is one; otherwise the built-in chains are listed (a few
        rules each) and the table's chain count, from the kernel in one message, must be exactly
        those, the rule-less chains of others the last dump found, and the chains kproxy's last
        successful sync left (any other chain, set or object in the table makes it larger)."""
        try:
            if nat_dump is not None:
                self._others_empty = {c for c in chains_in_dump(nat_dump)
                                      if c not in BUILTIN_CHAINS and not _owned_nat_chain(c)}
                return only_kproxy_in(nat_dump.splitlines(), _owned_nat_chain) or self._shared()
            # The built-in chains, and the rule-less chains of others the last dump found (they
            # must still be rule-less), are listed; they and kproxy's must be all the table has.
            listed: dict[str, list[str]] = {}
            for chain in (*NAT_BUILTIN_CHAINS, *sorted(self._others_empty)):
                if self.iptables.nft_chain_exists("nat", chain):
                    listed[chain] = self.iptables.chain_rules("nat", chain)
            if not only_kproxy_in([r for rules in listed.values() for r in rules], _owned_nat_chain):
                return self._shared()
            ours = len(_OWNED_NAT_NAMES) + sum(len(p.chains.split()) for p in self._programmed.values())
            use = self.iptables.table_use("nat")
        except (IPTablesError, OSError) as e:
            log.warning("cannot tell what the nat table holds, not zeroing counters err=%s", e)
            return False
        return use == len(listed) + ours or self._shared()

    def _shared(self) -> bool:
        if not self._shared_logged:
            self._shared_logged = True
            log.info("the nat table holds other software's chains or rules: large restores name their "
                     "chains one by one (slower on nf_tables) so that its counters are kept")
        return False

    def plan(self, request: SyncRequest, full: bool) -> Plan:
        """Build this sync's restore input in memory without applying it (tests, tools)."""
        chunks: list[str] = []
        plan = self._emit(request, full, chunks.append)
        plan.chunks = chunks
        return plan

    def _emit(self, request: SyncRequest, full: bool, write: Callable[[str], None]) -> Plan:
        """Render the sync and hand the restore input to `write` chunk by chunk, in an order
        that needs nothing rendered later: each Service's chains are declared and filled as
        soon as it is rendered; the shared chains (KUBE-SERVICES etc., built from per-service
        fragments kept in memory) are declared and written after all Services; the filter
        table, whose chains are all shared, comes after the nat table."""
        services = request.services
        endpoints = request.endpoints
        large = self._large_cluster(services, endpoints)
        if self._large is not None and large != self._large:
            full = True  # every SVC/SEP chain changes shape (comments on/off)
        r = self.render
        family = self.family
        ipv6 = family == "IPv6"
        t0 = time.perf_counter()
        render_s = 0.0
        size = 0

        programmed = {} if full else dict(self._programmed)
        if full:
            names = sorted(n for n, s in services.items() if _eligible(s, family))
        else:
            names = sorted(request.changed)
        # Full syncs after a failure or at start-up diff against the kernel's chain list (another
        # process may have left chains); otherwise against what we programmed, per ServicePort.
        dumped: set[str] | None = None
        nat_dump: str | None = None
        missing: dict[str, list[str]] = {"filter": [], "nat": []}
        if full:
            nat_dump = self.iptables.save("nat") if self._need_dump else None
            dumped = chains_in_dump(nat_dump) if nat_dump is not None else None
            missing = self._missing_jumps()
        # The chain count is only known after rendering; a Service with endpoints has its SVC
        # chain and one per endpoint, so three per Service is the usual floor.
        zero = (self.iptables.backend == "nft" and len(names) * 3 > NFT_ALL_CHAINS_THRESHOLD
                and self._zero_is_private(nat_dump))
        del nat_dump
        nat_open = False

        def nat(chunk: str) -> None:
            nonlocal nat_open, size
            if not nat_open:
                head = "*nat\n" + ("-Z\n" if zero else "")
                if full:
                    head += "".join(f":{c} - [0:0]\n" for c in NAT_CHAINS) + f":{CANARY} - [0:0]\n"
                write(head)
                size += len(head)
                nat_open = True
            write(chunk)
            size += len(chunk)

        stale: set[str] = set()
        dispatch_changed = full
        filter_changed = full
        empty: tuple[Endpoint, ...] = ()
        rendered = 0
        masq_all = self.masquerade_all
        cidr = self.cluster_cidr
        node_ips = self._node_ips
        for name in names:
            svc = services.get(name)
            old = self._programmed.get(name)
            if not _eligible(svc, family):
                if old is not None and not full:
                    programmed.pop(name, None)
                    stale.update(old.chains.split())
                    dispatch_changed = dispatch_changed or bool(old.dispatch)
                    filter_changed = filter_changed or bool(old.filter)
                continue
            assert svc is not None
            eps = endpoints.get(name, empty)
            tr = time.perf_counter()
            filt, disp, decls, rules, chains, _has = r.render_service_port(
                svc, eps, masq_all, cidr, large, node_ips, self.node_zone, ipv6
            )
            render_s += time.perf_counter() - tr
            rendered += 1
            if decls:
                nat(decls + rules)
            serving: frozenset[tuple[IP, Port]] = frozenset()
            if svc.protocol == "UDP":
                # The endpoints the rules DNAT to (kproxy.proxy's choice), for conntrack cleanup.
                serving = frozenset((e.ip, e.port) for e in categorize(svc, eps, self.node_zone).reachable)
            owned = " ".join(chains)
            programmed[name] = _Programmed(svc, filt, disp, owned, rules.count("\n"), serving)
            if dumped is not None:
                dumped.difference_update(chains)
            if old is not None and not full:
                if old.chains != owned:
                    keep = set(chains)
                    stale.update(c for c in old.chains.split() if c not in keep)
                if old.dispatch != disp:
                    dispatch_changed = True
                if old.filter != filt:
                    filter_changed = True
            else:
                dispatch_changed = dispatch_changed or bool(disp)
                filter_changed = filter_changed or bool(filt)
        if dumped is not None:
            stale = {c for c in dumped if c.startswith(SERVICE_CHAIN_PREFIXES)}
        elif full:
            for name, old in self._programmed.items():
                cur = programmed.get(name)
                if cur is None or cur.chains != old.chains:
                    keep = set(cur.chains.split()) if cur is not None else set()
                    stale.update(c for c in old.chains.split() if c not in keep)
        stale_sorted = sorted(stale)

        tail: list[str] = []
        if dispatch_changed and not full:
            tail.append(":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n")
        tail.extend(f":{c} - [0:0]\n" for c in stale_sorted)
        tail.extend(missing["nat"])
        if full:
            m = self.masquerade_mark
            tail.append(f"-A KUBE-POSTROUTING -m mark ! --mark {m}/{m} -j RETURN\n")
            tail.append(f"-A KUBE-POSTROUTING -j MARK --xor-mark {m}\n")
            tail.append(
                '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
                " -j MASQUERADE --random-fully\n"
            )
            tail.append(f"-A KUBE-MARK-MASQ -j MARK --or-mark {m}\n")
        if dispatch_changed:
            tail.extend(p.dispatch for p in self._ordered(programmed) if p.dispatch)
        tail.extend(f"-X {c}\n" for c in stale_sorted)
        if dispatch_changed:
            tail.extend(self._nodeports_tail())
        if tail or nat_open:
            nat("".join(tail))
            nat("COMMIT\n")

        fsec: list[str] = []
        if filter_changed:
            fsec.append("*filter\n")
            fsec.extend(f":{c} - [0:0]\n" for c in FILTER_CHAINS)
            if self.localhost_nodeports:
                fsec.append(f":{KUBELET_FIREWALL} - [0:0]\n")
            if full:
                fsec.append(f":{CANARY} - [0:0]\n")
            fsec.extend(missing["filter"])
            fsec.extend(p.filter for p in self._ordered(programmed) if p.filter)
            fsec.extend(self._filter_globals())
            fsec.append("COMMIT\n")
        elif missing["filter"]:
            fsec.append("*filter\n")
            fsec.extend(missing["filter"])
            fsec.append("COMMIT\n")
        if full:
            fsec.append(f"*mangle\n:{CANARY} - [0:0]\nCOMMIT\n")
        if fsec:
            chunk = "".join(fsec)
            write(chunk)
            size += len(chunk)
        self.last_plan_stats = {
            "render_s": render_s,
            "assemble_s": time.perf_counter() - t0 - render_s,
            "bytes": size,
        }
        self._large = large
        return Plan(
            chunks=[],  # filled by the caller: plan() collects, sync() streams
            programmed=programmed,
            full=full,
            rendered=rendered,
            wrote_dispatch=dispatch_changed,
            wrote_filter=filter_changed,
            deleted_chains=stale_sorted,
        )

    @staticmethod
    def _ordered(programmed: dict[ServicePortName, _Programmed]) -> list[_Programmed]:
        # A stable order keeps the shared chains byte-identical across syncs (Go iterates a map).
        return [programmed[k] for k in sorted(programmed)]

    # ---- applying ----

    def _flushed_by_someone_else(self) -> bool:
        """Upstream's iptables Monitor: a missing canary chain means a firewall reload wiped the
        tables, so the next sync must be full (our in-memory view of the kernel is wrong)."""
        now = time.monotonic()
        if now - self._last_canary_check < self.canary_interval:
            return False
        self._last_canary_check = now
        gone = not self.iptables.chain_exists("mangle", CANARY)
        if gone:
            log.warning("canary chain %s is gone: tables were flushed, forcing a full sync", CANARY)
            self._need_dump = True
        return gone

    def sync(self, request: SyncRequest) -> SyncResult:
        full = request.full or self._need_full or self._flushed_by_someone_else()
        start = time.perf_counter()
        cpu0 = time.process_time()
        # CPU seconds of the restore process (user+sys, the kernel's commit included): a fair
        # figure on a loaded machine where wall time mostly measures waiting for a core.
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stream: RestoreStream | None = None
        kept: list[str] = []
        kept_size = 0

        def write(chunk: str) -> None:
            # Rendering streams into the running iptables-restore: the input never exists whole
            # in memory. Small inputs are also kept (logs, error context, tests).
            nonlocal stream, kept_size
            if stream is None:
                stream = self.iptables.open_restore()
            stream.write(chunk)
            if kept_size <= self.keep_input_bytes:
                kept_size += len(chunk)
                if kept_size > self.keep_input_bytes:
                    kept.clear()
                else:
                    kept.append(chunk)

        try:
            if full:
                self._prepare_full_sync()
            plan = self._emit(request, full, write)
        except Exception as e:  # nothing may stay half-applied: kill the restore before EOF
            if stream is not None:
                stream.abort()
            self._need_full = True
            self._need_dump = True
            log.exception("iptables sync failed while rendering")
            return SyncResult(ok=False, error=f"render: {e}")
        plan.chunks = kept
        self.last_plan = plan
        t_render = time.perf_counter()
        cpu1 = time.process_time()
        if stream is not None:
            try:
                stream.close()
            except (IPTablesError, OSError) as e:
                self._need_full = True
                self._need_dump = True
                err = str(e)
                if isinstance(e, IPTablesError) and e.line and kept:
                    lines = plan.data.decode(errors="replace").splitlines()
                    ctx = lines[max(0, e.line - 2) : e.line + 1]
                    err += " near: " + " | ".join(ctx)
                log.error("iptables-restore failed full=%s err=%s", full, err)
                return SyncResult(ok=False, error=err)
        t_restore = time.perf_counter()
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        old = self._programmed
        self._programmed = plan.programmed
        self._need_full = False
        if full:
            self._need_dump = False
        self._after_sync(request, old)
        self.last_plan_stats.update(
            {
                "plan_s": t_render - start,
                "plan_cpu_s": cpu1 - cpu0,
                "restore_s": t_restore - t_render,
                "restore_cpu_s": (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime),
                "total_s": time.perf_counter() - start,
            }
        )
        filter_rules = sum(p.filter.count("\n") for p in plan.programmed.values()) + len(
            self._filter_globals()
        )
        nat_rules = sum(p.nat_rules + p.dispatch.count("\n") for p in plan.programmed.values())
        return SyncResult(ok=True, rules_total={"filter": filter_rules, "nat": nat_rules})

    def _prepare_full_sync(self) -> None:
        ips: tuple[str, ...] = ()
        try:
            ips = tuple(self.iptables.local_addresses() if self.family == "IPv6"
                        else self.iptables.local_ipv4_addresses())
        except (IPTablesError, OSError) as e:
            log.warning("cannot list node addresses err=%s", e)
        # The Node object's addresses (upstream's nodeIP) plus every local address.
        self._node_ips = tuple(dict.fromkeys(self._config_node_ips + ips))
        matches_loopback = not self.nodeport_addresses or any(
            ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(c, strict=False)
            for c in self.nodeport_addresses
        )
        if self.localhost_nodeports and matches_loopback:
            try:
                # Upstream sets route_localnet so NodePorts answer on 127.0.0.1 (KUBE-FIREWALL guards it).
                self.iptables.sysctl("net.ipv4.conf.all.route_localnet", "1")
            except (IPTablesError, OSError) as e:
                log.warning("cannot set route_localnet err=%s", e)

    def _after_sync(self, request: SyncRequest, old: dict[ServicePortName, _Programmed]) -> None:
        if self.health_server is not None:
            self._sync_health(request)
        if self.conntrack is not None:
            self._clean_conntrack(request, old)

    def _sync_health(self, request: SyncRequest) -> None:
        assert self.health_server is not None
        sync_health_server(self.health_server, request.services, request.endpoints)

    def _clean_conntrack(self, request: SyncRequest, old: dict[ServicePortName, _Programmed]) -> None:
        """Delete UDP conntrack entries that would keep steering packets to the wrong place:
        endpoints the rules no longer DNAT to, endpoints the trackers saw go, and UDP Services
        that got their first endpoint (kproxy.proxiers.udpstale)."""
        assert self.conntrack is not None
        clean_udp_conntrack(self.conntrack, request, old, self._programmed)

    # ---- cleanup ----

    def cleanup(self) -> bool:
        """Remove every jump kproxy inserted and every chain it owns, in one restore per table."""
        ok = True
        owned_global = set(FILTER_CHAINS) | set(NAT_CHAINS) | {CANARY, KUBELET_FIREWALL}
        for table in ("filter", "nat", "mangle"):
            try:
                dump = self.iptables.save(table)
            except (IPTablesError, OSError) as e:
                log.error("cleanup: iptables-save -t %s failed err=%s", table, e)
                ok = False
                continue
            chains = chains_in_dump(dump)
            ours = sorted(c for c in chains if c in owned_global or c.startswith(SERVICE_CHAIN_PREFIXES))
            if not ours:
                continue
            ours_set = set(ours)
            deletes = []
            for line in dump.splitlines():
                if not line.startswith("-A "):
                    continue
                chain = line.split(" ", 2)[1]
                target = line.rsplit(" -j ", 1)[-1].split(" ", 1)[0] if " -j " in line else ""
                if chain not in ours_set and target in ours_set:
                    deletes.append("-D " + line[3:] + "\n")
            # The same nf_tables chain-list cost as a full sync (see NFT_ALL_CHAINS_THRESHOLD):
            # without "-Z" first, deleting 110,000 chains takes minutes instead of seconds; as
            # there, only when nothing but kproxy's chains and jumps would be zeroed.
            zero = ("-Z\n" if self.iptables.backend == "nft" and len(ours) > NFT_ALL_CHAINS_THRESHOLD
                    and only_kproxy_in(dump.splitlines(), lambda c: c in ours_set) else "")
            body = (
                zero
                + "".join(deletes)
                + "".join(f":{c} - [0:0]\n" for c in ours)
                + "".join(f"-X {c}\n" for c in ours)
            )
            try:
                self.iptables.restore(f"*{table}\n{body}COMMIT\n".encode())
            except (IPTablesError, OSError) as e:
                log.error("cleanup of table %s failed err=%s", table, e)
                ok = False
        self._programmed.clear()
        self._need_full = True
        self._need_dump = True
        return ok

    def close(self) -> None:
        if self.health_server is not None:
            self.health_server.close()


def _backend(config: KProxyConfig) -> Backend:
    wanted = config.iptables_backend
    if wanted not in ("", "nft", "legacy"):
        raise ValueError(f"iptables backend {wanted!r}: expected nft or legacy")
    # One back end for both families, as upstream's iptables-wrapper picks one for the node.
    return detect_backend(config.netns or None) if not wanted else ("legacy" if wanted == "legacy" else "nft")


def family_supported(config: KProxyConfig, family: IPFamily) -> bool:
    """Upstream's platformCheckSupported: the family's iptables tool can read its nat table."""
    ipt = IPTables(backend=_backend(config), netns=config.netns or None, ipv6=family == "IPv6")
    try:
        ipt.save("nat")
    except (IPTablesError, OSError) as e:
        log.info("%s iptables not usable here err=%s", family, e)
        return False
    return True


def new_family_proxier(config: KProxyConfig, family: IPFamily) -> Proxier:
    """The iptables (family IPv4) or ip6tables (IPv6) proxier from the validated configuration
    (see the module docstring); the Service health checks are kproxy.proxiers.meta's."""
    netns = config.netns or None  # "" is no namespace too
    return IptablesProxier(
        IPTables(backend=_backend(config), netns=netns, ipv6=family == "IPv6"),
        node_name=config.hostname_override,
        cluster_cidr=config.cluster_cidr,
        nodeport_addresses=config.nodeport_addresses,
        masquerade_all=config.masquerade_all,
        masquerade_bit=config.masquerade_bit,  # 0 is valid (validation accepts 0..31)
        localhost_nodeports=config.localhost_nodeports,
        conntrack=Conntrack(netns=netns, family=family),
        node_ips=config.node_ips,
        node_zone=config.node_zone,
    )


def new_proxier(config: KProxyConfig) -> Proxier:
    """One proxier per family this node can run (kproxy.proxiers.meta), as upstream's
    NewDualStackProxier."""
    return new_proxier_for_families(config, new_family_proxier, family_supported)

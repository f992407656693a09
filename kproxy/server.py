"""Wires reflectors -> change trackers -> runner -> Proxier, plus the health and metrics servers.

Order, as upstream's ProxyServer.Run: find our Node (node IPs, eligibility), build the proxier,
start the HTTP servers, list+watch Services and EndpointSlices, wait until both listed once,
then sync: once immediately (full), then as the runner decides.
"""
from __future__ import annotations

import asyncio
import gc
import importlib
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from sys import intern
from typing import Any

from kproxy.changes import Checkout, ProxyState, parse_trigger_time
from kproxy.config import ConfigError, KProxyConfig
from kproxy.healthz import ProxierHealth, health_routes
from kproxy.httpserve import Handler, HTTPServer, Response
from kproxy.kube.client import ApiClient
from kproxy.kube.informer import Informer, SummaryStore
from kproxy.kube.ingest import (
    ENDPOINTSLICE_LABEL_SELECTOR,
    SERVICE_LABEL_SELECTOR,
    EndpointSlice,
    InvalidObject,
    Node,
    Service,
    node_eligible,
    node_ips,
    service_ports,
    slice_endpoints,
    trigger_time,
)
from kproxy.kube.kubeconfig import KubeConfigError, resolve_access
from kproxy.kube.reflector import Reflector
from kproxy.memtrim import release_free_memory
from kproxy.metrics import CONTENT_TYPE, ProxyMetrics
from kproxy.proxiers.base import Proxier, SyncResult
from kproxy.proxiers.meta import MetaProxier, primary_family, single_family
from kproxy.proxy.families import family_of
from kproxy.runner import BoundedFrequencyRunner
from kproxy.servicecidrs import FIRST_SYNC_WAIT
from kproxy.servicecidrs import for_proxier as service_cidr_source

log = logging.getLogger("kproxy.server")

ProxierFactory = Callable[[KProxyConfig], Proxier]

BUILTIN_MODES: Mapping[str, str] = {
    "iptables": "kproxy.proxiers.iptables",
    "ipvs": "kproxy.proxiers.ipvs",
    "nftables": "kproxy.proxiers.nftables",
    "userspace": "kproxy.proxiers.userspace",
}
FULL_SYNC_PERIOD = 3600.0  # upstream's proxyutil.FullSyncPeriod: partial syncs, but a full one hourly
NODE_WAIT = 30.0  # how long to wait for our Node before falling back to --bind-address


class ProxierInitError(Exception):
    """The chosen mode's proxier could not be built (missing kernel feature, tool, ...)."""

    def __init__(self, mode: str, cause: BaseException) -> None:
        super().__init__(f"{mode}: {cause}")
        self.mode, self.cause = mode, cause


class ModeRegistry:
    """Proxy mode name -> module exposing `new_proxier(config) -> Proxier` (imported lazily, so
    only the chosen mode's dependencies load) or a factory callable."""

    def __init__(self, extra: Mapping[str, str | Callable[[KProxyConfig], Any]] | None = None) -> None:
        self._table: dict[str, str | Callable[[KProxyConfig], Any]] = dict(BUILTIN_MODES)
        self._table.update(extra or {})

    def names(self) -> list[str]:
        return sorted(self._table)

    def is_builtin(self, mode: str) -> bool:
        """One of kube-proxy's modes, served by kproxy's own module (not a factory put in its place)."""
        return mode in BUILTIN_MODES and self._table.get(mode) == BUILTIN_MODES[mode]

    def leftovers_cleaner(self, mode: str) -> Callable[[KProxyConfig], bool] | None:
        """A built-in mode module's cleanup_leftovers(config), for modes whose kernel state can be
        removed without a whole proxier (the userspace mode needs no relay and no node address);
        None for modes without one and for factories put in place of a module."""
        target = self._table.get(mode)
        if not isinstance(target, str):
            return None
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError:
            return None
        fn = getattr(module, "cleanup_leftovers", None)
        return fn if callable(fn) else None

    def factory(self, mode: str) -> ProxierFactory:
        target = self._table.get(mode)
        if target is None:
            raise ConfigError(f"--proxy-mode: unknown mode {mode!r} (one of {', '.join(self.names())})")
        if callable(target):
            return target
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as err:
            if err.name and target.startswith(err.name):
                raise ConfigError(
                    f"--proxy-mode {mode}: not available in this build (module {target} does not exist)"
                ) from None
            raise
        fn = getattr(module, "new_proxier", None)
        if not callable(fn):
            raise ConfigError(f"--proxy-mode {mode}: {target} has no new_proxier(config)")
        if not callable(getattr(module, "new_family_proxier", None)):
            # One family only (no per-family proxiers yet): it gets that family's view.
            single: Callable[[KProxyConfig], Proxier] = fn

            def single_stack(cfg: KProxyConfig) -> Proxier:
                return single_family(single(cfg))

            return single_stack
        return fn  # type: ignore[no-any-return]


# What `--cleanup` visits besides the configured mode, as kube-proxy's cleanupLeftovers does:
# an operator switching modes runs it to remove what the previous mode left in the kernel.
CLEANUP_MODES = ("iptables", "ipvs", "nftables", "userspace")


def cleanup(cfg: KProxyConfig, factory: ProxierFactory, registry: ModeRegistry | None = None) -> int:
    ok = True
    # Only for kube-proxy's own modes: a mode registered in their place (tests' recording
    # proxier) cleans what it made and leaves the node's kernel state alone.
    if registry is not None and registry.is_builtin(cfg.mode):
        for mode in CLEANUP_MODES:
            if mode != cfg.mode:
                try:
                    ok = _clean_mode(registry, mode, cfg, None) and ok
                except Exception as err:  # noqa: BLE001 - another mode's failure is reported, not fatal
                    log.error("cleanup mode=%s failed err=%s", mode, err)
                    ok = False
    ok = _clean_mode(registry, cfg.mode, cfg, factory) and ok
    log.info("cleanup mode=%s ok=%s", cfg.mode, ok)
    return 0 if ok else 1


def _clean_mode(registry: ModeRegistry | None, mode: str, cfg: KProxyConfig, factory: ProxierFactory | None) -> bool:
    """One mode's cleanup: its module's cleanup_leftovers(config) when it has one (no proxier
    needed), else its proxier's cleanup(). `factory` is given for the configured mode, whose
    proxier must start; another mode that cannot start here (no IPVS in this kernel) cannot have
    left anything in it, so that counts as clean."""
    configured = factory is not None
    leftovers = registry.leftovers_cleaner(mode) if registry is not None else None
    if leftovers is not None:
        clean = bool(leftovers(cfg))
    else:
        try:
            if factory is None:
                assert registry is not None, "another mode's cleanup comes from the registry"
                factory = registry.factory(mode)
            proxier = factory(cfg)
        except Exception as err:
            if configured:
                raise ProxierInitError(mode, err) from err
            log.info("cleanup mode=%s skipped: cannot start here: %s", mode, err)
            return True
        try:
            clean = proxier.cleanup()
        finally:
            proxier.close()
    if not configured:
        log.info("cleanup mode=%s ok=%s", mode, clean)
    return clean


KERNEL_MODES = frozenset(("iptables", "ipvs", "nftables"))


def _same_netns_as_init() -> bool:
    try:
        return os.stat("/proc/self/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def apply_conntrack_settings(cfg: KProxyConfig, proc_sys: Path = Path("/proc/sys"),
                             init_netns: bool | None = None) -> dict[str, int]:
    """kube-proxy's conntrack tuning at start-up: the conntrack timeouts of this network
    namespace (only values > 0, only when they differ), and nf_conntrack_max raised to
    max(maxPerCore x CPUs, min), only in the initial namespace (it is global; in a node netns it
    is read-only). The hash table size (/sys, global) is left alone. Returns what was written."""
    nf = proc_sys / "net" / "netfilter"
    wanted: dict[str, int] = {
        "nf_conntrack_tcp_timeout_established": int(cfg.conntrack_tcp_established_timeout),
        "nf_conntrack_tcp_timeout_close_wait": int(cfg.conntrack_tcp_close_wait_timeout),
        "nf_conntrack_udp_timeout": int(cfg.conntrack_udp_timeout),
        "nf_conntrack_udp_timeout_stream": int(cfg.conntrack_udp_stream_timeout),
    }
    written: dict[str, int] = {}
    if init_netns if init_netns is not None else _same_netns_as_init():
        per_core = cfg.conntrack_max_per_core * (os.cpu_count() or 1)
        max_ = max(per_core, cfg.conntrack_min) if cfg.conntrack_max_per_core > 0 else 0
        try:
            if max_ and int((nf / "nf_conntrack_max").read_text()) < max_:
                (nf / "nf_conntrack_max").write_text(f"{max_}\n")
                written["nf_conntrack_max"] = max_
        except (OSError, ValueError) as err:
            log.warning("conntrack: cannot raise nf_conntrack_max to %d: %s", max_, err)
    for name, value in wanted.items():
        if value <= 0:
            continue
        path = nf / name
        try:
            if int(path.read_text()) != value:
                path.write_text(f"{value}\n")
                written[name] = value
        except (OSError, ValueError) as err:  # no nf_conntrack module, read-only /proc/sys
            log.warning("conntrack: cannot set %s=%d: %s", name, value, err)
    if written:
        log.info("conntrack settings %s", " ".join(f"{k}={v}" for k, v in written.items()))
    return written


async def _start_http(routes: Mapping[str, Handler], address: str, what: str,
                      hard_fail: bool) -> HTTPServer | None:
    """Serve routes on IP:port; "" disables. A port that cannot be bound is logged and skipped,
    or fatal with --bind-address-hard-fail, as upstream."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    server = HTTPServer(routes)
    try:
        bound = await server.start(host, int(port))
    except OSError as err:
        msg = f"--{what}-bind-address {address}: cannot listen ({err.strerror})"
        if hard_fail:
            raise ConfigError(msg) from None
        log.error("%s; going on without it (--bind-address-hard-fail makes this fatal)", msg)
        return None
    # The port actually bound, so a caller that asked for port 0 (tests beside other processes on
    # one loopback) can read it from this line instead of racing for a port it picked itself.
    log.info("serving %s address=%s bound=%s", what, address, bound)
    return server


def _slice_service_key(es: EndpointSlice) -> str:
    # Interned: kept once per slice by the EndpointSlice store and once per Service by the
    # tracker, which otherwise held two copies more of every Service's key (1.2 MiB at 10,000).
    svc = es.service_name
    return intern(f"{es.metadata.namespace}/{svc}") if svc else ""


def node_local_cidrs(node: Node | None) -> str:
    """--detect-local-mode NodeCIDR: the Node's spec.podCIDRs (else podCIDR), at most one per
    family, parsed; what does not parse is skipped with a warning. "" (no local detection, as
    upstream's no-op detector) when the Node has none."""
    if node is None:
        log.warning("detect-local-mode NodeCIDR: no Node object; pod traffic is not told apart")
        return ""
    raw = node.spec.pod_cidrs or ([node.spec.pod_cidr] if node.spec.pod_cidr else [])
    by_family: dict[int, str] = {}
    for text in raw:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            log.warning("node=%s skipping podCIDR %r: not a CIDR", node.metadata.name, text)
            continue
        by_family.setdefault(net.version, str(net))
    if not by_family:
        log.warning("detect-local-mode NodeCIDR: node=%s has no podCIDR; pod traffic is not told apart",
                    node.metadata.name)
    return ",".join(by_family.values())


class ProxyServer:
    """The running pieces; `run()` returns only when cancelled."""

    def __init__(self, cfg: KProxyConfig, factory: ProxierFactory, client: ApiClient,
                 metrics: ProxyMetrics | None = None) -> None:
        self.cfg = cfg
        self.factory = factory
        self.client = client
        self.metrics = metrics or ProxyMetrics()
        self.health = ProxierHealth(2 * cfg.sync_period)
        self.state = ProxyState()
        self.proxier: Proxier | None = None
        self.runner = BoundedFrequencyRunner("sync-runner", self._sync, cfg.min_sync_period, cfg.sync_period)
        self.start_time = time.time()
        self.last_full_sync = float("-inf")
        self.syncs = 0
        self.node: Node | None = None
        self._node_seen = asyncio.Event()
        self.initialized = False  # both Services and EndpointSlices listed once
        # Monotonic time the oldest change not yet handed to a sync was queued (None: nothing
        # waits): the sync's log line says how long the change waited and where the time went,
        # so write -> rule present can be split up (bench/bench_nftables_latency.py reads it).
        self._first_queued: float | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- event handlers (run on the event loop) ----

    def _queued(self) -> None:
        # As upstream, changes seen during the initial lists do not count against health: the
        # first sync waits for both lists however long they take.
        if self.initialized:
            self.health.queued_update()
        if self._first_queued is None:
            self._first_queued = time.monotonic()
        queued_at = time.time()
        for family in self._families():
            self.metrics.last_queued_timestamp.labels(ip_family=family).set(queued_at)
        self.metrics.service_changes_pending.set(self.state.services_tracker.pending())
        self.metrics.endpoint_changes_pending.set(self.state.endpoints_tracker.pending())
        self.runner.run()

    def _invalid(self, err: InvalidObject) -> None:
        # One line per invalid version of an object; the object counts as absent (its rules, if
        # an earlier version had any, are removed) and nothing else is affected.
        log.warning("skipping invalid object: %s", err)
        self.metrics.invalid_objects.labels(kind=err.kind, reason=err.reason).inc()

    def _skipped(self, err: InvalidObject) -> None:
        # One entry of a filtered list left out (as upstream's filters); the rest of the object is
        # programmed. One line per invalid entry of each version of the object.
        log.warning("skipping invalid entry, the rest is programmed: %s", err)
        self.metrics.invalid_values.labels(kind=err.kind, reason=err.reason).inc()

    def _undecodable(self, kind: str) -> Callable[[], None]:
        return lambda: self.metrics.invalid_objects.labels(kind=kind, reason="decode").inc()

    def on_service(self, key: str, _old: str | None, svc: Service | None) -> None:
        ports = {}
        if svc is not None:
            try:
                ports = service_ports(svc, self._skipped)
            except InvalidObject as err:
                self._invalid(err)
        if self.state.services_tracker.update(key, ports):
            self.metrics.service_changes_total.inc()
            self._queued()

    def on_slice(self, key: str, old_service: str | None, es: EndpointSlice | None) -> None:
        """key: the slice's namespace/name; old_service: the Service key it belonged to."""
        # The tracker names a slice by `key`, its store key: the same string object the SummaryStore
        # keeps (its name alone was one more string per slice, 0.6 MiB at 10,000 slices); the
        # slices of one Service share its namespace, so their order by key is their order by name.
        new_service = _slice_service_key(es) if es is not None else None
        # Deleted, or (unusually) relabelled to another Service: gone from the old one.
        if (old_service and old_service != new_service
                and self.state.endpoints_tracker.update(old_service, key, None)):
            self.metrics.endpoint_changes_total.inc()
            self._queued()
        if es is None or not new_service:
            return
        trig = parse_trigger_time(trigger_time(es))
        if trig is not None and trig < self.start_time:
            trig = None  # as upstream: changes from before we started say nothing about us
        try:
            eps = slice_endpoints(es, self.cfg.node_name)
        except InvalidObject as err:
            self._invalid(err)
            eps = {}
        if self.state.endpoints_tracker.update(new_service, key, eps, trig):
            self.metrics.endpoint_changes_total.inc()
            self._queued()

    def on_node(self, old: Node | None, new: Node | None) -> None:
        if new is None:
            self.health.node_eligible = False
            return
        self.node = new
        self.health.node_eligible = node_eligible(new)
        self._node_seen.set()

    # ---- sync ----

    async def _sync(self, full: bool) -> bool:
        assert self.proxier is not None
        proxier = self.proxier
        now = time.monotonic()
        queued, self._first_queued = self._first_queued, None
        full = full or now - self.last_full_sync >= FULL_SYNC_PERIOD
        co = self.state.checkout(full)
        checked_out = time.monotonic()
        self.metrics.service_changes_pending.set(0)
        self.metrics.endpoint_changes_pending.set(0)
        t0 = time.perf_counter()
        in_thread = t0

        def run() -> SyncResult:
            nonlocal in_thread
            in_thread = time.perf_counter()
            return proxier.sync(co.request)

        try:
            result = await asyncio.to_thread(run)
        except Exception as err:  # a proxier bug is a failed sync: retried, full, stale kept
            log.exception("sync raised mode=%s", self.cfg.mode)
            result = SyncResult(ok=False, error=f"{type(err).__name__}: {err}")
        elapsed = time.perf_counter() - t0
        self.syncs += 1
        # Per family as upstream's proxiers (one each): a single proxier's time is its family's.
        family_seconds = result.family_seconds or {f: elapsed for f in self._families()}
        for family, seconds in family_seconds.items():
            self.metrics.sync_duration.labels(ip_family=family).observe(seconds)
            (self.metrics.sync_full_duration if full else self.metrics.sync_partial_duration).labels(
                ip_family=family).observe(seconds)
        # waited: oldest change queued -> sync start; checkout: the trackers' hand-over;
        # thread: until the proxier's thread ran; queued_at/started_at: monotonic, as the bench's clock.
        log.log(logging.DEBUG if result.ok else logging.WARNING,
                "sync full=%s changed=%d services=%d endpoints=%d ok=%s elapsed=%.4fs waited=%.4fs "
                "checkout=%.4fs thread=%.4fs queued_at=%.6f started_at=%.6f%s", full,
                len(co.request.changed), len(co.request.services), len(co.request.endpoints),
                result.ok, elapsed, now - queued if queued is not None else 0.0, checked_out - now, in_thread - t0,
                queued or 0.0, now,
                f" error={result.error!r}" if result.error else "")
        for family, ok in result.family_ok.items():
            if ok and not result.ok:
                self.health.updated(family)  # healthz is per family: this one did sync
        if not result.ok:
            self.state.requeue_stale(co.request)
            if self.cfg.mode in ("iptables", "nftables"):
                failures = self.metrics.restore_failures if full else self.metrics.partial_restore_failures
                for family in family_seconds:
                    if not result.family_ok.get(family, False):
                        failures.labels(ip_family=family).inc()
            return False
        if full:
            self.last_full_sync = now
            # What a full sync leaves (10,000 Services' records, the proxier's bookkeeping) lives
            # until the next one: out of the collector's way, a full collection no longer walks
            # it (~40 ms at 10,000 Services, a pause that landed in the middle of write -> rule
            # present). Unfrozen first so last hour's frozen leftovers can be collected again.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            # And hand what the sync and that collection freed back to the kernel, a second
            # later: by then this sync's request, views and checkout are gone too (a trim right
            # here left RSS where it was: 100.7 MiB at 10,000 Services; a second later 99.5-99.6).
            asyncio.get_running_loop().call_later(1.0, release_free_memory)
        wall = time.time()
        self.health.updated()  # every family synced (a family's failure returned above)
        for family in family_seconds:
            self.metrics.last_sync_timestamp.labels(ip_family=family).set(wall)
        family_rules = result.family_rules or {f: result.rules_total for f in family_seconds}
        for family, rules in family_rules.items():
            for table, n in rules.items():
                self.metrics.iptables_total.labels(table=table, ip_family=family).set(n)
        if co.trigger_times:
            self._observe_programming(co, wall, tuple(family_seconds))
        return True

    def _families(self) -> tuple[str, ...]:
        """The IP families the proxier programs (the metrics' ip_family values)."""
        if isinstance(self.proxier, MetaProxier):
            return self.proxier.families
        return (primary_family(self.cfg),)

    def _observe_programming(self, co: Checkout, wall: float, families: tuple[str, ...]) -> None:
        """Network programming latency of each changed Service, under each family it has a
        ClusterIP of (upstream: each family's proxier observes its own EndpointSlices). Only the
        changed ServicePorts are looked at: a partial sync stays O(change)."""
        fams: dict[str, set[str]] = {}
        for spn in co.request.changed:
            sp = co.request.services.get(spn)
            if sp is not None:
                fams.setdefault(f"{spn.namespace}/{spn.name}", set()).update(family_of(ip) for ip in sp.cluster_ips)
        for key, times in co.trigger_times.items():
            for family in sorted(fams.get(key, ())) or families[:1]:
                if family not in families:
                    continue
                for t in times:
                    if wall >= t:
                        self.metrics.network_programming.labels(ip_family=family).observe(wall - t)

    # ---- lifecycle ----

    async def _find_node(self) -> None:
        node_inf: Informer[Node] = Informer(self.on_node)
        r = Reflector(self.client, "/api/v1/nodes", Node, node_inf,
                      field_selector=f"metadata.name={self.cfg.node_name}", name="nodes",
                      on_undecodable=self._undecodable("Node"))
        self._tasks.append(asyncio.create_task(r.run(), name="reflector-nodes"))
        try:
            await asyncio.wait_for(self._node_seen.wait(), NODE_WAIT)
        except TimeoutError:
            log.warning("node=%s not found after %.0fs: using bind-address %s", self.cfg.node_name,
                        NODE_WAIT, self.cfg.bind_address)
        ips = node_ips(self.node) if self.node is not None else []
        if ips:
            self.cfg.node_ips = tuple(ips)
        elif self.cfg.bind_address not in ("0.0.0.0", "::"):
            self.cfg.node_ips = (self.cfg.bind_address,)
        if self.node is not None and not ips:
            # As upstream's detectNodeIPs: a Node without a usable address is not fatal; NodePorts
            # are then not bound to a node IP of its own (only --bind-address, if one was given).
            log.warning("node=%s has no valid InternalIP/ExternalIP address; node IPs from --bind-address=%s",
                        self.cfg.node_name, self.cfg.bind_address)
        if self.node is not None:
            self.cfg.node_zone = self.node.metadata.labels.get("topology.kubernetes.io/zone", "")
        if self.cfg.detect_local_mode == "NodeCIDR":
            self.cfg.cluster_cidr = node_local_cidrs(self.node)
        log.info("node=%s node_ips=%s zone=%s", self.cfg.node_name, ",".join(self.cfg.node_ips) or "-",
                 self.cfg.node_zone or "-")

    async def run(self) -> None:
        http: list[HTTPServer] = []
        try:
            await self._find_node()
            if self.cfg.mode in KERNEL_MODES:
                await asyncio.to_thread(apply_conntrack_settings, self.cfg)
            try:
                self.proxier = await asyncio.to_thread(self.factory, self.cfg)
            except Exception as err:
                raise ProxierInitError(self.cfg.mode, err) from err
            families = getattr(self.proxier, "families", None)
            if families:
                self.health.families = tuple(families)  # healthz per family (kproxy.proxiers.meta)
            for routes, addr, what in ((health_routes(self.health, self.metrics), self.cfg.healthz_bind_address,
                                        "healthz"),
                                       (self._metrics_routes(), self.cfg.metrics_bind_address, "metrics")):
                site = await _start_http(routes, addr, what, self.cfg.bind_address_hard_fail)
                if site is not None:
                    http.append(site)
            svc_inf: SummaryStore[Service] = SummaryStore(self.on_service)
            es_inf: SummaryStore[EndpointSlice] = SummaryStore(self.on_slice, _slice_service_key)
            svc_r = Reflector(self.client, "/api/v1/services", Service, svc_inf,
                              label_selector=SERVICE_LABEL_SELECTOR, name="services",
                              on_undecodable=self._undecodable("Service"))
            es_r = Reflector(self.client, "/apis/discovery.k8s.io/v1/endpointslices", EndpointSlice, es_inf,
                             label_selector=ENDPOINTSLICE_LABEL_SELECTOR, name="endpointslices",
                             on_undecodable=self._undecodable("EndpointSlice"))
            for refl in (svc_r, es_r):
                self._tasks.append(asyncio.create_task(refl.run(), name=f"reflector-{refl.name}"))
            # nftables mode: the ServiceCIDRs' CIDRs for the unallocated-ClusterIP drop rule.
            cidrs = service_cidr_source(self.client, self.proxier, self.runner.run, on_invalid=self._invalid,
                                        on_undecodable=self._undecodable("ServiceCIDR")) \
                if self.cfg.mode == "nftables" else None
            if cidrs is not None:
                self._tasks.append(asyncio.create_task(cidrs.run(), name="servicecidrs"))

            async def sync_when_listed() -> None:
                # As upstream: no sync before both caches have listed once, else the first
                # (full) sync would program a partial world.
                await svc_r.wait_synced()
                await es_r.wait_synced()
                if cidrs is not None:
                    await cidrs.wait_listed(FIRST_SYNC_WAIT)
                log.info("synced services=%d endpointslices=%d", len(svc_inf), len(es_inf))
                self.initialized = True
                await self.runner.loop()

            self._tasks.append(asyncio.create_task(sync_when_listed(), name="sync-runner"))
            # Every task runs forever; one that ends (a bug in a handler, say) must take the
            # process down rather than leave it running on a frozen view.
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            raise RuntimeError(f"task {next(iter(done)).get_name()} stopped")
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for h in http:
                await h.close()
            if self.proxier is not None:
                self.proxier.close()

    def _metrics_routes(self) -> dict[str, Handler]:
        def metrics() -> Response:
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)

        def proxy_mode() -> Response:
            return Response(200, self.cfg.mode.encode())

        def healthz() -> Response:
            return Response(200, b"ok")

        return {"/metrics": metrics, "/proxyMode": proxy_mode, "/healthz": healthz}


async def serve(cfg: KProxyConfig, factory: ProxierFactory) -> None:
    """Run until SIGTERM/SIGINT."""
    try:
        access = resolve_access(cfg.kubeconfig, cfg.master)
    except KubeConfigError as err:
        raise ConfigError(f"--kubeconfig: {err}") from None
    client = ApiClient(access)
    server = ProxyServer(cfg, factory, client)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(server.run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    log.info("starting kproxy mode=%s node=%s server=%s", cfg.mode, cfg.node_name, access.server)
    try:
        await task
    except asyncio.CancelledError:
        log.info("shutting down")
    finally:
        await client.close()

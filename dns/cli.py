"""kproxy-dns: the cluster DNS server.

  kproxy-dns --kubeconfig K [--zone cluster.local] [--dns-port 53] [--health-port 8080]
             [--upstream 10.0.0.2:53 ...]
  kproxy-dns --objects services-and-slices.json ...   (a static zone, no API server)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from kdns import wire
from kdns.acl import Acl, default_networks, parse_networks
from kdns.records import ZoneIndex
from kdns.resolver import Resolver, parse_upstream, resolv_conf_upstreams
from kdns.server import DNSServer, HealthServer, TcpLimits

log = logging.getLogger("kdns")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kproxy-dns", description="Cluster DNS per the Kubernetes DNS specification")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kubeconfig", default="", help="kubeconfig of the API server to watch")
    src.add_argument("--objects", default="", help="JSON List of Services and EndpointSlices (static zone)")
    p.add_argument("--master", default="", help="API server URL (overrides the kubeconfig's)")
    p.add_argument("--zone", default="cluster.local", help="cluster domain (default cluster.local)")
    p.add_argument("--ttl", type=int, default=5, help="TTL of cluster records in seconds (default 5)")
    p.add_argument("--dns-bind-address", default="0.0.0.0", help="address for UDP and TCP (default 0.0.0.0)")
    p.add_argument("--dns-port", type=int, default=53, help="port for UDP and TCP (default 53; 0 = any free)")
    p.add_argument("--health-bind-address", default="127.0.0.1", help="address of /health /ready /metrics")
    p.add_argument("--health-port", type=int, default=8080, help="port of /health /ready /metrics (0 = off)")
    p.add_argument("--upstream", action="append", default=[],
                   help="upstream resolver host[:port] for non-cluster names (repeatable; default: "
                        "the nameservers of --resolv-conf)")
    p.add_argument("--resolv-conf", default="/etc/resolv.conf", help="where to read upstream nameservers")
    p.add_argument("--cache-size", type=int, default=10000, help="forward cache entries (0 = off)")
    p.add_argument("--upstream-timeout", type=float, default=2.0, help="seconds per upstream attempt")
    p.add_argument("--allow-query", action="append", default=[], metavar="CIDR",
                   help="sources that get answers (repeatable or comma-separated); others get REFUSED. "
                        "Default: loopback, --cluster-cidr, --service-cluster-ip-range and the networks "
                        "of this host's interfaces")
    p.add_argument("--allow-recursion", action="append", default=[], metavar="CIDR",
                   help="sources whose names outside the zone are forwarded upstream (also need "
                        "--allow-query); others get REFUSED. Default: as --allow-query's default")
    p.add_argument("--cluster-cidr", action="append", default=[], metavar="CIDR",
                   help="the pods' CIDR(s), allowed by default (repeatable or comma-separated)")
    p.add_argument("--service-cluster-ip-range", action="append", default=[], metavar="CIDR",
                   help="the Services' CIDR(s), allowed by default (repeatable or comma-separated)")
    p.add_argument("--node-networks-refresh", type=float, default=30.0, metavar="SECONDS",
                   help="how often the default access list re-reads this host's interface addresses "
                        "(default 30; 0 = only at start)")
    p.add_argument("--max-udp-size", type=int, default=wire.SERVER_UDP_SIZE,
                   help="largest UDP answer, also advertised in EDNS (512..4096, default 1232); "
                        "larger answers are truncated (TC) and the client retries over TCP")
    p.add_argument("--tcp-max-connections", type=int, default=TcpLimits.max_connections,
                   help="TCP connections in total (default 512); past it the oldest idle one is closed")
    p.add_argument("--tcp-max-connections-per-source", type=int, default=TcpLimits.max_per_source,
                   help="TCP connections from one address (default 64); past it that address's "
                        "oldest idle one is closed")
    p.add_argument("--tcp-idle-timeout", type=float, default=TcpLimits.idle_timeout,
                   help="seconds a TCP client may stay silent between queries (default 10)")
    p.add_argument("--port-file", default="", help="write the bound DNS port here once listening")
    p.add_argument("--v", "--log-level", dest="log_level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def _fail(msg: str) -> int:
    print(f"kproxy-dns: {msg}", file=sys.stderr)
    return 2


def _write_port_file(path: str, port: int) -> None:
    """Atomically: a reader polling for the file never sees it empty."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(port))
    os.replace(path + ".tmp", path)


async def _refresh_defaults(acl: Acl, resolver: Resolver, args: argparse.Namespace) -> None:
    """The default access list follows the node's addresses (DHCP, an added interface)."""
    cluster = parse_networks(args.cluster_cidr, "--cluster-cidr")
    services = parse_networks(args.service_cluster_ip_range, "--service-cluster-ip-range")
    while True:
        await asyncio.sleep(args.node_networks_refresh)
        try:
            nets = default_networks(cluster, services)
        except OSError as exc:
            log.warning("cannot read this host's addresses, keeping the access list: %r", exc)
            continue
        if acl.replace(nets):
            resolver.refresh_guard()
            log.info("node networks changed: default access list now %s", acl)


async def run(args: argparse.Namespace) -> None:
    index = ZoneIndex(zone=args.zone, ttl=args.ttl)
    upstreams = [parse_upstream(u) for u in args.upstream] or resolv_conf_upstreams(args.resolv_conf)
    looping = [(h, p) for h, p in upstreams if p == args.dns_port and args.dns_port != 0
               and (h == args.dns_bind_address or args.dns_bind_address in ("0.0.0.0", "::")
                    and (h.startswith("127.") or h == "::1"))]
    if looping:
        # This server as its own upstream (e.g. the node's resolv.conf names it) would forward
        # every unknown name to itself forever, as CoreDNS's loop plugin detects.
        log.warning("ignoring upstreams that are this server: %s", looping)
        upstreams = [u for u in upstreams if u not in looping]
    defaults: list[Acl] = []
    if not args.allow_query or not args.allow_recursion:
        defaults.append(Acl(default_networks(parse_networks(args.cluster_cidr, "--cluster-cidr"),
                                             parse_networks(args.service_cluster_ip_range,
                                                            "--service-cluster-ip-range"))))
    allow_query = Acl(parse_networks(args.allow_query, "--allow-query")) if args.allow_query else defaults[0]
    allow_recursion = (Acl(parse_networks(args.allow_recursion, "--allow-recursion")) if args.allow_recursion
                       else defaults[0])
    log.info("allow-query=%s allow-recursion=%s", allow_query, allow_recursion)
    resolver = Resolver(index, upstreams, wire.impl.Stats(), cache_size=args.cache_size,
                        timeout=args.upstream_timeout, allow_query=allow_query,
                        allow_recursion=allow_recursion, udp_size=args.max_udp_size)
    if args.objects:
        from kdns.source import load_file

        load_file(index, args.objects)
    limits = TcpLimits(max_connections=args.tcp_max_connections, max_per_source=args.tcp_max_connections_per_source,
                       idle_timeout=args.tcp_idle_timeout)
    server = DNSServer(resolver, args.dns_bind_address, args.dns_port, limits)
    await server.start()
    health = None
    if args.health_port:
        health = HealthServer(resolver, args.health_bind_address, args.health_port, server)
        await health.start()
    if args.port_file:
        _write_port_file(args.port_file, server.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    refresher = None
    if defaults and args.node_networks_refresh > 0:
        refresher = asyncio.create_task(_refresh_defaults(defaults[0], resolver, args))
    watcher = None
    if args.kubeconfig or args.master:
        from kdns.source import watch_cluster

        watcher = asyncio.create_task(watch_cluster(index, args.kubeconfig, args.master))
    log.info("serving zone=%s upstreams=%s compiled=%s", args.zone,
             ",".join(f"{h}:{p}" for h, p in upstreams) or "none", wire.COMPILED)
    waits: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
    if watcher is not None:
        waits.append(watcher)
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if watcher is not None and watcher in done and watcher.exception() is not None:
        log.error("watch failed: %r", watcher.exception())
    if watcher is not None:
        watcher.cancel()
    if refresher is not None:
        refresher.cancel()
    await server.stop()
    if health is not None:
        await health.stop()


def _run_loop(args: argparse.Namespace) -> None:
    try:
        import uvloop
    except ImportError:  # the pure asyncio loop works, only slower
        asyncio.run(run(args))
        return
    uvloop.run(run(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not 0 <= args.dns_port <= 65535:
        return _fail(f"--dns-port {args.dns_port}: must be 0..65535")
    for flag in ("allow_query", "allow_recursion", "cluster_cidr", "service_cluster_ip_range"):
        try:
            parse_networks(getattr(args, flag), "--" + flag.replace("_", "-"))
        except ValueError as exc:
            return _fail(str(exc))
    if not 512 <= args.max_udp_size <= 4096:
        return _fail(f"--max-udp-size {args.max_udp_size}: must be 512..4096")
    if args.tcp_max_connections < 1 or args.tcp_max_connections_per_source < 1:
        return _fail("--tcp-max-connections and --tcp-max-connections-per-source must be at least 1")
    if not 0 <= args.node_networks_refresh <= 86400:
        return _fail(f"--node-networks-refresh {args.node_networks_refresh}: must be 0..86400 seconds")
    if not 0 < args.tcp_idle_timeout <= 3600:
        return _fail(f"--tcp-idle-timeout {args.tcp_idle_timeout}: must be in (0, 3600] seconds")
    if args.objects and not os.path.isfile(args.objects):
        return _fail(f"--objects {args.objects}: no such file")
    if args.kubeconfig and not os.path.isfile(args.kubeconfig):
        return _fail(f"--kubeconfig {args.kubeconfig}: no such file")
    try:
        for u in args.upstream:
            parse_upstream(u)
    except ValueError:
        return _fail(f"--upstream {args.upstream}: expected host[:port]")
    try:
        _run_loop(args)
    except OSError as exc:
        return _fail(f"cannot listen on {args.dns_bind_address}:{args.dns_port}: {exc} "
                     "(--dns-bind-address/--dns-port)")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""kproxy-apiserver: the command line, first-start setup and the serving loop."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from ..store import backend
from . import bootstrap, limits, pki, satokens, semantics, servicecidrs
from .podio import PodIO
from .registry import Registry
from .server import APIServer
from .serviceaccounts import TokenSecretsController

log = logging.getLogger("kproxy.apiserver")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kproxy-apiserver",
                                description="A Kubernetes API server on an embedded SQLite store or on etcd.")
    p.add_argument("--data-dir", default=os.environ.get("KPROXY_APISERVER_DATA", "./var/apiserver"),
                   help="database, PKI, token file and kubeconfigs (default ./var/apiserver)")
    p.add_argument("--bind-address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--secure-port", type=int, default=6443, help="HTTPS port; 0 picks a free one (default 6443)")
    p.add_argument("--insecure-port", type=int, default=-1,
                   help="plain-HTTP port on the bind address instead of HTTPS (tests only; -1 = off, 0 = free port)")
    p.add_argument("--advertise-address", default="",
                   help="IP the kubernetes Service's endpoints point at (default: --bind-address if it is one "
                        "IP, else the host's first non-loopback IPv4, else 127.0.0.1)")
    p.add_argument("--bootstrap-reconcile-interval", type=float, default=bootstrap.DEFAULT_INTERVAL,
                   help="seconds between passes that re-create the system namespaces and the kubernetes "
                        "Service and its endpoints when deleted (kproxy only; default 10, as upstream)")
    p.add_argument("--tls-san", action="append", default=[], help="extra name/IP for the serving certificate")
    p.add_argument("--token-auth-file", default="",
                   help="token,user,uid,\"groups\" lines (default: DATA/tokens.csv, generated on first start)")
    p.add_argument("--kubelet-token-file", default="",
                   help="the bearer token for the node agents' logs/exec endpoint (pods/log, pods/exec)")
    p.add_argument("--service-cluster-ip-range", default="10.96.0.0/12",
                   help="Service ClusterIP range; two comma-separated CIDRs for dual-stack")
    p.add_argument("--service-node-port-range", default="30000-32767")
    p.add_argument("--watch-cache-size", type=int, default=10000,
                   help="events kept for watch replay; older resourceVersions get 410 Gone")
    p.add_argument("--bookmark-interval", type=float, default=60.0, help="seconds between watch BOOKMARK events")
    p.add_argument("--min-request-timeout", type=float, default=1800.0,
                   help="watches without timeoutSeconds end after a random time in [this, 2*this) seconds")
    p.add_argument("--max-requests-inflight", type=int, default=limits.DEFAULT_MAX_REQUESTS_INFLIGHT,
                   help="read-only requests (watches excepted) served at once; beyond: 429 (0 = no limit, "
                        "default 400)")
    p.add_argument("--max-mutating-requests-inflight", type=int,
                   default=limits.DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT,
                   help="mutating requests served at once; beyond: 429 (0 = no limit, default 200)")
    p.add_argument("--request-header-timeout", type=float, default=limits.DEFAULT_REQUEST_HEADER_TIMEOUT,
                   help="seconds from accept to a connection's first complete request header, TLS handshake "
                        "included (kproxy only; default 32, upstream's ReadHeaderTimeout)")
    p.add_argument("--idle-connection-timeout", type=float, default=limits.DEFAULT_IDLE_CONNECTION_TIMEOUT,
                   help="seconds a keep-alive connection may stay idle between requests (kproxy only; default "
                        "90, upstream's IdleTimeout)")
    p.add_argument("--request-timeout", type=float, default=limits.DEFAULT_REQUEST_TIMEOUT,
                   help="seconds a request's body may take to arrive; then 504 (default 60)")
    p.add_argument("--send-timeout", type=float, default=limits.DEFAULT_SEND_TIMEOUT,
                   help="seconds a list or watch client may take to accept the next 32 KiB of its response "
                        "before it is disconnected (kproxy only; default 10)")
    p.add_argument("--service-account-signing-key-file", default="",
                   help="PEM private key (RSA or ECDSA) that signs service account tokens (default: "
                        "DATA/pki/sa.key, an ECDSA P-256 key made on first start)")
    p.add_argument("--service-account-key-file", action="append", default=[],
                   help="PEM file of public keys (or certificates, private keys) that verify service account "
                        "tokens; repeatable (default: the signing key's)")
    p.add_argument("--service-account-issuer", action="append", default=[],
                   help="the iss of issued tokens (first one) and the issuers accepted (all); repeatable "
                        f"(default {satokens.DEFAULT_ISSUER})")
    p.add_argument("--api-audiences", default="",
                   help="comma-separated audiences a token must have one of (default: the first issuer)")
    p.add_argument("--service-account-max-token-expiration", type=_seconds, default=0,
                   help="longest lifetime of a TokenRequest token, e.g. 24h (default: none; at most 2^32 s)")
    backend.add_flags(p)
    p.add_argument("-v", "--v", type=int, default=1, help="log verbosity: 0 warnings, 1 info, 2+ debug")
    return p.parse_args(argv)


def _seconds(s: str) -> int:
    """A duration as kube-apiserver writes it (90s, 24h, 1h30m) or plain seconds."""
    import re

    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", s)
    if s.isdigit():
        return int(s)
    if not s or m is None:
        raise argparse.ArgumentTypeError(f"{s!r}: want a duration such as 24h or 3600s")
    h, mi, se = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + se


def token_authority(args: argparse.Namespace, data: str) -> satokens.TokenAuthority:
    """The service-account token signer and verifier from the --service-account-* flags."""
    signing = args.service_account_signing_key_file
    if not signing:
        os.makedirs(os.path.join(data, "pki"), exist_ok=True)
        signing = os.path.join(data, "pki", "sa.key")
        satokens.ensure_signing_key(signing)
    try:
        key = satokens.load_private_key(signing)
        public = [k for f in args.service_account_key_file for k in satokens.load_public_keys(f)]
    except (OSError, ValueError) as e:
        raise SystemExit(f"kproxy-apiserver: --service-account-*-key-file: {e}")
    if not 0 <= args.service_account_max_token_expiration <= satokens.MAX_EXPIRATION:
        raise SystemExit("kproxy-apiserver: --service-account-max-token-expiration: want at most 2^32 seconds")
    if 0 < args.service_account_max_token_expiration < satokens.MIN_EXPIRATION:
        raise SystemExit("kproxy-apiserver: --service-account-max-token-expiration: want at least 10m")
    issuers = args.service_account_issuer or [satokens.DEFAULT_ISSUER]
    audiences = [a.strip() for a in args.api_audiences.split(",") if a.strip()]
    return satokens.TokenAuthority(satokens.Signer(key), public, issuers, audiences,
                                   args.service_account_max_token_expiration)


def _node_port_range(s: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in s.split("-", 1))
    except ValueError:
        raise SystemExit(f"kproxy-apiserver: --service-node-port-range {s!r}: want LOW-HIGH, e.g. 30000-32767")
    if not 0 < lo <= hi < 65536:
        raise SystemExit(f"kproxy-apiserver: --service-node-port-range {s!r}: want 1 <= LOW <= HIGH <= 65535")
    return lo, hi


def _advertise_address(flag: str, bind_address: str) -> str:
    if not flag:
        return bootstrap.default_advertise_address(bind_address)
    try:
        ip = ipaddress.ip_address(flag)
    except ValueError:
        raise SystemExit(f"kproxy-apiserver: --advertise-address {flag!r}: want an IP address, e.g. 192.168.1.10")
    if ip.is_unspecified:
        raise SystemExit(f"kproxy-apiserver: --advertise-address {flag}: want one IP, not the unspecified address")
    return str(ip)


def _cidrs(s: str) -> list[str]:
    out = [c.strip() for c in s.split(",") if c.strip()]
    try:
        for c in out:
            ipaddress.ip_network(c)
    except ValueError as e:
        raise SystemExit(f"kproxy-apiserver: --service-cluster-ip-range: {e}")
    if not 1 <= len(out) <= 2:
        raise SystemExit("kproxy-apiserver: --service-cluster-ip-range: want one CIDR or two (dual-stack)")
    return out


def check_limits(args: argparse.Namespace) -> None:
    for flag in ("max_requests_inflight", "max_mutating_requests_inflight"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"kproxy-apiserver: --{flag.replace('_', '-')}: want a number >= 0 (0 = no limit)")
    for flag in ("request_header_timeout", "idle_connection_timeout", "send_timeout", "request_timeout",
                 "min_request_timeout"):
        if not 0 < getattr(args, flag) < 1e9:
            raise SystemExit(f"kproxy-apiserver: --{flag.replace('_', '-')}: want a number of seconds > 0")


async def serve(args: argparse.Namespace) -> int:
    check_limits(args)
    limits.tune_process()
    data = os.path.abspath(args.data_dir)
    pki.secure_data_dir(data)
    token_file = args.token_auth_file or os.path.join(data, "tokens.csv")
    if not args.token_auth_file:
        pki.ensure_token_file(token_file)
    try:
        users = pki.load_tokens(token_file)
    except (OSError, ValueError) as e:
        raise SystemExit(f"kproxy-apiserver: --token-auth-file: {e}")
    plain = args.insecure_port >= 0
    ssl_ctx: ssl.SSLContext | None = None
    ca_crt: str | None = None
    if not plain:
        ca_crt, crt, key = pki.ensure_certs(os.path.join(data, "pki"),
                                            pki.default_sans([args.bind_address, *args.tls_san]))
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(crt, key)
    advertise = _advertise_address(args.advertise_address, args.bind_address)
    authority = token_authority(args, data)
    if args.bootstrap_reconcile_interval <= 0:
        raise SystemExit("kproxy-apiserver: --bootstrap-reconcile-interval: want a number of seconds > 0")
    store = await backend.open_store(args, data)
    try:
        service_cidrs = _cidrs(args.service_cluster_ip_range)
        allocator = semantics.service_allocator(service_cidrs, _node_port_range(args.service_node_port_range))
        backend.share_allocations(store, allocator)
        registry = Registry(store, allocator)
        await registry.bootstrap()
        guard = limits.ConnectionGuard(args.request_header_timeout)
        api = APIServer(store, registry, users, bookmark_interval=args.bookmark_interval,
                        min_request_timeout=args.min_request_timeout, send_timeout=args.send_timeout,
                        max_requests_inflight=args.max_requests_inflight,
                        max_mutating_requests_inflight=args.max_mutating_requests_inflight, connections=guard,
                        request_timeout=args.request_timeout, token_authority=authority)
        if args.kubelet_token_file:
            api.pod_io = PodIO(store, Path(args.kubelet_token_file).read_text().strip())
        runner = _Runner(api, handle_signals=False, access_log=None, shutdown_timeout=3.0,
                         keepalive_timeout=args.idle_connection_timeout)
        await runner.setup()
        port = args.insecure_port if plain else args.secure_port
        site = limits.GuardedSite(runner, args.bind_address, port, ssl_context=ssl_ctx, guard=guard)
        await site.start()
        assert runner.server is not None
        guard.start(runner.server)
        server = getattr(site, "_server", None)
        actual = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
        host = "127.0.0.1" if args.bind_address in ("0.0.0.0", "") else ("::1" if args.bind_address == "::"
                                                                           else args.bind_address)
        hostport = f"[{host}]:{actual}" if ":" in host else f"{host}:{actual}"
        url = f"{'http' if plain else 'https'}://{hostport}"
        api.external_address = hostport
        # The kubernetes Service, its endpoints and the namespaces exist before the server says it
        # is ready (kubectl get svc right after start shows it); later passes re-create them.
        controller = bootstrap.BootstrapController(
            registry, allocator, bootstrap.KubernetesService(allocator.first_ip(), advertise, actual),
            args.bootstrap_reconcile_interval)
        await controller.reconcile()
        reconciling = asyncio.create_task(controller.run())
        # The default ServiceCIDR "kubernetes" exists (and is Ready) before the server says it is ready.
        cidr_controller = servicecidrs.ServiceCIDRController(registry, allocator, service_cidrs,
                                                             args.bootstrap_reconcile_interval)
        await cidr_controller.ensure_default()
        following_cidrs = asyncio.create_task(cidr_controller.run())
        ca_pem = Path(ca_crt).read_bytes() if ca_crt else b""
        tokens_controller = asyncio.create_task(TokenSecretsController(registry, authority, ca_pem).run())
        admin_cfg = os.path.join(data, "admin.kubeconfig")
        ro_cfg = os.path.join(data, "readonly.kubeconfig")
        pki.write_kubeconfig(admin_cfg, url, ca_crt, pki.token_for(users, admin=True), "admin")
        try:
            pki.write_kubeconfig(ro_cfg, url, ca_crt, pki.token_for(users, admin=False), "readonly")
        except LookupError:
            ro_cfg = ""
        api.ready = True
        log.info("event=ready url=%s kubeconfig=%s readonly_kubeconfig=%s advertise_address=%s revision=%d "
                 "semantics=%s", url, admin_cfg, ro_cfg, advertise, store.revision,
                 ",".join(k for k, v in semantics.available().items() if v) or "none")
        # One machine-readable line on stdout for scripts and testing.py.
        print(f"kproxy-apiserver ready url={url} kubeconfig={admin_cfg}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("event=shutdown watches=%d", api.watches.active)
        reconciling.cancel()
        following_cidrs.cancel()
        tokens_controller.cancel()
        guard.stop()
        # cleanup() closes the listener first, then ends the watch streams (_Runner.shutdown): clients
        # that re-watch at once find the port closed (and retry) instead of a server about to vanish.
        await runner.cleanup()
        await store.close()
    finally:
        store.close_sync()
    return 0


class _Runner(web.BaseRunner):
    """The API server's aiohttp runner: its low-level server (APIServer.server), and at cleanup,
    after the listener closed and before the server waits for its handlers, APIServer.shutdown."""

    def __init__(self, api: APIServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._api = api

    async def shutdown(self) -> None:
        await self._api.shutdown()

    async def _make_server(self) -> web.Server:
        return self._api.server(**self._kwargs)

    async def _cleanup_server(self) -> None:
        pass


def _run_loop(main_task: Coroutine[Any, Any, int]) -> int:
    """uvloop when it is installed (the controlplane extra installs it): its event loop and TLS
    transport are compiled; in a 50-watcher fan-out on etcd it kept the server busier and delivered
    more events/s in six alternating runs of seven (median +19%), 7% fewer in one
    (bench/bench_etcd_loop.py, bench/README.md etcd).
    KPROXY_APISERVER_LOOP=asyncio keeps asyncio's loop (to compare, or to rule the loop out)."""
    if os.environ.get("KPROXY_APISERVER_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:  # the pure asyncio loop works, only slower
            pass
        else:
            return uvloop.run(main_task)
    return asyncio.run(main_task)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.WARNING if args.v <= 0 else logging.INFO if args.v == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    try:
        return _run_loop(serve(args))
    except RuntimeError as e:
        if "locked by another" in str(e):
            print(f"kproxy-apiserver: --data-dir: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

"""`kproxy`: kube-proxy's command line (same flag names; flags override --config's file).

Errors are one line on stderr naming the flag or file, with exit code 1.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from kproxy import server
from kproxy.config import (
    ConfigError,
    KProxyConfig,
    check_cidrs,
    load_config_file,
    parse_bool,
    parse_duration,
    resolve_node_name,
    validate,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints usage and exits 2; kube-proxy's contract here is one line, exit 1.
        raise ConfigError(message)


def _checked(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    # argparse reports a plain ValueError as "invalid <function name> value"; our messages
    # already say what is expected.
    def convert(text: str) -> Any:
        try:
            return fn(text.lstrip("="))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = fn.__name__
    return convert


_duration = _checked(parse_duration)
_bool = _checked(parse_bool)
_int = _checked(int)


def _cidr_list(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _bool_flag(p: argparse.ArgumentParser, flag: str, dest: str, help: str) -> None:
    # pflag booleans: "--flag" means true, "--flag=false" is allowed.
    p.add_argument(flag, dest=dest, nargs="?", const=True, type=_bool, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kproxy", description="kube-proxy reimplementation", allow_abbrev=False)
    a = p.add_argument
    a("--config", dest="config_file", help="KubeProxyConfiguration file (kubeproxy.config.k8s.io/v1alpha1)")
    a("--kubeconfig", help="kubeconfig with authorization and API server location")
    a("--master", help="API server address (overrides the kubeconfig's server)")
    a("--proxy-mode", "--mode", dest="mode", help="iptables | ipvs | nftables | userspace (default iptables)")
    a("--hostname-override", help="the node name to use instead of the host name")
    a("--cluster-cidr", help="pod CIDR, one per family comma separated (e.g. 10.244.0.0/16,fd00:10:244::/56): "
      "traffic from outside is masqueraded")
    a("--detect-local-mode", help="how pod traffic is told apart: ClusterCIDR (--cluster-cidr, the default) or "
      "NodeCIDR (the Node's spec.podCIDRs)")
    a("--nodeport-addresses", type=_cidr_list, help="CIDRs of either family (or 'primary') NodePorts accept traffic on")
    a("--bind-address", help="the node's primary IP (default 0.0.0.0: from the Node object)")
    a("--healthz-bind-address", help="IP:port of the health server (default 0.0.0.0:10256; empty disables)")
    a("--metrics-bind-address", help="IP:port of the metrics server (default 127.0.0.1:10249; empty disables)")
    _bool_flag(p, "--bind-address-hard-fail", "bind_address_hard_fail",
               "exit when the healthz or metrics port cannot be bound (default: log and go on)")
    _bool_flag(p, "--masquerade-all", "masquerade_all", "SNAT all traffic sent via Service cluster IPs")
    a("--iptables-masquerade-bit", dest="masquerade_bit", type=_int, help="fwmark bit for SNAT (0-31)")
    a("--iptables-sync-period", type=_duration, help="max interval between syncs, e.g. 30s")
    a("--iptables-min-sync-period", type=_duration, help="min interval between syncs, e.g. 1s")
    _bool_flag(p, "--iptables-localhost-nodeports", "localhost_nodeports", "NodePorts on 127.0.0.1")
    a("--iptables-backend", help="kproxy only: nft or legacy (default: detect)")
    a("--ipvs-scheduler", help="IPVS scheduler (rr, lc, dh, sh, sed, nq, ...)")
    a("--ipvs-sync-period", type=_duration)
    a("--ipvs-min-sync-period", type=_duration)
    _bool_flag(p, "--ipvs-strict-arp", "ipvs_strict_arp", "arp_ignore=1 arp_announce=2")
    a("--ipvs-tcp-timeout", type=_duration)
    a("--ipvs-tcpfin-timeout", type=_duration)
    a("--ipvs-udp-timeout", type=_duration)
    a("--ipvs-exclude-cidrs", type=_cidr_list)
    a("--conntrack-max-per-core", type=_int)
    a("--conntrack-min", type=_int)
    a("--conntrack-tcp-timeout-established", dest="conntrack_tcp_established_timeout", type=_duration)
    a("--conntrack-tcp-timeout-close-wait", dest="conntrack_tcp_close_wait_timeout", type=_duration)
    a("--conntrack-udp-timeout", type=_duration)
    a("--conntrack-udp-timeout-stream", dest="conntrack_udp_stream_timeout", type=_duration)
    a("--config-sync-period", type=_duration)
    a("--udp-timeout", dest="udp_idle_timeout", type=_duration, help="userspace mode: idle UDP timeout, e.g. 250ms")
    _bool_flag(p, "--userspace-localhost-only", "userspace_localhost_only",
               "userspace mode: serve NodePort/LoadBalancer services on 127.0.0.1 only, with no rules")
    a("--userspace-tcp-congestion", help="kproxy only, userspace mode: TCP congestion control of the relayed "
      "connections' two legs, e.g. cubic or reno (default: the node's on the client leg; on the pod leg cubic "
      "when the node's is bbr)")
    a("--cleanup", nargs="?", const=True, type=_bool, default=None,
      help="remove everything kproxy programmed and exit")
    a("-v", "--v", dest="verbosity", type=_int, help="log verbosity (0-10)")
    return p


def parse_config(argv: Sequence[str]) -> KProxyConfig:
    """Flags + optional file -> a validated KProxyConfig (node name resolved)."""
    try:
        ns = build_parser().parse_args(list(argv))
    except ValueError as err:  # from a type= converter argparse did not wrap
        raise ConfigError(str(err)) from None
    flags = {k: v for k, v in vars(ns).items() if v is not None}
    cfg = KProxyConfig()
    values: dict[str, Any] = {}
    if flags.get("config_file"):
        values.update(load_config_file(flags["config_file"]))
    values.update(flags)  # flags override the file, as upstream
    for k, v in values.items():
        setattr(cfg, k, v)
    cfg.mode = cfg.mode or "iptables"  # upstream: an empty mode is the platform default
    if cfg.nodeport_addresses:
        check_cidrs(cfg.nodeport_addresses, "--nodeport-addresses", allow_primary=True)
    validate(cfg)
    cfg.hostname_override = resolve_node_name(cfg)
    return cfg


def _setup_logging(verbosity: int) -> None:
    # klog's -v: 0 start-up and problems; 2 adds one line per sync (upstream logs syncs at V(2)).
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    logging.getLogger("kproxy").setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)


ModeTable = Mapping[str, "str | Callable[[KProxyConfig], Any]"]


def main(argv: Sequence[str] | None = None, modes: ModeTable | None = None) -> int:
    """Entry point. `modes` adds proxy modes (name -> module path or factory) to the built-in
    ones; tests use it to run the real command with a recording Proxier."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "trace":  # a sub-command; the daemon's flags all start with "-"
        from kproxy import trace

        return trace.main(args[1:])
    try:
        cfg = parse_config(args)
        _setup_logging(cfg.verbosity)
        registry = server.ModeRegistry(modes)
        factory = registry.factory(cfg.mode)
        if cfg.cleanup:
            return server.cleanup(cfg, factory, registry)
        asyncio.run(server.serve(cfg, factory))
        return 0
    except server.ProxierInitError as err:
        print(f"kproxy: error: --proxy-mode {err.mode}: cannot start: {err.cause}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"kproxy: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

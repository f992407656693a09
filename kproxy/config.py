"""KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) file and the typed KProxyConfig.

KProxyConfig is flat: proxiers read plain attributes (hostname_override, cluster_cidr,
nodeport_addresses, masquerade_all, masquerade_bit, localhost_nodeports, ipvs_*, ...). Durations
are seconds (float). Every error names the file and the field path and raises ConfigError.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
MODES = ("iptables", "ipvs", "nftables", "userspace")


class ConfigError(Exception):
    """A bad flag or config file; the message is one line naming the flag/file/field."""


@dataclass
class KProxyConfig:
    mode: str = "iptables"
    kubeconfig: str = ""
    master: str = ""
    config_file: str = ""
    hostname_override: str = ""  # resolved to the node name by resolve_node_name()
    cluster_cidr: str = ""
    # How local (pod) traffic is detected: "" / ClusterCIDR (cluster_cidr) or NodeCIDR (the
    # server puts the Node's spec.podCIDRs, one per family, in cluster_cidr at start-up).
    detect_local_mode: str = ""
    bind_address: str = "0.0.0.0"
    bind_address_hard_fail: bool = False  # a healthz/metrics port that cannot be bound is fatal
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    nodeport_addresses: tuple[str, ...] = ()
    # iptables (and nftables: upstream keeps the same knobs in both sections)
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    iptables_sync_period: float = 30.0
    iptables_min_sync_period: float = 1.0
    iptables_backend: str = ""  # kproxy only: "nft" | "legacy" | "" (detect)
    nftables_sync_period: float = 30.0
    nftables_min_sync_period: float = 1.0
    # ipvs
    ipvs_scheduler: str = ""
    ipvs_sync_period: float = 30.0
    ipvs_min_sync_period: float = 0.0
    ipvs_strict_arp: bool = False
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcpfin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    # conntrack
    conntrack_max_per_core: int = 32768
    conntrack_min: int = 131072
    conntrack_tcp_established_timeout: float = 86400.0
    conntrack_tcp_close_wait_timeout: float = 3600.0
    conntrack_udp_timeout: float = 0.0
    conntrack_udp_stream_timeout: float = 0.0
    config_sync_period: float = 900.0
    udp_idle_timeout: float = 0.25  # userspace mode: idle UDP "connection" lifetime (--udp-timeout)
    # userspace mode without any rules: NodePort/LB services on 127.0.0.1:PORT only (no kube-proxy
    # equivalent; for hosts where the proxy may not own the firewall, as Docker Desktop does).
    userspace_localhost_only: bool = False
    # kproxy only: congestion control of the relay's TCP legs ("": the client leg keeps the node's
    # default, the pod leg gets cubic on a bbr node: bbr without the fq qdisc paces in the relay a
    # stream the client already paces; bench/README.md, userspace).
    userspace_tcp_congestion: str = ""
    cleanup: bool = False
    verbosity: int = 0
    healthcheck_bind_address: str = ""  # service health-check node ports listen here ("" = all)
    netns: str | None = None
    node_ips: tuple[str, ...] = field(default=())  # from the Node object, set by the server
    # The Node's topology.kubernetes.io/zone label, set by the server: topology hints need it.
    node_zone: str = ""

    @property
    def node_name(self) -> str:
        return self.hostname_override

    @property
    def sync_period(self) -> float:
        return {"ipvs": self.ipvs_sync_period, "nftables": self.nftables_sync_period}.get(
            self.mode, self.iptables_sync_period)

    @property
    def min_sync_period(self) -> float:
        return {"ipvs": self.ipvs_min_sync_period, "nftables": self.nftables_min_sync_period}.get(
            self.mode, self.iptables_min_sync_period)


FIELD_NAMES = frozenset(f.name for f in fields(KProxyConfig))

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration ("30s", "1m0s", "1h2m3.5s", "500ms", "0") -> seconds."""
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    body = s.lstrip("+-")
    pos, total = 0, 0.0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r} (expected e.g. 30s, 1m0s, 500ms)")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not body:
        raise ValueError(f"invalid duration {text!r} (expected e.g. 30s, 1m0s, 500ms)")
    return sign * total


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool, which pflag uses for --flag=value."""
    t = text.strip().lstrip("=")
    if t in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if t in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(f"invalid boolean {text!r} (expected true or false)")


def check_host_port(value: str, what: str) -> str:
    """IP:port (or empty: disabled). Upstream accepts only a literal IP and a port."""
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and 0 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{what}: {value!r} is not IP:port (e.g. 0.0.0.0:10256 or [::]:10256)")
    return value


def check_cidrs(values: tuple[str, ...], what: str, allow_primary: bool = False) -> tuple[str, ...]:
    for v in values:
        if allow_primary and v == "primary":
            continue
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ConfigError(f"{what}: {v!r} is not a CIDR (e.g. 10.0.0.0/8)") from None
    return values


# Upstream's LocalMode values; "" is the default (ClusterCIDR).
DETECT_LOCAL_MODES = ("", "ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")


def check_cluster_cidrs(value: str) -> tuple[str, ...]:
    """--cluster-cidr as upstream's validation: one CIDR, or two of different families (one per
    family's proxier, in either order); anything else is refused."""
    what = "--cluster-cidr/clusterCIDR"
    cidrs = tuple(c.strip() for c in value.split(","))
    if len(cidrs) > 2:
        raise ConfigError(f"{what}: {value!r}: only one CIDR allowed or a valid DualStack CIDR "
                          "(e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)")
    check_cidrs(cidrs, what)
    if len(cidrs) == 2 and len({ipaddress.ip_network(c, strict=False).version for c in cidrs}) != 2:
        raise ConfigError(f"{what}: {value!r}: must be a valid DualStack CIDR, one of each family "
                          "(e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)")
    return cidrs


# File field path -> (KProxyConfig attribute, kind). Known upstream fields kproxy does not use
# are accepted and ignored (IGNORED), unknown ones are an error as upstream's strict decoding.
_FILE_FIELDS: dict[str, tuple[str, str]] = {
    "mode": ("mode", "str"),
    "clusterCIDR": ("cluster_cidr", "str"),
    "detectLocalMode": ("detect_local_mode", "str"),
    "hostnameOverride": ("hostname_override", "str"),
    "bindAddress": ("bind_address", "str"),
    "bindAddressHardFail": ("bind_address_hard_fail", "bool"),
    "healthzBindAddress": ("healthz_bind_address", "str"),
    "metricsBindAddress": ("metrics_bind_address", "str"),
    "nodePortAddresses": ("nodeport_addresses", "list"),
    "configSyncPeriod": ("config_sync_period", "duration"),
    "udpIdleTimeout": ("udp_idle_timeout", "duration"),
    "clientConnection.kubeconfig": ("kubeconfig", "str"),
    "iptables.masqueradeAll": ("masquerade_all", "bool"),
    "iptables.masqueradeBit": ("masquerade_bit", "int"),
    "iptables.syncPeriod": ("iptables_sync_period", "duration"),
    "iptables.minSyncPeriod": ("iptables_min_sync_period", "duration"),
    "iptables.localhostNodePorts": ("localhost_nodeports", "bool"),
    "nftables.masqueradeAll": ("masquerade_all", "bool"),
    "nftables.masqueradeBit": ("masquerade_bit", "int"),
    "nftables.syncPeriod": ("nftables_sync_period", "duration"),
    "nftables.minSyncPeriod": ("nftables_min_sync_period", "duration"),
    "ipvs.scheduler": ("ipvs_scheduler", "str"),
    "ipvs.syncPeriod": ("ipvs_sync_period", "duration"),
    "ipvs.minSyncPeriod": ("ipvs_min_sync_period", "duration"),
    "ipvs.strictARP": ("ipvs_strict_arp", "bool"),
    "ipvs.tcpTimeout": ("ipvs_tcp_timeout", "duration"),
    "ipvs.tcpFinTimeout": ("ipvs_tcpfin_timeout", "duration"),
    "ipvs.udpTimeout": ("ipvs_udp_timeout", "duration"),
    "ipvs.excludeCIDRs": ("ipvs_exclude_cidrs", "list"),
    "conntrack.maxPerCore": ("conntrack_max_per_core", "int"),
    "conntrack.min": ("conntrack_min", "int"),
    "conntrack.tcpEstablishedTimeout": ("conntrack_tcp_established_timeout", "duration"),
    "conntrack.tcpCloseWaitTimeout": ("conntrack_tcp_close_wait_timeout", "duration"),
    "conntrack.udpTimeout": ("conntrack_udp_timeout", "duration"),
    "conntrack.udpStreamTimeout": ("conntrack_udp_stream_timeout", "duration"),
}
_IGNORED = frozenset((
    "apiVersion", "kind", "enableProfiling", "featureGates", "logging",
    "oomScoreAdj", "portRange", "detectLocal", "showHiddenMetricsForVersion",
    "winkernel", "clientConnection.acceptContentTypes", "clientConnection.contentType",
    "clientConnection.qps", "clientConnection.burst", "conntrack.tcpBeLiberal",
))
_SECTIONS = frozenset(("iptables", "ipvs", "nftables", "conntrack", "clientConnection"))


def _convert(value: Any, kind: str, where: str) -> Any:
    try:
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {value!r}")
            return value
        if kind == "duration":
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
                return 0.0
            if not isinstance(value, str):
                raise ValueError(f"expected a duration string like 30s, got {value!r}")
            return parse_duration(value)
        if kind == "list":
            if value is None:
                return ()
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"expected a list of strings, got {value!r}")
            return tuple(value)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    raise AssertionError(kind)


def load_config_file(path: str) -> dict[str, Any]:
    """KProxyConfig attribute -> value for every field the file sets."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}:{at} not valid YAML ({getattr(err, 'problem', err)})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a KubeProxyConfiguration mapping")
    if doc.get("kind", KIND) != KIND:
        raise ConfigError(f"--config {path}: kind is {doc.get('kind')!r}, expected {KIND}")
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(f"--config {path}: apiVersion is {doc.get('apiVersion')!r}, expected {API_VERSION}")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _SECTIONS and isinstance(value, dict):
            items = [(f"{key}.{k}", v) for k, v in value.items()]
        elif key in _SECTIONS and value is not None:
            raise ConfigError(f"--config {path}: field {key}: expected a mapping")
        else:
            items = [(key, value)]
        for fpath, v in items:
            if fpath in _FILE_FIELDS:
                attr, kind = _FILE_FIELDS[fpath]
                out[attr] = _convert(v, kind, f"--config {path}: field {fpath}")
            elif fpath not in _IGNORED and fpath.split(".")[0] not in ("featureGates", "logging", "winkernel"):
                raise ConfigError(f"--config {path}: unknown field {fpath!r} (strict decoding, as kube-proxy)")
    return out


def validate(cfg: KProxyConfig) -> None:
    """Cross-field checks as upstream's validation, each naming its flag/field."""
    # The mode name itself is checked against the proxier registry (kproxy.server.ModeRegistry).
    for name, sync, min_sync in (
        ("iptables", cfg.iptables_sync_period, cfg.iptables_min_sync_period),
        ("ipvs", cfg.ipvs_sync_period, cfg.ipvs_min_sync_period),
        ("nftables", cfg.nftables_sync_period, cfg.nftables_min_sync_period),
    ):
        if sync <= 0:
            raise ConfigError(f"--{name}-sync-period/{name}.syncPeriod: must be greater than 0")
        if min_sync < 0:
            raise ConfigError(f"--{name}-min-sync-period/{name}.minSyncPeriod: must be >= 0")
        if name == cfg.mode and min_sync > sync:
            raise ConfigError(f"--{name}-min-sync-period/{name}.minSyncPeriod: must be <= syncPeriod")
    if not 0 <= cfg.masquerade_bit <= 31:
        raise ConfigError(f"--iptables-masquerade-bit/iptables.masqueradeBit: {cfg.masquerade_bit} not in 0..31")
    check_host_port(cfg.healthz_bind_address, "--healthz-bind-address/healthzBindAddress")
    check_host_port(cfg.metrics_bind_address, "--metrics-bind-address/metricsBindAddress")
    try:
        ipaddress.ip_address(cfg.bind_address)
    except ValueError:
        raise ConfigError(f"--bind-address/bindAddress: {cfg.bind_address!r} is not an IP address") from None
    if cfg.cluster_cidr:
        check_cluster_cidrs(cfg.cluster_cidr)
    if cfg.detect_local_mode not in DETECT_LOCAL_MODES:
        raise ConfigError(f"--detect-local-mode/detectLocalMode: {cfg.detect_local_mode!r}: must be one of "
                          f"{', '.join(m for m in DETECT_LOCAL_MODES if m)}")
    if cfg.detect_local_mode in ("BridgeInterface", "InterfaceNamePrefix"):
        raise ConfigError(f"--detect-local-mode/detectLocalMode: {cfg.detect_local_mode} is not supported by "
                          "kproxy (ClusterCIDR or NodeCIDR)")
    check_cidrs(cfg.nodeport_addresses, "--nodeport-addresses/nodePortAddresses", allow_primary=True)
    check_cidrs(cfg.ipvs_exclude_cidrs, "--ipvs-exclude-cidrs/ipvs.excludeCIDRs")
    if cfg.udp_idle_timeout <= 0:
        raise ConfigError("--udp-timeout/udpIdleTimeout: must be greater than 0")
    if cfg.iptables_backend not in ("", "nft", "legacy"):
        raise ConfigError(f"--iptables-backend: {cfg.iptables_backend!r} is not nft or legacy")
    if cfg.userspace_tcp_congestion and cfg.mode == "userspace":
        from kproxy.relay import check_tcp_congestion  # the relay's module: only in this mode

        try:
            check_tcp_congestion(cfg.userspace_tcp_congestion)
        except ValueError as exc:
            raise ConfigError(f"--userspace-tcp-congestion: {exc}") from None


def resolve_node_name(cfg: KProxyConfig) -> str:
    """--hostname-override, else the host name, lower-cased as kubelet registers it."""
    name = (cfg.hostname_override or socket.gethostname()).strip().lower()
    if not name:
        raise ConfigError("--hostname-override: empty node name")
    return name

"""Flags, the KubeProxyConfiguration file, and their errors (one line, exit code 1)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kproxy.cli import main, parse_config
from kproxy.config import ConfigError, parse_duration


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30.0), ("1m0s", 60.0), ("1h2m3.5s", 3723.5), ("500ms", 0.5), ("0", 0.0), ("0s", 0.0),
    ("1.5h", 5400.0), ("250us", 0.00025), ("-1s", -1.0),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "30", "s", "1x", "1m 0s", "1sm"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
clusterCIDR: 10.244.0.0/16
hostnameOverride: Worker-1
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:20256
metricsBindAddress: 127.0.0.1:20249
nodePortAddresses: [192.168.0.0/16, primary]
clientConnection:
  kubeconfig: /etc/kp.conf
  qps: 5
iptables:
  masqueradeAll: true
  masqueradeBit: 15
  syncPeriod: 1m0s
  minSyncPeriod: 2s
  localhostNodePorts: false
ipvs:
  scheduler: lc
  syncPeriod: 45s
  minSyncPeriod: 500ms
  strictARP: true
  tcpTimeout: 15m0s
  tcpFinTimeout: 30s
  udpTimeout: 10s
  excludeCIDRs: [10.9.0.0/16]
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 24h0m0s
featureGates: {SomeGate: true}
logging: {format: text}
"""


def test_config_file_fields(tmp_path: Path) -> None:
    f = tmp_path / "kp.yaml"
    f.write_text(CONFIG)
    cfg = parse_config(["--config", str(f)])
    assert (cfg.mode, cfg.cluster_cidr, cfg.hostname_override) == ("ipvs", "10.244.0.0/16", "worker-1")
    assert cfg.healthz_bind_address == "127.0.0.1:20256" and cfg.metrics_bind_address == "127.0.0.1:20249"
    assert cfg.nodeport_addresses == ("192.168.0.0/16", "primary") and cfg.kubeconfig == "/etc/kp.conf"
    assert cfg.masquerade_all and cfg.masquerade_bit == 15 and not cfg.localhost_nodeports
    assert (cfg.iptables_sync_period, cfg.iptables_min_sync_period) == (60.0, 2.0)
    assert cfg.ipvs_scheduler == "lc" and cfg.ipvs_strict_arp and cfg.ipvs_exclude_cidrs == ("10.9.0.0/16",)
    assert (cfg.ipvs_tcp_timeout, cfg.ipvs_tcpfin_timeout, cfg.ipvs_udp_timeout) == (900.0, 30.0, 10.0)
    assert cfg.conntrack_max_per_core == 0 and cfg.conntrack_tcp_established_timeout == 86400.0
    # The active mode's periods drive the runner.
    assert (cfg.sync_period, cfg.min_sync_period) == (45.0, 0.5)


def test_flags_override_file_and_defaults(tmp_path: Path) -> None:
    f = tmp_path / "kp.yaml"
    f.write_text(CONFIG)
    cfg = parse_config(["--config", str(f), "--mode", "iptables", "--iptables-sync-period=10s",
                        "--masquerade-all=false", "--hostname-override", "n2", "--v=4",
                        "--nodeport-addresses", "10.0.0.0/8, 172.16.0.0/12", "--udp-timeout=2s"])
    assert cfg.mode == "iptables" and cfg.sync_period == 10.0 and cfg.min_sync_period == 2.0
    assert not cfg.masquerade_all and cfg.hostname_override == "n2" and cfg.verbosity == 4
    assert cfg.nodeport_addresses == ("10.0.0.0/8", "172.16.0.0/12") and cfg.udp_idle_timeout == 2.0
    d = parse_config(["--hostname-override", "x", "--masquerade-all", "--proxy-mode", "userspace"])
    assert d.masquerade_all and d.mode == "userspace"
    f.write_text('mode: ""\n')
    assert parse_config(["--config", str(f), "--hostname-override", "x"]).mode == "iptables"
    assert (d.healthz_bind_address, d.metrics_bind_address) == ("0.0.0.0:10256", "127.0.0.1:10249")
    assert (d.iptables_sync_period, d.iptables_min_sync_period, d.masquerade_bit) == (30.0, 1.0, 14)


@pytest.mark.parametrize("content,needle", [
    ("mode: [iptables\n", "not valid YAML"),
    ("kind: KubeletConfiguration\n", "kind is 'KubeletConfiguration'"),
    ("apiVersion: v1\n", "apiVersion is 'v1'"),
    ("iptables:\n  syncPeriod: soon\n", "field iptables.syncPeriod: invalid duration 'soon'"),
    ("iptables:\n  masqueradeAll: yes please\n", "field iptables.masqueradeAll: expected true or false"),
    ("ipvs:\n  schedular: rr\n", "unknown field 'ipvs.schedular'"),
    ("clusterCidr: 10.0.0.0/8\n", "unknown field 'clusterCidr'"),
    ("healthzBindAddress: localhost:10256\n", "healthzBindAddress: 'localhost:10256' is not IP:port"),
    ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR: '10.0.0.0/33' is not a CIDR"),
    ("iptables:\n  syncPeriod: 1s\n  minSyncPeriod: 5s\n", "minSyncPeriod: must be <= syncPeriod"),
    ("iptables: 5\n", "field iptables: expected a mapping"),
])
def test_bad_config_file_names_file_and_field(tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError) as exc:
        parse_config(["--config", str(f), "--hostname-override", "n"])
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg
    # Parse errors name the file; cross-field validation names the flag and the field instead.
    assert str(f) in msg or msg.startswith("--")


@pytest.mark.parametrize("argv,needle", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--iptables-sync-period", "often"], "argument --iptables-sync-period: invalid duration 'often'"),
    (["--masquerade-all=maybe"], "argument --masquerade-all: invalid boolean 'maybe'"),
    (["--metrics-bind-address", "127.0.0.1"], "--metrics-bind-address/metricsBindAddress: '127.0.0.1' is not IP:port"),
    (["--proxy-mode", "ebpf"], "--proxy-mode: unknown mode 'ebpf'"),
    (["--iptables-masquerade-bit", "40"], "masqueradeBit: 40 not in 0..31"),
    (["--udp-timeout", "0s"], "--udp-timeout/udpIdleTimeout: must be greater than 0"),
    (["--config", "/nonexistent/kp.yaml"], "--config /nonexistent/kp.yaml: No such file or directory"),
    (["--nodeport-addresses", "10.0.0.0/8,bogus"], "--nodeport-addresses: 'bogus' is not a CIDR"),
    (["--kubeconfig", "/nonexistent/kc"], "--kubeconfig: cannot read kubeconfig /nonexistent/kc"),
    (["--proxy-mode", "userspace", "--userspace-tcp-congestion", "no-such-cc"],
     "--userspace-tcp-congestion: TCP congestion control 'no-such-cc' cannot be used here"),
])
def test_bad_flags_one_line_exit_1(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Every case fails before anything listens or connects.
    assert main([*argv, "--hostname-override", "n"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("kproxy: error: ") and needle in err[0], err


@pytest.mark.timeout(30)
def test_console_script_reports_bad_flag() -> None:
    exe = Path(sys.executable).parent / "kproxy"
    if not exe.exists():
        pytest.skip("kproxy console script not installed in this environment")
    r = subprocess.run([str(exe), "--iptables-min-sync-period", "1q"], capture_output=True, timeout=20, check=False)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode().splitlines() == [
        "kproxy: error: argument --iptables-min-sync-period: invalid duration '1q' (expected e.g. 30s, 1m0s, 500ms)"]


def test_userspace_localhost_only_flag() -> None:
    assert parse_config(["--proxy-mode", "userspace"]).userspace_localhost_only is False
    cfg = parse_config(["--proxy-mode", "userspace", "--userspace-localhost-only"])
    assert cfg.userspace_localhost_only is True
    assert parse_config(["--userspace-localhost-only=false"]).userspace_localhost_only is False


def test_userspace_tcp_congestion_flag() -> None:
    assert parse_config(["--proxy-mode", "userspace"]).userspace_tcp_congestion == ""
    cfg = parse_config(["--proxy-mode", "userspace", "--userspace-tcp-congestion", "reno"])
    assert cfg.userspace_tcp_congestion == "reno"

"""Start-up conntrack tuning (kube-proxy's conntrack config): a temp /proc/sys tree for the rules,
and a real network namespace for the kernel (its own timeouts change, the host's do not)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kproxy.config import KProxyConfig
from kproxy.server import apply_conntrack_settings


def _tree(tmp_path: Path, **values: int) -> Path:
    nf = tmp_path / "net" / "netfilter"
    nf.mkdir(parents=True)
    for k, v in values.items():
        (nf / k).write_text(f"{v}\n")
    return tmp_path


def test_rules_on_a_temp_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, nf_conntrack_max=65536, nf_conntrack_tcp_timeout_established=432000,
                 nf_conntrack_tcp_timeout_close_wait=3600, nf_conntrack_udp_timeout=30,
                 nf_conntrack_udp_timeout_stream=120)
    cfg = KProxyConfig(conntrack_max_per_core=32768, conntrack_min=131072, conntrack_udp_timeout=0.0)
    written = apply_conntrack_settings(cfg, root, init_netns=False)
    # Not the initial netns: nf_conntrack_max untouched; equal values not rewritten; 0 = leave.
    assert written == {"nf_conntrack_tcp_timeout_established": 86400}
    assert (root / "net/netfilter/nf_conntrack_max").read_text() == "65536\n"
    want_max = max(32768 * (os.cpu_count() or 1), 131072)
    assert apply_conntrack_settings(cfg, root, init_netns=True) == {"nf_conntrack_max": want_max}
    # Never lowered.
    cfg.conntrack_min = 1
    cfg.conntrack_max_per_core = 1
    assert apply_conntrack_settings(cfg, root, init_netns=True) == {}


def test_missing_conntrack_module_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    assert apply_conntrack_settings(KProxyConfig(), tmp_path, init_netns=False) == {}


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_in_a_real_netns_only_that_namespace_changes() -> None:
    host = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established")
    if os.geteuid() != 0 or shutil.which("ip") is None or not host.exists():
        pytest.skip("needs root, iproute2 and the nf_conntrack module")
    ns = f"kptct{uuid.uuid4().hex[:6]}"
    before = host.read_text()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        inner = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established")
        code = ("from kproxy.config import KProxyConfig; from kproxy.server import apply_conntrack_settings; "
                "print(apply_conntrack_settings(KProxyConfig(conntrack_tcp_established_timeout=4321.0)))")
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=20, check=True).stdout
        assert "'nf_conntrack_tcp_timeout_established': 4321" in out
        assert "nf_conntrack_max" not in out  # read-only and global outside the initial netns
        seen = subprocess.run(["ip", "netns", "exec", ns, "cat", str(inner)], capture_output=True, text=True,
                              timeout=10, check=True).stdout
        assert seen.strip() == "4321"
        assert host.read_text() == before
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)

"""vagrant/provision.sh, the steps that run without network: kernel setup, unit files, the IPVS
check; and the real `kproxy --proxy-mode ipvs` CLI entry points the units call. Inside the VM."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ipvs_helpers import sh

REPO = Path(__file__).resolve().parents[3]
PROVISION = REPO / "vagrant" / "provision.sh"


@pytest.mark.timeout(120)
def test_ipvs_vagrant_provisioning_offline_steps(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["bash", str(PROVISION), "--role", "server", "--node-ip", "10.250.0.11", "--server-ip", "10.250.0.11",
         "--repo", str(REPO), "--root", str(tmp_path), "--steps", "kernel,units,check"],
        capture_output=True, text=True, check=False, timeout=100, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    assert "IPVS reachable over netlink" in proc.stdout
    modules = Path("/proc/modules").read_text()
    for m in ("ip_vs_sh", "ip_vs_wrr", "dummy", "nf_conntrack"):
        assert f"{m} " in modules
    assert Path("/proc/sys/net/ipv4/vs/expire_nodest_conn").read_text().strip() == "1"
    unit = (tmp_path / "etc/systemd/system/kproxy.service").read_text()
    assert "--proxy-mode ipvs" in unit and "--master https://10.250.0.11:6443" in unit
    assert "--nodeport-addresses 10.250.0.11/32" in unit and "--hostname-override node-1" in unit
    api = (tmp_path / "etc/systemd/system/kproxy-apiserver.service").read_text()
    assert "--tls-san 10.250.0.11" in api
    agent = (tmp_path / "etc/systemd/system/kproxy-node-agent.service").read_text()
    assert "_agent" in agent and "--node-index 1" in agent
    # The rest (the units running, the seed app across nodes) is tests/vm/test_cluster_vm.py.
    assert (tmp_path / "etc/modules-load.d/kproxy-ipvs.conf").read_text().split()[0] == "ip_vs"
    bad = subprocess.run(["bash", str(PROVISION), "--role", "leader"], capture_output=True, text=True, check=False, timeout=30)
    assert bad.returncode == 2 and "--role must be server or node" in bad.stderr
    # The node agent derives a node's address from its index: a mismatch is refused in one line.
    off = subprocess.run(["bash", str(PROVISION), "--role", "node", "--node-ip", "192.168.56.12", "--steps", "units",
                          "--root", str(tmp_path)], capture_output=True, text=True, check=False, timeout=30)
    assert off.returncode == 2 and "must have the address 10.250.0.12" in off.stderr, off.stderr


@pytest.mark.timeout(120)
def test_ipvs_kproxy_cli_cleanup_removes_ipvs_state() -> None:
    # The unit's ExecStopPost: `kproxy --proxy-mode ipvs --cleanup` through the real CLI,
    # config and new_proxier(), against state a proxier left behind.
    sh("ip", "link", "add", "kube-ipvs0", "type", "dummy")
    sh("ip", "addr", "add", "10.96.5.5/32", "dev", "kube-ipvs0")
    sh("ipvsadm", "-A", "-t", "10.96.5.5:80", "-s", "rr")
    sh("ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port")
    kproxy = Path(sys.executable).parent / "kproxy"
    proc = subprocess.run([str(kproxy), "--proxy-mode", "ipvs", "--cleanup"], capture_output=True, text=True, check=False,
                          timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "10.96.5.5" not in sh("ipvsadm", "-Ln")
    assert "kube-ipvs0" not in sh("ip", "link")
    assert "KUBE-CLUSTER-IP" not in sh("ipset", "list", "-n")

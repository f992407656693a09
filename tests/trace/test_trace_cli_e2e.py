"""`kproxy trace` as an operator runs it: the installed command, text output, against the kernel's
nftables table that kproxy's nftables proxier programmed in a network namespace this test makes
(and removes, also on failure). The agreement with real packets is tests/conformance's job; this
checks the command, its text and its one-line errors."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.config import KProxyConfig
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest

pytestmark = pytest.mark.e2e
KPROXY = str(Path(sys.executable).parent / "kproxy")
NODE_IP = "192.168.77.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def node() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft")
    ns = f"kptTr{secrets.token_hex(3)}"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "add", "kpt0", "type", "veth", "peer", "name", "kpt1")
        _ip("-n", ns, "addr", "add", f"{NODE_IP}/24", "dev", "kpt0")
        _ip("-n", ns, "link", "set", "kpt0", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)


def trace(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KPROXY, "trace", "--netns", ns, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_trace_command_text_on_an_nftables_node(node: str) -> None:
    missing = trace(node, "--from", "192.168.77.2", "10.96.0.10:80")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert missing.stderr.startswith("kproxy trace: error: no kproxy rules") and "kube-proxy" in missing.stderr

    from kproxy.proxiers.meta import single_family
    from kproxy.proxiers.nftables import new_proxier

    proxier = single_family(new_proxier(KProxyConfig(mode="nftables", netns=node, cluster_cidr="10.0.0.0/8",
                                                     hostname_override="n1", node_ips=(NODE_IP,))))
    name = ServicePortName("shop", "web", "http", "TCP")
    svc = ServicePort(name=name, type="ClusterIP", cluster_ips=("10.96.0.10",), port=80, protocol="TCP")
    eps = tuple(Endpoint(ip=ip, port=8080, node_name="n1", is_local=True) for ip in ("10.1.0.2", "10.1.0.3"))
    try:
        assert proxier.sync(SyncRequest({name: svc}, {name: eps})).ok
        out = trace(node, "--from", "192.168.77.2", "10.96.0.10:80")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "tcp 192.168.77.2 -> 10.96.0.10:80  (nftables mode, table ip kube-proxy)"
        for ep in ("10.1.0.2:8080", "10.1.0.3:8080"):
            row = next(line for line in lines if ep in line)
            assert row.split() == ["50.00%", "shop/web:http", "->", ep, "(masquerade)"], row
    finally:
        proxier.close()
        assert proxier.cleanup()

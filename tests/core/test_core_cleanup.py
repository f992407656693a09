"""`kproxy --cleanup` removes what every mode left in the kernel, whatever mode it is run with (as
kube-proxy's cleanupLeftovers): the real command in a network namespace of the test's own, on both
iptables back ends."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy.proxiers import userspace

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]
KPROXY = str(Path(sys.executable).with_name("kproxy"))

# Leftovers of the iptables mode (global chains, a Service's chains, the jumps from built-ins).
IPTABLES_MODE = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-QRSTUVWXYZ012345 - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ABCDEFGHIJKLMNOP
-A KUBE-SVC-ABCDEFGHIJKLMNOP -j KUBE-SEP-QRSTUVWXYZ012345
-A KUBE-SEP-QRSTUVWXYZ012345 -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
COMMIT
"""


def _userspace_mode() -> str:
    """Leftovers of the userspace mode, from the module's own chain and jump table."""
    lines = ["*nat", *(f":{c} - [0:0]" for c in userspace.CHAINS)]
    for parent, _, match, target in userspace.JUMPS:
        quoted = " ".join(f'"{m}"' if " " in m else m for m in match)
        lines.append(f"-A {parent} {quoted} -j {target}")
    return "\n".join([*lines, "COMMIT", ""])


def _sh(ns: str, *cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(params=["nft", "legacy"])
def node(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    backend: str = request.param
    if shutil.which(f"iptables-{backend}-restore") is None:
        pytest.skip(f"iptables-{backend} is not installed")
    ns = f"kpcl{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        yield ns, backend
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


def _kube_lines(ns: str, backend: str) -> list[str]:
    out = _sh(ns, f"iptables-{backend}-save").stdout
    return [line for line in out.splitlines() if "KUBE-" in line]


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_cleanup_in_any_mode_removes_every_modes_leftovers(node: tuple[str, str], mode: str) -> None:
    ns, backend = node
    for ruleset in (IPTABLES_MODE, _userspace_mode()):
        r = _sh(ns, f"iptables-{backend}-restore", "-w", "30", "--noflush", stdin=ruleset)
        assert r.returncode == 0, r.stderr
    before = _kube_lines(ns, backend)
    assert any("KUBE-PORTALS-CONTAINER" in x for x in before) and any("KUBE-SVC-" in x for x in before)
    # No address but loopback in this namespace: the userspace mode's cleanup must not need one.
    r = _sh(ns, KPROXY, "--proxy-mode", mode, "--iptables-backend", backend, "--cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _kube_lines(ns, backend) == []
    # Nothing left is still clean: a second run succeeds and changes nothing.
    r = _sh(ns, KPROXY, "--proxy-mode", mode, "--iptables-backend", backend, "--cleanup")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _kube_lines(ns, backend) == []

"""bench/nft_events.py (the API write -> rule present clock of the nftables benches) sees a
committed rule holding an address, and only such a rule, with real `nft` in a namespace of its own.
No benchmark is run here."""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed"),
]


@pytest.fixture(scope="module")
def nft_events() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_nft_events", BENCH / "nft_events.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"kpnE{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=60, check=False)


def nft(ns: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True,
                   timeout=30)


def test_sees_the_committed_rule_and_nothing_else(nft_events: ModuleType, netns: str) -> None:
    ev = nft_events.NftEvents(netns)
    try:
        wanted = ev.expect_rule_with("10.9.8.7")
        other = ev.expect_rule_with("10.9.8.70")
        # A set element and a chain holding the address's bytes elsewhere are not a rule.
        nft(netns, "add table ip kpnE\nadd chain ip kpnE c\nadd set ip kpnE s { type ipv4_addr; }\n"
                   "add element ip kpnE s { 10.9.8.7 }\n")
        t = time.monotonic()
        assert ev.wait(wanted, 0.5) is None
        nft(netns, "add rule ip kpnE c ip daddr 10.9.8.7 tcp dport 80 dnat to 10.9.8.8:8080\n")
        seen = ev.wait(wanted, 10)
        assert seen is not None and seen >= t
        assert ev.generations >= 2 and ev.overruns == 0
        assert ev.wait(other, 0.3) is None  # 10.9.8.70 is not 10.9.8.7's bytes plus one
    finally:
        ev.close()

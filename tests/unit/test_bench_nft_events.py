"""bench/nft_events.py (the API write -> rule present clock of the nftables benches) sees a
committed rule or set element holding an address, and nothing else, with real `nft` in a namespace of its own.
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


def test_sees_committed_rules_and_elements_holding_the_address(nft_events: ModuleType, netns: str) -> None:
    ev = nft_events.NftEvents(netns)
    try:
        in_rule = ev.expect_address("10.9.8.7")
        in_element = ev.expect_address("10.9.8.9")
        never = ev.expect_address("10.9.8.70")
        nft(netns, "add table ip kpnE\nadd chain ip kpnE c\n"
                   "add map ip kpnE m { type mark : ipv4_addr . inet_service; }\n")
        assert ev.wait(in_rule, 0.5) is None and ev.wait(in_element, 0.01) is None  # no address yet
        t = time.monotonic()
        nft(netns, "add rule ip kpnE c ip daddr 10.9.8.7 tcp dport 80 dnat to 10.9.8.8:8080\n")
        seen = ev.wait(in_rule, 10)
        assert seen is not None and seen >= t
        assert ev.wait(in_element, 0.3) is None
        nft(netns, "add element ip kpnE m { 1 : 10.9.8.9 . 8080 }\n")
        assert ev.wait(in_element, 10) is not None
        assert ev.generations >= 3 and ev.overruns == 0
        assert ev.wait(never, 0.3) is None  # other addresses' bytes are not a match
    finally:
        ev.close()

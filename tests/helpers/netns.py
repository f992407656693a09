"""A network namespace of the test's own (unique name, removed even when the test fails)."""
from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def fresh_netns(prefix: str, addresses: dict[str, str] | None = None, *, up: bool = False) -> Iterator[str]:
    """`ip netns add PREFIX<random hex>` with lo up. With `addresses` ({"eth0": CIDR, "eth1": CIDR}),
    a veth pair eth0/eth1 inside it carries them (node addresses for NodePort matching; no traffic
    leaves the namespace), set up when `up`."""
    name = f"{prefix}{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        if addresses:
            _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
            for dev, cidr in addresses.items():
                _ip("-n", name, "addr", "add", cidr, "dev", dev)
            for dev in ("eth0", "eth1") if up else ():
                _ip("-n", name, "link", "set", dev, "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)

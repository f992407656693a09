"""Synthetic Services for the nftables tests and benchmarks, and the kernel's ruleset as a set
of comparable entries (read with `nft -j list table`, never from kproxy's own bookkeeping)."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

from kproxy.model import Endpoint, ServicePort, ServicePortName


def _skip_reason() -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft", "iptables-nft"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return ""


SKIP_REASON = _skip_reason()


def sh(*args: str, check: bool = True, inp: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=60, input=inp)


def name(i: int) -> ServicePortName:
    return ServicePortName("bench", f"svc-{i}", "http", "TCP")


def service(i: int, node_port: bool = False, family: str = "IPv4") -> ServicePort:
    """Service i: ClusterIP 10.96.0.0/12 + i (IPv6: fd00:10:96::/108 + i)."""
    ip = str(ipaddress.IPv6Address(f"fd00:10:96::{i:x}")) if family == "IPv6" else f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
    return ServicePort(
        name=name(i), type="NodePort" if node_port else "ClusterIP",
        cluster_ips=(ip,), port=80, protocol="TCP",
        node_port=30000 + (i % 2000) if node_port else 0,
    )


def endpoints(i: int, count: int, first: int = 0, family: str = "IPv4") -> tuple[Endpoint, ...]:
    base = i * 64  # 10.128.0.0/10 (IPv6: fd00:10:128::/64): unique per Service and endpoint (k < 64)
    out = []
    for k in range(first, first + count):
        n = base + k
        ip = (str(ipaddress.IPv6Address(f"fd00:10:128::{n >> 16:x}:{n & 0xFFFF:x}")) if family == "IPv6"
              else f"10.{128 + (n >> 16) % 64}.{(n >> 8) % 256}.{n % 256}")
        out.append(Endpoint(ip=ip, port=8080, node_name="node-1", is_local=True))
    return tuple(out)


def state(services: int, per: int, node_ports: bool = False, family: str = "IPv4") -> tuple[
        dict[ServicePortName, ServicePort], dict[ServicePortName, tuple[Endpoint, ...]]]:
    svcs = {name(i): service(i, node_ports and i < 2000, family) for i in range(services)}
    return svcs, {name(i): endpoints(i, per, family=family) for i in range(services)}


def kernel_entries(netns: str, family: str = "ip", table: str = "kube-proxy") -> set[str]:
    """Every chain, rule, set and set/map element of a table as a string, handles removed."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "table", family, table],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    entries: set[str] = set()
    for item in json.loads(out)["nftables"]:
        for kind, obj in item.items():
            if kind == "metainfo":
                continue
            obj = {k: v for k, v in obj.items() if k != "handle"}
            elems = obj.pop("elem", None)
            if kind == "rule":
                entries.add(f"rule {obj['chain']} {json.dumps(obj['expr'], sort_keys=True)}")
            else:
                entries.add(f"{kind} {json.dumps(obj, sort_keys=True)}")
            for e in elems or ():
                entries.add(f"elem {obj['name']} {json.dumps(e, sort_keys=True)}")
    return entries


def table_exists(netns: str, family: str, table: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", family, table],
                          capture_output=True, check=False, timeout=60).returncode == 0

"""`kproxy trace`: where does a new connection go, read from the node's live state.

Read-only: it runs iptables-save, `nft -j list table`, `ipset save` and `ip addr` (in --netns when
given), reads IPVS over netlink, and never writes kernel state. What it reads is parsed as
untrusted (kproxy.trace.iptables, kproxy.trace.nftables, kproxy.trace.ipvs).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from kproxy.backends.ipvs import IPVS, Addresses, RealServer, VirtualServer
from kproxy.relay import enter_netns
from kproxy.trace import status
from kproxy.trace.iptables import MAX_DUMP_BYTES, Path, TraceError, Tracer
from kproxy.trace.ipvs import IPVSTracer, parse_ipsets
from kproxy.trace.nftables import NftTracer

__all__ = ["Path", "Route", "TraceError", "Tracer", "main", "summarize"]

_TIMEOUT = 60.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise TraceError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kproxy trace", allow_abbrev=False,
                description="print the path a new connection takes through the node's Service rules")
    p.add_argument("--from", dest="src", required=True, help="the connection's source IP")
    p.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.add_argument("--mode", choices=("auto", "iptables", "userspace", "nftables", "ipvs"), default="auto",
                   help="the proxy mode whose state to read (auto: the one whose rules are on the node)")
    p.add_argument("--status-socket", help="userspace mode: the relay's status socket (default: kproxy's run dir)")
    p.add_argument("--iptables-backend", choices=("auto", "nft", "legacy"), default="auto")
    p.add_argument("--netns", help="read the state of this network namespace instead of the current one")
    p.add_argument("dest", metavar="DEST_IP:PORT")
    return p


@dataclass(frozen=True)
class Route:
    """Paths with the same result, their probabilities added up."""

    verdict: str
    endpoint: str
    masquerade: bool
    affinity: bool
    service: str
    probability: float
    hops: tuple[str, ...]
    current: bool = False  # an affinity entry this client has now (kproxy.trace.iptables.Path)

    def as_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "endpoint": self.endpoint, "masquerade": self.masquerade,
                "affinity": self.affinity, "service": self.service, "probability": round(self.probability, 6),
                "rules": list(self.hops), **({"currentAffinity": True} if self.current else {})}


def summarize(paths: Sequence[Path]) -> list[Route]:
    merged: dict[tuple[str, str, bool, bool, str], Route] = {}
    for p in paths:
        key = (p.outcome.verdict, p.outcome.endpoint, p.outcome.masquerade, p.affinity, p.service)
        old = merged.get(key)
        prob = p.probability + (old.probability if old else 0.0)
        merged[key] = Route(*key, probability=prob, hops=old.hops if old else p.hops,
                            current=p.current or (old.current if old else False))
    return sorted(merged.values(), key=lambda r: (r.affinity, -r.probability, r.endpoint))


def _dest(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise TraceError(f"destination {text!r}: expected IP:PORT")
    return _ip(host.strip("[]"), "destination"), int(port)


def _ip(text: str, flag: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise TraceError(f"{flag} {text!r}: not an IP address") from None


T = TypeVar("T")


def in_netns(fn: Callable[[], T], netns: str | None) -> T:
    """fn() on a thread that entered `netns` (namespaces are per thread, and a process started
    from that thread is born in it: no `ip netns exec` per tool, whose extra process start is
    what a trace costs most on a slow machine)."""
    if netns is None:
        return fn()
    box: list[T | BaseException] = []

    def run() -> None:
        try:
            enter_netns(netns)
            box.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back below
            box.append(e)

    t = threading.Thread(target=run, name="kproxy-trace-netns", daemon=True)
    t.start()
    t.join(_TIMEOUT + 5)
    if not box:
        raise TraceError(f"netns {netns}: no answer within {_TIMEOUT:.0f} s")
    if isinstance(box[0], TraceError):
        raise box[0]
    if isinstance(box[0], BaseException):
        raise TraceError(f"netns {netns}: {box[0]}")
    return box[0]


def _read(cmd: list[str], netns: str | None) -> str:
    def run() -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run(cmd, capture_output=True, timeout=_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TraceError(f"{cmd[0]}: {e}") from None

    proc = in_netns(run, netns)
    if proc.returncode != 0:
        raise TraceError(f"{' '.join(cmd)}: {proc.stderr.decode(errors='replace').strip()[:200]}")
    if len(proc.stdout) > MAX_DUMP_BYTES:
        raise TraceError(f"{cmd[0]}: output over {MAX_DUMP_BYTES} bytes")
    return proc.stdout.decode(errors="replace")


_TABLES = ("nat", "filter")


def _tables(dump: str) -> str:
    """The nat and filter tables of a whole iptables-save (one tool run instead of one a table;
    the other tables are other software's and are not parsed)."""
    keep, out = False, []
    for line in dump.splitlines(keepends=True):
        if line.startswith("*"):
            keep = line[1:].strip() in _TABLES
        if keep:
            out.append(line)
    return "".join(out)


# IPVS mode has a KUBE-SERVICES chain too: its rules match Service addresses by ipset (its
# IPv6 proxier's ip6tables rules by the KUBE-6- sets, upstream's IPv6 names).
_MARKERS = {"ipvs": "--match-set KUBE-CLUSTER-IP ", "iptables": ":KUBE-SERVICES ",
            "userspace": ":KUBE-PORTALS-CONTAINER "}
_MARKERS6 = {**_MARKERS, "ipvs": "--match-set KUBE-6-CLUSTER-IP "}


def iptables_dump(backend: str, netns: str | None, mode: str, family: str = "ip") -> tuple[str, str, str]:
    """(mode, back end, nat+filter dump): the back end (and with mode auto, the mode) whose
    dump holds kproxy's chains (iptables mode's KUBE-SERVICES, userspace's KUBE-PORTALS-*);
    ip6tables' for an IPv6 destination (family ip6)."""
    modes = ("ipvs", "iptables", "userspace") if mode == "auto" else (mode,)
    for b in (("nft", "legacy") if backend == "auto" else (backend,)):
        tool = f"{'ip6tables' if family == 'ip6' else 'iptables'}-{b}-save"
        dump = _tables(_read([tool], netns))
        markers = _MARKERS6 if family == "ip6" else _MARKERS
        for m in modes:
            if markers[m] in dump and (m != "iptables" or markers["ipvs"] not in dump):
                return m, b, dump
    raise TraceError(f"no kproxy rules of mode {' or '.join(modes)} on this node (iptables back end {backend})")


def local_ips(netns: str | None) -> set[str]:
    """The node's addresses, both families, every link (rtnetlink: no tool to start)."""

    def read() -> set[str]:
        try:
            links = Addresses()
            try:
                return links.addresses(None)
            finally:
                links.close()
        except OSError as e:
            raise TraceError(f"the node's addresses (rtnetlink): {e}") from None

    return {_ip(a, "address of this node") for a in in_netns(read, netns)}


NFT_TABLE = "kube-proxy"


def nft_dump(netns: str | None, family: str) -> str:
    """The kernel's kube-proxy table of this address family as `nft -j` JSON."""
    return _read(["nft", "-j", "list", "table", family, NFT_TABLE], netns)


def trace_nftables(dump: str, local: set[str], src: str, dst: str, port: int, proto: str, family: str) -> list[Route]:
    return summarize(NftTracer(dump, local, family, NFT_TABLE).paths(src, dst, port, proto))


def trace_iptables(dump: str, local: set[str], src: str, dst: str, port: int, proto: str) -> list[Route]:
    return summarize(Tracer(dump, local).paths(src, dst, port, proto))


def through_relay(routes: Sequence[Route], ports: Sequence[status.RelayPort], proto: str,
                  local: set[str]) -> list[Route]:
    """Userspace mode: a route the rules send to a local relay port continues to that listener's
    endpoints, each an equal share (the relay picks round robin), each also reachable through an
    affinity entry when the Service has ClientIP affinity. The relay dials from the node, so the
    endpoint sees the node's address (masquerade)."""
    by_port = {p.port: p for p in ports if p.protocol == proto.upper()}
    out: list[Route] = []
    for r in routes:
        host, _, port = r.endpoint.rpartition(":")
        relay = by_port.get(int(port)) if r.verdict == "ACCEPT" and r.endpoint and (
            host.startswith("127.") or host in local) else None
        if relay is None:
            out.append(r)
            continue
        hops = (*r.hops, f"relay/{relay.role}:{relay.port}")
        if not relay.endpoints:
            out.append(Route("REJECT", "", False, False, relay.service, r.probability, hops))
        for ep in relay.endpoints:
            share = r.probability / len(relay.endpoints)
            out.append(Route("ACCEPT", ep, True, False, relay.service, share, hops))
            if relay.affinity_timeout > 0:
                out.append(Route("ACCEPT", ep, True, True, relay.service, 0.0, hops))
    return out


def render_text(routes: Sequence[Route], header: str) -> str:
    lines = [header]
    for r in routes:
        what = f"-> {r.endpoint}" if r.endpoint else ("not a Service: passes unchanged" if r.verdict == "ACCEPT"
                                                       else {"DROP": "dropped"}.get(r.verdict, f"{r.verdict.lower()}ed"))
        flags = [f for f, on in (("masquerade", r.masquerade), ("session affinity", r.affinity)) if on]
        chance = ("affinity" if not r.current else "now") if r.affinity else f"{r.probability:7.2%}"
        lines.append(f"  {chance:>8}  {r.service or '-'}  {what}" + (f"  ({', '.join(flags)})" if flags else ""))
        lines.append(f"            via {' > '.join(r.hops) or '(no rule)'}")
    return "\n".join(lines)


def _state(ns: argparse.Namespace, family: str) -> tuple[str, str, str]:
    """(mode, back end, dump) of the mode asked for, or with auto the one whose state is on the
    node: kproxy's iptables or userspace chains, else its nftables table."""
    if ns.mode == "nftables":
        return "nftables", "nftables", nft_dump(ns.netns, family)
    try:
        return iptables_dump(ns.iptables_backend, ns.netns, ns.mode, family)
    except TraceError as err:
        if ns.mode != "auto":
            raise
        try:
            return "nftables", "nftables", nft_dump(ns.netns, family)
        except TraceError:
            raise TraceError(f"{err}, and no nftables table {family} {NFT_TABLE}") from None


def ipvs_services(netns: str | None) -> list[tuple[VirtualServer, list[RealServer]]]:
    """Every virtual server with its real servers, over IPVS netlink in the node's namespace."""

    def read() -> list[tuple[VirtualServer, list[RealServer]]]:
        try:
            with IPVS() as ipvs:
                return [(vs, ipvs.dests(vs)) for vs in ipvs.services()]
        except OSError as e:
            raise TraceError(f"IPVS netlink: {e}") from None

    return in_netns(read, netns)


def trace_ipvs(dump: str, local: set[str], netns: str | None, src: str, dst: str, port: int,
               proto: str) -> list[Route]:
    sets = parse_ipsets(_read(["ipset", "save"], netns))
    tracer = IPVSTracer(dump, local, sets, ipvs_services(netns))
    return summarize(tracer.paths(src, dst, port, proto))


def main(argv: Sequence[str]) -> int:
    try:
        ns = _parser().parse_args(list(argv))
        src = _ip(ns.src, "--from")
        dst, port = _dest(ns.dest)
        if (":" in src) != (":" in dst):
            raise TraceError(f"--from {src} and destination {dst} are of different IP families")
        family = "ip6" if ":" in dst else "ip"
        mode, backend, dump = _state(ns, family)
        local = local_ips(ns.netns)
        if mode == "nftables":
            routes = trace_nftables(dump, local, src, dst, port, ns.proto, family)
        elif mode == "ipvs":
            routes = trace_ipvs(dump, local, ns.netns, src, dst, port, ns.proto)
        else:
            routes = trace_iptables(dump, local, src, dst, port, ns.proto)
        if mode == "userspace":
            ports = status.read(ns.status_socket or status.socket_path(ns.netns))
            routes = through_relay(routes, ports, ns.proto, local)
    except (TraceError, status.StatusError) as err:
        print(f"kproxy trace: error: {err}", file=sys.stderr)
        return 1
    if ns.output == "json":
        print(json.dumps({"mode": mode, "backend": backend, "from": src, "proto": ns.proto,
                          "destination": f"{dst}:{port}", "paths": [r.as_dict() for r in routes]}, indent=2))
    else:
        where = f"table {family} {NFT_TABLE}" if mode == "nftables" else f"{backend} back end"
        print(render_text(routes, f"{ns.proto} {src} -> {dst}:{port}  ({mode} mode, {where})"))
    return 0

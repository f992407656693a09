"""Runs one conformance probe with real sockets in a client namespace and judges the outcome.

Sockets are made inside the client's network namespace (kproxy.relay.socket_in_netns) and used
from this process: no process per connection. Every socket has a timeout and every loop a count.
"""
from __future__ import annotations

import json
import socket
from collections.abc import Callable

from conformance_table import Family, Probe, Scenario, Variant, client_ip, expected, target

from kproxy.relay import socket_in_netns

MAX_CONNECTIONS = 40  # (2/3)^40: a backend of three missed by chance once in 10^7 runs
DROP_TIMEOUT = 1.5  # a dropped SYN or datagram: no answer within this (answers take milliseconds)

MakeSocket = Callable[[int], socket.socket]  # socket type -> a socket in the client's namespace


def netns_sockets(netns: str | None, family: Family = "IPv4") -> MakeSocket:
    af = socket.AF_INET6 if family == "IPv6" else socket.AF_INET
    return lambda kind: socket_in_netns(netns, af, kind)


def _one(make: MakeSocket, proto: str, addr: tuple[str, int], timeout: float) -> tuple[str, str]:
    """(outcome, peer seen by the backend): outcome is a backend name, "refused", "dropped" or
    "error:...". Backends answer "NAME PEER_IP"."""
    s = make(socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        if proto == "TCP":
            s.connect(addr)
            data = s.recv(256)
        else:
            s.connect(addr)
            s.send(b"ping")
            data = s.recv(256)
        if not data:
            return "error:closed", ""
        name, _, peer = data.decode(errors="replace").strip().partition(" ")
        return name, peer
    except ConnectionRefusedError:
        return "refused", ""
    except (TimeoutError, socket.timeout):
        return "dropped", ""
    except ConnectionResetError:
        return "reset", ""
    except OSError as e:
        return f"error:{e.errno}", ""
    finally:
        s.close()


def _health(make: MakeSocket, addr: tuple[str, int]) -> tuple[int, dict[str, object]]:
    s = make(socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(addr)
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        raw = b""
        for _ in range(64):  # bounded: the body is a few hundred bytes
            chunk = s.recv(4096)
            if not chunk:
                break
            raw += chunk
    finally:
        s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    parsed: dict[str, object] = json.loads(body)
    return status, parsed


def run_probe(make: MakeSocket, probe: Probe, addr: tuple[str, int], family: Family = "IPv4") -> str:
    """Empty string when the probe passed, else what went wrong (for the assertion message)."""
    client = client_ip(family)
    if probe.dst == "health":
        status, body = _health(make, addr)
        if status != probe.expect:
            return f"health {addr}: status {status}, expected {probe.expect} ({body})"
        if probe.local_endpoints is not None and body.get("localEndpoints") != probe.local_endpoints:
            return f"health {addr}: localEndpoints {body.get('localEndpoints')}, expected {probe.local_endpoints}"
        return ""
    expect = probe.expect
    timeout = DROP_TIMEOUT if expect == "dropped" else 5.0
    results = [_one(make, probe.proto, addr, timeout) for _ in range(probe.count)]
    if isinstance(expect, frozenset):
        # iptables picks endpoints at random: more connections (bounded) until each expected
        # backend answered, or something unexpected did.
        for _ in range(MAX_CONNECTIONS - probe.count):
            seen = {r[0] for r in results}
            if expect <= seen or not seen <= expect:
                break
            results.append(_one(make, probe.proto, addr, timeout))
    outcomes = [r[0] for r in results]
    if isinstance(expect, str) and expect in ("refused", "dropped"):
        # A refusal must come at once and a drop must not be answered at all.
        return "" if set(outcomes) == {expect} else f"{addr}: got {outcomes}, expected {expect}"
    if expect == "sticky":
        names = set(outcomes)
        ok = len(names) == 1 and not any(o.startswith(("error", "refused", "dropped", "reset")) for o in outcomes)
        return "" if ok else f"{addr}: got {outcomes}, expected one backend for every connection"
    assert isinstance(expect, frozenset)
    if set(outcomes) != expect:
        return f"{addr}: got {outcomes}, expected each of {sorted(expect)} and nothing else"
    peers = {r[1] for r in results}
    if probe.source == "client" and peers != {client}:
        return f"{addr}: backends saw {peers}, expected the client's address {client}"
    if probe.source == "not-client" and client in peers:
        return f"{addr}: backends saw the client's address, expected the node's"
    return ""


TraceCheck = Callable[[Scenario, Probe, Variant, Family], str]  # "" when `kproxy trace` agrees with the probe


def check_scenario(mode: str, scenario: Scenario, client_netns: Callable[[str], str],
                   sync_phase2: Callable[[], None], trace_check: TraceCheck | None = None,
                   variant: Variant = "IPv4", family: Family = "IPv4") -> list[str]:
    """Runs every probe of one scenario as `mode` must pass it (conformance_table.expected);
    between phase 1 and 2 `sync_phase2` programs the scenario's changed endpoints. Returns the
    failures, each naming the documented limit it was judged by, if any. `variant`: which of the
    scenario's Services (IPv4-only, IPv6-only, dual-stack); `family`: the family the probes use."""
    failures = []
    for phase in (1, 2):
        if phase == 2:
            if scenario.then is None:
                break
            sync_phase2()
        for probe in scenario.probes:
            if probe.phase != phase:
                continue
            want, reason = expected(mode, scenario, probe)
            problem = run_probe(netns_sockets(client_netns(want.src), family), want,
                                target(scenario, want, variant, family), family)
            if problem:
                failures.append(f"{want.key}{' (documented limit: ' + reason + ')' if reason else ''}: {problem}")
            elif trace_check is not None:
                # The real connections landed as `want` says: `kproxy trace` must say the same.
                problem = trace_check(scenario, want, variant, family)
                if problem:
                    failures.append(f"{want.key}: kproxy trace disagrees with the real connections: {problem}")
    return failures

"""`kproxy trace`'s answer for a conformance probe, compared with what the probe's real connections did.

The probe has just passed (its connections landed as the probe states), so the trace must name
the same endpoint set, or the same drop or refusal, and the same source-address handling. The
trace runs the product's command (`kproxy trace -o json --netns NODE`) against the live ruleset.
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from contextlib import redirect_stdout

from conformance_table import POD_IPS, POD_IPS6, Family, Probe, Scenario, Variant, client_ip, node_ip, target

from kproxy import cli

_POD_BY_IP = {ip: name for ips in (POD_IPS, POD_IPS6) for name, ip in ips.items()}


def source(src: str, family: Family) -> str:
    pods = POD_IPS6 if family == "IPv6" else POD_IPS
    return {"node": node_ip(family), "outside": client_ip(family), "pod": pods["pod2"], "self": pods["pod1"]}[src]


def run_trace(argv: list[str]) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(["trace", *argv])
    return code, json.loads(out.getvalue()) if code == 0 else {}


def trace_checker(netns: str, mode_args: list[str],
                  reads_affinity: bool = False) -> Callable[[Scenario, Probe, Variant, Family], str]:
    """mode_args: how the mode is named to `kproxy trace` (--mode, --iptables-backend).
    reads_affinity: the mode's affinity entries are readable (nftables sets), so after a sticky
    probe the trace must name the one endpoint the client's entry holds now."""

    def check(scenario: Scenario, probe: Probe, variant: Variant, family: Family) -> str:
        dst, port = target(scenario, probe, variant, family)
        code, got = run_trace(["--netns", netns, *mode_args, "-o", "json", "--from", source(probe.src, family),
                               "--proto", probe.proto.lower(), f"[{dst}]:{port}" if ":" in dst else f"{dst}:{port}"])
        if code != 0:
            return f"kproxy trace exited {code}"
        paths = got["paths"]
        assert isinstance(paths, list)
        new = [p for p in paths if not p["affinity"] and p["probability"] > 0]
        verdicts = {p["verdict"] for p in new}
        pods = {_POD_BY_IP.get(p["endpoint"].rsplit(":", 1)[0].strip("[]"), p["endpoint"]) for p in new if p["endpoint"]}
        expect = probe.expect
        if probe.dst == "health":
            # Served by kproxy's own socket on the node: no rule may rewrite or stop it.
            ok = verdicts == {"ACCEPT"} and not pods
        elif expect == "refused":
            ok = verdicts == {"REJECT"}
        elif expect == "dropped":
            ok = verdicts == {"DROP"}
        elif expect == "sticky":
            sticky = {p["endpoint"] for p in paths if p["affinity"]}
            now = {p["endpoint"] for p in paths if p["affinity"] and p.get("currentAffinity")}
            ok = verdicts == {"ACCEPT"} and len(pods) > 1 and len(sticky) == len(pods) and (
                len(now) == 1 if reads_affinity else not now)
        else:
            assert isinstance(expect, frozenset)
            masq = {p["masquerade"] for p in new}
            ok = verdicts == {"ACCEPT"} and pods == set(expect) and (
                (probe.source != "client" or masq == {False}) and (probe.source != "not-client" or masq == {True}))
            total = sum(p["probability"] for p in new)
            ok = ok and abs(total - 1.0) < 1e-3
        return "" if ok else f"expected {expect!r}, trace says {json.dumps(paths)[:1500]}"

    return check

"""kproxy.trace's parsing of untrusted ruleset text and its command line (pure logic, no kernel)."""
from __future__ import annotations

import argparse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy import cli, trace
from kproxy.trace import summarize
from kproxy.trace.iptables import MAX_BRANCHES, Outcome, TraceError, Tracer

HEAD = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-X - [0:0]\n"
JUMP = "-A PREROUTING -j KUBE-SERVICES\n"
SVC = '-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "ns/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-X\n'


def _svc(n: int) -> str:
    """n endpoints as kproxy renders them: probability 1/(n-i) for the i-th, the last unconditional."""
    lines = [HEAD + "".join(f":KUBE-SEP-{i} - [0:0]\n" for i in range(n)), JUMP, SVC]
    for i in range(n):
        stat = f"-m statistic --mode random --probability {1 / (n - i):.11f} " if i < n - 1 else ""
        lines.append(f'-A KUBE-SVC-X -m comment --comment "ns/web:http -> 10.1.0.{i + 2}:8080" {stat}-j KUBE-SEP-{i}\n')
        lines.append(f"-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination 10.1.0.{i + 2}:8080\n")
    return "".join(lines) + "COMMIT\n"


@given(st.integers(min_value=1, max_value=40))
@settings(max_examples=25, deadline=None)
def test_endpoint_probabilities_are_equal_and_sum_to_one(n: int) -> None:
    routes = summarize(Tracer(_svc(n), {"192.168.0.1"}).paths("203.0.113.1", "10.96.0.1", 80))
    assert {r.endpoint for r in routes} == {f"10.1.0.{i + 2}:8080" for i in range(n)}
    assert all(r.service == "ns/web:http" and r.verdict == "ACCEPT" for r in routes)
    assert abs(sum(r.probability for r in routes) - 1.0) < 1e-6
    assert all(abs(r.probability - 1 / n) < 1e-6 for r in routes)


def test_other_destinations_pass_unchanged() -> None:
    assert Tracer(_svc(2), set()).trace("203.0.113.1", "10.96.0.1", 81) == {Outcome("ACCEPT", "", False)}


@pytest.mark.parametrize("line, word", [
    ("-A KUBE-SERVICES -d 10.96.0.300/32 -j DROP", "bad address"),
    ("-A KUBE-SERVICES -p tcp --dport 99999 -j DROP", "bad port"),
    ("-A KUBE-SERVICES -m mark --mark zz/0x1 -j DROP", "bad mark"),
    ("-A KUBE-SERVICES -m statistic --probability 2 -j DROP", "bad probability"),
    ('-A KUBE-SERVICES -m comment --comment "open -j DROP', "unbalanced quotes"),
    ("-A KUBE-SERVICES -j DNAT --to-destination 10.1.0.2:0", "bad DNAT port"),
    ("-A KUBE-SERVICES -j DNAT --to-destination nothost:80", "bad DNAT destination"),
    ("-A bad$chain -j DROP", "bad chain name"),
])
def test_bad_lines_are_errors_naming_them(line: str, word: str) -> None:
    with pytest.raises(TraceError, match=word):
        Tracer(HEAD + JUMP + line + "\nCOMMIT\n", set()).trace("1.2.3.4", "10.96.0.1", 80)


def test_loops_and_explosions_are_bounded() -> None:
    loop = HEAD + JUMP + "-A KUBE-SERVICES -j KUBE-SVC-X\n-A KUBE-SVC-X -j KUBE-SERVICES\nCOMMIT\n"
    with pytest.raises(TraceError, match="nested deeper"):
        Tracer(loop, set()).trace("1.2.3.4", "10.96.0.1", 80)
    fork = "".join("-A KUBE-SERVICES -m statistic --mode random --probability 0.5 -j KUBE-SVC-X\n" for _ in range(13))
    many = HEAD + JUMP + fork + "".join(
        "-A KUBE-SVC-X -m statistic --mode random --probability 0.5 -j MARK --or-mark 0x1\n" for _ in range(13))
    with pytest.raises(TraceError, match=str(MAX_BRANCHES)):
        Tracer(many + "COMMIT\n", set()).trace("1.2.3.4", "10.96.0.1", 80)


@given(st.text(alphabet=st.sampled_from(list("-A !KUBE:/.0123456789abjDNATm\"'\n")), max_size=400))
@settings(max_examples=300, deadline=None)
def test_garbage_is_a_trace_error_or_a_trace(text: str) -> None:
    try:
        Tracer(HEAD + JUMP + text + "\nCOMMIT\n", {"10.0.0.1"}).paths("10.0.0.2", "10.96.0.1", 80)
    except TraceError:
        pass


@pytest.mark.parametrize("argv, word", [
    (["trace", "10.96.0.1:80"], "--from"),
    (["trace", "--from", "nope", "10.96.0.1:80"], "--from 'nope': not an IP address"),
    (["trace", "--from", "1.2.3.4", "10.96.0.1"], "expected IP:PORT"),
    (["trace", "--from", "1.2.3.4", "10.96.0.1:70000"], "expected IP:PORT"),
    (["trace", "--from", "1.2.3.4", "--proto", "sctp", "10.96.0.1:80"], "--proto"),
    (["trace", "--from", "fd00::1", "10.96.0.1:80"], "different IP families"),
])
def test_bad_arguments_are_one_line_and_exit_1(argv: list[str], word: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kproxy trace: error:") and word in err, err


def test_daemon_flags_still_parse() -> None:
    assert cli.parse_config(["--proxy-mode", "userspace", "--hostname-override", "n1"]).mode == "userspace"


def test_mode_detection_reads_one_save_a_back_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: IPVS mode's KUBE-SERVICES (ipset matches) is not taken for iptables mode; other
    software's tables in the dump are not parsed; with no kproxy rules, the nftables table."""
    ipvs = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\nCOMMIT\n"
    other = "*mangle\n-A PREROUTING -m weird --thing ! ! -j NOWHERE(\nCOMMIT\n"
    calls: list[list[str]] = []

    def read(cmd: list[str], netns: str | None) -> str:
        calls.append(cmd)
        if cmd[0] == "nft":
            return '{"nftables": []}'
        if cmd[0] == "ip6tables-legacy-save":  # the IPv6 proxier's rules match the KUBE-6- sets (upstream's names)
            return other + ipvs.replace("KUBE-CLUSTER-IP", "KUBE-6-CLUSTER-IP")
        return other + (ipvs if cmd[0].endswith("tables-legacy-save") else "")

    monkeypatch.setattr(trace, "_read", read)
    assert trace.iptables_dump("auto", None, "auto")[:2] == ("ipvs", "legacy")
    assert calls == [["iptables-nft-save"], ["iptables-legacy-save"]]
    assert "weird" not in trace.iptables_dump("legacy", None, "ipvs")[2]
    with pytest.raises(TraceError, match="no kproxy rules of mode iptables"):
        trace.iptables_dump("legacy", None, "iptables")
    calls.clear()
    assert trace.iptables_dump("legacy", None, "ipvs", "ip6")[:2] == ("ipvs", "legacy")
    assert calls == [["ip6tables-legacy-save"]]
    monkeypatch.setattr(trace, "_read", lambda cmd, netns: other if cmd[0] != "nft" else '{"nftables": []}')
    ns = argparse.Namespace(mode="auto", iptables_backend="auto", netns=None)
    assert trace._state(ns, "ip") == ("nftables", "nftables", '{"nftables": []}')

"""kproxy.trace.nftables: the walk through an `nft -j` ruleset, and its parsing of that JSON as
untrusted input (pure logic, no kernel; tests/conformance checks it against real packets)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.trace import summarize
from kproxy.trace.iptables import MAX_BRANCHES, Outcome, TraceError
from kproxy.trace.nftables import NftTracer

T = {"family": "ip", "table": "kube-proxy"}
SVC = "service-ABCDEFGH-ns/web/tcp/http"
DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
KEY = {"concat": [DADDR, {"meta": {"key": "l4proto"}}, {"payload": {"protocol": "th", "field": "dport"}}]}
MARK = {"meta": {"key": "mark"}}


def chain(name: str, hook: str = "", prio: int = 0, kind: str = "nat") -> dict[str, object]:
    body: dict[str, object] = {**T, "name": name}
    if hook:
        body.update(type=kind, hook=hook, prio=prio, policy="accept")
    return {"chain": body}


def rule(chain_name: str, *exprs: object) -> dict[str, object]:
    return {"rule": {**T, "chain": chain_name, "expr": list(exprs)}}


def dnat(ip: str) -> dict[str, object]:
    return {"dnat": {"addr": ip, "port": 8080}}


def numgen(mod: int) -> dict[str, object]:
    return {"numgen": {"mode": "random", "mod": mod, "offset": 0}}


def ruleset(service_rules: list[dict[str, object]], extra: list[dict[str, object]] = ()) -> str:  # type: ignore[assignment]
    items: list[dict[str, object]] = [
        {"metainfo": {"version": "1.0.6"}}, {"table": {**T, "name": "kube-proxy"}},
        {"table": {"family": "ip", "name": "other"}},
        {"chain": {"family": "ip", "table": "other", "name": "x", "type": "filter", "hook": "prerouting", "prio": 0}},
        {"rule": {"family": "ip", "table": "other", "chain": "x", "expr": [{"drop": None}]}},  # not ours: ignored
        {"map": {**T, "name": "service-ips", "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict",
                 "elem": [[{"concat": ["10.96.0.1", "tcp", 80]}, {"goto": {"target": SVC}}]]}},
        {"set": {**T, "name": "aff", "type": "ipv4_addr", "flags": ["dynamic", "timeout"]}},
        chain("nat-prerouting", "prerouting", -100), chain("nat-output", "output", -100),
        chain("nat-postrouting", "postrouting", 100), chain("services"), chain("masq"), chain(SVC),
        rule("nat-prerouting", {"jump": {"target": "services"}}),
        rule("nat-output", {"jump": {"target": "services"}}),
        rule("services", {"vmap": {"key": KEY, "data": "@service-ips"}}),
        rule("nat-postrouting", {"jump": {"target": "masq"}}),
        rule("masq", {"match": {"op": "==", "left": {"&": [MARK, 0x4000]}, "right": 0}}, {"return": None}),
        rule("masq", {"masquerade": {"flags": "fully-random"}}),
        *service_rules, *extra,
    ]
    return json.dumps({"nftables": items})


def cascade(n: int) -> list[dict[str, object]]:
    """kproxy's renderer: rule k takes the connection with probability 1/(n-k)."""
    out = []
    for k in range(n):
        cond = [{"match": {"op": "==", "left": numgen(n - k), "right": 0}}] if k < n - 1 else []
        out.append(rule(SVC, *cond, dnat(f"10.1.0.{k + 2}")))
    return out


def vmap(n: int) -> list[dict[str, object]]:
    """upstream's renderer: one numgen verdict map over per-endpoint chains."""
    eps = [f"endpoint-ABCDEFGH-ns/web/tcp/http__10.1.0.{k + 2}/8080" for k in range(n)]
    out: list[dict[str, object]] = [chain(e) for e in eps]
    out += [rule(e, {"set": {"op": "update", "elem": SADDR, "set": "@aff"}}, dnat(f"10.1.0.{k + 2}"))
            for k, e in enumerate(eps)]
    out.append(rule(SVC, {"match": {"op": "==", "left": SADDR, "right": "@aff"}}, {"goto": {"target": eps[0]}}))
    out.append(rule(SVC, {"vmap": {"key": numgen(n), "data": {"set": [[k, {"goto": {"target": e}}] for k, e in enumerate(eps)]}}}))
    return out


@given(st.integers(min_value=1, max_value=30), st.booleans())
@settings(max_examples=25, deadline=None)
def test_every_endpoint_equally_likely_in_both_layouts(n: int, as_vmap: bool) -> None:
    dump = ruleset(vmap(n) if as_vmap else cascade(n))
    routes = [r for r in summarize(NftTracer(dump, {"192.168.0.1"}).paths("203.0.113.1", "10.96.0.1", 80))
              if not r.affinity]
    assert {r.endpoint for r in routes} == {f"10.1.0.{k + 2}:8080" for k in range(n)}
    assert all(r.service == "ns/web:http" and r.verdict == "ACCEPT" for r in routes)
    assert all(abs(r.probability - 1 / n) < 1e-9 for r in routes)
    assert abs(sum(r.probability for r in routes) - 1.0) < 1e-9


def test_affinity_set_hit_is_reported_as_affinity() -> None:
    routes = summarize(NftTracer(ruleset(vmap(3)), set()).paths("203.0.113.1", "10.96.0.1", 80))
    sticky = [r for r in routes if r.affinity]
    assert [(r.endpoint, r.current) for r in sticky] == [("10.1.0.2:8080", False)]


def test_a_clients_affinity_entry_now_is_reported() -> None:
    """The kernel lists a dynamic set's members with their expiry: the client in it is marked."""
    doc = json.loads(ruleset(vmap(3)))
    aff = next(i["set"] for i in doc["nftables"] if "set" in i and i["set"]["name"] == "aff")
    aff["elem"] = [{"elem": {"val": "203.0.113.1", "timeout": 60, "expires": 42}}]
    t = NftTracer(json.dumps(doc), set())
    now = [r for r in summarize(t.paths("203.0.113.1", "10.96.0.1", 80)) if r.current]
    assert [(r.endpoint, r.affinity, r.as_dict()["currentAffinity"]) for r in now] == [("10.1.0.2:8080", True, True)]
    assert not any(r.current for r in summarize(t.paths("203.0.113.2", "10.96.0.1", 80)))


def test_mark_decides_masquerade() -> None:
    marked = [rule(SVC, {"mangle": {"key": MARK, "value": {"|": [MARK, 0x4000]}}}), *cascade(1)]
    assert NftTracer(ruleset(marked), set()).trace("203.0.113.1", "10.96.0.1", 80) == {
        Outcome("ACCEPT", "10.1.0.2:8080", True)}
    assert NftTracer(ruleset(cascade(1)), set()).trace("203.0.113.1", "10.96.0.1", 80) == {
        Outcome("ACCEPT", "10.1.0.2:8080", False)}


def test_other_destinations_pass_and_tcp_dport_means_tcp() -> None:
    t = NftTracer(ruleset(cascade(2)), set())
    assert t.trace("203.0.113.1", "10.96.0.1", 81) == {Outcome("ACCEPT", "", False)}
    assert t.trace("203.0.113.1", "10.96.0.1", 80, "udp") == {Outcome("ACCEPT", "", False)}
    only_tcp = [rule(SVC, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}},
                     {"drop": None})]
    assert NftTracer(ruleset(only_tcp), set()).trace("1.2.3.4", "10.96.0.1", 80) == {Outcome("DROP", "", False)}


def test_node_traffic_goes_through_output() -> None:
    paths = NftTracer(ruleset(cascade(1)), {"192.168.0.1"}).paths("192.168.0.1", "10.96.0.1", 80)
    assert [p.outcome.endpoint for p in paths] == ["10.1.0.2:8080"]
    assert paths[0].hops[0] == "kube-proxy/nat-output"


@pytest.mark.parametrize("bad, word", [
    ({"dnat": {"addr": "10.1.0.300", "port": 80}}, "not an address"),
    ({"dnat": {"addr": "10.1.0.3", "port": 0}}, "DNAT port"),
    ({"dnat": {"addr": "tcp", "port": 80}}, "not an address"),
    ({"match": {"op": "<", "left": SADDR, "right": "1.2.3.4"}}, "operator"),
    ({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "ttl"}}, "right": 1}}, "field ip ttl"),
    ({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}}, "meta key"),
    ({"match": {"op": "==", "left": SADDR, "right": {"prefix": {"addr": "10.0.0.0", "len": 99}}}}, "bad prefix"),
    ({"match": {"op": "==", "left": numgen(0), "right": 0}}, "numgen mod"),
    ({"queue": {"num": 1}}, "statement"),
    ({"goto": {"target": "no-such-chain"}}, "does not have"),
    ({"match": {"op": "==", "left": SADDR, "right": "@no-such-set"}}, "does not have"),
    ({"goto": {"target": 7}}, "chain name"),
    ({"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}}, "but the mark"),
    ({"match": {"op": "==", "left": SADDR, "right": True}}, "boolean"),
    ("just text", "not an object"),
])
def test_unexpected_json_is_an_error_naming_it(bad: object, word: str) -> None:
    with pytest.raises(TraceError, match=word):
        NftTracer(ruleset([rule(SVC, bad)]), set()).trace("1.2.3.4", "10.96.0.1", 80)


@pytest.mark.parametrize("doc", ["", "[]", '{"nftables": 3}', "{" * 100000, '{"nftables": [{"rule": []}]}',
                                 '{"nftables": [{"chain": {"family": "ip", "table": "kube-proxy", "name": "a b"}}]}',
                                 '{"nftables": [{"table": {"family": "ip", "name": "kube-proxy"}}]}'])
def test_bad_documents_are_errors(doc: str) -> None:
    with pytest.raises(TraceError):
        NftTracer(doc, set())


def test_loops_and_explosions_are_bounded() -> None:
    loop = [rule(SVC, {"jump": {"target": "services"}})]
    with pytest.raises(TraceError, match="nested deeper"):
        NftTracer(ruleset(loop), set()).trace("1.2.3.4", "10.96.0.1", 80)
    fork = [rule(SVC, {"match": {"op": "==", "left": numgen(2), "right": 0}}, {"mangle": {"key": MARK, "value": k}})
            for k in range(13)]
    with pytest.raises(TraceError, match=str(MAX_BRANCHES)):
        NftTracer(ruleset(fork), set()).trace("1.2.3.4", "10.96.0.1", 80)


def test_ipv6_addresses_are_walked() -> None:
    t6 = {"family": "ip6", "table": "kube-proxy"}
    items = [
        {"chain": {**t6, "name": "nat-prerouting", "type": "nat", "hook": "prerouting", "prio": -100}},
        {"rule": {**t6, "chain": "nat-prerouting", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "fd00::1"}},
            {"dnat": {"addr": "fd01::2", "port": 8080}}]}},
    ]
    t = NftTracer(json.dumps({"nftables": items}), set(), "ip6")
    assert t.trace("fd02::9", "fd00::1", 80) == {Outcome("ACCEPT", "[fd01::2]:8080", False)}


def test_map_element_comments_name_the_service() -> None:
    """upstream's renderer names the Service in each element's comment (a no-endpoints drop has
    no Service chain to take the name from)."""
    extra = [{"map": {**T, "name": "no-endpoints", "type": ["ipv4_addr", "inet_proto", "inet_service"], "map": "verdict",
                      "elem": [[{"elem": {"val": {"concat": ["10.96.0.2", "tcp", 80]}, "comment": "ns/empty:http"}},
                                {"drop": None}]]}},
             chain("filter-forward", "forward", -110, "filter"),
             rule("filter-forward", {"vmap": {"key": KEY, "data": "@no-endpoints"}})]
    routes = summarize(NftTracer(ruleset([], extra), set()).paths("203.0.113.1", "10.96.0.2", 80))
    assert [(r.verdict, r.service) for r in routes] == [("DROP", "ns/empty:http")]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(
    ["tcp", "10.1.0.2", "@service-ips", "@aff", SVC, "new", "local", "daddr", "ip", "th", "dport", "x y"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["match", "op", "left", "right", "payload", "protocol", "field", "vmap", "key", "data", "set", "concat",
         "numgen", "mod", "dnat", "addr", "port", "goto", "target", "prefix", "len", "range", "elem", "val"]),
        inner, max_size=3), max_leaves=12)


@given(st.lists(JSON, min_size=1, max_size=3))
@settings(max_examples=300, deadline=None)
def test_any_json_in_a_rule_is_a_trace_error_or_a_trace(exprs: list[object]) -> None:
    try:
        NftTracer(ruleset([rule(SVC, *exprs)]), {"10.0.0.1"}).paths("10.0.0.2", "10.96.0.1", 80)
    except TraceError:
        pass

"""The nfnetlink encoder (kproxy.backends.nftnl) compiled by Cython and the same source run as
Python produce identical bytes, and a full sync's elements given as tuples the same bytes as
their lines: for the transactions the proxier writes for random Service sets
(hypothesis: full syncs and partial syncs after random changes) and for random rule texts (both
refuse the same ones). No kernel: tests/nftables/test_nftables_netlink.py checks what the bytes do."""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nftables_netlink import words
from test_nftables_render import endpoint, service

from kproxy.backends import _nftkey
from kproxy.backends import nftnl as COMPILED
from kproxy.backends.nftables import Nft
from kproxy.fastpath import pure_twin
from kproxy.model import Endpoint, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.nftables import NftablesProxier

PURE = pure_twin(COMPILED)


def test_the_encoder_is_compiled() -> None:
    assert (COMPILED.__file__ or "").endswith(".so"), "setup.py build_ext did not compile kproxy/backends/nftnl.py"
    assert (PURE.__file__ or "").endswith("nftnl.py")


def _encode(module: object, lines: Sequence[COMPILED.Part]) -> bytes | str:
    # An ElementRun is each twin's own class: the other twin's is given as this one's.
    own = [module.ElementRun(part.elements) if type(part).__name__ == "ElementRun" else part  # type: ignore[attr-defined, union-attr]
           for part in lines]
    try:
        batch = module.translate(own)  # type: ignore[attr-defined]
    except module.Untranslatable as e:  # type: ignore[attr-defined]
        return f"Untranslatable: {e}"
    return b"".join(batch.finish()) + "\n".join(batch.describe(i) for i in range(len(batch.origin))).encode()


class _NoKernel(Nft):
    """Keeps each transaction instead of sending it: only the encoding is under test here."""

    def __init__(self) -> None:
        super().__init__(None)
        self.transactions: list[list[str]] = []
        self.parts: list[COMPILED.Part] | None = None  # the last full sync's parts

    def apply(self, transaction: str | Iterable[str]) -> None:
        lines = [transaction] if isinstance(transaction, str) else list(transaction)
        # The nft -f fallback reads a transaction again after the encoder refused it: same lines.
        assert isinstance(transaction, str) or list(transaction) == lines
        self.transactions.append(lines)
        if isinstance(transaction, COMPILED.Parts):  # a full sync: its elements also as tuples
            parts = self.parts = list(transaction.parts())
            assert any(not isinstance(part, str) for part in parts) or not any("add element" in x for x in lines)
            assert _encode(COMPILED, parts) == _encode(PURE, parts) == _encode(COMPILED, lines)

    def local_ipv4_addresses(self) -> list[str]:
        return ["192.168.77.1"]


def _named(i: int, svc: ServicePort) -> ServicePort:
    # Distinct names and ClusterIPs, so that the Services of one example do not collide.
    name = ServicePortName(svc.name.namespace, f"{svc.name.name}-{i}", svc.name.port, svc.protocol)
    return msgspec.structs.replace(svc, name=name, cluster_ips=(f"10.96.{i // 250}.{i % 250 + 1}",))


services = st.lists(st.tuples(service, st.lists(endpoint, max_size=5, unique_by=lambda e: (e.ip, e.port))),
                    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(services, services, st.booleans(), st.sampled_from([(), ("10.96.0.0/12",)]))
def test_random_transactions_encode_identically(
        first: list[tuple[ServicePort, list[Endpoint]]], then: list[tuple[ServicePort, list[Endpoint]]],
        masquerade_all: bool, service_cidrs: tuple[str, ...]) -> None:
    nft = _NoKernel()
    p = NftablesProxier(nft, cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",), masquerade_all=masquerade_all,
                        service_cidrs=service_cidrs)
    p.stale_grace = 0.0  # the partial sync also deletes what it stopped using
    svcs = {s.name: s for s in (_named(i, svc) for i, (svc, _) in enumerate(first))}
    eps = {_named(i, svc).name: tuple(e) for i, (svc, e) in enumerate(first)}
    assert p.sync(SyncRequest(svcs, eps)).ok
    # Changes: the second list replaces the first Services one by one (kind, endpoints, gone).
    svcs2 = {s.name: s for s in (_named(i, svc) for i, (svc, _) in enumerate(then))}
    eps2 = {_named(i, svc).name: tuple(e) for i, (svc, e) in enumerate(then)}
    assert p.sync(SyncRequest(svcs2, eps2, changed=frozenset(svcs) | frozenset(svcs2), full=False)).ok
    assert p.sync(SyncRequest(svcs2, eps2)).ok  # the periodic resync: flush and refill
    assert len(nft.transactions) >= 2  # the partial sync sends nothing when nothing changed
    for lines in nft.transactions:
        a, b = _encode(COMPILED, lines), _encode(PURE, lines)
        assert isinstance(a, bytes), a  # the proxier writes only what the encoder covers
        assert a == b


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["ip", "ip6"]), st.lists(words | st.sampled_from(["ip6", "fd00::1", "fd00::/64"]), max_size=14))
def test_random_rule_texts_encode_identically_or_are_refused_by_both(family: str, ws: list[str]) -> None:
    line = f"add rule {family} kube-proxy c {' '.join(ws)}\n"
    assert _encode(COMPILED, [line]) == _encode(PURE, [line])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["ip", "ip6"]), st.sampled_from(["hairpin-ips", "service-ips", "endpoints-tcp-3", "cluster-ips"]),
       st.lists(st.sampled_from(["10.1.2.3", "fd00::1", "::ffff:1.2.3.4", "255.255.255.255", "0x0", "0x7fffffff", "0x100000000", "tcp", "sctp",
                                 "80", "65535", "65536", "1.2.3", "x"]), min_size=1, max_size=3),
       st.sampled_from(["", " : goto service-x", " : drop", " : jump", " : 10.0.0.1 . 8080", " : return x"]))
def test_random_elements_encode_identically_or_are_refused_by_both(family: str, set_name: str, key: list[str],
                                                                   value: str) -> None:
    line = f"add element {family} kube-proxy {set_name} {{ {' . '.join(key)}{value} }}\n"
    assert _encode(COMPILED, [line]) == _encode(PURE, [line])


key_part = st.one_of(
    st.sampled_from(["10.1.2.3", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3", "1.2.3.4.5", "0x0",
                     "0xffffffff", "0x100000000", "0xABC", "0x", "tcp", "udp", "sctp", "icmp", "0", "80", "00080",
                     "65535", "65536", "fd00::1", "", " "]),
    st.text(alphabet="0123456789abcdefx.:tcpuds ", max_size=12))


@settings(max_examples=1000, deadline=None)
@given(st.lists(key_part, min_size=1, max_size=5), st.sampled_from([" . ", " ", ".", " .  "]))
def test_the_c_key_parser_gives_the_python_bytes_or_leaves_them_to_it(parts: list[str], sep: str) -> None:
    text = sep.join(parts)
    got = _nftkey.key_bytes(text)
    try:
        want: bytes | None = PURE._key(text)
    except PURE.Untranslatable:
        want = None
    assert got is None or got == want, text


def test_the_c_key_parser_takes_the_common_forms() -> None:
    # What a full sync's elements are made of: None here would mean the C path is never used.
    for text, want in [("10.1.2.3 . tcp . 80", "0a010203" "06000000" "00500000"), ("0x1f", "1f000000"),
                       ("10.0.0.1 . 10.0.0.1", "0a000001" "0a000001"), ("udp . 30000", "11000000" "75300000")]:
        got = _nftkey.key_bytes(text)
        assert got is not None and got.hex() == (want if text != "0x1f" else struct.pack("=I", 31).hex())
    assert COMPILED._c_key is not None and PURE._c_key is None


# Rules as statements (what the renderer gives the encoder for a full sync): the same bytes as
# their text parsed, compiled and pure alike, or refused by every way. Values include malformed
# ones (each way must refuse them alike); none has a space or an "@" (no rule text has them there).
_fam = st.sampled_from(["ip", "ip6"])
_addr = st.sampled_from(["10.1.2.3", "10.0.0.0/8", "10.0.0.0/33", "fd00::1", "fd00::/64", "1.2.3", "x", "0.0.0.0/0"])
_num = st.sampled_from(["0", "1", "7", "65535", "65536", "2147483648", "x", "-1"])
_chain = st.sampled_from(["mark-for-masquerade", "service-ABCDEFGH-ns/svc/tcp/p", "reject-chain"])
statement = st.one_of(
    st.tuples(st.sampled_from(["match", "match!="]), _fam, st.sampled_from(["saddr", "daddr", "sport"]), _addr),
    st.tuples(st.just("in"), _fam, st.sampled_from(["saddr", "daddr"]), st.sampled_from(["affinity-x", "hairpin-ips"])),
    st.tuples(st.just("dport"), st.sampled_from(["tcp", "udp", "sctp", "icmp"]), _num),
    st.tuples(st.just("l4proto"), st.sampled_from(["tcp", "udp", "sctp", "gre"])),
    st.tuples(st.just("numgen"), _num, _num),
    st.tuples(st.just("fib"), st.sampled_from(["saddr", "daddr", "iif"])),
    st.tuples(st.just("update"), _fam, st.sampled_from(["affinity-x"])),
    st.tuples(st.just("dnat"), _fam, st.sampled_from(["10.1.2.3:80", "[fd00::1]:8080", "10.1.2.3:70000", "fd00::1:80", ":80"])),
    st.tuples(st.just("dnat-map"), _fam, _num, _num, st.sampled_from(["endpoints-tcp-3", "endpoints-udp-511"])),
    st.tuples(st.sampled_from(["jump", "goto"]), _chain),
    st.tuples(st.sampled_from(["drop", "accept", "return"])),
)


def _encoded(module: object, family: str, rule: tuple[tuple[str, ...], ...]) -> tuple[bytes | None, bytes | None]:
    m: object = module
    try:
        structured: bytes | None = m.encode_rule(rule, family)  # type: ignore[attr-defined]
    except m.Untranslatable:  # type: ignore[attr-defined]
        structured = None
    try:
        parsed: bytes | None = m.rule_expressions(m.rule_text(rule), family)  # type: ignore[attr-defined]
    except m.Untranslatable:  # type: ignore[attr-defined]
        parsed = None
    return structured, parsed


@settings(max_examples=600, deadline=None)
@given(_fam, st.lists(statement, min_size=1, max_size=5))
def test_rules_as_statements_encode_as_their_text(family: str, stmts: list[tuple[str, ...]]) -> None:
    rule = tuple(stmts)
    compiled, pure = _encoded(COMPILED, family, rule), _encoded(PURE, family, rule)
    assert compiled == pure
    structured, parsed = compiled
    assert structured == parsed, COMPILED.rule_text(rule)
    # A statement is refused on its own too: a rule of good statements always encodes.
    if all(_encoded(COMPILED, family, (s,))[0] is not None for s in rule):
        assert structured is not None


def test_a_full_sync_sends_its_rules_as_statements() -> None:
    """The proxier's full sync gives the encoder no rule text for its per-Service chains."""
    from nft_state import state
    nft = _NoKernel()
    p = NftablesProxier(nft, cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",))
    svcs, eps = state(5, 2, node_ports=True)
    assert p.sync(SyncRequest(svcs, eps)).ok
    assert nft.parts is not None
    assert not any(isinstance(x, str) and x.startswith("add rule") and "/svc-" in x for x in nft.parts)
    # per Service: its service- chain (DNAT; the ClusterIP's masquerade mark is an element of
    # cluster-ip-ports) and external- chain (mark, goto)
    assert sum(len(x[1]) for x in nft.parts if isinstance(x, tuple) and len(x) == 2) == 5 * 3
    runs = [x for x in nft.parts if not isinstance(x, (str, tuple))]  # ElementRuns: the elements
    assert sum(1 for run in runs for e in run.elements if e[0] == "cluster-ip-ports") == 5


_value_text = st.one_of(
    st.just(""), st.lists(key_part, min_size=1, max_size=3).map(" . ".join),
    st.sampled_from(["drop", "accept", "return", "goto service-ABCDEFGH-ns/svc/tcp/p", "jump x", "goto", "jump",
                     "drop x", "goto a b", "goto é", "continue", "goto x\0y"]),
    st.text(alphabet="gotjumpdrx -/é", max_size=12))


@settings(max_examples=1000, deadline=None)
@given(st.lists(key_part, min_size=1, max_size=4).map(" . ".join), _value_text)
def test_the_c_element_encoder_gives_the_python_bytes_or_leaves_them_to_it(key: str, value: str) -> None:
    got = _nftkey.element_attr(key, value)
    batch = PURE.Batch("ip", "kube-proxy")
    try:
        batch.element(PURE.NEWSETELEM, "s", key, value)
        want: bytes | None = batch._elem_list[0]
    except PURE.Untranslatable:
        want = None
    assert got is None or got == want, (key, value)


def test_the_c_element_encoder_takes_the_common_forms() -> None:
    # A full sync's elements: None here would mean the C path is never used.
    for key, value in [("0x1f", "10.1.2.3 . 8080"), ("10.1.2.3 . 10.1.2.3", ""), ("10.96.0.1", ""),
                       ("10.96.0.1 . tcp . 80", "goto service-ABCDEFGH-ns/svc/tcp/p"), ("tcp . 30000", "drop")]:
        assert _nftkey.element_attr(key, value) is not None, (key, value)
    assert COMPILED._c_element is not None and PURE._c_element is None


@settings(max_examples=600, deadline=None)
@given(_fam, statement | st.tuples(st.sampled_from(["goto", "jump"]), st.text(min_size=1, max_size=70)))
def test_statements_from_templates_are_the_generic_bytes(family: str, stmt: tuple[str, ...]) -> None:
    """The encoder's templates (a Service's own address, chains, endpoint map block cut into
    bytes made once) give _encode_stmt's bytes, or leave the statement to it; in both twins."""
    for m in (COMPILED, PURE):
        try:
            want: bytes | None = m._encode_stmt(stmt, family)
        except m.Untranslatable:
            want = None
        try:
            got = m._fast_stmt(stmt, family)
        except m.Untranslatable:
            assert want is None
            continue
        assert got is None or got == want, stmt


def test_the_templates_take_the_services_own_statements() -> None:
    # None here would mean every rule is nested anew (the templates unused).
    for family, stmt in [("ip", ("match", "ip", "daddr", "10.96.0.1")), ("ip6", ("match", "ip6", "daddr", "fd00::1")),
                         ("ip", ("goto", "service-ABCDEFGH-ns/svc/tcp/p")), ("ip", ("jump", "mark-for-masquerade")),
                         ("ip", ("dnat-map", "ip", "10", "4096", "endpoints-tcp-7")),
                         ("ip6", ("dnat-map", "ip6", "1", "0", "endpoints-udp-511"))]:
        assert COMPILED._fast_stmt(stmt, family) is not None, stmt


def test_the_cyclic_gc_is_paused_for_a_full_sync_only() -> None:
    import gc

    seen: list[bool] = []

    class Watching(_NoKernel):
        def apply(self, transaction: str | Iterable[str]) -> None:
            seen.append(gc.isenabled())
            super().apply(transaction)

    from nft_state import endpoints, name, state
    p = NftablesProxier(Watching(), cluster_cidr="10.0.0.0/8", node_ips=("192.168.77.1",))
    svcs, eps = state(3, 2)
    assert gc.isenabled()
    assert p.sync(SyncRequest(svcs, eps)).ok
    eps[name(1)] = endpoints(1, 1, first=5)
    assert p.sync(SyncRequest(svcs, eps, changed=frozenset({name(1)}), full=False)).ok
    assert seen == [False, True] and gc.isenabled()

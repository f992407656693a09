"""Fuzzing: the parser raises nothing but WireError, the handler (both twins) never raises and
answers only with its query's ID, and a live server fed thousands of mutated packets over UDP and
TCP keeps answering correctly. Example counts are bounded to fit the test-time budget."""
from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import dns.message
import dns.rcode
import pytest
from dns_helpers import ZONE, KdnsProcess, endpoint_slice, service, start_kdns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kdns import _purewire, wire
from kdns.resolver import Forward, Resolver
from test_dns_wire_twins import _index, corpus

TWINS: list[ModuleType] = [_purewire]
try:
    from kdns import _wire

    TWINS.insert(0, _wire)
except ImportError:
    pass

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(params=[m.__name__.rsplit(".", 1)[1] for m in TWINS])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Resolver:
    mod = next(m for m in TWINS if m.__name__.endswith(request.param))
    monkeypatch.setattr(wire, "impl", mod)
    idx = _index()
    table = mod.Table()
    idx.table = table
    idx.mark_synced()  # publishes into the twin's table
    return Resolver(idx, [("127.0.0.1", 9)], mod.Stats())


def _names() -> st.SearchStrategy[bytes]:
    label = st.one_of(st.sampled_from([b"web", b"default", b"svc", b"cluster", b"local", b"pod", b"_tcp", b"WEB"]),
                      st.binary(min_size=0, max_size=70))
    return st.lists(label, max_size=8).map(lambda ls: b"".join(bytes([len(x) & 0xFF]) + x for x in ls) + b"\x00")


near_valid = st.builds(
    lambda mid, flags, counts, name, tail: struct.pack("!HH", mid, flags) + counts + name + tail,
    st.integers(0, 65535), st.integers(0, 65535),
    st.one_of(st.just(b"\x00\x01\x00\x00\x00\x00\x00\x00"), st.just(b"\x00\x01\x00\x00\x00\x00\x00\x01"),
              st.binary(min_size=8, max_size=8)),
    _names(), st.binary(max_size=40))


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=600))
def test_dns_parser_only_raises_wire_error(data: bytes) -> None:
    try:
        wire.parse_message(data)
    except wire.WireError:
        pass


def _check(resolver: Resolver, data: bytes) -> None:
    for tcp in (False, True):
        out = resolver.local(data, tcp)
        assert resolver.internal_errors == 0, "the handler raised (see the log)"
        assert out is None or isinstance(out, (bytes, Forward))
        if isinstance(out, bytes):
            assert out[:2] == data[:2] and out[2] & 0x80  # our query's ID, and a response
            assert len(out) <= (65535 if tcp else 4096)
            dns.message.from_wire(out)  # always well-formed


@pytest.mark.timeout(120)
@FUZZ
@given(st.one_of(st.binary(max_size=600), near_valid))
def test_dns_handler_never_raises(resolver: Resolver, data: bytes) -> None:
    _check(resolver, data)


@pytest.mark.parametrize("qname", [
    b"\x03a.b\x03web\x07default\x03svc\x07cluster\x05local\x00",  # a dot inside a label
    b"\x01.\x03web\x00",  # a label that is only a dot (its text was once "..": an empty label)
    b"\x02\xa0\\\x02\xe0\x1c\x03web\x00",  # non-ASCII bytes and a backslash
])
def test_odd_labels_get_an_answer_that_echoes_the_question_bytes(resolver: Resolver, qname: bytes) -> None:
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    _check(resolver, query)
    out = resolver.local(query, False)
    if isinstance(out, bytes):  # answered here (NXDOMAIN in the zone): the question comes back as sent
        assert out[12:12 + len(qname) + 4] == query[12:]
    else:  # forwarded: the upstream gets the same name
        assert isinstance(out, Forward)
    name, _ = wire.read_name(query, 12)
    assert wire.name_to_wire(name) == qname


@pytest.mark.timeout(60)
def test_dns_handler_on_mutated_real_packets(resolver: Resolver) -> None:
    for packet in corpus(n_mutations=1500, seed=11):
        _check(resolver, packet)


@pytest.fixture(scope="module")
def live() -> Iterator[KdnsProcess]:
    p = start_kdns([service("web", ip="10.96.0.10", ports=[("http", 80, "TCP")]),
                    service("hl", headless=True, ports=[("http", 80, "TCP")]),
                    endpoint_slice("hl-a", "hl", [(f"10.3.0.{i}", None, True) for i in range(1, 30)],
                                   ports=[("http", 80, "TCP")])],
                   ["--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"])
    yield p
    p.stop()


@pytest.mark.timeout(90)
def test_dns_live_server_survives_mutations(live: KdnsProcess) -> None:
    packets = corpus(n_mutations=2500, seed=5)
    rnd = random.Random(5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        for i, p in enumerate(packets):
            try:
                s.sendto(p, ("127.0.0.1", live.port))
            except BlockingIOError:
                time.sleep(0.01)
            if i % 100 == 0:
                time.sleep(0.005)  # let the server drain; this is about robustness, not load
                for _ in range(200):  # discard replies so our receive buffer never blocks it
                    try:
                        s.recvfrom(65535)
                    except BlockingIOError:
                        break
    # TCP: a few connections carrying mutated messages (length prefixes kept honest or not)
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", live.port), timeout=2) as t:
            t.settimeout(0.5)
            batch = b""
            for p in rnd.sample(packets, 5):
                n = len(p) if rnd.random() < 0.8 else rnd.randrange(0, 70000) & 0xFFFF
                batch += struct.pack("!H", n) + p
            try:
                t.sendall(batch)
                t.recv(65535)
            except OSError:
                pass
    assert live.alive()
    m = live.query(f"web.default.svc.{ZONE}", "A")
    assert m.rcode() == dns.rcode.NOERROR and m.answer[0][0].to_text() == "10.96.0.10"
    assert len(live.query(f"hl.default.svc.{ZONE}", "A", tcp=True).answer[0]) == 29
    assert live.http("/health")[0] == 200
    text: Any = live.http("/metrics")[1]
    assert "kdns_dns_responses_total" in text
    assert "kdns_internal_errors_total 0.0" in text

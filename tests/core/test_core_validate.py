"""kproxy.kube.validate: the parsers every kernel-bound field goes through (issue 13)."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.kube import validate


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.text(alphabet="0123456789.", max_size=16), st.ip_addresses().map(str),
                 st.text(alphabet="0123456789abcdef:.%", max_size=40), st.text(max_size=20)))
def test_ip_accepts_exactly_the_canonical_text_of_an_address(text: str) -> None:
    # The IPv4 fast path (inet_pton) and the IPv6 path agree with ipaddress: valid text comes
    # back canonical, anything else is refused.
    try:
        addr = ipaddress.ip_address(text)
        canonical = str(addr)
        ok = not (isinstance(addr, ipaddress.IPv6Address) and (addr.scope_id or addr.ipv4_mapped))
    except ValueError:
        ok, canonical = False, ""
    try:
        got = validate.ip(text, "f")
    except validate.InvalidField:
        assert not ok or (":" not in text and canonical != text), text
    else:
        assert ok and got == canonical, text


@pytest.mark.parametrize("value", ["198.51.100.7\n-A INPUT -j ACCEPT", "1.2.3.4 ", "01.2.3.4", "::ffff:1.2.3.4",
                                   "fe80::1%eth0", "", "1.2.3.4/32", 5, None])
def test_ip_refuses(value: object) -> None:
    with pytest.raises(validate.InvalidField) as exc:
        validate.ip(value, "status.loadBalancer.ingress.ip")
    assert exc.value.reason == "ip" and "\n" not in str(exc.value)


def test_ports_protocols_names_cidrs() -> None:
    assert validate.port(65535, "p") == 65535
    for bad in (0, 65536, 70000, -1, True, "80"):
        with pytest.raises(validate.InvalidField):
            validate.port(bad, "p")
    assert validate.optional_port(0, "p") == 0
    assert validate.protocol(None, "p") == "TCP" and validate.protocol("SCTP", "p") == "SCTP"
    with pytest.raises(validate.InvalidField):
        validate.protocol("tcp", "p")
    assert validate.port_name("", "n") == "" and validate.port_name("http-2", "n") == "http-2"
    for bad in ('a" -j ACCEPT', "Http", "-x", "x" * 64, "a_b"):
        with pytest.raises(validate.InvalidField):
            validate.port_name(bad, "n")
    assert validate.dns1035_label("web", "n") == "web"
    with pytest.raises(validate.InvalidField):
        validate.dns1035_label("1web", "n")
    assert validate.cidr(" 203.0.113.7/24 ", "c") == "203.0.113.0/24"
    for bad in ("0.0.0.0/0\n-A INPUT -j ACCEPT", "1.2.3.4", "1.2.3.4/33", "x/8"):
        with pytest.raises(validate.InvalidField):
            validate.cidr(bad, "c")
    assert validate.affinity_timeout(86400, "t") == 86400
    with pytest.raises(validate.InvalidField):
        validate.affinity_timeout(86401, "t")

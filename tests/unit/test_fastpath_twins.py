from __future__ import annotations

from types import ModuleType

import pytest

from kproxy import _fastpath, _purepath


def test_compiled_module_is_really_compiled() -> None:
    # A .py file sitting where the extension should be would make every twin test meaningless.
    assert _fastpath.__file__ is not None and _fastpath.__file__.endswith(".so")


@pytest.mark.parametrize(
    "name,proto",
    [("default/flask:http", "tcp"), ("kube-system/kube-dns:dns", "udp"), ("ns/svc:", "sctp"), ("é/ü:p", "tcp")],
)
def test_port_proto_hash_twins_agree(kproxy_path: ModuleType, name: str, proto: str) -> None:
    got = kproxy_path.port_proto_hash(name, proto)
    assert got == _purepath.port_proto_hash(name, proto)
    assert len(got) == 16 and got.isalnum() and got.upper() == got


def test_port_proto_hash_known_value() -> None:
    # Upstream's chain for "ns1/svc1:p80" tcp is KUBE-SVC-XPGD46QRK7WJZT7O (pkg/proxy/iptables tests).
    assert _purepath.port_proto_hash("ns1/svc1:p80", "tcp") == "XPGD46QRK7WJZT7O"

"""The nftables benches read each proxy's syncs from its log (bench/bench_iptables_latency.py,
bench/bench_nftables_latency.py); these are the parsers, on log lines of the shapes kproxy and the
Go kube-proxy 1.30.3 print. No benchmark is run here."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCH = str(Path(__file__).resolve().parents[2] / "bench")


@pytest.fixture(scope="module", autouse=True)
def bench_on_path() -> Iterator[None]:
    sys.path.insert(0, BENCH)  # as pytest has it when it runs bench/
    try:
        yield
    finally:
        sys.path.remove(BENCH)


def test_go_durations() -> None:
    from bench_iptables_latency import go_duration

    assert go_duration("2.65026614s") == pytest.approx(2.65026614)
    assert go_duration("759.757008ms") == pytest.approx(0.759757008)
    assert go_duration("1m2.5s") == pytest.approx(62.5)
    assert go_duration("950µs") == pytest.approx(0.00095)
    with pytest.raises(AssertionError):
        go_duration("2.5 s")


def test_kproxy_syncs() -> None:
    from bench_iptables_latency import kproxy_syncs

    log = ("2026-12-06 09:00:00,000 level=DEBUG logger=kproxy.server sync full=True changed=0 services=1001 "
           "endpoints=1001 ok=True elapsed=1.6635s\n"
           "... sync full=False changed=1 services=1001 endpoints=1001 ok=False elapsed=0.0100s error='x'\n"
           "... sync full=False changed=1 services=1001 endpoints=1001 ok=True elapsed=0.1462s\n")
    assert kproxy_syncs(log) == [(True, 1.6635, 1001), (False, 0.1462, 1001)]  # a failed sync is not a sync


def test_go_syncs_leave_out_the_ipv6_proxier() -> None:
    from bench_nftables_latency import go_syncs

    # As logged by the Go kube-proxy 1.30.3 (nftables mode, dual-stack: an empty IPv6 proxier).
    log = """I1206 09:02:30.822718     527 proxier.go:1604] "Reloading service nftables data" numServices=1001 numEndpoints=10001
I1206 09:02:33.146333     527 proxier.go:989] "SyncProxyRules complete" elapsed="2.65026614s"
I1206 09:02:33.626527     527 proxier.go:1604] "Reloading service nftables data" numServices=0 numEndpoints=0
I1206 09:02:33.906212     527 proxier.go:989] "SyncProxyRules complete" elapsed="759.757008ms"
I1206 09:02:37.602638     527 proxier.go:1604] "Reloading service nftables data" numServices=1001 numEndpoints=10002
I1206 09:02:37.610000     527 proxier.go:1604] "Reloading service nftables data" numServices=0 numEndpoints=0
I1206 09:02:37.640000     527 proxier.go:989] "SyncProxyRules complete" elapsed="40ms"
I1206 09:02:39.878385     527 proxier.go:989] "SyncProxyRules complete" elapsed="3.635130688s"
I1206 09:03:41.180093     527 proxier.go:1604] "Reloading service nftables data" numServices=1001 numEndpoints=10003
"""  # the last sync has not ended yet
    assert go_syncs(log) == [(True, 2.65026614, 10001), (True, 3.635130688, 10002)]

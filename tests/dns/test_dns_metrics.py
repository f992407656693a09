"""Issue 17 (DNS): /metrics carries CoreDNS's metric names and labels, scraped after real queries
over UDP and TCP, cluster names and forwarded ones (a fake upstream on loopback), cache hits of
both kinds; the exposition is parsed with prometheus_client's own parser."""
from __future__ import annotations

from typing import Any

import dns.rcode
import pytest
from dns_helpers import ZONE, service
from prometheus_client.parser import text_string_to_metric_families


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


@pytest.mark.timeout(60)
def test_coredns_metric_names_after_real_queries(kdns_factory: Any, fake_upstream: Any) -> None:
    up = fake_upstream({("outside.example", "A"): (60, ["192.0.2.1"])})
    p = kdns_factory([service("web", ip="10.96.0.10", ports=[("http", 80, "TCP")])],
                     ["--upstream", f"127.0.0.1:{up.port}"])
    for _ in range(3):
        assert p.query(f"web.default.svc.{ZONE}", "A").answer
    assert p.query(f"nope.default.svc.{ZONE}", "A").rcode() == dns.rcode.NXDOMAIN
    assert p.query(f"_http._tcp.web.default.svc.{ZONE}", "SRV", tcp=True).answer
    for _ in range(2):  # the second of each pair is a cache hit: success, then denial
        assert p.query("outside.example", "A").answer[0][0].to_text() == "192.0.2.1"
        assert p.query("missing.example", "A").rcode() == dns.rcode.NXDOMAIN
    status, text = p.http("/metrics")
    assert status == 200
    m = _samples(text)
    base = {"server": f"dns://127.0.0.1:{p.port}", "zone": ".", "view": ""}

    def v(name: str, **labels: str) -> float:
        return m.get((name, frozenset(labels.items())), -1.0)

    assert v("coredns_dns_requests_total", **base, proto="udp", family="1", type="A") == 3 + 1 + 4
    assert v("coredns_dns_requests_total", **base, proto="tcp", family="1", type="SRV") == 1
    assert v("coredns_dns_responses_total", **base, rcode="NOERROR", plugin="") == 3 + 1 + 2
    assert v("coredns_dns_responses_total", **base, rcode="NXDOMAIN", plugin="") == 1 + 2
    assert v("coredns_dns_request_duration_seconds_count", **base) == 9
    assert v("coredns_dns_request_duration_seconds_bucket", **base, le="+Inf") == 9
    cz = {"server": base["server"], "view": "", "zones": "."}
    assert v("coredns_cache_hits_total", **cz, type="success") == 1
    assert v("coredns_cache_hits_total", **cz, type="denial") == 1
    assert v("coredns_cache_misses_total", **cz) == 2
    assert v("coredns_cache_entries", **cz, type="success") == 1
    assert v("coredns_cache_entries", **cz, type="denial") == 1
    to = f"127.0.0.1:{up.port}"
    assert v("coredns_forward_requests_total", to=to) == 2 == up.count("outside.example") + up.count("missing.example")
    assert v("coredns_forward_responses_total", to=to, rcode="NOERROR") == 1
    assert v("coredns_forward_responses_total", to=to, rcode="NXDOMAIN") == 1
    assert v("coredns_forward_request_duration_seconds_count", to=to) == 2
    assert 0 < v("coredns_forward_request_duration_seconds_sum", to=to) < 5
    # the project's own names stay (dashboards made for them keep working)
    assert m[("kdns_dns_requests_total", frozenset({("type", "A")}))] == 8

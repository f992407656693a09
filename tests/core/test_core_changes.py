"""Change trackers: pending per name, cancel-out, slice merging, stale UDP conntrack, checkout."""
from __future__ import annotations

from kproxy.changes import (
    EndpointsChangeTracker,
    ProxyState,
    ServiceChangeTracker,
    merge_slices,
    parse_trigger_time,
)
from kproxy.model import Endpoint, ServicePort, ServicePortName

WEB = ServicePortName("ns", "web", "http", "TCP")
DNS = ServicePortName("ns", "dns", "", "UDP")


def sp(spn: ServicePortName, port: int = 80, ip: str = "10.0.0.1") -> ServicePort:
    return ServicePort(name=spn, type="ClusterIP", cluster_ips=(ip,), port=port, protocol=spn.protocol)


def ep(ip: str, port: int = 8080, ready: bool = True) -> Endpoint:
    return Endpoint(ip, port, ready=ready, serving=ready)


def test_service_change_that_returns_to_applied_cancels_out() -> None:
    t = ServiceChangeTracker()
    assert t.update("ns/web", {WEB: sp(WEB)})
    assert t.checkout() == {"ns/web": ({}, {WEB: sp(WEB)})}
    assert t.update("ns/web", {WEB: sp(WEB, 81)})
    assert not t.update("ns/web", {WEB: sp(WEB)})  # back to what was applied
    assert t.pending() == 0 and t.checkout() == {}
    # previous is the applied state, current the latest of several updates.
    t.update("ns/web", {WEB: sp(WEB, 81)})
    t.update("ns/web", {WEB: sp(WEB, 82)})
    assert t.checkout() == {"ns/web": ({WEB: sp(WEB)}, {WEB: sp(WEB, 82)})}


def test_endpoint_slices_merge_per_service_and_dedupe() -> None:
    merged = merge_slices({
        "web-b": {WEB: (ep("10.1.0.3"), ep("10.1.0.2", ready=False))},
        "web-a": {WEB: (ep("10.1.0.2"),)},
    })
    assert merged == {WEB: (ep("10.1.0.2"), ep("10.1.0.3"))}
    assert merge_slices({"x": {WEB: ()}}) == {}


def test_endpoints_tracker_cancel_out_and_trigger_times() -> None:
    t = EndpointsChangeTracker()
    assert t.update("ns/web", "web-a", {WEB: (ep("10.1.0.2"),)}, trigger_time=100.0)
    changes, triggers = t.checkout()
    assert changes == {"ns/web": ({}, {WEB: (ep("10.1.0.2"),)})} and triggers == {"ns/web": [100.0]}
    assert t.update("ns/web", "web-a", None, trigger_time=101.0)
    assert not t.update("ns/web", "web-a", {WEB: (ep("10.1.0.2"),)}, trigger_time=102.0)
    assert t.pending() == 0 and t.checkout() == ({}, {})
    # Moving an endpoint from one slice to another changes no merged endpoint: not reported.
    t.update("ns/web", "web-a", None)
    t.update("ns/web", "web-b", {WEB: (ep("10.1.0.2"),)})
    assert t.checkout() == ({}, {})


def test_checkout_full_state_changed_set_and_stale_udp() -> None:
    st = ProxyState()
    st.services_tracker.update("ns/web", {WEB: sp(WEB)})
    st.services_tracker.update("ns/dns", {DNS: sp(DNS, 53, "10.0.0.53")})
    st.endpoints_tracker.update("ns/dns", "dns-1", {DNS: (ep("10.1.0.7", 53), ep("10.1.0.8", 53))})
    first = st.checkout(full=True).request
    assert first.full and first.changed == {WEB, DNS}
    assert first.services == {WEB: sp(WEB), DNS: sp(DNS, 53, "10.0.0.53")}
    assert first.endpoints == {DNS: (ep("10.1.0.7", 53), ep("10.1.0.8", 53))}
    assert first.stale_services == [DNS]  # first ready endpoint of a UDP port
    assert first.stale_endpoints == []

    # One UDP backend goes away, one turns unready: both leave pinned conntrack flows.
    st.endpoints_tracker.update("ns/dns", "dns-1", {DNS: (ep("10.1.0.8", 53, ready=False),)})
    st.endpoints_tracker.update("ns/web", "web-1", {WEB: (ep("10.1.0.2"),)})
    c = st.checkout(full=False)
    req = c.request
    assert not req.full and req.changed == {WEB, DNS} and c.endpoint_changes == 2 and c.service_changes == 0
    assert sorted(e.ip for _, e in req.stale_endpoints) == ["10.1.0.7", "10.1.0.8"]
    assert req.stale_services == []  # TCP never needs it
    assert req.endpoints[WEB] == (ep("10.1.0.2"),)

    # Deleting a service removes its ports from the full map; the request is a copy.
    st.services_tracker.update("ns/web", {})
    req3 = st.checkout(full=False).request
    assert WEB not in req3.services and req3.changed == {WEB} and WEB in req.services

    # A failed sync hands its stale entries to the next request.
    st.requeue_stale(req)
    assert len(st.checkout(full=True).request.stale_endpoints) == 2


def test_parse_trigger_time() -> None:
    assert parse_trigger_time("1970-01-01T00:01:40Z") == 100.0
    assert parse_trigger_time("") is None and parse_trigger_time("yesterday") is None

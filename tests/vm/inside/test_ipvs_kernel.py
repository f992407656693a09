"""IPVS mode against the kernel: upstream's known pains (1 s delay on connection reuse, drops
while real servers go away), restart without disturbance, batching, options, pyroute2 pitfalls,
and cleanup. Runs inside the VM."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from ipvs_helpers import (
    CLIENT_IP,
    State,
    Topology,
    endpoints,
    make_proxier,
    service,
    sh,
)
from pyroute2 import IPVS as PyIPVS
from pyroute2 import IPVSDest, IPVSService

from kproxy.backends import ipvs as nl
from kproxy.proxiers.base import SyncRequest
from kproxy.proxiers.ipvs import IPVSProxier

B0, B1, B2 = "10.244.0.10", "10.244.0.11", "10.244.0.12"


@pytest.mark.timeout(90)
def test_ipvs_connection_reuse_after_endpoint_change_has_no_1s_delay(topo: Topology, state: State) -> None:
    # Upstream's pain (kubernetes#81775): with conntrack=1 and conn_reuse_mode=1, a SYN that
    # reuses a client port whose old IPVS entry is in TIME_WAIT got dropped, costing a 1 s
    # retransmit. Reuse the same client port right after the endpoint set changes.
    for b in topo.backends:
        b.close_after_greeting = True
    try:
        name = state.set(service("reuse", "10.96.1.1"), endpoints(B0))
        state.sync()
        port = 40123
        worst = 0.0
        for i, ep in enumerate([B1, B2, B0, B1]):
            t0 = time.monotonic()
            with topo.connect("10.96.1.1", 80, timeout=5, src_port=port) as s, s.makefile() as reader:
                assert reader.readline()
                # The backend closes first: were the client first, its own TIME_WAIT would hold
                # the port (connect: EADDRNOTAVAIL); the reuse in question is IPVS's entry's.
                assert reader.read() == ""
            worst = max(worst, time.monotonic() - t0)
            state.set(service("reuse", "10.96.1.1"), endpoints(ep))
            state.sync({name})
        assert worst < 0.5, f"a reused client port waited {worst:.2f}s"
    finally:
        for b in topo.backends:
            b.close_after_greeting = False


@pytest.mark.timeout(120)
def test_ipvs_no_failed_connections_while_real_servers_are_removed(topo: Topology, state: State) -> None:
    # Upstream's pain: real servers removed with traffic flowing must not cost connections to
    # the remaining ones (no flush-and-recreate of the virtual server, ever).
    name = state.set(service("churn", "10.96.1.2"), endpoints(B0, B1, B2))
    state.sync()
    failures: list[str] = []
    done = threading.Event()
    count = 0

    def load() -> None:
        nonlocal count
        deadline = time.monotonic() + 60
        while not done.is_set() and time.monotonic() < deadline and count < 2000:
            try:
                topo.greet("10.96.1.2", 80, timeout=2)
            except OSError as e:
                failures.append(repr(e))
            count += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        for eps in ((B0, B1), (B1,), (B1, B2), (B2,)):
            time.sleep(0.4)
            state.set(service("churn", "10.96.1.2"), endpoints(*eps))
            state.sync({name})
        time.sleep(0.4)
    finally:
        done.set()
        t.join(70)
    assert count >= 10 and failures == []


@pytest.mark.timeout(90)
def test_ipvs_restart_converges_without_disturbing_live_services(topo: Topology, state: State, proxier: IPVSProxier) -> None:
    state.set(service("live", "10.96.1.3", session_affinity_timeout=300), endpoints(B0, B1))
    state.sync()
    conn = topo.connect("10.96.1.3", 80)
    f = conn.makefile("rwb", buffering=0)
    first = f.readline().split()[0]
    before = sh("ipvsadm", "-Ln")  # ActiveConn per real server: a recreated server shows 0
    assert "10.96.1.3:80" in before and " 1          0" in before
    # A second kproxy (a restart) with the same state: a full sync that must change nothing.
    again = make_proxier(tcpfin_timeout=2)
    try:
        result = again.sync(SyncRequest(dict(state.services), dict(state.endpoints)))
        assert result.ok, result.error
        assert again.last_messages == 0
        assert sh("ipvsadm", "-Ln") == before  # nothing recreated: connection counts intact
        f.write(b"ping\n")
        assert f.readline() == first + b":ping\n"
    finally:
        conn.close()
        again.close()
    # A restart that finds stale state (a foreign real server, a service nobody wants) repairs it.
    with nl.IPVS() as ipvs_sock:
        vs = nl.VirtualServer("10.96.1.3", 80, "TCP", "rr", 1, 300)
        stale = nl.VirtualServer("10.96.1.99", 80, "TCP")
        assert ipvs_sock.apply([ipvs_sock.add_dest(vs, nl.RealServer("10.244.0.77", 8080)),
                                ipvs_sock.add_service(stale)]) == []
    assert "10.244.0.77" in sh("ipvsadm", "-Ln")
    restarted = make_proxier(tcpfin_timeout=2)
    try:
        assert restarted.sync(SyncRequest(dict(state.services), dict(state.endpoints))).ok
    finally:
        restarted.close()
    table = sh("ipvsadm", "-Ln")
    assert "10.244.0.77" not in table and "10.96.1.99" not in table and "10.96.1.3:80" in table


@pytest.mark.timeout(90)
def test_ipvs_full_sync_is_batched(state: State, proxier: IPVSProxier) -> None:
    for i in range(200):
        state.set(service(f"bulk{i}", f"10.97.{i // 250}.{i % 250 + 1}"),
                  endpoints(*(f"10.245.{i % 200}.{j + 1}" for j in range(10))))
    sends = proxier.ipvs.sends
    state.sync()
    assert proxier.last_messages == 200 + 2000
    assert proxier.ipvs.sends - sends <= 220  # the dumps are per service; the 2,200 writes are ~20 sends
    table = sh("ipvsadm", "-Ln")
    assert table.count("Masq") == 2000 and table.count("TCP  10.97.") == 200


@pytest.mark.timeout(60)
def test_ipvs_options_scheduler_timeouts_strict_arp() -> None:
    p = make_proxier(scheduler="sh", tcp_timeout=900, tcpfin_timeout=30, udp_timeout=60, strict_arp=True)
    st = State(p)
    try:
        st.set(service("sched", "10.96.1.4"), endpoints(B0))
        st.sync()
        assert "TCP  10.96.1.4:80 sh" in sh("ipvsadm", "-Ln")
        assert "(tcp tcpfin udp): 900 30 60" in sh("ipvsadm", "-L", "--timeout")
        assert Path("/proc/sys/net/ipv4/conf/all/arp_ignore").read_text().strip() == "1"
        assert Path("/proc/sys/net/ipv4/conf/all/arp_announce").read_text().strip() == "2"
        with pytest.raises(ValueError, match="--ipvs-scheduler"):
            make_proxier(scheduler="fastest")
    finally:
        st.services.clear()
        assert p.sync(SyncRequest({}, {})).ok
        p.close()


@pytest.mark.timeout(60)
def test_ipvs_udp_real_servers_go_at_once(state: State, proxier: IPVSProxier) -> None:
    name = state.set(service("dns", "10.96.1.5", port=53, protocol="UDP"), endpoints(B0, B1, port=53))
    state.sync()
    state.set(service("dns", "10.96.1.5", port=53, protocol="UDP"), endpoints(B1, port=53))
    state.sync({name})
    table = sh("ipvsadm", "-Ln")
    assert "UDP  10.96.1.5:53 rr" in table and "10.244.0.10:53" not in table
    assert proxier.terminating() == []


@pytest.mark.timeout(60)
def test_ipvs_pyroute2_pitfalls(state: State) -> None:
    # 1. IPVSDest defaults to direct routing (3); kproxy writes masquerade (0), read back raw.
    assert IPVSDest(addr="10.244.0.10", port=8080)["fwd_method"] == 3
    state.set(service("pit", "10.96.1.6", session_affinity_timeout=1234), endpoints(B0))
    state.sync()
    with PyIPVS() as ipvs:
        svc_msgs = [m for m in ipvs.service("dump")
                    if m.get("IPVS_CMD_ATTR_SERVICE").get("IPVS_SVC_ATTR_PORT") == 80
                    and m.get("IPVS_CMD_ATTR_SERVICE").get("IPVS_SVC_ATTR_ADDR") == "10.96.1.6"]
        assert len(svc_msgs) == 1
        raw = svc_msgs[0].get("IPVS_CMD_ATTR_SERVICE")
        # 2. The raw attributes hold the truth; from_message() reports defaults for these.
        assert raw.get("IPVS_SVC_ATTR_TIMEOUT") == 1234
        assert raw.get("IPVS_SVC_ATTR_FLAGS")["flags"] & nl.IP_VS_SVC_F_PERSISTENT
        svc = IPVSService(addr="10.96.1.6", port=80, protocol=socket.IPPROTO_TCP)
        dests = list(ipvs.dest("dump", service=svc))
        assert [d.get("IPVS_CMD_ATTR_DEST").get("IPVS_DEST_ATTR_FWD_METHOD") for d in dests] == [0]
        # 3. "set" changes a service in place (pyroute2's "update" would delete it).
        ipvs.service("set", service=IPVSService(addr="10.96.1.6", port=80, protocol=socket.IPPROTO_TCP,
                                                sched_name="lc", timeout=1234,
                                                flags={"flags": 1, "mask": 0xFFFF}))
    table = sh("ipvsadm", "-Ln")
    assert "TCP  10.96.1.6:80 lc persistent 1234" in table and "10.244.0.10:8080" in table
    # kproxy's own reader agrees with ipvsadm, and the next sync puts its scheduler back.
    with nl.IPVS() as mine:
        vs = next(v for v in mine.services() if v.address == "10.96.1.6")
        assert (vs.scheduler, vs.timeout, vs.flags) == ("lc", 1234, nl.IP_VS_SVC_F_PERSISTENT)
        assert [m for _, m in mine.dests_with_method(vs)] == [nl.FWD_MASQ]
    state.sync()
    assert "TCP  10.96.1.6:80 rr persistent 1234" in sh("ipvsadm", "-Ln")


@pytest.mark.timeout(60)
def test_ipvs_zz_cleanup_removes_everything(topo: Topology) -> None:
    p = make_proxier()
    st = State(p)
    st.set(service("gone", "10.96.1.7", node_port=30090, type="LoadBalancer",
                   load_balancer_ips=("192.0.2.77",)), endpoints(B0))
    st.sync()
    assert topo.greet("10.96.1.7", 80)[0] == "b0"
    assert p.cleanup()
    p.close()
    assert "10.96.1.7" not in sh("ipvsadm", "-Ln")
    assert "kube-ipvs0" not in sh("ip", "link")
    saved = sh("iptables-legacy-save")
    assert "KUBE-" not in saved, saved
    assert "KUBE-" not in sh("ipset", "list", "-n")
    assert CLIENT_IP  # the client netns is untouched by cleanup
    assert sh("ip", "netns", "list").count(topo.suffix) >= 2

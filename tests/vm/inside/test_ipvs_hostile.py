"""The hostile store of tests/iptables/test_iptables_hostile.py (tests/helpers/hostile_store.py: the
same objects, the same counters and log lines, the same change while the API server is down) served
to the real `kproxy --proxy-mode ipvs` inside the VM, in a node namespace this test creates (IPVS,
ipsets, iptables and kube-ipvs0 are per namespace: nothing of the suite's root-namespace node is
touched).

What IPVS mode programmed is read from the kernel in that namespace: `ipvsadm -S -n` (one virtual
server per ClusterIP, its real servers the endpoints; NodePorts as virtual servers on the node's
addresses), `ipset save` and `iptables-legacy-save` (checked by tests/iptables/iptables_rulecheck.py
like iptables mode's dump). kproxy must program exactly the 100 valid Services and the two partly-bad
ones (without their bad entry), with their valid endpoints only; no rejected value may show up in
any of the three dumps; and connections from the node reach exactly the valid endpoints
(helpers.hostile_store.assert_traffic).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "iptables")]

from helpers.hostile_store import (
    BAD_SERVICES,
    FIRST,
    PARTIAL,
    SECOND,
    EndpointServer,
    assert_counted_and_logged,
    assert_no_rejected_values,
    assert_traffic,
    assert_watch_resumed,
    bad_cluster_ip,
    bad_endpoint,
    good_endpoints,
    hostile_apiserver,
    hostile_node,
    kproxy_args,
    ns_output,
    restart_with_changes,
    service_addresses,
    wait_programmed,
)
from helpers.kproxy_e2e import start_kproxy, stop_and_clean
from iptables_rulecheck import rule_problems

testing = pytest.importorskip("controlplane_stub.apiserver.testing")

pytestmark = pytest.mark.e2e
MODE_ARGS = ("--proxy-mode", "ipvs", "--iptables-backend", "legacy")
# The node namespace's own addresses (hostile_node): where NodePort virtual servers may listen.
NODE_ADDRESSES = {"192.168.7.2", "10.0.0.5"}
# bad-lb-ingress keeps its NodePort; bad-node-port's (99999) and bad-source-range's (30002) are nowhere.
NODE_PORTS = {30001}

HAIRPIN_COMMENT = '"Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"'

VirtualServers = dict[tuple[str, str], set[str]]  # (protocol, "ip:port") -> {"ip:port" of real servers}


def _ipvs(netns: str) -> tuple[VirtualServers, str]:
    """The namespace's IPVS table from `ipvsadm -S -n` (-A: a virtual server, -a: one of its real
    servers), and the dump itself."""
    dump = ns_output(netns, "ipvsadm", "-S", "-n")
    table: VirtualServers = {}
    for line in dump.splitlines():
        tokens = shlex.split(line)
        if not tokens:
            continue
        opts = {tok: (tokens[k + 1] if k + 1 < len(tokens) else "") for k, tok in enumerate(tokens) if tok.startswith("-")}
        proto = next((p for p in ("-t", "-u", "--sctp-service") if p in opts), "")
        if tokens[0] == "-A":
            table.setdefault((proto, opts[proto]), set())
        elif tokens[0] == "-a":
            table.setdefault((proto, opts[proto]), set()).add(opts["-r"])
    return table, dump


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _cluster_ip_servers(table: VirtualServers) -> dict[str, set[str]]:
    """Service name -> the real servers of the TCP virtual server at its ClusterIP:80 (the Services
    of the store, by their addresses)."""
    by_vip = {vip: name for name, (vip, _valid) in service_addresses().items()}
    out: dict[str, set[str]] = {}
    for (proto, vs), reals in table.items():
        ip, port = _split(vs)
        if proto == "-t" and port == 80 and ip in by_vip:
            out[by_vip[ip]] = reals
    return out


def _wait_for(netns: str, want: frozenset[str], proc: subprocess.Popen[bytes], log: Path) -> VirtualServers:
    def read() -> tuple[set[str], str]:
        table, dump = _ipvs(netns)
        # A Service counts as programmed once its virtual server has its real servers.
        return {name for name, reals in _cluster_ip_servers(table).items() if reals}, dump

    wait_programmed(read, want, proc, log)
    return _ipvs(netns)[0]


def _assert_programmed(table: VirtualServers, dump: str, names: frozenset[str]) -> None:
    """The virtual servers are exactly the ClusterIPs of `names` (each with exactly its valid
    endpoints as real servers), the API server's own `kubernetes` Service, and the NodePorts of
    NODE_PORTS on the node's addresses; nothing else."""
    addresses = service_addresses()
    servers = _cluster_ip_servers(table)
    assert set(servers) == set(names), sorted(set(servers) ^ set(names))
    for name in names:
        vip, valid = addresses[name]
        assert servers[name] == {f"{ip}:8080" for ip in valid}, (name, vip, servers[name])
    known = {("-t", f"{addresses[name][0]}:80") for name in names}
    node_ports = {vs for vs in table if _split(vs[1])[1] in NODE_PORTS and _split(vs[1])[0] not in
                  {v for v, _ in addresses.values()}}
    others = set(table) - known - node_ports
    # What is left is the API server's `kubernetes` Service (one TCP virtual server at :443).
    assert len(others) == 1 and next(iter(others))[0] == "-t" and _split(next(iter(others))[1])[1] == 443, (
        sorted(others), dump[-3000:])
    # bad-lb-ingress's NodePort on each node address (never on the rejected ingress IP), to its endpoint.
    assert node_ports == {("-t", f"{ip}:{port}") for ip in NODE_ADDRESSES for port in NODE_PORTS}, (
        sorted(node_ports), dump[-3000:])
    for vs in node_ports:
        assert table[vs] == {f"{bad_endpoint(list(BAD_SERVICES).index('bad-lb-ingress'))}:8080"}, (vs, table[vs])


def _assert_clean_dumps(netns: str, ipvs_dump: str) -> tuple[str, str]:
    """No rejected value in the IPVS, ipset or iptables dumps; every iptables rule is one kproxy's
    validated records can render. Returns the ipset and iptables dumps."""
    ipsets = ns_output(netns, "ipset", "save")
    rules = ns_output(netns, "iptables-legacy-save")
    assert "KUBE-CLUSTER-IP" in ipsets, ipsets[:2000]
    assert "KUBE-SERVICES" in rules, rules[:2000]
    for dump in (ipvs_dump, ipsets, rules):
        assert_no_rejected_values(dump)
    # IPVS mode's one fixed comment with a comma (upstream's, kproxy/proxiers/ipvs.py) is outside
    # the checker's comment alphabet (written for iptables mode): checked without its comma.
    assert HAIRPIN_COMMENT in rules, rules[:2000]
    checked = rules.replace(HAIRPIN_COMMENT, HAIRPIN_COMMENT.replace(",", ""))
    assert rule_problems(checked) == [], rule_problems(checked)[:5]
    return ipsets, rules


@pytest.fixture
def node() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with hostile_node("kpvmh") as netns:
        yield netns


@pytest.mark.timeout(400)
def test_bad_objects_in_the_store_are_skipped_and_never_reach_ipvs(node: str, tmp_path: Path) -> None:
    log_path = tmp_path / "kproxy.log"
    with hostile_apiserver(node) as (api, data_dir), EndpointServer(node):
        proc = start_kproxy(node, kproxy_args(api, "ipvs", *MODE_ARGS[2:], "--ipvs-min-sync-period", "0s"),
                            log_path)
        try:
            table = _wait_for(node, FIRST, proc, log_path)
            ipvs_dump = ns_output(node, "ipvsadm", "-S", "-n")
            _assert_programmed(table, ipvs_dump, FIRST)
            ipsets, _rules = _assert_clean_dumps(node, ipvs_dump)
            for j, name in enumerate(BAD_SERVICES):  # addresses as the store gives them
                partial = name in PARTIAL
                assert (f"-t {bad_cluster_ip(j)}:80 " in ipvs_dump) == partial, (name, bad_cluster_ip(j))
                assert (f"-r {bad_endpoint(j)}:8080 " in ipvs_dump) == partial, (name, bad_endpoint(j))
                assert (f" {bad_cluster_ip(j)},tcp:80" in ipsets) == partial, (name, bad_cluster_ip(j))
            # The valid slices of svc-0/1/2 still apply beside their bad ones (_assert_programmed: exactly).
            assert all(f"-r {good_endpoints(i)[1]}:8080 " in ipvs_dump for i in range(3))
            # No address of the rejected externalIP / ingress IP is bound for IPVS either.
            bound = ns_output(node, "ip", "-o", "addr", "show", "dev", "kube-ipvs0")
            assert_no_rejected_values(bound)
            for j, name in enumerate(BAD_SERVICES):
                assert (f" {bad_cluster_ip(j)}/32 " in bound) == (name in PARTIAL), (name, bound[:2000])
            assert_traffic(node, FIRST)
            assert_counted_and_logged(node, log_path)

            # Changes while the API server is down arrive through the resumed watch.
            restart_with_changes(api, data_dir)
            table = _wait_for(node, SECOND, proc, log_path)
            ipvs_dump = ns_output(node, "ipvsadm", "-S", "-n")
            _assert_programmed(table, ipvs_dump, SECOND)
            ipsets, _rules = _assert_clean_dumps(node, ipvs_dump)
            assert " 10.96.1.4,tcp:80" not in ipsets  # svc-3, now type-wrong
            assert_traffic(node, SECOND)
            assert_watch_resumed(proc, log_path)
        finally:
            cleaned = stop_and_clean(proc, node, *MODE_ARGS)
    assert cleaned.returncode == 0, cleaned.stderr
    left = ns_output(node, "ipvsadm", "-S", "-n")
    assert not [ln for ln in left.splitlines() if ln.startswith("-A")], left
    assert "KUBE-" not in ns_output(node, "ipset", "list", "-n")
    assert "KUBE-" not in ns_output(node, "iptables-legacy-save")

"""The hostile store of tests/iptables/test_iptables_hostile.py (tests/helpers/hostile_store.py: the
same objects, the same counters and log lines, the same change while the API server is down) served
to the real `kproxy --proxy-mode userspace` in a node namespace this test creates, on both iptables
back ends.

What userspace mode programmed is in two places: its nat rules (KUBE-PORTALS-CONTAINER/-HOST send
each ClusterIP to the Service's relay listener, KUBE-NODEPORT-* its NodePort, read with
iptables-save in the namespace and checked by tests/iptables/iptables_rulecheck.py like iptables
mode's dump), and the relay, which picks the endpoints: connections from the node through the
ClusterIPs must reach exactly the valid endpoints (helpers.hostile_store.assert_traffic), as the
other userspace tests check a relay by its traffic.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
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
    hostile_apiserver,
    hostile_node,
    iptables_save,
    kproxy_args,
    restart_with_changes,
    service_addresses,
    wait_programmed,
)
from helpers.kproxy_e2e import start_kproxy, stop_and_clean

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "iptables"))

from iptables_rulecheck import rule_problems

testing = pytest.importorskip("controlplane_stub.apiserver.testing")

pytestmark = pytest.mark.e2e
PORTALS = ("KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST")
NODEPORTS = ("KUBE-NODEPORT-CONTAINER", "KUBE-NODEPORT-HOST")
FIREWALL = "KUBE-USERSPACE-FIREWALL"


def _skip_reason(backend: str) -> str:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", f"iptables-{backend}-save", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return ""


def _rules(dump: str, chain: str) -> list[dict[str, str]]:
    """The rules of `chain` as {option: value} ("-d", "--comment", "--dport", ...)."""
    out = []
    for line in dump.splitlines():
        if line.startswith(f"-A {chain} "):
            tokens = shlex.split(line)[2:]
            out.append({tok: (tokens[k + 1] if k + 1 < len(tokens) else "") for k, tok in enumerate(tokens)
                        if tok.startswith("-")})
    return out


def _service(rule: dict[str, str]) -> str:
    """The Service name (namespace default) of a rule's "default/NAME:PORT" comment."""
    ns, _, rest = rule.get("--comment", "").partition("/")
    return rest.split(":", 1)[0] if ns == "default" else ""


def _portals(dump: str, chain: str) -> dict[str, set[str]]:
    """Service name -> the destinations `chain` sends to its relay listener."""
    out: dict[str, set[str]] = {}
    for rule in _rules(dump, chain):
        if _service(rule) and "-d" in rule:
            out.setdefault(_service(rule), set()).add(rule["-d"])
    return out


def _wait_for(netns: str, backend: str, want: frozenset[str], proc: subprocess.Popen[bytes], log: Path) -> str:
    def read() -> tuple[set[str], str]:
        dump = iptables_save(netns, backend)
        return set(_portals(dump, PORTALS[0])), dump

    return wait_programmed(read, want, proc, log)


def _assert_programmed(dump: str, names: frozenset[str]) -> None:
    """Both portal chains send each of `names` (and nothing else) at its ClusterIP only, and no
    Service is refused in the firewall chain (each has valid endpoints)."""
    addresses = service_addresses()
    for chain in PORTALS:
        portals = _portals(dump, chain)
        sent = set(portals) - {"kubernetes"}
        assert sent == names, (chain, sorted(sent ^ names))
        for name in names:
            assert portals.get(name) == {f"{addresses[name][0]}/32"}, (chain, name, portals.get(name))
    assert _rules(dump, FIREWALL) == [], _rules(dump, FIREWALL)[:5]


@pytest.fixture
def node(backend: str) -> Iterator[str]:
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)
    with hostile_node("kpush") as netns:
        yield netns


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_bad_objects_in_the_store_are_skipped_and_never_reach_the_relay(backend: str, node: str,
                                                                       tmp_path: Path) -> None:
    log_path = tmp_path / "kproxy.log"
    with hostile_apiserver(node) as (api, data_dir), EndpointServer(node):
        proc = start_kproxy(node, kproxy_args(api, "userspace", "--iptables-backend", backend,
                                              "--iptables-min-sync-period", "0s"), log_path)
        try:
            dump = _wait_for(node, backend, FIRST, proc, log_path)
            assert rule_problems(dump) == [], rule_problems(dump)[:5]
            assert_no_rejected_values(dump)
            _assert_programmed(dump, FIRST)
            for j, name in enumerate(BAD_SERVICES):  # addresses as the store gives them
                assert (f"-d {bad_cluster_ip(j)}/32 " in dump) == (name in PARTIAL), (name, bad_cluster_ip(j))
            # bad-lb-ingress keeps its NodePort; bad-node-port's and bad-source-range's are nowhere.
            for chain in NODEPORTS:
                assert {r.get("--dport"): _service(r) for r in _rules(dump, chain)} == {"30001": "bad-lb-ingress"}
            # The relay: every valid endpoint (svc-0/1/2's valid slices beside their bad ones, the
            # partly-bad Services' own) and nothing else.
            assert_traffic(node, FIRST)
            assert_counted_and_logged(node, log_path)

            # Changes while the API server is down arrive through the resumed watch.
            restart_with_changes(api, data_dir)
            dump = _wait_for(node, backend, SECOND, proc, log_path)
            assert rule_problems(dump) == []
            _assert_programmed(dump, SECOND)
            assert_traffic(node, SECOND)
            assert_watch_resumed(proc, log_path)
        finally:
            cleaned = stop_and_clean(proc, node, "--proxy-mode", "userspace", "--iptables-backend", backend)
    assert cleaned.returncode == 0, cleaned.stderr
    left = iptables_save(node, backend)
    assert not any(chain in left for chain in (*PORTALS, *NODEPORTS, FIREWALL)), left
    assert "10.96.9." not in left

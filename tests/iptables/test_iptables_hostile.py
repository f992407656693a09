"""Hostile objects served by the real API server to the real kproxy process in a network namespace,
in iptables mode on both back ends.

The hostile store, what kproxy must skip, leave out and count, and the change made while the API
server is down are tests/helpers/hostile_store.py's, shared with the same scenario in the other
modes (tests/nftables/, tests/userspace/, tests/vm/inside/test_ipvs_hostile.py). Here, what
iptables mode programmed: the node's firewall dump (iptables-save of every table) must only ever
contain values the validators produce (iptables_rulecheck.py), the partly-bad Services without their
bad entry, and after the restart the changes arrive by the resumed watch and each applies.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.hostile_store import (
    BAD_SERVICES,
    FIRST,
    PARTIAL,
    SECOND,
    assert_counted_and_logged,
    assert_no_rejected_values,
    assert_watch_resumed,
    bad_cluster_ip,
    bad_endpoint,
    hostile_apiserver,
    iptables_save,
    kproxy_args,
    restart_with_changes,
    wait_programmed,
)
from helpers.kproxy_e2e import start_kproxy, stop_and_clean
from iptables_rulecheck import rule_problems

testing = pytest.importorskip("controlplane_stub.apiserver.testing")

pytestmark = pytest.mark.e2e


def _programmed(dump: str) -> set[str]:
    """Service names with a ClusterIP dispatch rule in KUBE-SERVICES."""
    out = set()
    for line in dump.splitlines():
        if line.startswith("-A KUBE-SERVICES") and 'cluster IP"' in line:
            out.add(line.split('--comment "', 1)[1].split(":", 1)[0].split("/", 1)[1])
    return out


def _wait_for(netns: str, backend: str, want: frozenset[str], proc: subprocess.Popen[bytes], log: Path) -> str:
    def read() -> tuple[set[str], str]:
        dump = iptables_save(netns, backend)
        return _programmed(dump), dump

    return wait_programmed(read, want, proc, log)


@pytest.fixture
def served(rules_netns: str) -> Iterator[tuple[Any, str]]:
    with hostile_apiserver(rules_netns) as (api, data_dir):
        yield api, data_dir


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_bad_objects_in_the_store_are_skipped_and_never_reach_the_firewall(
        backend: str, served: tuple[Any, str], rules_netns: str, tmp_path: Path) -> None:
    api, data_dir = served
    log_path = tmp_path / "kproxy.log"
    proc = start_kproxy(rules_netns, kproxy_args(api, "iptables", "--iptables-backend", backend,
                                                 "--iptables-min-sync-period", "0s"), log_path)
    try:
        dump = _wait_for(rules_netns, backend, FIRST, proc, log_path)
        assert rule_problems(dump) == [], rule_problems(dump)[:5]
        assert_no_rejected_values(dump)
        for j, name in enumerate(BAD_SERVICES):  # addresses as the store gives them
            for address in (f"{bad_cluster_ip(j)}/32", f"{bad_endpoint(j)}:8080"):
                assert (address in dump) == (name in PARTIAL), (name, address)
        # The valid slices of svc-0/1/2 still apply beside their bad ones.
        for i in range(3):
            assert f"--to-destination 10.1.{i}.2:8080" in dump
        assert_counted_and_logged(rules_netns, log_path)

        # Changes while the API server is down arrive through the resumed watch.
        restart_with_changes(api, data_dir)
        dump = _wait_for(rules_netns, backend, SECOND, proc, log_path)
        assert rule_problems(dump) == []
        assert_watch_resumed(proc, log_path)
    finally:
        stop_and_clean(proc, rules_netns, "--proxy-mode", "iptables", "--iptables-backend", backend)
    left = iptables_save(rules_netns, backend)
    assert "KUBE-SVC-" not in left and json.dumps(left).count("10.96.9.") == 0

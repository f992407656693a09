"""What the iptables proxier keeps in memory between syncs (no kernel: the restore goes nowhere).

Issue 5's limit is 100 MiB RSS for the whole process at 10,000 Services x 10 endpoints; the
core's own state is ~34 MiB of that, so the proxier's record of what the kernel holds must
stay small: about 1.8 KiB per ServicePort when every chain name was its own str in a tuple plus a
set of all 110,000 names, under 1 KiB now.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence

from iptables_helpers import ep, request, spn, svc

from kproxy.backends.iptables import IPTables, RestoreStream
from kproxy.proxiers.iptables import IptablesProxier


class _Sink(RestoreStream):
    def __init__(self) -> None:  # no process: the input is dropped
        self.bytes = 0

    def write(self, chunk: str | bytes) -> None:
        self.bytes += len(chunk)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _NoKernel(IPTables):
    def open_restore(self) -> RestoreStream:
        return _Sink()

    def save(self, table: str) -> str:
        return ""

    def chain_rules(self, table: str, chain: str) -> list[str]:
        return []

    def chain_exists(self, table: str, chain: str) -> bool:
        # The canary check (every 30 s on partial syncs) must not run iptables on the host: under
        # load this test outlives the interval, and a missing canary would force a full sync.
        return True

    def local_ipv4_addresses(self) -> list[str]:
        return []

    def sysctl(self, key: str, value: str) -> None:
        pass

    def restore(self, data: bytes | Sequence[str]) -> None:
        pass


def test_state_kept_between_syncs_is_under_1_kib_per_service_port() -> None:
    n = 2000
    services = [svc(spn(f"s{i}"), f"172.20.{i // 250}.{i % 250 + 1}") for i in range(n)]
    eps = {s.name: tuple(ep(f"10.{i // 250 + 1}.{i % 250}.{j + 1}") for j in range(10)) for i, s in enumerate(services)}
    px = IptablesProxier(_NoKernel(backend="nft"), cluster_cidr="10.0.0.0/8")
    px.keep_input_bytes = 0
    req = request(services, eps)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert px.sync(req).ok
        px.last_plan = None  # the last restore input, kept for logs and tests, is not state
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept / n < 1024, f"{kept / n:.0f} bytes per ServicePort"
    # Still a working proxier: a partial sync after one endpoint change deletes the replaced chain.
    target = services[7].name
    eps[target] = (*eps[target][:-1], ep("10.250.0.1"))
    px.keep_input_bytes = 1 << 20
    assert px.sync(request(services, eps, changed={target})).ok
    assert px.last_plan is not None and px.last_plan.deleted_chains and len(px.last_plan.deleted_chains) == 1

"""UDP conntrack cleanup after a sync, for the proxiers that DNAT in the kernel (iptables,
nftables): which endpoints the rules stopped sending to, and which UDP Services got their first
endpoint, from what each proxier recorded per ServicePort before and after the sync. What to
delete is kproxy.proxy.udp_conntrack_cleanup's decision."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from kproxy.backends.conntrack import Conntrack
from kproxy.model import IP, Endpoint, Port, ServicePort, ServicePortName
from kproxy.proxiers.base import SyncRequest
from kproxy.proxy import apply_cleanup, udp_conntrack_cleanup


class Programmed(Protocol):
    @property
    def svc(self) -> ServicePort: ...

    @property
    def serving(self) -> frozenset[tuple[IP, Port]]: ...  # UDP: the endpoints DNATed to


def clean_udp_conntrack(conntrack: Conntrack, request: SyncRequest, old: Mapping[ServicePortName, Programmed],
                        new: Mapping[ServicePortName, Programmed]) -> None:
    stale = [(n, e) for n, e in request.stale_endpoints if n.protocol == "UDP"]
    newly = [n for n in request.stale_services if n.protocol == "UDP" and n in new]
    for name, prev in old.items():
        if prev.svc.protocol != "UDP":
            continue
        now = new.get(name)
        now_serving = now.serving if now is not None else frozenset()
        stale.extend((name, Endpoint(ip=ip, port=port)) for ip, port in sorted(prev.serving - now_serving))
    for name, cur in new.items():
        if cur.svc.protocol == "UDP" and cur.serving:
            before = old.get(name)
            if before is None or not before.serving:
                newly.append(name)
    if not stale and not newly:
        conntrack.deletions.clear()
        return
    names = {n for n, _ in stale} | set(newly)
    current = {n: new[n].svc for n in names if n in new}
    previous = {n: old[n].svc for n in names if n in old}
    apply_cleanup(conntrack, udp_conntrack_cleanup(current, stale, newly, previous, conntrack.family))

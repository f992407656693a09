"""Who may query the server and who may have names forwarded (--allow-query, --allow-recursion).

A DNS server bound to a public interface that answers and forwards for anyone is an open
resolver (a reflection amplifier and a cache anyone can probe). The defaults admit what a cluster
DNS serves: loopback, the cluster (pod) and service CIDRs when known, and the networks of the
node's own interfaces; everything else gets REFUSED. The networks are handed to the hot path as
packed (address, mask) pairs (`packed`), which the compiled and pure twins match byte-wise.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_CACHE_MAX = 4096  # sources remembered per Acl; beyond it the cache restarts (a client can't grow it)


class Acl:
    """A set of source networks; `allows` is what the slow path and TCP ask per query."""

    def __init__(self, networks: Iterable[Network]) -> None:
        uniq: dict[Network, None] = {}
        for n in networks:
            uniq.setdefault(n, None)
        self.networks: tuple[Network, ...] = tuple(uniq)
        self._cache: dict[str, bool] = {}

    def replace(self, networks: Iterable[Network]) -> bool:
        """Take a new set of networks (the node's addresses changed); True when it differs."""
        new = Acl(networks).networks
        if set(new) == set(self.networks):
            return False
        self.networks = new
        self._cache = {}
        return True

    def allows(self, host: str) -> bool:
        hit = self._cache.get(host)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a v4 client on a dual-stack socket
        ok = any(addr.version == n.version and addr in n for n in self.networks)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[host] = ok
        return ok

    def packed(self) -> tuple[bytes, bytes]:
        """(v4 rules, v6 rules): 4-byte network + 4-byte mask each, 16 + 16 for IPv6."""
        v4 = b"".join(n.network_address.packed + n.netmask.packed for n in self.networks if n.version == 4)
        v6 = b"".join(n.network_address.packed + n.netmask.packed for n in self.networks if n.version == 6)
        return v4, v6

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks)


def parse_networks(values: Iterable[str], flag: str) -> list[Network]:
    """CIDRs (or bare addresses) from a repeatable, comma-separated flag; ValueError names the flag
    and the bad value in one line."""
    out: list[Network] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{flag} {item!r}: not an IP network (CIDR such as 10.0.0.0/8 or fd00::/64)") from None
    return out


# --------------------------------------------------------------------- the node's networks

_RTM_GETADDR, _RTM_NEWADDR, _NLMSG_DONE, _NLMSG_ERROR = 22, 20, 3, 2
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_NLMSG = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


def node_networks() -> list[Network]:
    """The networks of every address on this host's (namespace's) interfaces, from one netlink
    RTM_GETADDR dump (no iproute2 process, no pyroute2 import: the server's memory is budgeted).
    An address's network is IFA_ADDRESS/prefixlen (the connected route; the peer's network on a
    point-to-point link) plus the local address itself."""
    out: list[Network] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.settimeout(5)
        req = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        s.send(_NLMSG.pack(_NLMSG.size + len(req), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req)
        for _ in range(10_000):  # bounded: a dump ends with NLMSG_DONE long before
            data = s.recv(1 << 16)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
                if length < _NLMSG.size:
                    return out
                if kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    return out
                if kind == _RTM_NEWADDR:
                    out += _addr_networks(data[pos + _NLMSG.size:pos + length])
                pos += (length + 3) & ~3
    return out


def _addr_networks(msg: bytes) -> list[Network]:
    family, prefixlen, _, _, _ = _IFADDRMSG.unpack_from(msg, 0)
    attrs: dict[int, bytes] = {}
    pos = _IFADDRMSG.size
    while pos + _RTATTR.size <= len(msg):
        alen, atype = _RTATTR.unpack_from(msg, pos)
        if alen < _RTATTR.size:
            break
        attrs[atype] = msg[pos + _RTATTR.size:pos + alen]
        pos += (alen + 3) & ~3
    size = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    nets: list[Network] = []
    for key in (_IFA_ADDRESS, _IFA_LOCAL):
        raw = attrs.get(key)
        if size and raw is not None and len(raw) == size:
            addr = ipaddress.ip_address(raw)
            plen = prefixlen if key == _IFA_ADDRESS else addr.max_prefixlen
            nets.append(ipaddress.ip_network(f"{addr}/{plen}", strict=False))
    return nets


def default_networks(cluster: Iterable[Network], services: Iterable[Network]) -> list[Network]:
    return [*LOOPBACK, *cluster, *services, *node_networks()]

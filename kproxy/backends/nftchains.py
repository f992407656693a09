"""How many objects an nf_tables table holds (its use count: chains, sets, objects,
flowtables), and whether a chain exists, each read from the kernel in one nfnetlink message
(NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN), no process. (`iptables-nft -S` cannot tell: it shows the
built-in chains of a table whether or not they exist in the kernel.)

kproxy asks before every large nf_tables restore whether a "-Z" would zero other software's
counters (NFT_ALL_CHAINS_THRESHOLD in kproxy/proxiers/iptables.py). Between its own syncs it
knows how many chains it has in the table, so the count answers. Listing the chains instead was
measured and dropped: a NFT_MSG_GETCHAIN dump re-walks the kernel's chain list for every batch
(quadratic), 7.7-9.4 s for the 110,000 chains of a 10,000-Service table on this loaded machine,
and `nft list chains` took 13.6 s; the count takes milliseconds.
"""

from __future__ import annotations

import errno
import os
import struct

from kproxy.backends.nftnl import NFNL_SUBSYS_NFTABLES, NLM_F_REQUEST, NLMSG_ERROR, netfilter_socket
from kproxy.backends.nftnl import str_attr as _attr

NFT_MSG_GETTABLE = 1
NFT_MSG_GETCHAIN = 4
NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFTA_TABLE_USE = 3
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10  # ip6tables-nft's tables (`ip6 nat`): kproxy's IPv6 proxier
_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF


def _ask(netns: str | None, msg: int, attrs: bytes, ipv6: bool = False) -> bytes:
    """One request, its one answer (a NEW* message; OSError for an error answer)."""
    body = struct.pack("=BBH", NFPROTO_IPV6 if ipv6 else NFPROTO_IPV4, 0, 0) + attrs
    request = _HDR.pack(_HDR.size + len(body), (NFNL_SUBSYS_NFTABLES << 8) | msg, NLM_F_REQUEST, 1, 0) + body
    with netfilter_socket(netns) as sock:
        sock.bind((0, 0))
        sock.send(request)
        data = sock.recv(1 << 16)
    if len(data) < _HDR.size + 4:
        raise OSError("nfnetlink: short answer")
    _length, msg_type, _flags, _seq, _pid = _HDR.unpack_from(data, 0)
    if msg_type == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, _HDR.size)
        raise OSError(-err, f"nfnetlink: {os.strerror(-err)}")
    return data


def chain_exists(table: str, chain: str, netns: str | None = None, ipv6: bool = False) -> bool:
    try:
        _ask(netns, NFT_MSG_GETCHAIN, _attr(NFTA_CHAIN_TABLE, table) + _attr(NFTA_CHAIN_NAME, chain), ipv6)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def table_use(table: str, netns: str | None = None, ipv6: bool = False) -> int:
    """The kernel's use count of `ip <table>` (`ip6 <table>`): its chains plus any sets, objects
    and flowtables. OSError if the table does not exist or the kernel refuses."""
    data = _ask(netns, NFT_MSG_GETTABLE, _attr(NFTA_TABLE_NAME, table), ipv6)
    pos, end = _HDR.size + 4, min(_HDR.unpack_from(data, 0)[0], len(data))
    while pos + 4 <= end:
        alen, atype = _ATTR.unpack_from(data, pos)
        if alen < 4:
            break
        if atype & _NLA_TYPE_MASK == NFTA_TABLE_USE and alen >= 8:
            (use,) = struct.unpack_from("!I", data, pos + 4)  # nf_tables attributes are big-endian
            return int(use)
        pos += (alen + 3) & ~3
    raise OSError(f"nfnetlink GETTABLE {table}: no use count in the answer")

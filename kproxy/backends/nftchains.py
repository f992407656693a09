"""The chains of one nf_tables table that are not kproxy's, read from the kernel (NFT_MSG_GETCHAIN dump over
nfnetlink) without reading a rule and without a process.

kproxy asks this before every large nf_tables restore (see NFT_ALL_CHAINS_THRESHOLD in
kproxy/proxiers/iptables.py: whether a "-Z" would zero other software's counters). `nft list
chains` answers the same question but builds its whole cache first: 13.6 s for the 110,000 chains
of a 10,000-Service table on this (loaded) machine, longer than the sync it guards; the dump takes
a fraction of a second.
"""

from __future__ import annotations

import socket
import struct
import threading

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETCHAIN = 4
NFTA_CHAIN_TABLE = 1
NFTA_CHAIN_NAME = 3
NFPROTO_IPV4 = 2
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3
_HDR = struct.Struct("=IHHII")
_ATTR = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF


def _socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    # A socket keeps the namespace it was made in: a short-lived thread enters it and makes one.
    from kproxy.relay import enter_netns

    box: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            enter_netns(netns)
            box.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER))
        except BaseException as exc:  # noqa: BLE001 - handed back below
            box.append(exc)

    t = threading.Thread(target=make, name="kproxy-nft-socket")
    t.start()
    t.join()
    got = box[0]
    if isinstance(got, BaseException):
        raise got
    return got


def _request(table: str, seq: int) -> bytes:
    name = table.encode() + b"\0"
    attr = _ATTR.pack(4 + len(name), NFTA_CHAIN_TABLE) + name + b"\0" * (-len(name) % 4)
    body = struct.pack("=BBH", NFPROTO_IPV4, 0, 0) + attr
    msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETCHAIN
    return _HDR.pack(_HDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def other_chains(table: str, prefixes: tuple[str, ...], names: frozenset[str], netns: str | None = None) -> list[str]:
    """Names of the chains of `ip <table>` that neither start with one of `prefixes` nor are
    one of `names` (usually none: only those are decoded, the 110,000 others are tested as
    bytes and dropped). OSError if the
    kernel refuses or the dump was interrupted by a concurrent change (the caller then assumes
    the worst)."""
    found: list[str] = []
    want = table.encode()
    own_prefixes = tuple(p.encode() for p in prefixes)
    own_names = frozenset(n.encode() for n in names)
    unpack_hdr, unpack_attr = _HDR.unpack_from, _ATTR.unpack_from
    with _socket(netns) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        sock.send(_request(table, 1))
        while True:
            data = sock.recv(1 << 20)
            if not data:
                raise OSError("nfnetlink: connection closed during the chain dump")
            off, size = 0, len(data)
            while off + 16 <= size:
                length, msg_type, flags, _seq, _pid = unpack_hdr(data, off)
                if length < 16:
                    raise OSError("nfnetlink: malformed message")
                if flags & NLM_F_DUMP_INTR:
                    raise OSError("nfnetlink: the chain dump was interrupted by a change")
                if msg_type == NLMSG_DONE:
                    return found
                if msg_type == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + 16)
                    if err:
                        raise OSError(-err, f"nfnetlink GETCHAIN: error {-err}")
                else:
                    # Attributes after nlmsghdr (16) and nfgenmsg (4); the table's name comes
                    # before the chain's: stop at the chain's.
                    pos, end, tbl = off + 20, off + length, b""
                    while pos + 4 <= end:
                        alen, atype = unpack_attr(data, pos)
                        if alen < 4:
                            break
                        atype &= _NLA_TYPE_MASK
                        if atype == NFTA_CHAIN_TABLE:
                            tbl = data[pos + 4 : pos + alen].rstrip(b"\0")
                        elif atype == NFTA_CHAIN_NAME:
                            name = data[pos + 4 : pos + alen].rstrip(b"\0")
                            if tbl == want and not name.startswith(own_prefixes) and name not in own_names:
                                found.append(name.decode(errors="replace"))
                            break
                        pos += (alen + 3) & ~3
                off += (length + 3) & ~3

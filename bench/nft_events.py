"""The moment an address reaches the kernel's nf_tables ruleset, from the kernel's own notification.

A NETLINK_NETFILTER socket in the node's namespace joins the NFNLGRP_NFTABLES multicast group:
nf_tables sends every object a transaction created or deleted to that group when the transaction
commits, so the time a NEWRULE or NEWSETELEM message holding an address is read is when the rule
or map element (an endpoint map's element, where a proxy keeps endpoints in maps) holding it
became live, without polling (`nft list` at 10,000 Services would fetch the whole ruleset each
time and steal the CPU the proxy under test needs). One thread reads; waiters register the
address they expect before they write to the API.

Works for everything that programs nf_tables: kproxy's nftables mode, iptables-nft rules (their
`-s`/`-d` matches and DNAT targets hold the address as raw bytes too) and the Go kube-proxy. The
address must be new to the ruleset (a fresh endpoint), else an older object holding it would do.
Used by bench_iptables_latency.py and bench_nftables_latency.py; tests/unit/test_bench_nft_events.py
checks it against real `nft` commands in a namespace.
"""
from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from kproxy.relay import socket_in_netns

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWRULE = 6
NFT_MSG_NEWSETELEM = 12
NFT_MSG_NEWGEN = 15
_HDR = struct.Struct("=IHHII")  # struct nlmsghdr
# A full sync of the Go kube-proxy at 10,000 Services is hundreds of thousands of notifications
# in one burst; the reader must never fall behind by more than this (root may force it; memory
# is only taken while notifications wait to be read).
RCVBUF = 1 << 30


@dataclass
class _Wait:
    needle: bytes
    event: threading.Event = field(default_factory=threading.Event)
    seen_at: float = 0.0


class NftEvents:
    """Reads nf_tables notifications in `netns` until close(); see the module doc."""

    def __init__(self, netns: str) -> None:
        self.sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            self.sock.settimeout(0.2)
        except BaseException:
            self.sock.close()
            raise
        self.overruns = 0  # ENOBUFS: notifications the kernel dropped because we read too slowly
        self.generations = 0  # NEWGEN messages: committed transactions seen
        self.messages = 0
        self._lock = threading.Lock()
        self._waits: list[_Wait] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nft-events", daemon=True)
        self._thread.start()

    def expect_address(self, address: str) -> _Wait:
        """Register before the write: the returned wait is set when a committed rule or set element
        holds `address`."""
        w = _Wait(socket.inet_aton(address))
        with self._lock:
            self._waits.append(w)
        return w

    def wait(self, w: _Wait, timeout: float) -> float | None:
        """time.monotonic() of the notification, or None after `timeout` seconds."""
        if not w.event.wait(timeout):
            return None
        return w.seen_at

    def _run(self) -> None:
        holders = {(NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM}
        gen_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                if self._stop.is_set():
                    return
                raise
            now = time.monotonic()
            with self._lock:
                pending = [w for w in self._waits if not w.event.is_set()]
            # Several notifications share one datagram; most datagrams hold no awaited address,
            # and `in` on bytes is the cheap test that skips parsing them.
            hits = [w for w in pending if w.needle in data]
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _flags, _seq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    break
                self.messages += 1
                if mtype == gen_type:
                    self.generations += 1
                elif mtype in holders and hits:
                    body = data[off + _HDR.size:off + length]
                    for w in hits:
                        if not w.event.is_set() and w.needle in body:
                            w.seen_at = now
                            w.event.set()
                off += (length + 3) & ~3
            if hits:
                with self._lock:
                    self._waits = [w for w in self._waits if not w.event.is_set()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

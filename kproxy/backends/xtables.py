"""Which rules of the built-in chains jump to which user chains, read from the legacy x_tables
kernel interface (getsockopt IPT_SO_GET_INFO / IPT_SO_GET_ENTRIES on a raw socket), as
iptables-legacy-save itself reads them.

Why not `iptables-save`: IPVS mode needs only this one fact per sync (are our jumps from
PREROUTING, INPUT, ... already there?), and under User-Mode Linux an iptables-save process
costs 50-70 ms, a fifth of a 1,000-Service full sync on an empty node. The nf_tables back end
has no such interface: callers keep iptables-save for it, and for another namespace.

Layout read here (include/uapi/linux/netfilter_ipv4/ip_tables.h, x86_64 and every LP64/ILP32
ABI with 8-byte aligned u64): struct ipt_entry is 112 bytes (target_offset and next_offset at
88, counters last), a target starts with xt_entry_target (u16 size, char name[29], u8 revision),
a jump to a user chain is a standard target (name "") whose verdict is the byte offset of that
chain's first rule, and every user chain is headed by an ERROR target carrying its name.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import os
import socket
import struct

IPT_SO_GET_INFO = 64
IPT_SO_GET_ENTRIES = 65
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
IPT_F_GOTO = 0x02  # ipt_ip.flags: `-g CHAIN` (iptables-save prints -g, not -j)

_GETINFO = struct.Struct("=32sI5I5III")  # struct ipt_getinfo: 84 bytes
_GET_ENTRIES_HDR = 40  # struct ipt_get_entries: name[32], u32 size, padded to the entries' 8
_ENTRY_FLAGS = 82  # ipt_entry.ip.flags
_ENTRY_OFFSETS = struct.Struct("=HH")  # target_offset, next_offset at 88
_TARGET_HDR = 32
_VERDICT = struct.Struct("=i")

_libc = ctypes.CDLL(None, use_errno=True)


def _getsockopt(fd: int, opt: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    size = ctypes.c_uint32(len(buf))
    if _libc.getsockopt(fd, socket.IPPROTO_IP, opt, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def live_tables() -> set[str]:
    """Tables instantiated in this network namespace. A table not listed holds no rule; asking
    the kernel for it would create it (and load its module: a modprobe process)."""
    try:
        # thread-self: /proc/net is /proc/self/net, the namespace of the process' main thread,
        # not of a thread that setns()ed elsewhere.
        with open("/proc/thread-self/net/ip_tables_names") as f:
            return {line.strip() for line in f if line.strip()}
    except FileNotFoundError:
        return set()


def _read_table(fd: int, table: str) -> tuple[tuple[int, ...], tuple[int, ...], int, bytes]:
    """(hook_entry, underflow, valid_hooks, entries) of one table, retried if it changes
    between the two calls (EAGAIN: the entries' size no longer matches)."""
    name = table.encode()
    for _ in range(5):
        info = ctypes.create_string_buffer(name, _GETINFO.size)
        _getsockopt(fd, IPT_SO_GET_INFO, info)
        fields = _GETINFO.unpack(info.raw)
        valid, hook_entry, underflow, size = fields[1], fields[2:7], fields[7:12], fields[13]
        buf = ctypes.create_string_buffer(_GET_ENTRIES_HDR + size)
        struct.pack_into("=32sI", buf, 0, name, size)
        try:
            _getsockopt(fd, IPT_SO_GET_ENTRIES, buf)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                continue
            raise
        return hook_entry, underflow, valid, buf.raw[_GET_ENTRIES_HDR:]
    raise OSError(errno.EAGAIN, f"iptables table {table} kept changing while read")


def parse_jumps(hook_entry: tuple[int, ...], underflow: tuple[int, ...], valid_hooks: int,
                entries: bytes) -> set[tuple[str, str]]:
    """(built-in chain, user chain) for every `-j USER-CHAIN` rule of a built-in chain."""
    heads: list[int] = []  # offsets of the ERROR entries heading the user chains, ascending
    names: list[str] = []
    jumps: list[tuple[int, int]] = []  # (rule offset, verdict) of standard targets jumping ahead
    off = 0
    while off + 112 <= len(entries):
        target_off, next_off = _ENTRY_OFFSETS.unpack_from(entries, off + 88)
        if next_off < 112:
            raise ValueError(f"malformed ipt_entry at {off}: next_offset {next_off}")
        t = off + target_off
        tname = entries[t + 2 : t + 31].split(b"\0", 1)[0]
        if tname == b"ERROR":
            heads.append(off)
            names.append(entries[t + _TARGET_HDR : t + _TARGET_HDR + 30].split(b"\0", 1)[0].decode())
        elif not tname and not entries[off + _ENTRY_FLAGS] & IPT_F_GOTO:
            verdict = _VERDICT.unpack_from(entries, t + _TARGET_HDR)[0]
            if verdict >= 0:
                jumps.append((off, verdict))
        off += next_off
    out: set[tuple[str, str]] = set()
    for off, verdict in jumps:
        hook = next((h for h in range(len(HOOKS)) if valid_hooks & (1 << h)
                     and hook_entry[h] <= off <= underflow[h]), None)
        i = bisect.bisect_right(heads, verdict) - 1
        # A verdict before every user chain is a fall-through to the next rule (a rule with no
        # target), never a jump; the last ERROR entry ends the table and names no chain.
        if hook is None or i < 0 or i == len(heads) - 1:
            continue
        out.add((HOOKS[hook], names[i]))
    return out


def builtin_jumps(tables: tuple[str, ...]) -> set[tuple[str, str, str]]:
    """(table, built-in chain, user chain) for every jump from a built-in chain, in this network
    namespace's legacy tables. Raises OSError where the interface is missing or refused."""
    live = live_tables()
    out: set[tuple[str, str, str]] = set()
    wanted = [t for t in tables if t in live]
    if not wanted:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        for table in wanted:
            try:
                hook_entry, underflow, valid, entries = _read_table(sock.fileno(), table)
            except OSError as e:
                if e.errno == errno.ENOENT:  # went away since live_tables()
                    continue
                raise
            out.update((table, src, dst) for src, dst in parse_jumps(hook_entry, underflow, valid, entries))
    return out


__all__ = ["builtin_jumps", "live_tables", "parse_jumps"]

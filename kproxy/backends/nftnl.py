# cython: wraparound=True, boundscheck=True, cdivision=False
# (setup.py compiles this file with Cython; these directives keep Python's semantics for its
# negative indices and modulo, which setup.py's global ones would change.)
"""nftables transactions as nfnetlink batches encoded here, sent on one netlink socket: no `nft`
process and no ruleset cache.

Why (measured, bench/README.md, nftables): `nft -f` (and libnftables in-process, which does the
same) dumps the table's chains and sets from the kernel before every transaction to evaluate it;
in a 10,000-Service table that fetch is most of a partial sync (0.2-0.3 s wall, ~0.03 s CPU for a
one-element transaction), whatever the transaction holds. A batch encoded by kproxy goes straight
to the kernel: the kernel applies it in the sending thread, atomically (all or nothing), so the
replies are queued when sendmsg returns.

The input is the nft script kproxy renders (kproxy._nftpath, kproxy.proxiers.nftables), one
command per line, translated by a closed grammar: the statements kproxy itself writes and nothing
more. A line outside it raises Untranslatable and the caller sends the script through `nft -f`
instead (same meaning, slower), so the script stays the one description of a transaction (logs,
tests, the fallback). tests/nftables check that both ways leave identical rulesets in the kernel.
A full sync's elements (200,000 at 10,000 Services) may come as (set, key, value) tuples instead
of lines, and its per-Service rules as statements (Part, Rule): the same bytes without writing and
parsing their text.

The compiled core: setup.py compiles this file with Cython (the directives above keep Python's
semantics); kproxy.fastpath.pure_twin loads the same source as Python (KPROXY_PURE=1), and
tests/nftables/test_nftables_encode_twins.py checks both give identical bytes.
"""
from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from kproxy.protocols import SERVICE_PROTOCOLS

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x1, 0x4, 0x200, 0x400, 0x800
NLA_F_NESTED = 0x8000
SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11

NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM = 9, 11, 12, 14
FAMILIES = {"ip": 2, "ip6": 10}
PROTOS = SERVICE_PROTOCOLS

# Verdict codes (linux/netfilter/nf_tables.h; negative values as u32).
VERDICTS = {"drop": 0, "accept": 1, "jump": -3 & 0xFFFFFFFF, "goto": -4 & 0xFFFFFFFF, "return": -5 & 0xFFFFFFFF}
NFT_REG_VERDICT, NFT_REG_1, NFT_REG_2, NFT_REG32_00, NFT_REG32_01 = 0, 1, 2, 8, 9
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_CMP_EQ, NFT_CMP_NEQ = 0, 1
NFT_META_L4PROTO, NFT_META_MARK = 16, 3
NFT_CT_STATE, NFT_CT_STATUS = 0, 2
NF_NAT_RANGE_PROTO_RANDOM_FULLY = 0x10
NFT_REJECT_ICMP_UNREACH, ICMP_PORT_UNREACH, ICMPV6_PORT_UNREACH = 0, 3, 4
NFTA_FIB_F_DADDR = 2
NFT_NG_RANDOM = 1
NFT_NAT_DNAT = 1
NFT_FIB_RESULT_ADDRTYPE, NFTA_FIB_F_SADDR = 3, 1
RTN_LOCAL = 2
NFT_DYNSET_OP_UPDATE = 1
NFT_SET_TIMEOUT, NFT_SET_EVAL = 0x10, 0x20
TYPE_IPADDR = 7  # nft's datatype id for ipv4_addr (the set's key type, for `nft list`)
TYPE_IP6ADDR = 8  # ipv6_addr
TYPE_INTEGER = 4
TYPE_IPADDR_SERVICE = (7 << 6) | 13  # the concatenation ipv4_addr . inet_service
TYPE_IP6ADDR_SERVICE = (8 << 6) | 13  # ipv6_addr . inet_service
NFT_SET_MAP = 0x8
NFT_DATA_VERDICT = 0xFFFFFF00
# The endpoint maps (kproxy.proxiers.nftables.endpoint_map_type): `nft list` shows their typeof
# from this user data, nft's own encoding of `typeof numgen random mod 1 : ip daddr . PROTO dport`
# (as nft 1.0.6 sends it; only the protocol's payload id differs).
_MAP_UDATA_HEAD = bytes.fromhex(
    "000401000000010400000000031a000417000000011200040100000001040100000002040000000004340004"
    "0d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c0004")
# In an ip6 table `ip6 daddr`: nft's ip6 protocol id (13) and its daddr field (9) instead of ip's (12, 12).
_MAP_UDATA_HEAD6 = _MAP_UDATA_HEAD.replace(bytes.fromhex("040c00000001040c000000"), bytes.fromhex("040d000000010409000000"))
_MAP_UDATA_TAIL = bytes.fromhex("000000010402000000060400000000")
_PAYLOAD_PROTO_IDS = {"tcp": 8, "udp": 6, "sctp": 10}  # nft's proto_desc ids
ENDPOINT_MAP_DECLS = {f"{{ typeof numgen random mod 1 : {ipx} daddr . {p} dport ; }}": (p, ipx)
                      for p in PROTOS for ipx in FAMILIES}
# Elements per NEWSETELEM message: as many as fit the element list's nested attribute (at most
# 64 KiB, its length is 16 bits), less room for the attribute headers around them.
ELEMENT_LIST_BYTES = 65535 - 64
MAX_BATCH = 1 << 30

_HDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")
_ATTR = struct.Struct("=HH")


class ElementRun:
    """Elements as (set, key, value), each the line `add element FAMILY TABLE SET { KEY : VALUE }`."""

    __slots__ = ("elements",)

    def __init__(self, elements: Iterable[tuple[str, str, str]]) -> None:
        self.elements = elements


# One item of a transaction: a script line; an element the table's set or map gets, as
# (set, key, value): the line `add element FAMILY TABLE SET { KEY : VALUE }` without writing and
# parsing its text; many of them as an ElementRun (a full sync's 230,000 elements at 10,000
# Services, without a step of translate's loop each); a chain's rules as (chain, rules), each rule
# as statements (Rule, below): the lines `add rule FAMILY TABLE CHAIN RULE` without their text (a
# full sync's 24,000 rules); or a new chain as (chain,): the line `add chain FAMILY TABLE CHAIN`.
Part = str | tuple[str] | tuple[str, str, str] | tuple[str, tuple["Rule", ...]] | ElementRun


@runtime_checkable
class Parts(Protocol):
    """A transaction that can give its items as Parts (kproxy.proxiers.nftables.Script)."""

    def parts(self) -> Iterable[Part]: ...


class Untranslatable(ValueError):
    """A script line outside the grammar this module encodes."""


class BatchError(OSError):
    """The kernel refused the batch: nothing of it was applied."""


# ---- attributes ----

def _attr(kind: int, value: bytes) -> bytes:
    n = len(value)
    if n & 3:
        return _ATTR.pack(4 + n, kind) + value + _PADS[-n % 4]
    return _ATTR.pack(4 + n, kind) + value


_PADS = (b"", b"\0", b"\0\0", b"\0\0\0")


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def str_attr(kind: int, text: str) -> bytes:
    return _attr(kind, text.encode() + b"\0")


_str = str_attr


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("!I", value))


def _data(kind: int, value: bytes) -> bytes:
    return _nest(kind, _attr(1, value))  # NFTA_DATA_VALUE


def _value(kind: int, value: bytes) -> bytes:
    """_data(kind, value) for a value of whole 32-bit words (every register value: keys and
    data of set elements), in one pack: the hot path of a full sync's 200,000 elements."""
    n = len(value)
    if n & 3:
        return _data(kind, value)
    return _VALUE.pack(8 + n, kind | NLA_F_NESTED, 4 + n, 1) + value


_VALUE = struct.Struct("=HHHH")


def _verdict(kind: int, code: str, chain: str = "") -> bytes:
    inner = _u32(1, VERDICTS[code]) + (_str(2, chain) if chain else b"")  # NFTA_VERDICT_CODE, _CHAIN
    return _nest(kind, _nest(2, inner))  # NFTA_DATA_VERDICT


def _expr(name: str, *attrs: bytes) -> bytes:
    return _nest(1, _str(1, name), _nest(2, *attrs))  # NFTA_LIST_ELEM{NFTA_EXPR_NAME, NFTA_EXPR_DATA}


# The expressions below repeat across rules (the same loads, protocols, ports): cached.
@functools.lru_cache(maxsize=1024)
def _payload(base: int, offset: int, length: int, reg: int = NFT_REG_1) -> bytes:
    return _expr("payload", _u32(1, reg), _u32(2, base), _u32(3, offset), _u32(4, length))


def _cmp_once(value: bytes, op: int = NFT_CMP_EQ, reg: int = NFT_REG_1) -> bytes:
    """A comparison with a value seen once (a Service's address): not worth a cache entry."""
    return _expr("cmp", _u32(1, reg), _u32(2, op), _data(3, value))


_cmp = functools.lru_cache(maxsize=4096)(_cmp_once)


@functools.lru_cache(maxsize=64)
def _meta(key: int, reg: int = NFT_REG_1) -> bytes:
    return _expr("meta", _u32(2, key), _u32(1, reg))


def _immediate(reg: int, value: bytes) -> bytes:
    return _expr("immediate", _u32(1, reg), _data(2, value))


# ---- values ----

def _ip4(text: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET, text)  # dotted quad only (inet_aton takes "10.1")
    except OSError as e:
        raise Untranslatable(f"not an IPv4 address: {text!r}") from e


def _ip6(text: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET6, text)
    except OSError as e:
        raise Untranslatable(f"not an IPv6 address: {text!r}") from e


def _port(text: str) -> bytes:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise Untranslatable(f"not a port: {text!r}")
    return struct.pack("!H", int(text))


def _proto(text: str) -> int:
    try:
        return PROTOS[text]
    except KeyError as e:
        raise Untranslatable(f"not a protocol: {text!r}") from e


def _key(text: str) -> bytes:
    """A set element's key: "IP", "IP . IP", "IP . PROTO . PORT" or "PROTO . PORT" (each part of a
    concatenation padded to 4 bytes, as the kernel's registers are)."""
    if _c_key is not None:
        done = _c_key(text)
        if done is not None:
            return done
    if " " not in text:
        return _key_part(text)
    return b"".join([_key_part(part) for part in text.split(" . ")])


def _key_part(part: str) -> bytes:
    if ":" in part:
        return _ip6(part)
    if part[:1].isdigit() and "." in part:
        return _ip4(part)
    if part[:2] == "0x":  # an integer key (numgen's index: host-endian), one per endpoint slot
        try:
            return _INDEX.pack(int(part, 16))
        except (ValueError, struct.error) as e:
            raise Untranslatable(f"not a 32-bit integer: {part!r}") from e
    return _small_key_part(part)


_INDEX = struct.Struct("=I")
# The common forms of _key in C (kproxy/backends/_nftkey.pyx), not in the pure twin: this module
# run as Python (KPROXY_PURE=1, kproxy.fastpath.pure_twin names it ..._pure) is the pure path.
# Likewise a whole element (key and data) in C: a full sync's 200,000.
_c_key: Callable[[str], bytes | None] | None = None
_c_element: Callable[[str, str], bytes | None] | None = None
if not __name__.endswith("_pure"):
    try:
        from kproxy.backends._nftkey import element_attr as _c_element
        from kproxy.backends._nftkey import key_bytes as _c_key
    except ImportError:  # not built: the Python path alone
        pass


@functools.lru_cache(maxsize=4096)
def _small_key_part(part: str) -> bytes:
    if part in PROTOS:
        return bytes([PROTOS[part]]) + b"\0\0\0"
    if part.isdigit():
        return _port(part) + b"\0\0"
    return _ip4(part)


# ---- rules ----

# (address offset in the network header, length) per `ip`/`ip6` match and field.
_ADDR_FIELDS = {("ip", "saddr"): (12, 4), ("ip", "daddr"): (16, 4), ("ip6", "saddr"): (8, 16), ("ip6", "daddr"): (24, 16)}


def _match_ip(field: str, negate: bool, text: str, fam: str = "ip") -> list[bytes]:
    offset, length = _ADDR_FIELDS[(fam, field)]
    op = NFT_CMP_NEQ if negate else NFT_CMP_EQ
    out = [_payload(NFT_PAYLOAD_NETWORK_HEADER, offset, length)]
    if "/" in text:
        try:
            net = _ip_network(text, fam)
        except ValueError as e:
            raise Untranslatable(f"not an {fam} CIDR: {text!r}") from e
        if net.prefixlen < net.max_prefixlen:
            out.append(_expr("bitwise", _u32(1, NFT_REG_1), _u32(2, NFT_REG_1), _u32(3, length),
                             _data(4, net.netmask.packed), _data(5, bytes(length))))
        out.append(_cmp(net.network_address.packed, op))
        return out
    out.append(_cmp_once(_ip4(text) if fam == "ip" else _ip6(text), op))
    return out


@functools.lru_cache(maxsize=256)  # the few CIDRs of every rule
def _ip_network(text: str, fam: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.IPv4Network(text) if fam == "ip" else ipaddress.IPv6Network(text)


# ---- rules as statements ----
# A rule of the proxier's per-Service chains comes as statements, not text: (kind, args...), every
# argument a string, the address family (where there is one) second. Each statement has one text
# (stmt_text: the rule's description, for `nft -f`, logs and tests) and one encoding
# (_stmt_expressions); rule_expressions parses text into the same statements, so a structured
# rule and its text give the same bytes (tests/nftables/test_nftables_encode_twins.py).
#   ("match", FAM, FIELD, ADDR_OR_CIDR)    FAM FIELD VALUE          (FIELD: saddr, daddr)
#   ("match!=", FAM, FIELD, ADDR_OR_CIDR)  FAM FIELD != VALUE
#   ("in", FAM, FIELD, SET)                FAM FIELD @SET
#   ("dport", PROTO, PORT)                 PROTO dport PORT
#   ("l4proto", PROTO)                     meta l4proto PROTO
#   ("numgen", MOD, VALUE)                 numgen random mod MOD == VALUE
#   ("fib", saddr|daddr)                   fib ADDR type local
#   ("update", FAM, SET)                   update @SET { FAM saddr }
#   ("dnat", FAM, DEST)                    dnat FAM to ADDR:PORT ([ADDR]:PORT in ip6)
#   ("dnat-map", FAM, MOD, OFFSET, MAP)    dnat FAM addr . port to numgen random mod MOD offset OFFSET map @MAP
#   ("jump"|"goto", CHAIN), ("drop",), ("accept",), ("return",)
Stmt = tuple[str, ...]
Rule = tuple[Stmt, ...]

# Statements whose bytes do not depend on a Service's own values repeat in every chain (the
# protocol and port matches, the cluster CIDR match, the jump to mark-for-masquerade): cached,
# bounded (cleared when full).
_REPEATING = frozenset({"match!=", "dport", "l4proto", "numgen", "fib", "jump", "drop", "accept", "return"})
_STMT_CACHE: dict[Stmt, bytes] = {}
_STMT_CACHE_SIZE = 4096


# kind -> (arity, text): the statements above and how each is written.
_STMT_FORMS = {
    "match": (4, "{1} {2} {3}"),
    "match!=": (4, "{1} {2} != {3}"),
    "in": (4, "{1} {2} @{3}"),
    "dport": (3, "{1} dport {2}"),
    "l4proto": (2, "meta l4proto {1}"),
    "numgen": (3, "numgen random mod {1} == {2}"),
    "fib": (2, "fib {1} type local"),
    "update": (3, "update @{2} {{ {1} saddr }}"),
    "dnat": (3, "dnat {1} to {2}"),
    "dnat-map": (5, "dnat {1} addr . port to numgen random mod {2} offset {3} map @{4}"),
    "jump": (2, "jump {1}"),
    "goto": (2, "goto {1}"),
    "drop": (1, "drop"),
    "accept": (1, "accept"),
    "return": (1, "return"),
}


def stmt_text(s: Stmt) -> str:
    """The nft text of one statement (Untranslatable for anything outside the list above)."""
    arity, form = _STMT_FORMS.get(s[0] if s else "", (-1, ""))
    if len(s) != arity:
        raise Untranslatable(f"statement {s!r}")
    return form.format(*s)


def rule_text(rule: Rule) -> str:
    return " ".join([stmt_text(s) for s in rule])


def encode_rule(rule: Rule, family: str = "ip") -> bytes:
    """The NFTA_RULE_EXPRESSIONS of a rule given as statements, in a table of `family`."""
    if not rule:
        raise Untranslatable("an empty rule")
    return _nest(4, *[_stmt_expressions(s, family) for s in rule])


def _stmt_expressions(s: Stmt, family: str) -> bytes:
    k = s[0]
    if k in _REPEATING:
        done = _STMT_CACHE.get(s)
        if done is not None and (k != "match!=" or s[1] == family):
            return done
        done = _encode_stmt(s, family)
        if len(_STMT_CACHE) >= _STMT_CACHE_SIZE:
            _STMT_CACHE.clear()
        _STMT_CACHE[s] = done
        return done
    fast = _fast_stmt(s, family)
    return fast if fast is not None else _encode_stmt(s, family)


# The statements with a Service's own values (its address, its chains, its endpoint map block)
# from templates: _encode_stmt's bytes made once with stand-in values, cut where the values go
# (each stand-in found exactly once, or no template: _encode_stmt does it). Same bytes, without
# nesting the attributes anew for each of a full sync's 24,000 rules.
_TEMPLATES: dict[tuple[str, str, int], tuple[bytes, ...] | None] = {}


def _template(key: tuple[str, str, int]) -> tuple[bytes, ...] | None:
    """The template of ("match", FAMILY, FIELD: 0 saddr, 1 daddr), ("goto"|"jump", FAMILY,
    NAME_LENGTH) or ("dnat-map", FAMILY, NAME_LENGTH)."""
    t = _TEMPLATES.get(key, _NO_TEMPLATE)
    if t is not _NO_TEMPLATE:
        return t
    k, family, n = key
    stand_in = "~" * n
    holes: tuple[bytes, ...] = (stand_in.encode(),)
    if k == "match":
        holes = (bytes(range(0xa0, 0xa0 + (4 if family == "ip" else 16))),)
        stmt: Stmt = (k, family, ("saddr", "daddr")[n], _STAND_IN[family])
    elif k == "dnat-map":
        stmt = (k, family, str(_BE32.unpack(_U32_HOLES[0])[0]), str(_BE32.unpack(_U32_HOLES[1])[0]), stand_in)
        holes = (*_U32_HOLES, *holes)
    else:
        stmt = (k, stand_in)
    out: tuple[bytes, ...] | None = None
    try:
        rest, cut = _encode_stmt(stmt, family), []
        for hole in holes:
            if rest.count(hole) != 1:
                raise ValueError(hole)
            head, _, rest = rest.partition(hole)
            cut.append(head)
        out = (*cut, rest)
    except (ValueError, Untranslatable):
        out = None
    if len(_TEMPLATES) < _STMT_CACHE_SIZE:
        _TEMPLATES[key] = out
    return out


_NO_TEMPLATE: tuple[bytes, ...] = (b"none",)
_U32_HOLES = (b"\x7e\xa1\xb2\x01", b"\x7e\xa1\xb2\x02")


def _fast_stmt(s: Stmt, family: str) -> bytes | None:
    """s's bytes from a template, or None (then _encode_stmt decides, and refuses what is wrong)."""
    k = s[0]
    if k == "match" and len(s) == 4 and s[1] == family and "/" not in s[3] and (s[2] == "saddr" or s[2] == "daddr"):
        addr = _ip4(s[3]) if family == "ip" else _ip6(s[3])
        t = _template((k, family, 1 if s[2] == "daddr" else 0))
        return None if t is None else t[0] + addr + t[1]
    if (k == "goto" or k == "jump") and len(s) == 2 and s[1]:
        name = s[1].encode()
        t = _template((k, family, len(name)))
        return None if t is None else t[0] + name + t[1]
    if k == "dnat-map" and len(s) == 5 and s[1] == family and s[2].isdigit() and s[3].isdigit() and s[4]:
        modulus, offset = int(s[2]), int(s[3])
        if not 0 < modulus < 1 << 31 or offset >= 1 << 31:
            return None
        name = s[4].encode()
        t = _template((k, family, len(name)))
        if t is None:
            return None
        return t[0] + _BE32.pack(modulus) + t[1] + _BE32.pack(offset) + t[2] + name + t[3]
    return None


# Stand-in addresses whose bytes are 0xa0, 0xa1, ... (the hole _fast_stmt cuts at).
_STAND_IN = {"ip": "160.161.162.163", "ip6": "a0a1:a2a3:a4a5:a6a7:a8a9:aaab:acad:aeaf"}
_BE32 = struct.Struct("!I")


def _encode_stmt(s: Stmt, family: str) -> bytes:
    text = stmt_text(s)  # checks the kind and the arity
    k = s[0]
    if k in ("match", "match!=", "in", "update", "dnat", "dnat-map") and s[1] != family:
        raise Untranslatable(f"{text!r} in an {family} table")
    if k in ("match", "match!=", "in") and s[2] not in ("saddr", "daddr"):
        raise Untranslatable(text)
    if k == "match" or k == "match!=":
        return b"".join(_match_ip(s[2], k == "match!=", s[3], family))
    if k == "in":
        return (_payload(NFT_PAYLOAD_NETWORK_HEADER, *_ADDR_FIELDS[(family, s[2])])
                + _expr("lookup", _str(1, s[3]), _u32(2, NFT_REG_1)))
    if k == "dport":
        if s[1] not in PROTOS:
            raise Untranslatable(text)
        return (_meta(NFT_META_L4PROTO) + _cmp(bytes([PROTOS[s[1]]]))
                + _payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2) + _cmp(_port(s[2])))
    if k == "l4proto":
        return _meta(NFT_META_L4PROTO) + _cmp(bytes([_proto(s[1])]))
    if k == "numgen":
        if not s[1].isdigit() or not s[2].isdigit():
            raise Untranslatable(text)
        return (_expr("numgen", _u32(1, NFT_REG_1), _u32(2, int(s[1])), _u32(3, NFT_NG_RANDOM))
                + _cmp(struct.pack("=I", int(s[2]))))  # numgen's result is host-endian
    if k == "fib":
        if s[1] not in ("saddr", "daddr"):
            raise Untranslatable(text)
        flag = NFTA_FIB_F_SADDR if s[1] == "saddr" else NFTA_FIB_F_DADDR
        return (_expr("fib", _u32(1, NFT_REG_1), _u32(2, NFT_FIB_RESULT_ADDRTYPE), _u32(3, flag))
                + _cmp(struct.pack("=I", RTN_LOCAL)))
    if k == "update":
        return (_payload(NFT_PAYLOAD_NETWORK_HEADER, *_ADDR_FIELDS[(family, "saddr")])
                + _expr("dynset", _str(1, s[2]), _u32(3, NFT_DYNSET_OP_UPDATE), _u32(4, NFT_REG_1)))
    if k == "dnat-map":
        # The map's data (address . port) lands in register 1 (address) and its second word (port).
        modulus, offset = s[2], s[3]
        if not modulus.isdigit() or not offset.isdigit() or not 0 < int(modulus) < 1 << 31 or int(offset) >= 1 << 31:
            raise Untranslatable(text)
        return (_expr("numgen", _u32(1, NFT_REG_1), _u32(2, int(modulus)), _u32(3, NFT_NG_RANDOM), _u32(4, int(offset)))
                + _expr("lookup", _str(1, s[4]), _u32(2, NFT_REG_1), _u32(3, NFT_REG_1))
                # the port follows the address: register 9 after 4 bytes, 12 after 16
                + _expr("nat", _u32(1, NFT_NAT_DNAT), _u32(2, FAMILIES[family]), _u32(3, NFT_REG_1),
                        _u32(5, NFT_REG32_01 if family == "ip" else NFT_REG32_00 + 4)))
    if k == "dnat":
        addr, _, port = s[2].rpartition(":")
        if not addr:
            raise Untranslatable(text)
        if family == "ip6":  # [ADDRESS]:PORT
            if not (addr.startswith("[") and addr.endswith("]")):
                raise Untranslatable(text)
            addr_bytes = _ip6(addr[1:-1])
        else:
            addr_bytes = _ip4(addr)
        return (_immediate(NFT_REG_1, addr_bytes) + _immediate(NFT_REG_2, _port(port))
                + _expr("nat", _u32(1, NFT_NAT_DNAT), _u32(2, FAMILIES[family]), _u32(3, NFT_REG_1), _u32(5, NFT_REG_2)))
    return _expr("immediate", _u32(1, NFT_REG_VERDICT), _verdict(2, k, s[1] if len(s) > 1 else ""))


def rule_expressions(rule: str, family: str = "ip") -> bytes:
    """The NFTA_RULE_EXPRESSIONS of one rule of kproxy's grammar (Untranslatable otherwise), in
    a table of `family` ("ip" or "ip6": its address matches and reject variant). The forms that
    are statements (above) are parsed into them and encoded as those."""
    words = rule.split()
    out: list[bytes] = []
    i, n = 0, len(words)

    def need(k: int) -> list[str]:
        if i + k > n:
            raise Untranslatable(f"truncated rule: {rule!r}")
        return words[i:i + k]

    while i < n:
        w = words[i]
        stmt: Stmt = ()
        used = 0  # the words the statement took
        if i + 2 < n and words[i + 2] == ".":
            i = _concat_lookup(words, i, rule, out, family)
        elif w == "ct":
            _, key, value = need(3)
            ct_key, mask = _CT_MATCHES.get((key, value), (-1, 0))
            if ct_key < 0:
                raise Untranslatable(rule)
            out += [_expr("ct", _u32(1, NFT_REG_1), _u32(2, ct_key)), _mask(mask, 0), _cmp(b"\0\0\0\0", NFT_CMP_NEQ)]
            i += 3
        elif w == "meta" and i + 1 < n and words[i + 1] == "mark":
            i = _meta_mark(words, i, rule, out)
        elif w == "masquerade":
            random = words[i + 1:i + 2] == ["fully-random"]
            out.append(_expr("masq", *([_u32(1, NF_NAT_RANGE_PROTO_RANDOM_FULLY)] if random else [])))
            i += 2 if random else 1
        elif w == "reject":
            # As nft's plain `reject`: ICMP (ICMPv6 in an ip6 table) port unreachable.
            code = ICMPV6_PORT_UNREACH if family == "ip6" else ICMP_PORT_UNREACH
            out.append(_expr("reject", _u32(1, NFT_REJECT_ICMP_UNREACH), _attr(2, bytes([code]))))
            i += 1
        elif w == family:
            field, arg = need(3)[1:]
            if field not in ("saddr", "daddr"):
                raise Untranslatable(rule)
            if arg == "!=":
                stmt, used = ("match!=", w, field, need(4)[3]), 4
            elif arg.startswith("@"):
                stmt, used = ("in", w, field, arg[1:]), 3
            else:
                stmt, used = ("match", w, field, arg), 3
        elif w in PROTOS:
            field, port = need(3)[1:]
            if field != "dport":
                raise Untranslatable(rule)
            stmt, used = ("dport", w, port), 3
        elif w == "meta":
            key, proto = need(3)[1:]
            if key != "l4proto":
                raise Untranslatable(rule)
            stmt, used = ("l4proto", proto), 3
        elif w == "numgen":
            _, kind, mod, modulus, eq, value = need(6)
            if kind != "random" or mod != "mod" or eq != "==":
                raise Untranslatable(rule)
            stmt, used = ("numgen", modulus, value), 6
        elif w == "fib":
            _, addr, kw, kind = need(4)
            if (kw, kind) != ("type", "local"):
                raise Untranslatable(rule)
            stmt, used = ("fib", addr), 4
        elif w == "update":
            _, target, lb, ip, saddr, rb = need(6)
            if not target.startswith("@") or (lb, saddr, rb) != ("{", "saddr", "}"):
                raise Untranslatable(rule)
            stmt, used = ("update", ip, target[1:]), 6
        elif w == "dnat" and words[i + 2:i + 6] == ["addr", ".", "port", "to"]:
            has_offset = words[i + 10:i + 11] == ["offset"]
            ws = need(14 if has_offset else 12)
            if ws[6:9] != ["numgen", "random", "mod"] or ws[-2] != "map" or not ws[-1].startswith("@"):
                raise Untranslatable(rule)
            stmt, used = ("dnat-map", ws[1], ws[9], ws[11] if has_offset else "0", ws[-1][1:]), len(ws)
        elif w == "dnat":
            _, fam, to, dest = need(4)
            if to != "to":
                raise Untranslatable(rule)
            stmt, used = ("dnat", fam, dest), 4
        elif w in ("jump", "goto"):
            stmt, used = (w, need(2)[1]), 2
        elif w in ("drop", "accept", "return"):
            stmt, used = (w,), 1
        else:
            raise Untranslatable(f"statement {w!r} in {rule!r}")
        if stmt:
            out.append(_stmt_expressions(stmt, family))
            i += used
    if not out:
        raise Untranslatable(f"an empty rule: {rule!r}")
    return _nest(4, *out)  # NFTA_RULE_EXPRESSIONS


_CT_MATCHES = {("state", "new"): (NFT_CT_STATE, 0x08), ("state", "invalid"): (NFT_CT_STATE, 0x01),
               ("status", "dnat"): (NFT_CT_STATUS, 0x20)}
_CONCAT_FIELDS = {**{k: v[0] for k, v in _ADDR_FIELDS.items()}, ("meta", "l4proto"): -1, ("th", "dport"): -2}


def _mask(mask: int, xor: int) -> bytes:
    """register 1 = (register 1 & mask) ^ xor, on a host-endian 32-bit value (marks, ct bits)."""
    return _expr("bitwise", _u32(1, NFT_REG_1), _u32(2, NFT_REG_1), _u32(3, 4),
                 _data(4, struct.pack("=I", mask)), _data(5, struct.pack("=I", xor)))


def _concat_lookup(words: list[str], i: int, rule: str, out: list[bytes], family: str = "ip") -> int:
    """`F . F ... @SET` or `F . F ... vmap @MAP`: each field in the next free 32-bit register, as
    nft lays out a concatenation (register 1, then 9, 10, 11 after an IPv4 address; 12 after an
    IPv6 one, which fills 4)."""
    used = 0  # 32-bit registers filled so far
    while True:
        field = (words[i], words[i + 1]) if i + 1 < len(words) else ("", "")
        offset = _CONCAT_FIELDS.get(field) if field[0] in (family, "meta", "th") else None
        if offset is None or used > 15:
            raise Untranslatable(rule)
        reg = NFT_REG_1 if not used else NFT_REG32_00 + used
        if offset == -1:
            out.append(_meta(NFT_META_L4PROTO, reg))
            used += 1
        elif offset == -2:
            out.append(_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg))
            used += 1
        else:
            length = _ADDR_FIELDS[field][1]
            out.append(_payload(NFT_PAYLOAD_NETWORK_HEADER, offset, length, reg))
            used += length // 4
        i += 2
        if i < len(words) and words[i] == ".":
            i += 1
            continue
        break
    vmap = words[i:i + 1] == ["vmap"]
    i += 1 if vmap else 0
    if i >= len(words) or not words[i].startswith("@") or len(words[i]) < 2:
        raise Untranslatable(rule)
    out.append(_expr("lookup", _str(1, words[i][1:]), _u32(2, NFT_REG_1),
                     *([_u32(3, NFT_REG_VERDICT)] if vmap else [])))
    return i + 1


def _meta_mark(words: list[str], i: int, rule: str, out: list[bytes]) -> int:
    """`meta mark set meta mark or|xor M` and `meta mark and M == 0`."""
    w = words[i:i + 7]
    try:
        if w[2:5] == ["set", "meta", "mark"] and w[5] in ("or", "xor") and len(w) == 7:
            m = int(w[6], 16)
            out += [_meta(NFT_META_MARK), _mask(~m & 0xFFFFFFFF if w[5] == "or" else 0xFFFFFFFF, m),
                    _expr("meta", _u32(2, NFT_META_MARK), _u32(3, NFT_REG_1))]
            return i + 7
        if w[2] == "and" and w[4:6] == ["==", "0"]:
            out += [_meta(NFT_META_MARK), _mask(int(w[3], 16), 0), _cmp(b"\0\0\0\0")]
            return i + 6
    except (IndexError, ValueError, struct.error):
        pass
    raise Untranslatable(rule)


def _udata(kind: int, text: str) -> bytes:
    """One of nft's user-data TLVs (type, length byte, value): comments, shown by `nft list`."""
    value = text.encode() + b"\0"
    if len(value) > 255:
        raise Untranslatable(f"comment too long: {text[:40]!r}")
    return bytes([kind, len(value)]) + value


# The fixed sets and maps: (key type, key length, nft's user data before the comment) as nft
# 1.0.6 sends them for these declarations (the key's byte order and concatenation layout).
_CONCAT_UDATA = bytes.fromhex("0004000000000308000" "40d0000000100")
_SHARED_SETS = {
    "type ipv4_addr": (TYPE_IPADDR, 4, bytes.fromhex("000402000000")),
    "type ipv4_addr . ipv4_addr": ((7 << 6) | 7, 8, _CONCAT_UDATA),
    "type ipv4_addr . inet_proto . inet_service : verdict": (
        (((7 << 6) | 12) << 6) | 13, 12, bytes.fromhex("000400000000010400000000") + _CONCAT_UDATA[6:]
        + bytes.fromhex("060400000000")),
    "type ipv4_addr . inet_proto . inet_service": ((((7 << 6) | 12) << 6) | 13, 12, _CONCAT_UDATA),
    "type inet_proto . inet_service : verdict": (
        (12 << 6) | 13, 8, bytes.fromhex("000400000000010400000000") + _CONCAT_UDATA[6:] + bytes.fromhex("060400000000")),
}
# The ip6 table's: ipv6_addr (type 8, 16 bytes) where the ip table's have ipv4_addr; same user data.
_SHARED_SETS.update({
    "type ipv6_addr": (TYPE_IP6ADDR, 16, _SHARED_SETS["type ipv4_addr"][2]),
    "type ipv6_addr . ipv6_addr": ((8 << 6) | 8, 32, _CONCAT_UDATA),
    "type ipv6_addr . inet_proto . inet_service": ((((8 << 6) | 12) << 6) | 13, 24, _CONCAT_UDATA),
    "type ipv6_addr . inet_proto . inet_service : verdict": (
        (((8 << 6) | 12) << 6) | 13, 24, _SHARED_SETS["type ipv4_addr . inet_proto . inet_service : verdict"][2]),
})
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}


# ---- the batch ----

def _element_attr(key: str, value: str) -> bytes:
    """One element's NFTA_LIST_ELEM: its key and, in a map, its data (a verdict or a value)."""
    elem = _value(1, _key(key))  # NFTA_SET_ELEM_KEY { NFTA_DATA_VALUE }
    if value:
        verdict, _, chain = value.partition(" ")
        if verdict in VERDICTS:
            if (verdict in ("jump", "goto")) != bool(chain):
                raise Untranslatable(f"element value {value!r}")
            elem += _verdict(2, verdict, chain)  # NFTA_SET_ELEM_DATA
        else:
            elem += _value(2, _key(value))
    return _ATTR.pack(4 + len(elem), 1 | NLA_F_NESTED) + elem  # NFTA_LIST_ELEM


class Batch:
    """nfnetlink messages of one transaction, between BATCH_BEGIN and BATCH_END."""

    def __init__(self, family: str, table: str) -> None:
        if family not in FAMILIES:
            raise Untranslatable(f"family {family}")
        self.family = family
        self.nfproto = FAMILIES[family]
        self.table = table
        self._table_attr = _str(1, table)  # NFTA_{CHAIN,RULE,SET,SET_ELEM_LIST}_TABLE are all 1
        self.buf = bytearray()  # the messages, one buffer: sendmsg takes at most 1024 pieces
        self.size = 0
        self.seq = 0
        self._elems: tuple[int, str] | None = None  # (message, set) of the elements being collected
        self._elem_list: list[bytes] = []
        self.command = ""  # the script line being translated
        self._elem_command = ""
        # message seq -> its script line, or (chain, rule) for a rule given as statements (its
        # text is written only for an error message: describe)
        self.origin: list[str | tuple[str, Rule]] = [""]
        self.element_list_bytes = ELEMENT_LIST_BYTES
        self._elem_bytes = 0

    def _msg(self, kind: int, flags: int, body: bytes, nfproto: int | None = None, res_id: int = 0) -> None:
        self.seq += 1
        payload = _NFGEN.pack(self.nfproto if nfproto is None else nfproto, 0, res_id) + body
        msg_type = kind if kind in (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END) else (NFNL_SUBSYS_NFTABLES << 8) | kind
        msg = _HDR.pack(_HDR.size + len(payload), msg_type, NLM_F_REQUEST | flags, self.seq, 0) + payload
        self.buf += msg
        self.origin.append(self.command)
        self.size += len(msg)

    def _flush_elements(self) -> None:
        if self._elems is None:
            return
        kind, set_name = self._elems
        command, self.command = self.command, self._elem_command
        self._msg(kind, NLM_F_CREATE if kind == NEWSETELEM else 0,
                  self._table_attr + _str(2, set_name) + _nest(3, *self._elem_list))
        self._elems, self._elem_list, self._elem_bytes, self.command = None, [], 0, command

    def chain(self, kind: int, name: str) -> None:
        self._flush_elements()
        self._msg(kind, NLM_F_CREATE if kind == NEWCHAIN else 0, self._table_attr + _str(3, name))

    def flush_chain(self, name: str) -> None:
        self._flush_elements()
        self._msg(DELRULE, 0, self._table_attr + _str(2, name))

    def rule(self, chain: str, rule: str) -> None:
        udata = b""
        text, quote, comment = rule.partition(' comment "')
        if quote:
            if not comment.endswith('"') or '"' in comment[:-1]:
                raise Untranslatable(rule)
            udata = _attr(7, _udata(0, comment[:-1]))  # NFTA_RULE_USERDATA{NFTNL_UDATA_RULE_COMMENT}
        exprs = rule_expressions(text, self.family)
        self._flush_elements()
        self._msg(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, self._table_attr + _str(2, chain) + exprs + udata)

    def rules(self, chain: str, rules: tuple[Rule, ...]) -> None:
        """`add rule ... CHAIN RULE` for each rule given as statements."""
        prefix = self._table_attr + _str(2, chain)
        for rule in rules:
            exprs = encode_rule(rule, self.family)
            self._flush_elements()
            self._msg(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, prefix + exprs)
            self.origin[-1] = (chain, rule)

    def describe(self, seq: int) -> str:
        """The script line message `seq` came from (error messages)."""
        what = self.origin[seq] if 0 <= seq < len(self.origin) else f"message {seq}"
        if isinstance(what, str):
            return what
        return f"add rule {self.family} {self.table} {what[0]} {rule_text(what[1])}"

    def table_op(self, kind: int, comment: str = "") -> None:
        self._flush_elements()
        body = self._table_attr
        if kind == NEWTABLE:
            body += _u32(2, 0) + (_attr(6, _udata(0, comment)) if comment else b"")  # FLAGS, USERDATA
        self._msg(kind, NLM_F_CREATE if kind == NEWTABLE else 0, body)

    def base_chain(self, name: str, kind: str, hook: int, priority: int) -> None:
        self._flush_elements()
        hook_attr = _nest(4, _u32(1, hook), _u32(2, priority & 0xFFFFFFFF))  # NFTA_CHAIN_HOOK
        self._msg(NEWCHAIN, NLM_F_CREATE, self._table_attr + _str(3, name) + _str(7, kind) + hook_attr)

    def shared_set(self, name: str, decl: str, comment: str, size: int = 0) -> None:
        """One of the table's fixed sets and verdict maps (kproxy.proxiers.nftables._skeleton),
        with `size N` when size (NFTA_SET_DESC_SIZE: the kernel sizes its hash for N elements
        and refuses more)."""
        key_type, key_len, udata = _SHARED_SETS[decl]
        self._flush_elements()
        body = self._table_attr + _str(2, name)
        is_map = decl.endswith(": verdict")
        body += _u32(3, NFT_SET_MAP if is_map else 0) + _u32(4, key_type) + _u32(5, key_len)
        if is_map:
            body += _u32(6, NFT_DATA_VERDICT) + _u32(7, 0)
        if size:
            body += _nest(9, _u32(1, size))  # NFTA_SET_DESC { NFTA_SET_DESC_SIZE }
        body += _u32(10, self.seq + 1) + _attr(13, udata + _udata(7, comment))
        self._msg(NEWSET, NLM_F_CREATE, body)

    def affinity_set(self, name: str, timeout_s: int, v6: bool = False) -> None:
        self._flush_elements()
        key = _u32(4, TYPE_IP6ADDR) + _u32(5, 16) if v6 else _u32(4, TYPE_IPADDR) + _u32(5, 4)
        body = (self._table_attr + _str(2, name) + _u32(3, NFT_SET_TIMEOUT | NFT_SET_EVAL) + key
                + _u32(10, self.seq + 1) + _attr(11, struct.pack("!Q", timeout_s * 1000)))
        self._msg(NEWSET, NLM_F_CREATE, body)

    def endpoint_map(self, name: str, proto: str, ipx: str = "ip") -> None:
        self._flush_elements()
        v6 = ipx == "ip6"
        udata = (_MAP_UDATA_HEAD6 if v6 else _MAP_UDATA_HEAD) + bytes([_PAYLOAD_PROTO_IDS[proto]]) + _MAP_UDATA_TAIL
        data = _u32(6, TYPE_IP6ADDR_SERVICE) + _u32(7, 20) if v6 else _u32(6, TYPE_IPADDR_SERVICE) + _u32(7, 8)
        body = (self._table_attr + _str(2, name) + _u32(3, NFT_SET_MAP) + _u32(4, TYPE_INTEGER) + _u32(5, 4)
                + data + _u32(10, self.seq + 1)
                + _attr(13, udata))
        self._msg(NEWSET, NLM_F_CREATE, body)

    def flush_set(self, name: str) -> None:
        self._flush_elements()
        self._msg(DELSETELEM, 0, self._table_attr + _str(2, name))  # no element list: all of them

    def delete_set(self, name: str) -> None:
        self._flush_elements()
        self._msg(DELSET, 0, self._table_attr + _str(2, name))

    def element(self, kind: int, set_name: str, key: str, value: str) -> None:
        self.elements(kind, ((set_name, key, value),))

    def elements(self, kind: int, elements: Iterable[tuple[str, str, str]]) -> None:
        """element() of each (set, key, value) in turn, in one loop (a full sync's 230,000)."""
        limit = self.element_list_bytes
        for set_name, key, value in elements:
            attr = _c_element(key, value) if _c_element is not None else None
            if attr is None:
                attr = _element_attr(key, value)
            size = len(attr)
            elems = self._elems
            if elems is None or elems[1] != set_name or elems[0] != kind or self._elem_bytes + size > limit:
                self._flush_elements()
                # An element given as a tuple has no line: its text, for error messages, made here.
                self._elem_command = self.command or (f"{'add' if kind == NEWSETELEM else 'delete'} element {self.family} "
                                                      f"{self.table} {set_name} {{ {key}{' : ' if value else ''}{value} }}")
                self._elems = (kind, set_name)
            self._elem_list.append(attr)
            self._elem_bytes += size

    def finish(self) -> list[bytes | bytearray]:
        self._flush_elements()
        res = socket.htons(NFNL_SUBSYS_NFTABLES)  # nfgenmsg.res_id is big-endian
        body, self.buf = self.buf, bytearray()
        self.seq += 1
        begin = _HDR.pack(_HDR.size + 4, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, 0) + _NFGEN.pack(0, 0, res)
        end = _HDR.pack(_HDR.size + 4, NFNL_MSG_BATCH_END, NLM_F_REQUEST, self.seq, 0) + _NFGEN.pack(0, 0, res)
        return [begin, body, end]


def translate(lines: Iterable[Part]) -> Batch:
    """The batch for an nft script of kproxy's grammar, every command on one table (the first
    command's); Untranslatable for anything else. After the first line, elements, rules and new
    chains may come as Parts: the same bytes as their lines."""
    batch: Batch | None = None
    head = ""
    add_element = "\0"  # "add element FAMILY TABLE ": most lines of a full sync, parsed first
    for line in lines:
        if not isinstance(line, str):
            if batch is None:
                raise Untranslatable("an element or a rule before the transaction's first line")
            batch.command = ""
            if isinstance(line, ElementRun):
                batch.elements(NEWSETELEM, line.elements)
            elif len(line) == 2:
                batch.rules(*line)
            elif len(line) == 1:
                batch.command = f"add chain{head}{line[0]}"
                batch.chain(NEWCHAIN, line[0])
            else:
                batch.element(NEWSETELEM, *line)
            continue
        for command in line.split("\n"):
            if not command:
                continue
            if batch is None:
                words = command.split(maxsplit=4)
                if len(words) < 4:
                    raise Untranslatable(command)
                batch = Batch(words[2], words[3])
                head = f" {words[2]} {words[3]} "
                add_element = f"add element{head}"
            batch.command = command
            if command.startswith(add_element) and command.endswith(" }"):
                name, _, tail = command[len(add_element):].partition(" ")
                if tail[:2] == "{ ":
                    key, _, value = tail[2:-2].partition(" : ")
                    batch.element(NEWSETELEM, name, key, value)
                    continue
            verb, _, rest = command.partition(" ")
            obj, _, rest = rest.partition(" ")
            if obj == "table":
                if rest == head[1:-1] and verb in ("add", "delete"):
                    batch.table_op(NEWTABLE if verb == "add" else DELTABLE)
                    continue
                decl = rest[len(head) - 1:] if rest.startswith(head[1:]) else ""
                if verb == "add" and decl.startswith('{ comment "') and decl.endswith('" ; }'):
                    batch.table_op(NEWTABLE, decl[11:-5])
                    continue
                raise Untranslatable(command)
            if not rest.startswith(head[1:]):
                raise Untranslatable(command)
            rest = rest[len(head) - 1:]
            name, _, tail = rest.partition(" ")
            if obj == "rule" and verb == "add":
                batch.rule(name, tail)
            elif obj == "chain" and verb == "add" and tail.startswith("{ type "):
                w = tail.split()
                if (len(w) != 9 or w[2] not in ("filter", "nat") or w[3] != "hook" or w[4] not in HOOKS
                        or w[5] != "priority" or not w[6].lstrip("-").isdigit() or w[7:] != [";", "}"]):
                    raise Untranslatable(command)
                batch.base_chain(name, w[2], HOOKS[w[4]], int(w[6]))
            elif obj in ("set", "map") and verb == "add" and tail.startswith("{ type ") and ' ; comment "' in tail:
                decl, _, comment = tail[2:].partition(' ; comment "')
                decl, sized, size = decl.partition(" ; size ")
                if (decl not in _SHARED_SETS or not comment.endswith('" ; }') or (obj == "map") != decl.endswith("verdict")
                        or (sized and not (size.isdigit() and 0 < int(size) < 1 << 32))):
                    raise Untranslatable(command)
                batch.shared_set(name, decl, comment[:-5], int(size) if sized else 0)
            elif obj == "chain" and not tail:
                if verb == "add":
                    batch.chain(NEWCHAIN, name)
                elif verb == "delete":
                    batch.chain(DELCHAIN, name)
                elif verb == "flush":
                    batch.flush_chain(name)
                else:
                    raise Untranslatable(command)
            elif obj == "element" and verb in ("add", "delete") and tail.startswith("{ ") and tail.endswith(" }"):
                key, _, value = tail[2:-2].partition(" : ")
                batch.element(NEWSETELEM if verb == "add" else DELSETELEM, name, key, value)
            elif obj == "map" and verb == "add" and tail in ENDPOINT_MAP_DECLS:
                batch.endpoint_map(name, *ENDPOINT_MAP_DECLS[tail])
            elif obj in ("set", "map") and verb == "flush" and not tail:
                batch.flush_set(name)
            elif obj in ("set", "map") and verb == "delete" and not tail:
                batch.delete_set(name)
            elif obj == "set" and verb == "add":
                words = tail.split()
                addr_type = words[2] if len(words) > 2 and words[2] in ("ipv4_addr", "ipv6_addr") else "?"
                if (words[:9] != ["{", "type", addr_type, ";", "flags", "dynamic,timeout", ";", "timeout", words[8]]
                        or words[9:] != [";", "}"] or not words[8].endswith("s") or not words[8][:-1].isdigit()):
                    raise Untranslatable(command)
                batch.affinity_set(name, int(words[8][:-1]), addr_type == "ipv6_addr")
            else:
                raise Untranslatable(command)
    if batch is None:
        raise Untranslatable("an empty transaction")
    return batch


# ---- sending ----

def netfilter_socket(netns: str | None) -> socket.socket:
    from kproxy.relay import socket_in_netns  # a socket keeps the namespace it was made in

    return socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def send(batch: Batch, netns: str | None = None) -> None:
    """Sends one batch and reads the kernel's verdict: BatchError if it refused (then nothing of
    it was applied). The kernel processes a batch inside sendmsg, so every answer is queued
    when it returns; only errors are answered (no NLM_F_ACK), and an error answer carries just
    the failing message's header (NETLINK_CAP_ACK)."""
    parts = batch.finish()
    size = sum(map(len, parts))
    if size > MAX_BATCH:
        raise BatchError(errno.EMSGSIZE, f"nfnetlink batch of {size} bytes")
    with netfilter_socket(netns) as sock:
        sock.bind((0, 0))
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            sock.setsockopt(SOL_NETLINK, opt, 1)
        if size + 4096 > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2:
            # The whole batch is one netlink message to the kernel (one skb).
            SO_SNDBUFFORCE = 32
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size + 65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sent = sock.sendmsg(parts)
        if sent != size:
            raise BatchError(errno.EIO, f"nfnetlink: sent {sent} of {size} bytes")
        errors: list[str] = []
        while True:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            errors.extend(_errors(data, batch))
    if errors:
        raise BatchError(errno.EINVAL, "; ".join(errors[:6]))


def _errors(data: bytes, batch: Batch) -> list[str]:
    out = []
    pos = 0
    while pos + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, pos)
        if length < _HDR.size:
            break
        if kind == NLMSG_ERROR and pos + _HDR.size + 4 <= len(data):
            (code,) = struct.unpack_from("=i", data, pos + _HDR.size)
            if code:
                what = batch.describe(seq)
                out.append(f"{os.strerror(-code)}: {what[:200]}")
        pos += (length + 3) & ~3
    return out

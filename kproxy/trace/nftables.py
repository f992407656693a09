"""Where does a new connection go, read from the kernel's `kube-proxy` nftables table (`nft -j list table`).

The table is read as the kernel reports it, not as kproxy renders it, so the walk keeps working
when the renderer's layout changes: every base chain of the table is run at its hook in priority
order (prerouting, then input or forward, then postrouting; output for the node's own traffic),
following jumps, gotos, verdict maps and set lookups. The JSON is untrusted-shaped input: bounded
in size and nesting, every address, port, mark and verdict parsed into a typed value, and an
expression the walker does not know is an error naming it (a wrong answer would be worse).

Forks, as in the iptables walk (kproxy.trace.iptables): `numgen random` matches and verdict maps
split the walk by the share of the random numbers each branch takes, so every endpoint is listed
with its probability; a lookup in a dynamic set (ClientIP affinity, filled by `update @set`) takes
both branches, the hit marked as "affinity" (an entry a previous connection left sends the client
there). Kubernetes names come from the chain names (upstream's "service-HASH-ns/name/proto/port").
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from kproxy.protocols import IP_PROTOCOLS
from kproxy.trace.iptables import (MAX_BRANCHES, MAX_DEPTH, MAX_DUMP_BYTES, Outcome, Path, TraceError,
                                   service_of_comment)


__all__ = ["NftTracer", "Ruleset", "parse"]

MAX_RULE_EXPRS = 256
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network
# A typed value: an address, a number (port, mark, numgen result), a name (protocol "tcp", fib
# type "local", ct state "new"), or a concatenation of those.
Scalar = IP | int | str
Value = Scalar | tuple[Scalar, ...]
_PROTOS = IP_PROTOCOLS
_PROTO_NAMES = {v: k for k, v in _PROTOS.items()}
_NAME = re.compile(r"^[A-Za-z0-9_.:/@-]{1,256}$")
# upstream's chain names: PREFIX-HASH-namespace/name/protocol/port, "__ip/port" after for endpoints.
_SPN_CHAIN = re.compile(r"^(?:service|local|external|firewall|endpoint)-[A-Z2-7]{8}-"
                        r"([a-z0-9][a-z0-9.-]{0,252})/([a-z0-9][a-z0-9-]{0,62})/[a-z]+/([a-z0-9-]{0,63})(?:__|$)")
_VERDICTS = ("accept", "drop", "return", "continue", "jump", "goto")


@dataclass(frozen=True)
class Element:
    """A set or map element: a value, a prefix or a range per concatenated field."""

    parts: tuple[Scalar | Net | tuple[Scalar, Scalar], ...]
    verdict: Verdict | None = None

    def exact(self) -> Value | None:
        """The element as one value when it is exact (hashable lookup), else None."""
        if any(isinstance(p, (ipaddress.IPv4Network, ipaddress.IPv6Network, tuple)) for p in self.parts):
            return None
        vals = tuple(p for p in self.parts if not isinstance(p, (ipaddress.IPv4Network, ipaddress.IPv6Network, tuple)))
        return vals[0] if len(vals) == 1 else vals


@dataclass(frozen=True)
class Verdict:
    kind: str  # accept drop return continue jump goto
    target: str = ""
    service: str = ""  # namespace/name:port from the map element's comment, if any


@dataclass
class NftSet:
    name: str
    dynamic: bool  # filled by the datapath (`update @set`): its content is per client and per moment
    exact: dict[Value, Verdict | None] = field(default_factory=dict)
    other: list[Element] = field(default_factory=list)
    data: dict[Value, str] = field(default_factory=dict)  # a map to addresses: key -> "ip:port"

    def lookup(self, value: Value) -> tuple[bool, Verdict | None]:
        key = value
        if key in self.exact:
            return True, self.exact[key]
        for el in self.other:
            if _element_has(el, value):
                return True, el.verdict
        return False, None


@dataclass(frozen=True)
class Expr:
    """A parsed expression of a rule: `kind` names it, the rest is its typed operands."""

    kind: str  # match, vmap, verdict, reject, dnat, snat, masquerade, redirect, mark, nop
    left: Callable[[Packet], Value | NumgenRef] | None = None
    op: str = "=="
    right: Operand | None = None
    verdict: Verdict | None = None
    addr: str = ""
    port: int = 0
    text: str = ""


@dataclass(frozen=True)
class NumgenRef:
    """`numgen random mod N offset O`: its value is any of O..O+N-1, equally likely."""

    mod: int
    offset: int


@dataclass(frozen=True)
class Operand:
    """The right side of a match or the data of a vmap: a named set, an anonymous set, or a value."""

    set_name: str = ""
    elements: tuple[Element, ...] = ()


@dataclass(frozen=True)
class Rule:
    chain: str
    exprs: tuple[Expr, ...]
    text: str  # for errors and hops


@dataclass(frozen=True)
class BaseChain:
    name: str
    type: str
    hook: str
    prio: int
    policy: str


@dataclass
class Ruleset:
    family: str
    table: str
    base: list[BaseChain] = field(default_factory=list)
    chains: dict[str, list[Rule]] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)


@dataclass
class Packet:
    src: IP
    dst: IP
    dport: int
    proto: str
    local_src: bool
    mark: int = 0
    dnat: str = ""  # "ip:port" once DNATed
    masquerade: bool = False
    probability: float = 1.0
    affinity: bool = False
    current: bool = False  # on an affinity branch: the client's entry is in the set now
    service: str = ""
    hops: tuple[str, ...] = ()


# ---- parsing -------------------------------------------------------------------------------

def _bad(what: str, obj: object) -> TraceError:
    return TraceError(f"nft ruleset: {what}: {json.dumps(obj, default=str)[:200]}")


def _str(obj: object, what: str) -> str:
    if not isinstance(obj, str) or not _NAME.match(obj):
        raise _bad(f"{what} is not a name", obj)
    return obj


def _int(obj: object, what: str, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not lo <= obj <= hi:
        raise _bad(f"{what} is not a number in {lo}..{hi}", obj)
    return obj


def _dict(obj: object, what: str) -> dict[str, object]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise _bad(f"{what} is not an object", obj)
    return obj


def _single(obj: object, what: str) -> tuple[str, object]:
    d = _dict(obj, what)
    if len(d) != 1:
        raise _bad(f"{what} is not a one-key object", obj)
    return next(iter(d.items()))


def _scalar(obj: object) -> Scalar:
    """A literal of the JSON: an address, a number, or a name (a protocol, a fib type, a ct state)."""
    if isinstance(obj, bool):
        raise _bad("a boolean where a value belongs", obj)
    if isinstance(obj, int):
        return _int(obj, "value", 0, (1 << 64) - 1)
    if isinstance(obj, str):
        try:
            return ipaddress.ip_address(obj)
        except ValueError:
            pass
        if not _NAME.match(obj):
            raise _bad("a value that is neither an address, a number nor a name", obj)
        return _PROTO_NAMES.get(int(obj), obj) if obj.isdigit() else obj
    raise _bad("a value of unexpected type", obj)


def _part(obj: object) -> Scalar | Net | tuple[Scalar, Scalar]:
    if isinstance(obj, dict):
        key, body = _single(obj, "value")
        if key == "prefix":
            b = _dict(body, "prefix")
            try:
                return ipaddress.ip_network(f"{_str(b.get('addr'), 'prefix address')}/{_int(b.get('len'), 'prefix length', 0, 128)}",
                                            strict=False)
            except ValueError:
                raise _bad("bad prefix", obj) from None
        if key == "range" and isinstance(body, list) and len(body) == 2:
            return (_scalar(body[0]), _scalar(body[1]))
        raise _bad("unknown value", obj)
    return _scalar(obj)


def _element(obj: object, is_map: bool) -> Element:
    verdict = None
    if is_map:
        if not isinstance(obj, list) or len(obj) != 2:
            raise _bad("map element is not [key, value]", obj)
        obj, data = obj
        verdict = _verdict(data)
    if isinstance(obj, dict) and "elem" in obj:  # {"elem": {"val": ..., "timeout": ..., "comment": ...}}
        elem = _dict(obj["elem"], "element")
        obj = elem.get("val")
        comment = elem.get("comment")
        if verdict is not None and isinstance(comment, str):
            # upstream names the Service in each map element's comment ("ns/name:port")
            verdict = replace(verdict, service=service_of_comment(comment))
    if isinstance(obj, dict) and "concat" in obj:
        items = obj["concat"]
        if not isinstance(items, list) or not items:
            raise _bad("bad concatenation", obj)
        return Element(tuple(_part(i) for i in items), verdict)
    return Element((_part(obj),), verdict)


def _verdict(obj: object) -> Verdict:
    key, body = _single(obj, "verdict")
    if key not in _VERDICTS:
        raise _bad("unknown verdict", obj)
    if key in ("jump", "goto"):
        return Verdict(key, _str(_dict(body, "verdict").get("target"), "chain name"))
    return Verdict(key)


def _operand(obj: object, is_map: bool) -> Operand:
    if isinstance(obj, str) and obj.startswith("@"):
        return Operand(set_name=_str(obj[1:], "set name"))
    if isinstance(obj, dict) and "set" in obj:
        items = obj["set"]
        if not isinstance(items, list):
            raise _bad("bad anonymous set", obj)
        return Operand(elements=tuple(_element(i, is_map) for i in items))
    if isinstance(obj, list) and not is_map:  # flags: ["new", "established"]
        return Operand(elements=tuple(_element(i, False) for i in obj))
    return Operand(elements=(_element(obj, is_map),))


def _payload(proto: str, fld: str) -> Callable[[Packet], Value]:
    if proto in ("ip", "ip6") and fld == "saddr":
        return lambda p: p.src
    if proto in ("ip", "ip6") and fld == "daddr":
        return lambda p: _cur_dst(p)
    if proto in ("th", "tcp", "udp", "sctp") and fld == "dport":
        if proto == "th":
            return lambda p: _cur_dport(p)
        # `tcp dport 80` also means "is TCP": -1 never equals a port.
        return lambda p: _cur_dport(p) if p.proto == proto else -1
    raise TraceError(f"nft ruleset: the walk does not know the field {proto} {fld}")


def _left(obj: object, local: Callable[[IP], bool]) -> Callable[[Packet], Value | NumgenRef]:
    key, body = _single(obj, "expression")
    if key == "payload":
        b = _dict(body, "payload")
        return _payload(_str(b.get("protocol"), "protocol"), _str(b.get("field"), "field"))
    if key == "meta":
        mkey = _dict(body, "meta").get("key")
        if mkey == "l4proto":
            return lambda p: p.proto
        if mkey == "mark":
            return lambda p: p.mark
        if mkey == "nfproto":
            return lambda p: "ipv4" if p.dst.version == 4 else "ipv6"
        raise _bad("unknown meta key", obj)
    if key == "ct":
        ckey = _dict(body, "ct").get("key")
        if ckey == "state":  # a new connection: the first packet, before any reply
            return lambda p: "new"
        if ckey == "status":
            return lambda p: "dnat" if p.dnat else ""
        raise _bad("unknown ct key", obj)
    if key == "fib":
        b = _dict(body, "fib")
        flags = b.get("flags")
        if b.get("result") != "type" or flags not in (["saddr"], ["daddr"], "saddr", "daddr"):
            raise _bad("unknown fib lookup", obj)
        which = flags[0] if isinstance(flags, list) else flags
        if which == "saddr":
            return lambda p: "local" if local(p.src) else "unicast"
        return lambda p: "local" if local(_cur_dst(p)) else "unicast"
    if key == "numgen":
        b = _dict(body, "numgen")
        if b.get("mode") != "random":
            raise _bad("numgen other than random", obj)
        ref = NumgenRef(_int(b.get("mod"), "numgen mod", 1, 1 << 16), _int(b.get("offset", 0), "numgen offset"))
        return lambda p: ref
    if key == "concat":
        if not isinstance(body, list) or not body:
            raise _bad("bad concatenation", obj)
        parts = [_left(b, local) for b in body]

        def concat(p: Packet) -> Value:
            vals = [f(p) for f in parts]
            if any(isinstance(v, (tuple, NumgenRef)) for v in vals):
                raise TraceError("nft ruleset: numgen or nested concatenation inside a concatenation")
            return tuple(v for v in vals if not isinstance(v, (tuple, NumgenRef)))
        return concat
    if key in ("&", "|", "^") and isinstance(body, list) and len(body) == 2:
        inner = _left(body[0], local)
        mask = _int(body[1], "bit mask")
        op: Callable[[int, int], int] = {"&": int.__and__, "|": int.__or__, "^": int.__xor__}[key]

        def bits(p: Packet) -> Value:
            v = inner(p)
            if not isinstance(v, int):
                raise TraceError(f"nft ruleset: bit operation on a non-number: {json.dumps(obj)[:200]}")
            return op(v, mask)
        return bits
    raise _bad("the walk does not know this expression", obj)


def _expr(obj: object, local: Callable[[IP], bool]) -> Expr:
    key, body = _single(obj, "statement")
    if key == "match":
        b = _dict(body, "match")
        op = b.get("op", "==")
        if op not in ("==", "!=", "in"):
            raise _bad("unknown match operator", obj)
        return Expr("match", left=_left(b.get("left"), local), op=str(op), right=_operand(b.get("right"), False))
    if key == "vmap":
        b = _dict(body, "vmap")
        return Expr("vmap", left=_left(b.get("key"), local), right=_operand(b.get("data"), True))
    if key in _VERDICTS:
        return Expr("verdict", verdict=_verdict(obj))
    if key == "reject":
        return Expr("reject")
    if key == "dnat" and isinstance(body, dict) and isinstance(body.get("addr"), dict):
        # dnat ip addr . port to numgen random mod N offset O map @m
        m = _dict(_dict(body.get("addr"), "DNAT address").get("map"), "DNAT map")
        data = m.get("data")
        if "port" in body or not isinstance(data, str) or not data.startswith("@"):
            raise _bad("DNAT through something other than a named map", obj)
        return Expr("dnat", left=_left(m.get("key"), local), text=_str(data[1:], "map name"))
    if key in ("dnat", "redirect"):
        b = _dict(body, key) if body is not None else {}
        addr = "127.0.0.1" if key == "redirect" else str(_scalar(b.get("addr")))
        if key == "dnat" and not isinstance(_scalar(b.get("addr")), (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise _bad("DNAT to something not an address", obj)
        return Expr("dnat", addr=addr, port=_int(b.get("port"), "DNAT port", 1, 65535))
    if key in ("masquerade", "snat"):
        return Expr("masquerade")
    if key == "mangle":
        b = _dict(body, "mangle")
        if b.get("key") != {"meta": {"key": "mark"}}:
            raise _bad("the walk changes no field but the mark", obj)
        val = b.get("value")
        if isinstance(val, int):
            return Expr("mark", op="=", port=_int(val, "mark"))
        vkey, vbody = _single(val, "mark value")
        if vkey not in ("&", "|", "^") or not isinstance(vbody, list) or len(vbody) != 2 or \
                vbody[0] != {"meta": {"key": "mark"}}:
            raise _bad("unknown mark operation", obj)
        return Expr("mark", op=vkey, port=_int(vbody[1], "mark"))
    if key in ("counter", "log", "set", "notrack", "limit", "quota"):
        # No effect on where a new connection goes (`set update` records affinity for later ones;
        # a limit or quota is not something kproxy programs: taken as not reached).
        return Expr("nop", text=key)
    raise _bad("the walk does not know this statement", obj)


def _load(dump: str) -> list[object]:
    if len(dump) > MAX_DUMP_BYTES:
        raise TraceError(f"nft ruleset of {len(dump)} bytes is over the {MAX_DUMP_BYTES} limit")
    try:
        doc = json.loads(dump)
    except RecursionError:  # the decoder's answer to nesting deeper than its stack
        raise TraceError("nft ruleset: JSON nested too deep") from None
    except ValueError as e:
        raise TraceError(f"nft ruleset: not JSON: {e}") from None
    items = _dict(doc, "document").get("nftables")
    if not isinstance(items, list):
        raise TraceError("nft ruleset: no \"nftables\" list")
    return items


def parse(dump: str, local: Callable[[IP], bool], family: str = "ip", table: str = "kube-proxy") -> Ruleset:
    """`nft -j list table FAMILY TABLE` -> the typed ruleset of that table (other tables ignored)."""
    rs = Ruleset(family, table)
    for item in _load(dump):
        kind, body = _single(item, "ruleset item")
        if kind in ("metainfo", "table"):
            continue
        b = _dict(body, kind)
        if b.get("family") != family or b.get("table") != table:
            continue
        name = _str(b.get("name") if kind != "rule" else b.get("chain"), f"{kind} name")
        if kind == "chain":
            rs.chains.setdefault(name, [])
            if "hook" in b:
                prio = b.get("prio")
                rs.base.append(BaseChain(name, _str(b.get("type"), "chain type"), _str(b.get("hook"), "hook"),
                                         _int(prio, "priority", -(1 << 31), (1 << 31) - 1),
                                         _str(b.get("policy", "accept"), "policy")))
        elif kind == "rule":
            exprs = b.get("expr")
            if not isinstance(exprs, list) or len(exprs) > MAX_RULE_EXPRS:
                raise _bad("rule without a bounded expression list", body)
            text = json.dumps(exprs)[:300]
            rs.chains.setdefault(name, []).append(Rule(name, tuple(_expr(e, local) for e in exprs), text))
        elif kind in ("set", "map"):
            flags = b.get("flags", [])
            flags = [flags] if isinstance(flags, str) else flags
            if not isinstance(flags, list):
                raise _bad("bad set flags", body)
            s = NftSet(name, dynamic="dynamic" in flags or "timeout" in flags)
            elems = b.get("elem", [])
            if not isinstance(elems, list):
                raise _bad("bad elements", body)
            if kind == "map" and b.get("map") != "verdict":
                # A map to "address . port" (kproxy's endpoint maps, `dnat ... map @m`).
                for raw in elems:
                    if not isinstance(raw, list) or len(raw) != 2:
                        raise _bad("map element is not [key, value]", raw)
                    key = Element((_part(raw[0]),)).exact()
                    parts = _dict(raw[1], "map data").get("concat")
                    if key is None or not isinstance(parts, list) or len(parts) != 2:
                        raise _bad("map data is not address . port", raw)
                    ip = _scalar(parts[0])
                    if not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                        raise _bad("map data is not address . port", raw)
                    port = _int(parts[1], "DNAT port", 1, 65535)
                    s.data[key] = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
                rs.sets[name] = s
                continue
            for raw in elems:
                el = _element(raw, kind == "map")
                key = el.exact()
                if key is not None:
                    s.exact[key] = el.verdict
                else:
                    s.other.append(el)
            rs.sets[name] = s
    return rs


# ---- the walk ------------------------------------------------------------------------------

def _cur_dst(p: Packet) -> IP:
    return ipaddress.ip_address(p.dnat.rsplit(":", 1)[0].strip("[]")) if p.dnat else p.dst


def _cur_dport(p: Packet) -> int:
    return int(p.dnat.rsplit(":", 1)[1]) if p.dnat else p.dport


def _part_has(part: Scalar | Net | tuple[Scalar, Scalar], v: Scalar) -> bool:
    if isinstance(part, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)) and v in part
    if isinstance(part, tuple):
        lo, hi = part
        try:
            return bool(lo <= v <= hi)  # type: ignore[operator]
        except TypeError:
            return False
    if isinstance(part, str) and isinstance(v, int):  # "tcp" against 6
        return _PROTOS.get(part) == v
    return part == v


def _element_has(el: Element, value: Value) -> bool:
    vals = value if isinstance(value, tuple) else (value,)
    return len(vals) == len(el.parts) and all(_part_has(p, v) for p, v in zip(el.parts, vals))


def _set_mark(op: str, mark: int, value: int) -> int:
    if op == "&":
        return mark & value
    if op == "|":
        return mark | value
    if op == "^":
        return mark ^ value
    return value


def _service(chain: str) -> str:
    m = _SPN_CHAIN.match(chain)
    return f"{m.group(1)}/{m.group(2)}:{m.group(3)}" if m else ""


class NftTracer:
    def __init__(self, dump: str, local_ips: set[str], family: str = "ip", table: str = "kube-proxy") -> None:
        self.local_ips = local_ips
        self.rs = parse(dump, self._is_local, family, table)
        if not self.rs.base:
            raise TraceError(f"nft ruleset: table {family} {table} has no base chains")

    def _is_local(self, ip: IP) -> bool:
        return str(ip) in self.local_ips or ip.is_loopback

    def _set(self, name: str) -> NftSet:
        s = self.rs.sets.get(name)
        if s is None:
            raise TraceError(f"nft ruleset: a rule uses set @{name}, which the table does not have")
        return s

    def _lookup(self, operand: Operand, value: Value) -> list[tuple[float, bool, Verdict | None]]:
        """(share of the packets, matched, verdict) for a value (or a numgen) against an operand."""
        if operand.set_name:
            s = self._set(operand.set_name)
            if s.dynamic:
                return [(1.0, False, None), (1.0, True, None)]  # both: see the module docstring
            hit, verdict = s.lookup(value)
            return [(1.0, hit, verdict)]
        for el in operand.elements:
            if _element_has(el, value):
                return [(1.0, True, el.verdict)]
        return [(1.0, False, None)]

    def _evaluate(self, e: Expr, p: Packet) -> list[tuple[float, bool, Verdict | None]]:
        assert e.left is not None and e.right is not None
        v = e.left(p)
        if isinstance(v, NumgenRef):
            counts: dict[tuple[bool, Verdict | None], int] = {}
            for n in range(v.offset, v.offset + v.mod):
                for _, hit, verdict in self._lookup(e.right, n):
                    counts[(hit, verdict)] = counts.get((hit, verdict), 0) + 1
            return [(c / v.mod, hit, verdict) for (hit, verdict), c in counts.items()]
        return self._lookup(e.right, v)

    def run_chain(self, chain: str, pkt: Packet, depth: int = 0) -> list[tuple[Packet, str]]:
        """(packet, verdict) pairs; verdict "" means the chain returned to its caller."""
        if depth >= MAX_DEPTH:
            raise TraceError(f"nft ruleset: jumps nested deeper than {MAX_DEPTH} at {chain} (a loop?)")
        if chain not in self.rs.chains:
            raise TraceError(f"nft ruleset: a rule jumps to chain {chain}, which the table does not have")
        pkt = replace(pkt, service=pkt.service or _service(chain))
        live, done = [pkt], []
        for rule in self.rs.chains[chain]:
            nxt: list[Packet] = []
            for p in live:
                cont, fin = self._rule(rule, p, depth)
                nxt.extend(cont)
                done.extend(fin)
            live = nxt
            if len(live) + len(done) >= MAX_BRANCHES:
                raise TraceError(f"more than {MAX_BRANCHES} paths through {chain}")
        done.extend((p, "") for p in live)
        return done

    def _rule(self, rule: Rule, pkt: Packet, depth: int) -> tuple[list[Packet], list[tuple[Packet, str]]]:
        """(packets going on to the next rule, packets with a verdict or returning)."""
        cont: list[Packet] = []
        fin: list[tuple[Packet, str]] = []
        branches = [pkt]
        hop = f"{self.rs.table}/{rule.chain}"
        if pkt.hops and pkt.hops[-1] == hop:  # one hop per chain visit, however many of its rules matched
            pkt = replace(pkt, hops=pkt.hops[:-1])
        for e in rule.exprs:
            nxt: list[Packet] = []
            for p in branches:
                if e.kind == "match":
                    for share, hit, _ in self._evaluate(e, p):
                        q = replace(p, probability=p.probability * share) if share < 1.0 else p
                        if (hit if e.op != "!=" else not hit):
                            nxt.append(replace(q, affinity=True, current=self._member_now(e, q))
                                       if share == 1.0 and self._is_dynamic(e) and hit else q)
                        else:
                            cont.append(q)
                elif e.kind == "vmap":
                    for share, hit, verdict in self._evaluate(e, p):
                        q = replace(p, probability=p.probability * share, hops=(*p.hops, hop))
                        if not hit or verdict is None:
                            cont.append(replace(q, hops=p.hops))  # a lookup miss: the rule does not match
                        else:
                            self._verdict(verdict, q, depth, cont, fin)
                elif e.kind == "verdict":
                    assert e.verdict is not None
                    self._verdict(e.verdict, replace(p, hops=(*p.hops, hop)), depth, cont, fin)
                elif e.kind == "reject":
                    fin.append((replace(p, hops=(*p.hops, hop)), "REJECT"))
                elif e.kind == "dnat" and e.left is not None:
                    self._dnat_map(e, p, hop, cont, fin)
                elif e.kind == "dnat":
                    ip = ipaddress.ip_address(e.addr)
                    dest = f"[{ip}]:{e.port}" if ip.version == 6 else f"{ip}:{e.port}"
                    fin.append((replace(p, dnat=dest, hops=(*p.hops, hop)), "ACCEPT"))  # NAT ends the base chain
                elif e.kind == "masquerade":
                    fin.append((replace(p, masquerade=True, hops=(*p.hops, hop)), "ACCEPT"))
                elif e.kind == "mark":
                    nxt.append(replace(p, mark=_set_mark(e.op, p.mark, e.port)))
                else:
                    nxt.append(p)
            branches = nxt
        # Every statement ran without a verdict: on to the next rule.
        cont.extend(replace(p, hops=(*p.hops, hop)) for p in branches)
        return cont, fin

    def _dnat_map(self, e: Expr, p: Packet, hop: str, cont: list[Packet], fin: list[tuple[Packet, str]]) -> None:
        """DNAT to the map's data for the key: each numgen value a fork of its share; a key the
        map lacks makes the rule not match (the kernel's lookup breaks it)."""
        assert e.left is not None
        data = self._set(e.text).data
        v = e.left(p)
        keys: list[Value] = list(range(v.offset, v.offset + v.mod)) if isinstance(v, NumgenRef) else [v]
        counts: dict[str, int] = {}
        for k in keys:
            dest = data.get(k, "")
            counts[dest] = counts.get(dest, 0) + 1
        for dest, c in counts.items():
            q = replace(p, probability=p.probability * c / len(keys)) if c < len(keys) else p
            if dest:
                fin.append((replace(q, dnat=dest, hops=(*q.hops, hop)), "ACCEPT"))  # NAT ends the base chain
            else:
                cont.append(q)

    def _member_now(self, e: Expr, p: Packet) -> bool:
        """Whether the dynamic set holds this packet's key now (an affinity entry not yet expired)."""
        assert e.left is not None and e.right is not None
        v = e.left(p)
        return not isinstance(v, NumgenRef) and self._set(e.right.set_name).lookup(v)[0]

    def _is_dynamic(self, e: Expr) -> bool:
        return e.right is not None and bool(e.right.set_name) and self._set(e.right.set_name).dynamic

    def _verdict(self, v: Verdict, p: Packet, depth: int, cont: list[Packet], fin: list[tuple[Packet, str]]) -> None:
        if v.service and not p.service:
            p = replace(p, service=v.service)
        if v.kind == "continue":
            cont.append(p)
        elif v.kind in ("accept", "drop"):
            fin.append((p, v.kind.upper()))
        elif v.kind == "return":
            fin.append((p, "RETURN"))
        else:
            for p2, verdict in self.run_chain(v.target, p, depth + 1):
                if verdict in ("", "RETURN"):
                    if v.kind == "jump":
                        cont.append(p2)
                    else:
                        fin.append((p2, "RETURN"))  # goto: the called chain's return is ours
                else:
                    fin.append((p2, verdict))

    def _hook(self, hook: str, packets: Iterable[Packet], types: Sequence[str] = ("filter", "nat", "route")) -> list[tuple[Packet, str]]:
        """Every base chain at a hook in priority order; "" for packets that pass the hook."""
        chains = sorted((c for c in self.rs.base if c.hook == hook and c.type in types), key=lambda c: c.prio)
        live = list(packets)
        done: list[tuple[Packet, str]] = []
        for c in chains:
            nxt: list[Packet] = []
            for p in live:
                for p2, verdict in self.run_chain(c.name, p):
                    if verdict in ("", "RETURN"):
                        verdict = c.policy.upper()
                    if verdict == "ACCEPT":
                        nxt.append(p2)
                    else:
                        done.append((p2, verdict))
            live = nxt
        return done + [(p, "") for p in live]

    def paths(self, src: str, dst: str, dport: int, proto: str = "tcp") -> list[Path]:
        """Every way a new connection arriving at (or, if src is local, leaving) the node can go."""
        try:
            s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        except ValueError as e:
            raise TraceError(str(e)) from None
        pkt = Packet(s, d, dport, proto, local_src=src in self.local_ips)
        result: list[tuple[Packet, str]] = []
        if pkt.local_src:
            stages = ["output", "postrouting"]
        else:
            stages = ["prerouting", "route", "postrouting"]
        live = [pkt]
        for stage in stages:
            nxt: list[Packet] = []
            if stage == "route":
                forward = [p for p in live if not self._is_local(_cur_dst(p))]
                for p, v in self._hook("input", [p for p in live if self._is_local(_cur_dst(p))]):
                    # Delivered to a local socket: no postrouting.
                    result.append((p, v or "ACCEPT"))
                out = self._hook("forward", forward)
            else:
                out = self._hook(stage, live)
            for p, v in out:
                if v:
                    result.append((p, v))
                else:
                    nxt.append(p)
            live = nxt
        if pkt.local_src:
            # The node's own connection to one of its addresses comes back in through loopback:
            # the filter chains of prerouting and input see it (NAT was decided on the way out).
            looped = [p for p in live if self._is_local(_cur_dst(p))]
            result.extend((p, "ACCEPT") for p in live if not self._is_local(_cur_dst(p)))
            for stage in ("prerouting", "input"):
                nxt = []
                for p, v in self._hook(stage, looped, ("filter",)):
                    if v:
                        result.append((p, v))
                    else:
                        nxt.append(p)
                looped = nxt
            result.extend((p, "ACCEPT") for p in looped)
        else:
            result.extend((p, "ACCEPT") for p in live)
        return [Path(Outcome(v, p.dnat, p.masquerade and v == "ACCEPT"), p.probability, p.affinity, p.service, p.hops,
                     p.current) for p, v in result]

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp") -> set[Outcome]:
        return {p.outcome for p in self.paths(src, dst, dport, proto)}

"""Where does a new connection go, read from an iptables-save dump of the node's nat and filter tables.

The walk follows upstream's pkg/proxy/iptables/proxier_test.go tracePacket (nat PREROUTING or
OUTPUT, then filter, then nat POSTROUTING for the masquerade mark), written from scratch. The
dump is what the kernel reports back, so it is parsed as untrusted text: bounded in size, every
address, port and mark validated into a typed value, and a bad line is an error naming it.

Probabilistic rules (-m statistic) and affinity checks (-m recent --rcheck) fork the walk into
"matched" and "not matched" branches, so the result lists every endpoint a connection can reach,
each with its probability. Kubernetes names come from kproxy's rule comments ("ns/svc:port ...").
"""
from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace

MAX_DUMP_BYTES = 256 << 20  # tens of MiB at 10,000 Services; more is not a kproxy node's dump
MAX_LINE = 8192
MAX_BRANCHES = 4096
MAX_DEPTH = 32
_CHAIN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# "ns/name:port" (port name may be empty) at the start of kproxy's comments.
_SPN = re.compile(r"^([a-z0-9][a-z0-9.-]{0,252})/([a-z0-9][a-z0-9-]{0,62}):([a-z0-9-]{0,63})(?=\s|$)")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class TraceError(ValueError):
    """The state read is not something the tracer can follow (bad line, loop, too large)."""


@dataclass(frozen=True)
class Match:
    opt: str
    neg: bool
    nets: tuple[Net, ...] = ()
    text: str = ""
    number: int = 0
    mask: int = 0xFFFFFFFF
    prob: float = 0.0
    flags: str = ""  # -m set: which packet fields, "dst,dst"


@dataclass
class Rule:
    chain: str
    raw: str
    matches: list[Match]
    target: str = ""
    target_args: dict[str, str] = field(default_factory=dict)
    comment: str = ""
    goto: bool = False  # -g: when the target chain returns, this chain returns too


@dataclass
class Packet:
    src: str
    dst: str
    dport: int
    proto: str = "tcp"
    mark: int = 0
    dnat: str = ""  # "ip:port" once DNATed
    probability: float = 1.0
    affinity: bool = False
    service: str = ""
    hops: tuple[str, ...] = ()

    @property
    def cur_dst(self) -> str:
        return self.dnat.rsplit(":", 1)[0].strip("[]") if self.dnat else self.dst

    @property
    def cur_dport(self) -> int:
        return int(self.dnat.rsplit(":", 1)[1]) if self.dnat else self.dport


@dataclass(frozen=True)
class Outcome:
    verdict: str  # ACCEPT, DROP, REJECT
    endpoint: str  # "ip:port" after DNAT, "" when not DNATed
    masquerade: bool


@dataclass(frozen=True)
class Path:
    """One way a new connection can go, with what decided it."""

    outcome: Outcome
    probability: float
    affinity: bool  # an existing ClientIP affinity entry sends the client here
    service: str  # namespace/name:port from the rules' comments, "" when no Service rule matched
    hops: tuple[str, ...]  # table/chain of each rule that matched, in order
    # affinity paths: the entry exists right now for this client (nftables' sets list their
    # members), so its next connection goes here; False where the state is not readable.
    current: bool = False


def _int(text: str, what: str, line: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise TraceError(f"bad {what} {text!r} in: {line[:200]}") from None


def _nets(text: str, line: str) -> tuple[Net, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in text.split(",") if v)
    except ValueError:
        raise TraceError(f"bad address {text!r} in: {line[:200]}") from None


def parse(dump: str) -> dict[str, dict[str, list[Rule]]]:
    """iptables-save (or restore input) -> table -> chain -> rules."""
    if len(dump) > MAX_DUMP_BYTES:
        raise TraceError(f"ruleset dump of {len(dump)} bytes is over the {MAX_DUMP_BYTES} limit")
    tables: dict[str, dict[str, list[Rule]]] = {}
    table: dict[str, list[Rule]] = {}
    for line in dump.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if len(line) > MAX_LINE:
            raise TraceError(f"ruleset line of {len(line)} characters: {line[:80]}...")
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            name = line[1:].split()[0] if line[1:].split() else ""
            if not _CHAIN.match(name):
                raise TraceError(f"bad chain name in: {line[:200]}")
            table.setdefault(name, [])
        elif line.startswith("-A "):
            rule = _parse_rule(line)
            table.setdefault(rule.chain, []).append(rule)
    return tables


def _parse_rule(line: str) -> Rule:
    try:
        toks = shlex.split(line)
    except ValueError:
        raise TraceError(f"unbalanced quotes in: {line[:200]}") from None
    if len(toks) < 2 or not _CHAIN.match(toks[1]):
        raise TraceError(f"bad chain name in: {line[:200]}")
    rule = Rule(chain=toks[1], raw=line, matches=[])
    i, neg = 2, False
    while i < len(toks):
        t = toks[i]
        if t == "!":
            neg = True
            i += 1
            continue
        if t in ("-j", "--jump", "-g", "--goto"):
            if i + 1 >= len(toks):
                raise TraceError(f"no target in: {line[:200]}")
            rule.target = toks[i + 1]
            rule.goto = t in ("-g", "--goto")
            i += 2
            while i < len(toks):  # target options run to the end of the line
                key = toks[i]
                val = toks[i + 1] if i + 1 < len(toks) and not toks[i + 1].startswith("--") else ""
                rule.target_args[key] = val
                i += 2 if val else 1
            break
        if t == "-m":
            i += 2  # the module name; its options follow as ordinary options
            continue
        values = []
        j = i + 1
        while j < len(toks) and not toks[j].startswith("-") and toks[j] != "!":
            values.append(toks[j])
            j += 1
        if t == "--comment" and values:
            rule.comment = values[0]
        else:
            rule.matches.append(_typed(t, neg, values, line))
        neg = False
        i = j
    return rule


def _typed(opt: str, neg: bool, values: list[str], line: str) -> Match:
    first = values[0] if values else ""
    if opt in ("-s", "--source", "-d", "--destination"):
        return Match("-s" if opt in ("-s", "--source") else "-d", neg, nets=_nets(first, line))
    if opt in ("--dport", "--sport"):
        port = _int(first.split(":")[0], "port", line)
        if not 0 <= port <= 65535:
            raise TraceError(f"bad port {first!r} in: {line[:200]}")
        return Match(opt, neg, number=port)
    if opt == "--mark":
        v, _, m = first.partition("/")
        return Match(opt, neg, number=_int(v, "mark", line), mask=_int(m, "mark", line) if m else 0xFFFFFFFF)
    if opt == "--probability":
        try:
            prob = float(first)
        except ValueError:
            raise TraceError(f"bad probability {first!r} in: {line[:200]}") from None
        if not 0.0 <= prob <= 1.0:
            raise TraceError(f"bad probability {first!r} in: {line[:200]}")
        return Match(opt, neg, prob=prob)
    if opt == "--match-set":
        if len(values) != 2 or not _CHAIN.match(values[0]) or not re.fullmatch(r"(src|dst)(,(src|dst)){0,5}", values[1]):
            raise TraceError(f"bad set match {' '.join(values)!r} in: {line[:200]}")
        return Match(opt, neg, text=values[0], flags=values[1])
    return Match(opt, neg, text=first)


# (set name, flags "dst,dst", packet) -> is the packet's (dst ip, dst port) in the set (ipset)
SetLookup = Callable[[str, str, "Packet"], bool]


class Tracer:
    def __init__(self, dump: str, local_ips: set[str], sets: SetLookup | None = None) -> None:
        self.tables = parse(dump)
        self.local_ips = local_ips
        self.sets = sets

    def _is_local(self, ip: str) -> bool:
        return ip in self.local_ips or ip.startswith("127.")

    def _match(self, m: Match, pkt: Packet, table: str) -> bool | None:
        """True/False, or None for "either" (statistic, recent --rcheck)."""
        if m.opt == "-s":
            src = ipaddress.ip_address(pkt.src)
            return any(src in n for n in m.nets)
        if m.opt == "-d":
            dst = ipaddress.ip_address(pkt.dst if table == "nat" else pkt.cur_dst)
            return any(dst in n for n in m.nets)
        if m.opt in ("-p", "--protocol"):
            return m.text == pkt.proto
        if m.opt == "--dport":
            return m.number == (pkt.dport if table == "nat" else pkt.cur_dport)
        if m.opt == "--dst-type":
            return m.text == "LOCAL" and self._is_local(pkt.dst if table == "nat" else pkt.cur_dst)
        if m.opt == "--src-type":
            return m.text == "LOCAL" and pkt.src in self.local_ips
        if m.opt == "--ctstate":
            return "NEW" in m.text.split(",")
        if m.opt == "--mark":
            return (pkt.mark & m.mask) == m.number
        if m.opt in ("--probability", "--rcheck"):
            return None
        if m.opt == "--match-set" and self.sets is not None:
            return self.sets(m.text, m.flags, pkt)
        # mode, name, seconds, reap, set, mask, rsource, tcp flags...: no constraint on a new SYN
        return True

    def run_chain(self, table: str, chain: str, pkt: Packet, depth: int = 0) -> list[tuple[Packet, str]]:
        """Returns (packet, verdict) pairs; verdict "" means the chain returned to its caller."""
        if depth >= MAX_DEPTH:
            raise TraceError(f"jumps nested deeper than {MAX_DEPTH} at {table}/{chain} (a loop?)")
        live = [pkt]
        done: list[tuple[Packet, str]] = []
        for rule in self.tables.get(table, {}).get(chain, []):
            nxt: list[Packet] = []
            for p in live:
                verdict: bool | None = True
                fork: Match | None = None
                for m in rule.matches:
                    got = self._match(m, p, table)
                    if got is None:
                        fork = m
                        continue
                    if got == m.neg:
                        verdict = False
                        break
                if verdict is False:
                    nxt.append(p)
                    continue
                hop = f"{table}/{chain}"
                # One hop per chain visit, however many of its rules matched.
                hit = replace(p, hops=p.hops if p.hops[-1:] == (hop,) else (*p.hops, hop),
                              service=p.service or service_of_comment(rule.comment))
                if fork is not None:
                    # The branch where the random/affinity match did not fire goes on here.
                    if fork.opt == "--probability":
                        nxt.append(replace(p, probability=p.probability * (1.0 - fork.prob)))
                        hit.probability = p.probability * fork.prob
                    else:
                        nxt.append(p)
                        hit.affinity = True
                nxt.extend(self._apply(table, rule, hit, done, depth))
            live = nxt
            if len(live) + len(done) >= MAX_BRANCHES:
                raise TraceError(f"more than {MAX_BRANCHES} paths through {table}/{chain}")
        done.extend((p, "") for p in live)
        return done

    def _apply(self, table: str, rule: Rule, p: Packet, done: list[tuple[Packet, str]], depth: int) -> list[Packet]:
        """Apply the target; returns packets that continue in this chain."""
        t = rule.target
        args = rule.target_args
        if not t:
            return [p]
        if t == "MARK":
            if "--set-xmark" in args:
                v, _, m = args["--set-xmark"].partition("/")
                p.mark = (p.mark & ~_int(m or "0xffffffff", "mark", rule.raw)) ^ _int(v, "mark", rule.raw)
            elif "--or-mark" in args:
                p.mark |= _int(args["--or-mark"], "mark", rule.raw)
            elif "--xor-mark" in args:
                p.mark ^= _int(args["--xor-mark"], "mark", rule.raw)
            return [p]
        if t == "DNAT":
            p.dnat = _endpoint(args.get("--to-destination", ""), rule.raw)
            done.append((p, "ACCEPT"))
            return []
        if t == "REDIRECT":
            # The node's own address on the incoming interface: 127.0.0.1 stands for it (the
            # userspace relay listens on every address; the walk only needs "local").
            p.dnat = _endpoint(f"127.0.0.1:{args.get('--to-ports', '')}", rule.raw)
            done.append((p, "ACCEPT"))
            return []
        if t in ("ACCEPT", "DROP", "REJECT", "MASQUERADE", "RETURN"):
            done.append((p, t))
            return []
        if not _CHAIN.match(t):
            raise TraceError(f"bad target in: {rule.raw[:200]}")
        cont = []
        for p2, verdict in self.run_chain(table, t, p, depth + 1):
            if verdict in ("", "RETURN") and not rule.goto:
                cont.append(p2)
            elif verdict in ("", "RETURN"):
                done.append((p2, "RETURN"))
            else:
                done.append((p2, verdict))
        return cont

    def paths(self, src: str, dst: str, dport: int, proto: str = "tcp") -> list[Path]:
        """Every way a new connection arriving at (or, if src is local, leaving) the node can go."""
        from_node = src in self.local_ips
        out: list[Path] = []
        for p, _ in self.run_chain("nat", "OUTPUT" if from_node else "PREROUTING", Packet(src, dst, dport, proto)):
            fchain = "OUTPUT" if from_node else ("INPUT" if self._is_local(p.cur_dst) else "FORWARD")
            verdict = "ACCEPT"
            masq = False
            for p2, v in self.run_chain("filter", fchain, p):
                if v in ("DROP", "REJECT"):
                    verdict, p = v, p2
                    break
                p = p2
            if verdict == "ACCEPT" and fchain != "INPUT":
                masq = any(v == "MASQUERADE" for _, v in self.run_chain("nat", "POSTROUTING", p))
            out.append(Path(Outcome(verdict, p.dnat, masq), p.probability, p.affinity, p.service, p.hops))
        return out

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp") -> set[Outcome]:
        return {p.outcome for p in self.paths(src, dst, dport, proto)}


def service_of_comment(comment: str) -> str:
    m = _SPN.match(comment)
    return f"{m.group(1)}/{m.group(2)}:{m.group(3)}" if m else ""


def _endpoint(text: str, line: str) -> str:
    host, _, port = text.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise TraceError(f"bad DNAT destination {text!r} in: {line[:200]}") from None
    p = _int(port, "port", line)
    if not 0 < p <= 65535:
        raise TraceError(f"bad DNAT port {text!r} in: {line[:200]}")
    return text

"""A packet tracer over iptables-save output: where does a new connection to VIP:port from X go?

The shape follows upstream's pkg/proxy/iptables/proxier_test.go tracePacket (nat PREROUTING or
OUTPUT, then filter, then nat POSTROUTING for the masquerade mark), written from scratch. It
parses what the kernel reports back (iptables-save normalizes "-s 10.0.0.1/32", reorders
matches), so a test tracing a dump checks what is really programmed, not what we meant to write.

Probabilistic rules (-m statistic) and affinity checks (-m recent --rcheck) fork the trace into
"matched" and "not matched" branches, so the result lists every endpoint a packet can reach.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field, replace

MAX_BRANCHES = 4096


@dataclass
class Rule:
    chain: str
    raw: str
    matches: list[tuple[str, bool, list[str]]]  # (option, negated, values)
    target: str = ""
    target_args: dict[str, str] = field(default_factory=dict)


@dataclass
class Packet:
    src: str
    dst: str
    dport: int
    proto: str = "tcp"
    mark: int = 0
    dnat: str = ""  # "ip:port" once DNATed

    @property
    def cur_dst(self) -> str:
        return self.dnat.rsplit(":", 1)[0] if self.dnat else self.dst

    @property
    def cur_dport(self) -> int:
        return int(self.dnat.rsplit(":", 1)[1]) if self.dnat else self.dport


@dataclass(frozen=True)
class Outcome:
    verdict: str  # ACCEPT, DROP, REJECT
    endpoint: str  # "ip:port" after DNAT, "" when not DNATed
    masquerade: bool


def parse(dump: str) -> dict[str, dict[str, list[Rule]]]:
    """iptables-save (or restore input) -> table -> chain -> rules."""
    tables: dict[str, dict[str, list[Rule]]] = {}
    table: dict[str, list[Rule]] = {}
    for line in dump.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            rule = _parse_rule(line)
            table.setdefault(rule.chain, []).append(rule)
    return tables


def _parse_rule(line: str) -> Rule:
    toks = shlex.split(line)
    rule = Rule(chain=toks[1], raw=line, matches=[])
    i, neg = 2, False
    while i < len(toks):
        t = toks[i]
        if t == "!":
            neg = True
            i += 1
            continue
        if t in ("-j", "--jump", "-g"):
            rule.target = toks[i + 1]
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
        rule.matches.append((t, neg, values))
        neg = False
        i = j
    return rule


class Tracer:
    def __init__(self, dump: str, local_ips: set[str]) -> None:
        self.tables = parse(dump)
        self.local_ips = local_ips

    def _match(self, opt: str, values: list[str], pkt: Packet, table: str) -> bool | None:
        """True/False, or None for "either" (statistic, recent --rcheck)."""
        if opt in ("-s", "--source"):
            return any(
                ipaddress.ip_address(pkt.src) in ipaddress.ip_network(v, strict=False)
                for v in values[0].split(",")
            )
        if opt in ("-d", "--destination"):
            dst = pkt.dst if table == "nat" else pkt.cur_dst
            return any(
                ipaddress.ip_address(dst) in ipaddress.ip_network(v, strict=False)
                for v in values[0].split(",")
            )
        if opt in ("-p", "--protocol"):
            return values[0] == pkt.proto
        if opt == "--dport":
            return int(values[0]) == (pkt.dport if table == "nat" else pkt.cur_dport)
        if opt == "--dst-type":
            dst = pkt.dst if table == "nat" else pkt.cur_dst
            return values[0] == "LOCAL" and (dst in self.local_ips or dst.startswith("127."))
        if opt == "--src-type":
            return values[0] == "LOCAL" and pkt.src in self.local_ips
        if opt == "--ctstate":
            return "NEW" in values[0].split(",")
        if opt == "--mark":
            v, _, m = values[0].partition("/")
            mask = int(m, 0) if m else 0xFFFFFFFF
            return (pkt.mark & mask) == int(v, 0)
        if opt == "--probability":
            return None
        if opt == "--rcheck":
            return None
        # comment, mode, name, seconds, reap, set, mask, rsource, tcp flags...: no constraint
        return True

    def run_chain(self, table: str, chain: str, pkt: Packet, depth: int = 0) -> list[tuple[Packet, str]]:
        """Returns (packet, verdict) pairs; verdict "" means the chain returned to its caller."""
        assert depth < 32, f"jump loop at {chain}"
        live = [pkt]
        done: list[tuple[Packet, str]] = []
        for rule in self.tables.get(table, {}).get(chain, []):
            nxt: list[Packet] = []
            for p in live:
                verdict: bool | None = True
                for opt, neg, values in rule.matches:
                    m = self._match(opt, values, p, table)
                    if m is None:
                        verdict = None if verdict is not False else False
                        continue
                    if m == neg:
                        verdict = False
                        break
                if verdict is False:
                    nxt.append(p)
                    continue
                if verdict is None:
                    nxt.append(p)  # the branch where the random/affinity match did not fire
                nxt.extend(self._apply(table, rule, replace(p), done, depth))
            live = nxt
            assert len(live) + len(done) < MAX_BRANCHES, "trace exploded"
        done.extend((p, "") for p in live)
        return done

    def _apply(
        self, table: str, rule: Rule, p: Packet, done: list[tuple[Packet, str]], depth: int
    ) -> list[Packet]:
        """Apply the target; returns packets that continue in this chain."""
        t = rule.target
        if not t:
            return [p]
        if t == "MARK":
            if "--set-xmark" in rule.target_args:
                v, _, m = rule.target_args["--set-xmark"].partition("/")
                p.mark = (p.mark & ~int(m, 0)) ^ int(v, 0)
            elif "--or-mark" in rule.target_args:
                p.mark |= int(rule.target_args["--or-mark"], 0)
            elif "--xor-mark" in rule.target_args:
                p.mark ^= int(rule.target_args["--xor-mark"], 0)
            return [p]
        if t == "DNAT":
            p.dnat = rule.target_args["--to-destination"]
            done.append((p, "ACCEPT"))
            return []
        if t in ("ACCEPT", "DROP", "REJECT", "MASQUERADE"):
            done.append((p, t))
            return []
        if t == "RETURN":
            done.append((p, "RETURN"))
            return []
        cont = []
        for p2, verdict in self.run_chain(table, t, p, depth + 1):
            if verdict in ("", "RETURN"):
                cont.append(p2)
            else:
                done.append((p2, verdict))
        return cont

    def trace(self, src: str, dst: str, dport: int, proto: str = "tcp") -> set[Outcome]:
        """Every outcome for a new connection arriving at (or, if src is local, leaving) the node."""
        from_node = src in self.local_ips
        pkt = Packet(src, dst, dport, proto)
        outcomes: set[Outcome] = set()
        for p, _ in self.run_chain("nat", "OUTPUT" if from_node else "PREROUTING", pkt):
            fchain = "OUTPUT" if from_node else ("INPUT" if p.cur_dst in self.local_ips else "FORWARD")
            verdict = "ACCEPT"
            masq = False
            for p2, v in self.run_chain("filter", fchain, p):
                if v in ("DROP", "REJECT"):
                    verdict = v
                    p = p2
                    break
                p = p2
            if verdict == "ACCEPT" and fchain != "INPUT":
                for _p3, v in self.run_chain("nat", "POSTROUTING", p):
                    masq = masq or v == "MASQUERADE"
            outcomes.add(Outcome(verdict, p.dnat, masq))
        return outcomes

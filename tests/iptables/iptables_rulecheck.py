"""A checker for iptables-save dumps and iptables-restore inputs: every value in a rule must be
one the validators can produce (a canonical address or network, a port in 1-65535, a comment
built from Kubernetes names, a chain name), and every line must be one of the format's own
shapes. Used on kproxy's restore input (property tests) and on the kernel's dump (netns tests):
a hostile value that slipped through shows up as a problem line, not as a passing test.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

_CHAIN = re.compile(r"[A-Z][A-Z0-9_-]{0,28}")
_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
# ns/name:port as ServicePortName.__str__ renders it, port name possibly empty.
_SPN = re.compile(rf"{_LABEL}/[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?:(?:{_LABEL})?")
_COMMENT_CHARS = re.compile(r"[A-Za-z0-9 ./:;_>\[\]-]*")
_SAFE_TOKEN = re.compile(r"!|[A-Za-z0-9_./:,+-]+")
_TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "DNAT", "SNAT", "MASQUERADE", "MARK"}


def _address(value: str) -> bool:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError:
        return False
    # iptables-save prints a /32 (/128) for a host; the restore input may carry the bare address.
    return value in (str(net), str(net.network_address)) or value == f"{net.network_address}/{net.prefixlen}"


def _port(value: str) -> bool:
    parts = value.split(":")
    return len(parts) <= 2 and all(p.isdigit() and 1 <= int(p) <= 65535 for p in parts)


def _comment(value: str) -> bool:
    if not _COMMENT_CHARS.fullmatch(value):
        return False
    # Every ns/name:port inside must be one a validated ServicePortName renders.
    return all(_SPN.fullmatch(word) for word in value.split() if "/" in word and ":" in word
               and not word.endswith(("/32", "/128")) and "->" not in word)


def rule_problems(text: str) -> list[str]:
    """Lines (with the reason) that are not something kproxy's validated records can render."""
    problems: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT" or line == "-Z":
            continue
        if line.startswith("*"):
            if line[1:] not in ("nat", "filter", "mangle", "raw"):
                problems.append(f"table: {raw!r}")
            continue
        if line.startswith(":"):
            parts = line[1:].split()
            if len(parts) != 3 or not _CHAIN.fullmatch(parts[0]) or parts[1] not in ("-", "ACCEPT", "DROP"):
                problems.append(f"chain declaration: {raw!r}")
            continue
        if line.startswith("-X ") and len(line.split()) == 2:
            if not line.split()[1].startswith("KUBE-"):
                problems.append(f"deletes a chain that is not kproxy's: {raw!r}")
            continue
        if line.startswith("["):  # counters (iptables-save -c)
            line = line.split("]", 1)[1].strip()
        try:
            tokens = shlex.split(line)
        except ValueError:
            problems.append(f"unbalanced quoting: {raw!r}")
            continue
        if not tokens or tokens[0] not in ("-A", "-I", "-X", "-N", "-D") or len(tokens) < 2:
            problems.append(f"not a rule: {raw!r}")
            continue
        if not _CHAIN.fullmatch(tokens[1]):
            problems.append(f"chain name: {raw!r}")
        targets = [tokens[k + 1] for k in range(len(tokens) - 1) if tokens[k] in ("-j", "-g")]
        if len(targets) > 1:
            problems.append(f"more than one target: {raw!r}")
        # kproxy's rules live in its own chains; in a built-in chain it only has its jumps
        # (`-I INPUT 1 ... -j KUBE-...` in its input, `-A INPUT ... -j KUBE-...` in a dump).
        if not tokens[1].startswith("KUBE-") and not (targets and targets[0].startswith("KUBE-")):
            problems.append(f"a rule outside kproxy's chains: {raw!r}")
        i = 2
        while i < len(tokens):
            tok = tokens[i]
            val = tokens[i + 1] if i + 1 < len(tokens) else ""
            if tok in ("-d", "-s", "--destination", "--source"):
                ok = _address(val)
            elif tok in ("--dport", "--sport", "--dports", "--sports"):
                ok = all(_port(v) for v in val.split(","))
            elif tok == "--to-destination":
                host, _, port = val.rpartition(":")
                ok = _address(host.strip("[]")) and _port(port)
            elif tok == "--comment":
                ok = _comment(val)
            elif tok in ("-j", "-g"):
                ok = val in _TARGETS or bool(_CHAIN.fullmatch(val))
            elif tok == "--name":
                ok = bool(_CHAIN.fullmatch(val))
            else:
                ok = bool(_SAFE_TOKEN.fullmatch(tok))
                i += 1
                if not ok:
                    problems.append(f"token {tok!r}: {raw!r}")
                continue
            if not ok:
                problems.append(f"{tok} {val!r}: {raw!r}")
            i += 2
    return problems

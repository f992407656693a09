"""ipset: desired sets diffed against the kernel, changes sent in nfnetlink batches.

Upstream's IPVS proxier keeps a handful of sets (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, ...) that its
few iptables rules match on, so the rule count stays constant as services grow. Here a sync
computes the entries each set should hold, diffs them against what the kernel holds (read on a
full sync: which sets exist over netlink, their members with `ipset save` only if some do;
remembered afterwards) and sends only the creates, adds and deletes: a one-endpoint change is a
few entries. In a foreign netns (`netns` set) the same changes go through one `ipset restore`.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kproxy.protocols import SERVICE_PROTOCOLS

if TYPE_CHECKING:
    from kproxy.backends.ipvs import _Socket

NETLINK_NETFILTER = 12
IPSET_MAXNAMELEN = 31  # IPSET_MAXNAMELEN (32) less the terminating NUL


class IPSetError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class SetSpec:
    name: str
    type: str  # hash:ip,port | hash:ip,port,ip | hash:ip,port,net | hash:ip | bitmap:port
    comment: str = ""
    family: str = "inet"

    def for_family(self, family: str) -> SetSpec:
        """This set as the proxier of `family` ("inet" or "inet6") owns it (family_set_name)."""
        if family not in _FAMILIES:
            raise ValueError(f"ipset family {family!r}: expected inet or inet6")
        return replace(self, name=family_set_name(self.name, family), family=family)

    def create_line(self) -> str:
        if self.type == "bitmap:port":
            opts = "range 0-65535"
        else:
            opts = f"family {self.family} hashsize 1024 maxelem 1048576"
        return f"create {self.name} {self.type} {opts}"


def family_set_name(name: str, family: str) -> str:
    """Upstream's set names per family (pkg/proxy/ipvs NewIPSet): both families' sets live in one
    kernel, so the IPv6 proxier's `KUBE-` sets are `KUBE-6-`, cut to ipset's 31 characters
    (KUBE-6-LOAD-BALANCER-SOURCE-CIDR -> ...-SOURCE-CID, as upstream); IPv4 names are unchanged."""
    if family != "inet6" or not name.startswith("KUBE-"):
        return name
    return ("KUBE-6-" + name[len("KUBE-"):])[:IPSET_MAXNAMELEN]


def _prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


@dataclass
class IPSets:
    """The sets kproxy owns in one network namespace (netns None: the current one)."""

    specs: tuple[SetSpec, ...]
    netns: str | None = None
    timeout: float = 120.0
    restores: int = field(default=0, init=False)
    _known: dict[str, set[str]] | None = field(default=None, init=False)
    _nl: _Socket | None = field(default=None, init=False, repr=False)

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        cmd = [*_prefix(self.netns), "ipset", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False, timeout=self.timeout)
        if proc.returncode != 0:
            raise IPSetError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def _socket(self) -> _Socket:
        from kproxy.backends.ipvs import _Socket

        if self._nl is None:
            self._nl = _Socket(NETLINK_NETFILTER)
        return self._nl

    def _present(self) -> set[str]:
        """Which owned sets exist, over nfnetlink: one IPSET_CMD_HEADER per set in one batch,
        ENOENT meaning absent. Why: on an empty node this spares `ipset save`, a process start
        (~50 ms under User-Mode Linux) that would only list nothing."""
        nlsock = self._socket()
        by_seq: dict[int, str] = {}
        msgs = []
        for spec in self.specs:
            seq, msg = nlsock.message((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_HEADER, 1,
                                      _ipset_head(0) + _nla(IPSET_ATTR_SETNAME, spec.name.encode() + b"\0"))
            by_seq[seq] = spec.name
            msgs.append(msg)
        present = {s.name for s in self.specs}
        for msg, err in nlsock.batch(msgs):
            if err != errno.ENOENT:
                raise IPSetError(f"ipset header query failed: {os.strerror(err)}")
            present.discard(by_seq[struct.unpack_from("=I", msg, 8)[0]])
        return present

    def read(self) -> dict[str, set[str]]:
        """Members of our sets as the kernel holds them (missing sets are absent)."""
        if self.netns is None and not self._present():
            return {}
        names = {s.name for s in self.specs}
        out: dict[str, set[str]] = {}
        for line in self._run(["save"]).splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[1] in names:
                if parts[0] == "create":
                    out.setdefault(parts[1], set())
                elif parts[0] == "add" and len(parts) >= 3:
                    out.setdefault(parts[1], set()).add(parts[2])
        return out

    def forget(self) -> None:
        """Makes the next sync re-read the kernel (after a failure, or on a full sync)."""
        self._known = None

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def sync(self, desired: Mapping[str, AbstractSet[str]], only: AbstractSet[str] | None = None) -> int:
        """Brings every owned set to `desired`: creates missing sets, then sends the adds and
        deletes, all over nfnetlink in batches (in a foreign netns, through one `ipset restore`). `only` names the sets that may have changed since the last
        successful sync (the others are skipped). Returns the number of entries changed."""
        known = self._known if self._known is not None else self.read()
        self._known = None  # unknown until everything below succeeded
        missing = [s for s in self.specs if s.name not in known]
        if missing and self.netns is None:
            self._create(missing)
        elif missing:
            self.restores += 1
            self._run(["restore", "-exist"], "\n".join(s.create_line() for s in missing) + "\n")
        changes: list[tuple[SetSpec, list[str], list[str]]] = []
        for spec in self.specs:
            if only is not None and spec.name not in only and spec.name in known:
                continue
            want: AbstractSet[str] = desired.get(spec.name, frozenset())
            have = known.setdefault(spec.name, set())
            dels = [m for m in have if m not in want]
            adds = [m for m in want if m not in have]
            if dels or adds:
                changes.append((spec, dels, adds))
        count = sum(len(d) + len(a) for _, d, a in changes)
        if changes and self.netns is None:
            nlsock = self._socket()

            def frame(kind: int, flags: int, body: bytes) -> bytes:
                return nlsock.message(kind, flags, body)[1]

            msgs: list[bytes] = []
            for spec, dels, adds in changes:
                msgs += encode_messages(spec, IPSET_CMD_DEL, dels, frame)
                msgs += encode_messages(spec, IPSET_CMD_ADD, adds, frame)
            failed = nlsock.batch(msgs)
            if failed:
                raise IPSetError(f"{len(failed)} ipset netlink requests failed (errno {failed[0][1]})")
        elif changes:
            lines = [f"del {spec.name} {m}" for spec, dels, _ in changes for m in dels]
            lines += [f"add {spec.name} {m}" for spec, _, adds in changes for m in adds]
            self.restores += 1
            self._run(["restore", "-exist"], "\n".join(lines) + "\n")
        for spec, dels, adds in changes:
            have = known[spec.name]
            have.difference_update(dels)
            have.update(adds)
        self._known = known
        return count

    def _create(self, specs: list[SetSpec]) -> None:
        """IPSET_CMD_CREATE over nfnetlink, what `ipset restore -exist` sends for create_line()
        (no NLM_F_EXCL: an identical existing set is fine). The kernel wants a type revision it
        knows; IPSET_CMD_TYPE answers its highest one."""
        from kproxy.backends.ipvs import _attrs

        nlsock = self._socket()
        revisions: dict[tuple[str, int], int] = {}
        msgs = []
        for spec in specs:
            family = _FAMILIES[spec.family] if spec.type != "bitmap:port" else 0
            typename = _nla(IPSET_ATTR_TYPENAME, spec.type.encode() + b"\0")
            rev = revisions.get((spec.type, family))
            if rev is None:
                answer = nlsock.query((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_TYPE,
                                      _ipset_head(family) + typename + _nla(IPSET_ATTR_FAMILY, bytes([family])))
                attrs = _attrs(answer[0][4:]) if answer else {}
                if IPSET_ATTR_REVISION not in attrs:
                    raise IPSetError(f"ipset type {spec.type}: the kernel did not report a revision")
                rev = revisions[(spec.type, family)] = attrs[IPSET_ATTR_REVISION][0]
            if spec.type == "bitmap:port":
                data = (_nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", 0))
                        + _nla(IPSET_ATTR_PORT_TO | NLA_F_NET_BYTEORDER, struct.pack("!H", 65535)))
            else:  # create_line(): hashsize 1024 maxelem 1048576
                data = (_nla(IPSET_ATTR_HASHSIZE | NLA_F_NET_BYTEORDER, struct.pack("!I", 1024))
                        + _nla(IPSET_ATTR_MAXELEM | NLA_F_NET_BYTEORDER, struct.pack("!I", 1048576)))
            body = (_ipset_head(family) + _nla(IPSET_ATTR_SETNAME, spec.name.encode() + b"\0") + typename
                    + _nla(IPSET_ATTR_REVISION, bytes([rev])) + _nla(IPSET_ATTR_FAMILY, bytes([family]))
                    + _nla(IPSET_ATTR_DATA | NLA_F_NESTED, data))
            msgs.append(nlsock.message((NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_CREATE, 1, body)[1])
        failed = nlsock.batch(msgs)
        if failed:
            raise IPSetError(f"{len(failed)} ipset creates failed: {os.strerror(failed[0][1])}")

    def destroy(self) -> None:
        """Destroys every owned set that exists, in one restore (iptables rules using them must
        be gone first)."""
        present = set(self._run(["list", "-n"]).split())
        lines = [f"destroy {s.name}" for s in self.specs if s.name in present]
        if lines:
            self._run(["restore"], "\n".join(lines) + "\n")
        self._known = None


# --- bulk adds/deletes over nfnetlink --------------------------------------------------------
# Why: `ipset restore` costs ~1 ms per line under User-Mode Linux (and far more than the kernel's
# work natively), so a 10,000-service full sync spent most of its time there. The kernel's
# ipset netlink protocol takes a list of entries per message (IPSET_ATTR_ADT); many such messages
# go out in one sendmsg through the batch socket of backends/ipvs.py. Layout from
# include/uapi/linux/netfilter/ipset/ip_set.h. Without NLM_F_EXCL the kernel applies "-exist"
# semantics: re-adding a present entry or deleting an absent one is not an error.
NFNL_SUBSYS_IPSET = 6
IPSET_PROTOCOL = 7
IPSET_CMD_CREATE, IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_CMD_HEADER, IPSET_CMD_TYPE = 2, 9, 10, 12, 13
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_TYPENAME, IPSET_ATTR_REVISION = 1, 2, 3, 4
IPSET_ATTR_FAMILY, IPSET_ATTR_DATA, IPSET_ATTR_ADT, IPSET_ATTR_LINENO = 5, 7, 8, 9
IPSET_ATTR_IP, IPSET_ATTR_CIDR, IPSET_ATTR_PORT, IPSET_ATTR_PORT_TO, IPSET_ATTR_PROTO = 1, 3, 4, 5, 7
IPSET_ATTR_HASHSIZE, IPSET_ATTR_MAXELEM = 18, 19
IPSET_ATTR_IP2, IPSET_ATTR_CIDR2 = 20, 21
IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6 = 1, 2
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
_ENTRIES_PER_MESSAGE = 512
_IP_PROTOS = SERVICE_PROTOCOLS


_FAMILIES = {"inet": 2, "inet6": 10}  # NFPROTO_IPV4, NFPROTO_IPV6


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length & 3)


def _ipset_head(family: int) -> bytes:
    """nfgenmsg, then the protocol attribute every ipset message starts with."""
    return struct.pack("=BBH", family, 0, 0) + _nla(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL]))


def _ip_attr(kind: int, address: str) -> bytes:
    # inet_pton, not ipaddress.ip_address(): 20x cheaper, and a full sync encodes 20,000.
    if ":" in address:
        inner, packed = IPSET_ATTR_IPADDR_IPV6, socket.inet_pton(socket.AF_INET6, address)
    else:
        inner, packed = IPSET_ATTR_IPADDR_IPV4, socket.inet_pton(socket.AF_INET, address)
    return _nla(kind | NLA_F_NESTED, _nla(inner | NLA_F_NET_BYTEORDER, packed))


def encode_entry(set_type: str, entry: str) -> bytes:
    """One IPSET_ATTR_DATA payload for an entry in `ipset add` syntax."""
    if set_type == "bitmap:port":
        return _nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(entry)))
    parts = entry.split(",")
    out = _ip_attr(IPSET_ATTR_IP, parts[0])
    if set_type == "hash:ip":
        return out
    proto, _, port = parts[1].partition(":")
    out += _nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", int(port)))
    out += _nla(IPSET_ATTR_PROTO, struct.pack("=B", _IP_PROTOS[proto]))
    if set_type == "hash:ip,port,ip":
        out += _ip_attr(IPSET_ATTR_IP2, parts[2])
    elif set_type == "hash:ip,port,net":
        net, _, cidr = parts[2].partition("/")
        out += _ip_attr(IPSET_ATTR_IP2, net)
        out += _nla(IPSET_ATTR_CIDR2, struct.pack("=B", int(cidr or (32 if ":" not in net else 128))))
    return out


def encode_messages(spec: SetSpec, cmd: int, entries: list[str], message: Callable[[int, int, bytes], bytes]) -> list[bytes]:
    """nfnetlink messages carrying `entries` (a list per message). `message(type, flags, body)`
    frames one netlink message (sequence numbers belong to the socket)."""
    family = 10 if spec.family == "inet6" else 2
    head = _ipset_head(family) + _nla(IPSET_ATTR_SETNAME, spec.name.encode() + b"\0")
    out = []
    for i in range(0, len(entries), _ENTRIES_PER_MESSAGE):
        adt = b"".join(_nla(IPSET_ATTR_DATA | NLA_F_NESTED, encode_entry(spec.type, e))
                       for e in entries[i : i + _ENTRIES_PER_MESSAGE])
        # An entry list must come with a line number (the kernel reports failures against it).
        out.append(message((NFNL_SUBSYS_IPSET << 8) | cmd, 1,
                           head + _nla(IPSET_ATTR_LINENO, struct.pack("=I", 0)) + _nla(IPSET_ATTR_ADT | NLA_F_NESTED, adt)))
    return out

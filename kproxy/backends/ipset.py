"""ipset: desired sets rendered into ONE `ipset restore` per sync, diffed against the kernel.

Upstream's IPVS proxier keeps a handful of sets (KUBE-CLUSTER-IP, KUBE-LOOP-BACK, ...) that its
few iptables rules match on, so the rule count stays constant as services grow. Here a sync
computes the entries each set should hold, diffs them against what the kernel holds (read once
with `ipset save` on a full sync, remembered afterwards) and sends only the adds and deletes,
with the creates, in one `ipset restore -exist`: a one-endpoint change is a few lines.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import AbstractSet, Mapping


class IPSetError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class SetSpec:
    name: str
    type: str  # hash:ip,port | hash:ip,port,ip | hash:ip,port,net | hash:ip | bitmap:port
    comment: str = ""
    family: str = "inet"

    def create_line(self) -> str:
        if self.type == "bitmap:port":
            opts = "range 0-65535"
        else:
            opts = f"family {self.family} hashsize 1024 maxelem 1048576"
        return f"create {self.name} {self.type} {opts}"


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

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        cmd = [*_prefix(self.netns), "ipset", *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=self.timeout)
        if proc.returncode != 0:
            raise IPSetError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def read(self) -> dict[str, set[str]]:
        """Members of our sets as the kernel holds them (missing sets are absent)."""
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

    def render(self, desired: Mapping[str, AbstractSet[str]], known: Mapping[str, AbstractSet[str]]) -> list[str]:
        lines: list[str] = []
        for spec in self.specs:
            want: AbstractSet[str] = desired.get(spec.name, frozenset())
            have: AbstractSet[str] | None = known.get(spec.name)
            if have is None:
                lines.append(spec.create_line())
                have = frozenset()
            lines.extend(f"del {spec.name} {m}" for m in sorted(have - want))
            lines.extend(f"add {spec.name} {m}" for m in sorted(want - have))
        return lines

    def sync(self, desired: Mapping[str, AbstractSet[str]]) -> int:
        """Brings every owned set to `desired` in one restore; returns the lines sent."""
        known = self._known if self._known is not None else self.read()
        lines = self.render(desired, known)
        if lines:
            self._known = None  # unknown until the restore succeeds
            self.restores += 1
            self._run(["restore", "-exist"], "\n".join(lines) + "\n")
        self._known = {s.name: set(desired.get(s.name, set())) for s in self.specs}
        return len(lines)

    def destroy(self) -> None:
        """Destroys every owned set that exists, in one restore (iptables rules using them must
        be gone first)."""
        present = set(self._run(["list", "-n"]).split())
        lines = [f"destroy {s.name}" for s in self.specs if s.name in present]
        if lines:
            self._run(["restore"], "\n".join(lines) + "\n")
        self._known = None

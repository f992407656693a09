"""What a cluster made, recorded as it makes it, so that `down` removes exactly that.

An append-only file of JSON lines (mode 0600), written by every process of the cluster that
creates something (the supervisor: node namespaces and component processes; node agents: pod
namespaces). A line is written *before* a namespace is created (so a crash in between still leaves
a record) and again with the namespace's inode once it exists: a namespace of the same name made
later by someone else has another inode and is left alone. Processes are recorded with their start
time (/proc/PID/stat field 22), so a recycled pid is never killed. O_APPEND writes of one short
line are atomic, so several writers need no lock.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is the state (field 3); a zombie is as good as gone for us.
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def netns_inode(name: str) -> int | None:
    try:
        return (NETNS_DIR / name).stat().st_ino
    except OSError:
        return None


@dataclass
class Owned:
    """What the record lists: netns name -> inode (None: about to be made) and pid -> start."""

    netns: dict[str, int | None] = field(default_factory=dict)
    pids: dict[int, tuple[int, str]] = field(default_factory=dict)

    def owns_netns(self, name: str) -> bool:
        """True when name is ours: recorded, and (if its inode was recorded) the same namespace."""
        if name not in self.netns:
            return False
        ino = self.netns[name]
        return ino is None or ino == netns_inode(name)

    def live_pids(self) -> dict[int, str]:
        """Recorded processes that still run (same pid *and* start time): pid -> component name."""
        return {pid: name for pid, (start, name) in self.pids.items() if proc_start(pid) == start}


class Record:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _append(self, entry: dict[str, object]) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def netns_intent(self, name: str) -> None:
        self._append({"netns": name})

    def netns_made(self, name: str) -> None:
        self._append({"netns": name, "ino": netns_inode(name)})

    def process(self, name: str, pid: int) -> None:
        start = proc_start(pid)
        if start is not None:
            self._append({"pid": pid, "start": start, "name": name})

    def load(self) -> Owned:
        """Reads the record; a line that does not parse is skipped (a torn write after a crash)."""
        o = Owned()
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return o
        for line in text.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if not isinstance(e, dict):
                continue
            ns, ino, pid, start = e.get("netns"), e.get("ino"), e.get("pid"), e.get("start")
            if isinstance(ns, str) and ns:
                if isinstance(ino, int) and not isinstance(ino, bool):
                    o.netns[ns] = ino
                else:
                    o.netns.setdefault(ns, None)
            elif isinstance(pid, int) and isinstance(start, int) and pid > 1:
                o.pids[pid] = (start, str(e.get("name", "")))
        return o

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)

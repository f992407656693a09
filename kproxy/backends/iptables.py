"""Thin runner around the iptables tools: restore, save, single commands, back-end detection.

Bulk work goes through one `iptables-restore -w 5 --noflush` per sync, as upstream's
utiliptables.RestoreAll(NoFlushTables): --noflush keeps chains kproxy does not own, and the kernel
applies each table (legacy) or the whole batch (nf_tables) atomically, so a failed restore leaves
the previous rules in place.

`netns` runs every command inside an existing network namespace (`ip netns exec NAME ...`); the
daemon leaves it None and works in its own namespace. Tests and benchmarks use it to program a
namespace they created without ever touching the root namespace's rules.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kproxy.backends import nftchains, xtables

Backend = Literal["nft", "legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "legacy")
# Environment override for the back end, like the iptables-wrapper's mode selection.
BACKEND_ENV = "KPROXY_IPTABLES_BACKEND"
_ERR_LINE = re.compile(r"line:? (\d+)")


class IPTablesError(RuntimeError):
    """A failed iptables command; `line` is the restore input line the tool complained about."""

    def __init__(self, cmd: list[str], returncode: int, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr.strip()
        m = _ERR_LINE.search(self.stderr)
        self.line = int(m.group(1)) if m else 0
        super().__init__(f"{' '.join(cmd)} exited {returncode}: {self.stderr}")


def _netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def _tool(backend: Backend, tool: str, ipv6: bool = False) -> str:
    # iptables-nft-restore / ip6tables-legacy-save ...: explicit names, never the alternatives link.
    base, _, suffix = tool.partition("-")
    if ipv6:
        base = "ip6" + base[2:]
    return f"{base}-{backend}-{suffix}" if suffix else f"{base}-{backend}"


def detect_backend(netns: str | None = None) -> Backend:
    """Pick the back end as upstream's iptables-wrapper does: the one that already holds kube rules.

    KPROXY_IPTABLES_BACKEND=nft|legacy overrides. Otherwise count KUBE- lines in each back end's
    mangle/nat dump; legacy wins only with strictly more (nf_tables is the image default), or
    when nf_tables cannot run here or cannot hold a nat table (User-Mode Linux).
    """
    forced = os.environ.get(BACKEND_ENV, "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        return "legacy" if forced == "legacy" else "nft"
    counts: dict[Backend, int] = {}
    for backend in BACKENDS:
        try:
            proc = subprocess.run(
                [*_netns_prefix(netns), _tool(backend, "iptables-save")],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            counts[backend] = -1
            continue
        # A back end this kernel cannot run (no nf_tables, e.g. User-Mode Linux) is no candidate.
        ok = proc.returncode == 0
        counts[backend] = sum(1 for line in proc.stdout.splitlines() if "KUBE-" in line) if ok else -1
    if counts["nft"] == counts["legacy"] == 0 and not _nft_nat_works(netns):
        return "legacy"  # a fresh node whose kernel has nf_tables without its nat chain type
    return "legacy" if counts["legacy"] > counts["nft"] else "nft"


def _nft_nat_works(netns: str | None) -> bool:
    """Whether nf_tables can hold a nat table here: a chain made and removed in one restore.
    Asked only on a node with no KUBE- rules anywhere, where kproxy is about to make them."""
    probe = b"*nat\n:KUBE-KPROXY-PROBE - [0:0]\n-X KUBE-KPROXY-PROBE\nCOMMIT\n"
    try:
        proc = subprocess.run([*_netns_prefix(netns), _tool("nft", "iptables-restore"), "-w", "30", "--noflush"],
                              input=probe, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@dataclass
class IPTables:
    """One (back end, namespace) pair. Not thread-safe; the proxier calls it from one thread."""

    backend: Backend = "nft"
    netns: str | None = None
    ipv6: bool = False  # ip6tables-*: one IPTables per family, as upstream's per-family proxiers
    # The legacy back end's xtables lock (/run/xtables.lock) is shared by every namespace on the
    # host; upstream waits 5 s, a busy node (or a test machine) can hold it longer.
    wait_seconds: int = 30
    timeout: float = 120.0
    restores: int = field(default=0, init=False)
    saves: int = field(default=0, init=False)  # iptables-save processes, for tests

    def _run(self, args: list[str], stdin: bytes | None = None) -> bytes:
        cmd = [*_netns_prefix(self.netns), *args]
        proc = subprocess.run(cmd, input=stdin, check=False, capture_output=True, timeout=self.timeout)
        if proc.returncode != 0:
            raise IPTablesError(cmd, proc.returncode, proc.stderr.decode(errors="replace"))
        return proc.stdout

    def restore(self, data: bytes | Sequence[str]) -> None:
        """Apply restore input with --noflush; raises IPTablesError (with .line) on failure.

        `data` may be a list of str chunks: they are encoded and written one by one, so the
        full input (tens of MiB at 10,000 Services) never exists as one string plus its bytes.
        """
        stream = self.open_restore()
        try:
            for chunk in [data] if isinstance(data, bytes) else data:
                stream.write(chunk)
        except BaseException:
            stream.abort()
            raise
        stream.close()

    def open_restore(self) -> RestoreStream:
        """Start `iptables-restore --noflush` and return a writer: the caller renders straight
        into its stdin, so the input never has to exist in memory as a whole."""
        self.restores += 1
        cmd = [
            *_netns_prefix(self.netns),
            _tool(self.backend, "iptables-restore", self.ipv6),
            "-w",
            str(self.wait_seconds),
        ]
        cmd.append("--noflush")
        return RestoreStream(cmd, self.timeout)

    def save(self, table: str) -> str:
        self.saves += 1
        return self._run([_tool(self.backend, "iptables-save", self.ipv6), "-t", table]).decode()

    def save_all(self) -> str:
        """`iptables-save` of every table in one process (process starts are the cost under
        User-Mode Linux, not the bytes)."""
        self.saves += 1
        return self._run([_tool(self.backend, "iptables-save", self.ipv6)]).decode()

    def builtin_jumps(self, tables: tuple[str, ...]) -> set[tuple[str, str, str]]:
        """(table, built-in chain, target chain) of every `-j CHAIN` rule in a built-in chain.
        Legacy back end in our own namespace: read from the kernel (backends/xtables.py), no
        iptables-save process; otherwise (nf_tables, another netns, or the kernel interface
        refused) parsed from one iptables-save."""
        if self.backend == "legacy" and self.netns is None and not self.ipv6:  # xtables reads IPv4
            try:
                return xtables.builtin_jumps(tables)
            except (OSError, ValueError):
                pass
        out: set[tuple[str, str, str]] = set()
        lines = self.save_all().splitlines()
        # User chains are declared with policy "-" (built-ins with ACCEPT/DROP); only jumps to
        # them count, as in the kernel read (not -j ACCEPT, -j MASQUERADE ...).
        user = {(t, line[1:].split()[0]) for t, line in _with_tables(lines) if line.startswith(":") and " - " in line}
        for table, line in _with_tables(lines):
            if line.startswith("-A ") and table in tables:
                parts = line.split()
                # A jump to a user chain ends the line (user chains take no target options).
                if parts[1] in xtables.HOOKS and parts[-2] == "-j" and (table, parts[-1]) in user:
                    out.add((table, parts[1], parts[-1]))
        return out

    def table_use(self, table: str) -> int:
        """nf_tables only: how many chains (and sets, objects) the table holds, from the kernel
        in one netlink message (backends/nftchains.py); OSError if it cannot say."""
        if self.backend != "nft":
            raise OSError(f"table_use: the {self.backend} back end has no use count")
        return nftchains.table_use(table, self.netns, self.ipv6)

    def nft_chain_exists(self, table: str, chain: str) -> bool:
        """nf_tables only: whether the chain exists in the kernel (iptables-nft -S shows the
        built-in chains of a table even when they do not)."""
        return nftchains.chain_exists(table, chain, self.netns, self.ipv6)

    def command(self, *args: str) -> str:
        return self._run([_tool(self.backend, "iptables", self.ipv6), "-w", str(self.wait_seconds), *args]).decode()

    def chain_rules(self, table: str, chain: str) -> list[str]:
        """`-S CHAIN` lines of one chain (empty if the chain does not exist)."""
        try:
            out = self.command("-t", table, "-S", chain)
        except IPTablesError:
            return []
        return [line for line in out.splitlines() if line.startswith("-A ")]

    def chain_exists(self, table: str, chain: str) -> bool:
        try:
            self.command("-t", table, "-S", chain)
        except IPTablesError:
            return False
        return True

    def sysctl(self, key: str, value: str) -> None:
        """Write a sysctl in the namespace (sysctls under net/ are per network namespace)."""
        path = "/proc/sys/" + key.replace(".", "/")
        if self.netns:
            self._run(["sh", "-c", f"echo {value} > {path}"])
        else:
            with open(path, "w") as f:
                f.write(value)

    def local_ipv4_addresses(self) -> list[str]:
        """Addresses on this node's interfaces, for --nodeport-addresses matching."""
        return ipv4_addresses(self._run(["ip", "-o", "-4", "addr", "show"]).decode())

    def local_addresses(self) -> list[str]:
        """This table family's addresses on the node's interfaces (IPv6: link-local ones left
        out: a Service is never reached on them, as upstream's node address lookup)."""
        if not self.ipv6:
            return self.local_ipv4_addresses()
        out = self._run(["ip", "-o", "-6", "addr", "show"]).decode()
        return [ip for ip in ipv4_addresses(out, "inet6") if not ip.lower().startswith("fe80:")]


def ipv4_addresses(ip_addr_output: str, kind: str = "inet") -> list[str]:
    """The addresses in `ip -o -4 addr show` output (kind "inet6": `ip -o -6`)."""
    ips = []
    for line in ip_addr_output.splitlines():
        parts = line.split()
        if kind in parts:
            ips.append(parts[parts.index(kind) + 1].split("/")[0])
    return ips


class RestoreStream:
    """A running iptables-restore fed chunk by chunk. Nothing is applied unless close() sees the
    input through to EOF; abort() kills the tool before it reads a COMMIT it was never sent."""

    def __init__(self, cmd: list[str], timeout: float) -> None:
        self.cmd = cmd
        self.timeout = timeout
        self.bytes = 0
        # stderr goes to a file: a pipe could fill while we are still writing stdin.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()/abort()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err)
        self._broken = False

    def write(self, chunk: str | bytes) -> None:
        if self._broken:
            return  # the tool stopped reading (bad input): close() reports its error
        data = chunk if isinstance(chunk, bytes) else chunk.encode()
        self.bytes += len(data)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
        except BrokenPipeError:
            self._broken = True

    def abort(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self._err.close()

    def close(self) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            rc = self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.abort()
            raise IPTablesError(self.cmd, -9, f"timed out after {self.timeout}s") from None
        self._err.seek(0)
        stderr = self._err.read().decode(errors="replace")
        self._err.close()
        if rc != 0:
            raise IPTablesError(self.cmd, rc, stderr)


def _with_tables(lines: list[str]) -> Iterator[tuple[str, str]]:
    """(table, line) for each line of an iptables-save dump."""
    table = ""
    for line in lines:
        if line.startswith("*"):
            table = line[1:].strip()
        yield table, line


def chains_in_dump(dump: str) -> set[str]:
    """Chain names declared in an iptables-save dump of one table (upstream GetChainsFromTable)."""
    return {line[1:].split(" ", 1)[0] for line in dump.splitlines() if line.startswith(":")}

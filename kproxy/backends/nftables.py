"""The nftables kernel interface: a transaction is an nft script applied as ONE netlink batch,
either every command in it takes effect or none does (the kernel aborts the batch on the first
error), which is what makes a failed sync leave the previous ruleset.

Two ways, same meaning: a script of kproxy's own grammar is encoded by kproxy.backends.nftnl and
sent on a netlink socket (no process, no ruleset cache: what makes a partial sync take
milliseconds); anything else goes through `nft -f -`, as upstream's knftables does.
Everything runs in the node's network namespace when `netns` is set.
"""
from __future__ import annotations

import itertools
import json
import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kproxy.backends.iptables import ipv4_addresses
from kproxy.fastpath import pure_twin, want_pure

if TYPE_CHECKING:
    from kproxy.backends import nftnl as nftnl  # re-exported: the proxier takes the one chosen here
else:  # the encoder compiled by Cython from its source, or that source as Python (KPROXY_PURE=1)
    from kproxy.backends import nftnl as _compiled

    nftnl = pure_twin(_compiled) if want_pure() else _compiled

NFT_TIMEOUT = 600.0  # seconds; a 10,000-Service first sync takes 10-25 s on a loaded 2-core machine
STREAM_LINES = 10000  # lines per write when streaming a transaction


class NftError(Exception):
    """nft refused a transaction (nothing of it was applied) or could not run."""


class Nft:
    def __init__(self, netns: str | None = None, binary: str = "nft", netlink: bool = True) -> None:
        self.netns = netns
        self.binary = binary
        self.netlink = netlink  # False: every transaction through `nft -f` (tests compare the two)
        self.last_way = ""  # "netlink" or "nft": how the last transaction went
        self.last_batch_bytes = 0  # the last netlink batch's size

    def _cmd(self, *args: str) -> list[str]:
        cmd = [self.binary, *args]
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _run(self, args: list[str], data: bytes | None = None) -> bytes:
        try:
            proc = subprocess.run(self._cmd(*args), input=data, capture_output=True, timeout=NFT_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NftError(f"nft {' '.join(args)}: {e}") from e
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise NftError(f"nft {' '.join(args)} exited {proc.returncode}: " + " | ".join(err[:6]))
        return proc.stdout

    def apply(self, transaction: str | Iterable[str]) -> None:
        """Applies `transaction` (an nft script, or its lines: a list, or anything that can be
        read more than once, as the nft -f fallback reads it again) atomically; raises NftError if
        nothing was applied. Lines are streamed to nft's stdin in chunks: the script of a
        10,000-Service table (25 MB) never exists whole in this process."""
        if self.netlink:
            try:
                items = transaction.parts() if isinstance(transaction, nftnl.Parts) else transaction
                batch = nftnl.translate([items] if isinstance(items, str) else items)
            except nftnl.Untranslatable:
                pass
            else:
                self.last_way = "netlink"
                self.last_batch_bytes = batch.size
                try:
                    nftnl.send(batch, self.netns)
                except OSError as e:
                    raise NftError(f"nfnetlink batch refused: {e}") from e
                return
        self.last_way = "nft"
        if isinstance(transaction, str):
            self._run(["-f", "-"], transaction.encode())
            return
        args = ["-f", "-"]
        try:
            proc = subprocess.Popen(self._cmd(*args), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except OSError as e:
            raise NftError(f"nft -f -: {e}") from e
        assert proc.stdin is not None
        try:
            # nft reads its whole input before it sends anything to the kernel, and writes to
            # stderr only after that, so the pipe cannot deadlock.
            pending = iter(transaction)  # a full sync's script makes its lines as they are read
            while chunk := "".join(itertools.islice(pending, STREAM_LINES)):
                proc.stdin.write(chunk.encode())
            proc.stdin.close()
            err = proc.stderr.read() if proc.stderr is not None else b""
            code = proc.wait(timeout=NFT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc.kill()
            proc.wait()
            raise NftError(f"nft -f -: {e}") from e
        if code != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise NftError(f"nft -f - exited {code}: " + " | ".join(lines[:6]))

    def table_exists(self, family: str, table: str) -> bool:
        try:
            self._run(["-t", "list", "table", family, table])  # -t: sets without their elements
        except NftError:
            return False
        return True

    def delete_table(self, family: str, table: str) -> bool:
        """Deletes the table if it exists; True if it is gone."""
        if not self.table_exists(family, table):
            return True
        self.apply(f"delete table {family} {table}\n")
        return True

    def list_json(self, family: str, table: str) -> list[dict[str, object]]:
        """The kernel's view of a table as `nft -j list table` objects (tests, tools)."""
        out = json.loads(self._run(["-j", "list", "table", family, table]))
        items = out.get("nftables", []) if isinstance(out, dict) else []
        return [i for i in items if isinstance(i, dict)]

    def local_ipv4_addresses(self) -> list[str]:
        """Addresses on this node's interfaces, for --nodeport-addresses matching."""
        return self.local_addresses("IPv4")

    def local_addresses(self, family: str = "IPv4") -> list[str]:
        """This family's addresses on the node's interfaces, for --nodeport-addresses matching
        (IPv6: link-local ones left out, a Service is never reached on them)."""
        v6 = family == "IPv6"
        cmd = ["ip", *(["-n", self.netns] if self.netns else []), "-o", "-6" if v6 else "-4", "addr", "show"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise NftError(f"listing addresses: {e}") from e
        if not v6:
            return ipv4_addresses(out)
        return [ip for ip in ipv4_addresses(out, "inet6") if not ip.lower().startswith("fe80:")]

"""Stale UDP conntrack cleanup with the conntrack tool, as upstream's pkg/proxy/conntrack (1.30).

UDP has no connection teardown: a client that keeps sending to a service VIP keeps matching the
conntrack entry that DNATs to a backend that is gone (or, before the service had endpoints, the
entry that saw the REJECT path). Upstream deletes:
  - for a UDP service that gained endpoints: every entry whose original destination is one of
    its IPs (ClusterIP, externalIPs, LB IPs) and, for a NodePort, every UDP entry to that port;
  - for a removed UDP endpoint: entries from the service IPs DNATed to that endpoint's IP and,
    for a NodePort, entries to the node port DNATed to it.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field

from kproxy.model import IPFamily

log = logging.getLogger(__name__)


@dataclass
class Conntrack:
    netns: str | None = None
    # Each family's proxier cleans its own family's table (conntrack -f ipv6 for IPv6).
    family: IPFamily = "IPv4"
    binary: str = "conntrack"
    timeout: float = 30.0
    deletions: list[list[str]] = field(default_factory=list, init=False)  # last sync's calls, for logs/tests

    def _delete(self, args: list[str]) -> int:
        """Run `conntrack -D ARGS`; returns the number of entries deleted (0 when none matched)."""
        family = ["-f", "ipv6"] if self.family == "IPv6" else []  # conntrack's default is ipv4
        cmd = (["ip", "netns", "exec", self.netns] if self.netns else []) + [self.binary, "-D", *family, *args]
        self.deletions.append(args)
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("conntrack delete failed cmd=%r err=%s", cmd, e)
            return 0
        # conntrack exits 1 with "0 flow entries have been deleted" when nothing matched.
        for line in proc.stderr.splitlines():
            if "flow entries have been deleted" in line:
                try:
                    return int(line.split(":")[-1].split()[0])
                except (ValueError, IndexError):
                    return 0
        if proc.returncode not in (0, 1):
            log.warning(
                "conntrack delete failed cmd=%r rc=%d stderr=%s", cmd, proc.returncode, proc.stderr.strip()
            )
        return 0

    def clear_entries_for_ip(self, ip: str, protocol: str = "udp") -> int:
        return self._delete(["--orig-dst", ip, "-p", protocol])

    def clear_entries_for_port(self, port: int, protocol: str = "udp") -> int:
        return self._delete(["-p", protocol, "--dport", str(port)])

    def clear_entries_for_nat(self, origin: str, dest: str, protocol: str = "udp") -> int:
        return self._delete(["--orig-dst", origin, "--dst-nat", dest, "-p", protocol])

    def clear_entries_for_port_nat(self, dest: str, port: int, protocol: str = "udp") -> int:
        return self._delete(["-p", protocol, "--dport", str(port), "--dst-nat", dest])

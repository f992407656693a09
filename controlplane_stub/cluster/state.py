"""Where a cluster keeps its state (state.json in its data dir) and how its processes are found."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from controlplane_stub import seed
from controlplane_stub.agent.record import Record

MARKER = "KPC_CLUSTER"
# Package data (examples/seed/flask-kubernetes.yaml links to it): found also when installed.
SEED = seed.path("flask-kubernetes.yaml")
DNS_IP = "10.96.0.10"
SERVICE_CIDR = "10.96.0.0/12"
# The IPv6 Service range (a /112: kube-apiserver allows at most /108 for IPv6) and kube-dns's
# IPv6 ClusterIP in it (the 10th address, as 10.96.0.10).
DNS_IP6 = "fd00:10:96::a"
SERVICE_CIDR6 = "fd00:10:96::/112"
LB_POOL = {"ipv4": "10.251.0.0/24", "ipv6": "fd00:10:251::/120"}


def per_family(ip_family: str, v4: str, v6: str) -> list[str]:
    """The values of the cluster's families, primary first (`up --ip-family ipv4|ipv6|dual`)."""
    return {"ipv4": [v4], "ipv6": [v6], "dual": [v4, v6]}[ip_family]


def default_lb_pool(ip_family: str) -> str:
    return ",".join(per_family(ip_family, LB_POOL["ipv4"], LB_POOL["ipv6"]))


def lb_routes(pool: str) -> list[str]:
    """The CIDRs the client routes to the nodes for an --lb-pool (ValueError if it does not parse)."""
    from controlplane_stub.controllers.loadbalancer import parse_pool

    return parse_pool(pool).cidrs()
MAX_ZONES = 26  # zone-a .. zone-z


def node_zone(index: int, zones: int) -> str:
    """The topology.kubernetes.io/zone of node `index` (1-based) in a cluster of `zones` zones:
    round robin, so every zone gets nodes before any gets a second; "" (no label) for 0 zones."""
    if not 0 <= zones <= MAX_ZONES or index < 1:
        raise ValueError(f"node {index} of {zones} zones: zones must be 0..{MAX_ZONES}, nodes from 1")
    return f"zone-{chr(ord('a') + (index - 1) % zones)}" if zones else ""


def default_data_dir(name: str) -> Path:
    base = os.environ.get("KPROXY_CLUSTER_HOME") or os.path.expanduser("~/.kproxy-cluster")
    return Path(base) / name


def self_command() -> list[str]:
    script = Path(sys.executable).parent / "kproxy-cluster"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from controlplane_stub.cluster import main; sys.exit(main())"]


def tool(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else shutil.which(name)


@dataclass
class State:
    name: str
    prefix: str
    data_dir: str
    nodes: int
    proxy_mode: str
    lb_pool: str
    api_port: int = 0
    api_url: str = ""
    supervisor_pid: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    components: dict[str, str] = field(default_factory=dict)
    ready: bool = False
    # Unique per `up`: the value of the KPC_CLUSTER marker its processes carry (see marker).
    instance: str = ""
    ip_family: str = "ipv4"  # ipv4 | ipv6 | dual (IPv4 primary)
    # Per supervised process, as the supervisor last saw it: state (running, backoff, stopped),
    # since (epoch seconds), restarts, pid, last_exit, next_start (epoch seconds, in back-off).
    supervised: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "state.json"

    @property
    def marker(self) -> str:
        return f"{self.prefix}{self.instance}"

    @property
    def record(self) -> Record:
        """What this cluster made (netns, processes): what `down` removes (agent/record.py)."""
        return Record(Path(self.data_dir) / "owned.jsonl")

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    @staticmethod
    def load(data_dir: Path) -> State | None:
        """The state file, or None when it is missing or not one (a field of the wrong type is
        reset to its default, so that `status` and `down` still work on a damaged file)."""
        try:
            raw = json.loads((data_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict):
            return None
        kept: dict[str, Any] = {}
        for f in fields(State):
            v = raw.get(f.name)
            want = {"str": str, "int": int, "bool": bool}.get(str(f.type), dict)
            if v is not None and isinstance(v, want) and not (want is int and isinstance(v, bool)):
                kept[f.name] = v
        try:
            return State(**kept)
        except TypeError:  # a required field missing
            return None

    @property
    def kubeconfig(self) -> str:
        return str(Path(self.data_dir) / "kubeconfig")


def marked_pids(marker: str) -> list[int]:
    """Processes started by this `up` (they carry KPC_CLUSTER=State.marker in their environment)."""
    want = f"{MARKER}={marker}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if want in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            continue
    return out

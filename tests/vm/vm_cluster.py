"""The VM cluster test bed: N User-Mode Linux VMs, one kernel per node, on one L2 network.

    PREFIX (netns)   bridge br0 10.250.0.2/24 (the client: curl, kubectl), tap1..tapN on br0,
                     routes to the LoadBalancer pool over every node (ECMP, as a router would)
                     and to each node's pod CIDR 10.244.I.0/24 via that node
    VM node-I        eth0 (vec0 on tapI) 10.250.0.(10+I)/24; node-1 is the server (API server,
                     controllers, DNS); every node runs the node agent and kproxy

Each VM is `tests/vm/run --net PREFIX:tapI -- tests/vm/cluster/node.sh ...`: it is provisioned by
vagrant/provision.sh and runs the units provision.sh wrote. The UML processes run inside the bed's
netns, so the taps and the bridge live there and nothing is configured in the root namespace. A
shared directory (hostfs) carries the kubeconfig the server publishes and every node's logs.
`stop()` ends the VMs, removes the netns and the directory, also after a failure; a VM's runner
kills it after its --timeout anyway.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "run"
REPO = RUNNER.parents[2]
NODE_SH = REPO / "tests" / "vm" / "cluster" / "node.sh"
CLIENT_IP = "10.250.0.2"
LB_POOL = "10.251.0.0/24"


def node_ip(index: int) -> str:
    return f"10.250.0.{10 + index}"


def sh(*cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


VM_CANNOT_START = 125  # tests/vm/run's exit status when the VM could not start


class BedError(RuntimeError):
    pass


class VMCannotStart(BedError):
    """A VM's runner exited 125 and said "VM cannot start" (no UML kernel, or it panics before its
    init runs, as Debian's 6.1 UML does on hosts with AMX: "ptrace set fp regs failed, errno = 14").
    The single-VM tests skip on it (tests/vm/conftest.py); the bed's tests do the same."""


@dataclass
class Bed:
    mode: str
    nodes: int
    vm_timeout: int
    ns: str = field(default_factory=lambda: f"kptvc-{secrets.token_hex(3)}")
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kptvc-")))
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        sh("ip", "netns", "add", self.ns)
        batch = [
            "link set lo up",
            "link add br0 type bridge",
            f"addr add {CLIENT_IP}/24 dev br0",
            "link set br0 up",
        ]
        for i in range(1, self.nodes + 1):
            batch += [f"tuntap add tap{i} mode tap", f"link set tap{i} master br0", f"link set tap{i} up"]
        hops = " ".join(f"nexthop via {node_ip(i)} dev br0" for i in range(1, self.nodes + 1))
        batch.append(f"route replace {LB_POOL} {hops}")
        # Pod CIDRs via their nodes, so that the client can reach a prober pod directly.
        batch += [f"route replace 10.244.{i}.0/24 via {node_ip(i)} dev br0" for i in range(1, self.nodes + 1)]
        subprocess.run(["ip", "-n", self.ns, "-batch", "-"], input="\n".join(batch) + "\n", text=True,
                       capture_output=True, timeout=30, check=True)
        for i in range(1, self.nodes + 1):
            self.boot(i)

    def boot(self, i: int) -> None:
        role = "server" if i == 1 else "node"
        mem = "640M" if i == 1 else "384M"
        out = (self.dir / f"vm-{i}.out").open("wb")
        self.procs[i] = subprocess.Popen(
            [str(RUNNER), "--timeout", str(self.vm_timeout), "--mem", mem, "--net", f"{self.ns}:tap{i}",
             "--share", str(self.dir), "--umid-file", str(self.dir / f"umid-{i}"), "--",
             "bash", str(NODE_SH), role, str(i), str(self.nodes), self.mode, node_ip(1), str(self.dir)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def kill_node(self, i: int) -> None:
        """Powers VM node-I off at once (SIGKILL to every process of its kernel), as a pulled plug."""
        umid = (self.dir / f"umid-{i}").read_text().strip()
        mark = f" umid={umid} ".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if mark in cmdline:
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.killed.add(i)

    def stop(self) -> None:
        # units.py stops the units (kproxy's ExecStopPost cleanup included) once "stop" exists;
        # the VMs vanish with their state either way, so give that only a short while.
        (self.dir / "stop").touch()
        deadline = time.monotonic() + 12
        for p in self.procs.values():
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            if p.poll() is None:
                # The runner's own trap kills its VM by umid.
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        sh("ip", "netns", "del", self.ns, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self, lines: int = 30) -> str:
        """The tail of every log the VMs wrote (runner output, node.sh, each unit)."""
        parts = []
        for f in sorted(self.dir.glob("vm-*.out")) + sorted(self.dir.glob("logs/*/*.log")):
            try:
                text = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"==> {f.relative_to(self.dir)} <==\n" + "\n".join(text))
        return "\n".join(parts)

    def check_vms(self) -> None:
        for i, p in self.procs.items():
            if i not in self.killed and p.poll() is not None:
                out = self.dir / f"vm-{i}.out"
                text = out.read_text(errors="replace") if out.exists() else ""
                cannot = [ln for ln in text.splitlines() if "VM cannot start" in ln]
                if p.returncode == VM_CANNOT_START and cannot:
                    raise VMCannotStart(cannot[-1].strip())
                raise BedError(f"VM node-{i} stopped (runner exit {p.returncode})\n{self.logs()}")

    # -- the client ------------------------------------------------------------------------
    def client(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *cmd, timeout=timeout, check=check)

    def kubectl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        return self.client("kubectl", "--kubeconfig", str(self.kubeconfig), *args, timeout=timeout,
                           check=check).stdout

    def curl(self, url: str, max_time: float = 3) -> subprocess.CompletedProcess[str]:
        """One HTTP request from the client; returncode 0 and the body, or curl's error."""
        return self.client("curl", "-s", "-m", str(max_time), "-o", "-", "-w", "\n%{http_code}", url,
                           timeout=max_time + 10, check=False)

    def curl_until(self, url: str, want: Callable[[str], bool], timeout: float = 30) -> str:
        """The first 200 body from url that want() accepts, polled while kproxy on the nodes
        catches up with the API (the last body, possibly '', when none did in time)."""
        body = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = ok_body(self.curl(url))
            if want(body):
                break
            time.sleep(0.5)
        return body

    def wait_for(self, what: str, ok: object, timeout: float, every: float = 1.0) -> float:
        """Polls ok() until it is true; returns the seconds it took. Fails with the VMs' logs."""
        assert callable(ok)
        t0 = time.monotonic()
        last: object = None
        while time.monotonic() - t0 < timeout:
            self.check_vms()
            try:
                last = ok()
                if last:
                    return time.monotonic() - t0
            except (RuntimeError, subprocess.SubprocessError) as e:
                last = e
            time.sleep(every)
        raise BedError(f"{what}: not within {timeout:.0f} s (last: {last!r})\n{self.logs()}")

    def ready_nodes(self) -> set[str]:
        out = self.kubectl("get", "nodes", "--no-headers", check=False)
        return {ln.split()[0] for ln in out.splitlines() if len(ln.split()) > 1 and ln.split()[1] == "Ready"}

    def wait_ready(self, timeout: float) -> float:
        want = {f"node-{i}" for i in range(1, self.nodes + 1)}
        return self.wait_for(f"{self.nodes} nodes Ready", lambda: self.kubeconfig.exists()
                             and self.ready_nodes() == want, timeout, every=2)

    def pods(self, selector: str) -> dict[str, tuple[str, str, str]]:
        """name -> (phase, node, pod IP) of the pods matching a label selector."""
        out = self.kubectl("get", "pods", "-l", selector, "--no-headers", "-o",
                           "custom-columns=N:.metadata.name,P:.status.phase,NODE:.spec.nodeName,IP:.status.podIP")
        rows = [ln.split() for ln in out.splitlines() if ln.strip()]
        return {r[0]: (r[1], r[2], r[3]) for r in rows if len(r) == 4}

    def service_field(self, name: str, jsonpath: str) -> str:
        return self.kubectl("get", "svc", name, "-o", f"jsonpath={jsonpath}").strip()

    def slice_addresses(self, service: str) -> set[str]:
        """The ready endpoint addresses of a Service's EndpointSlices."""
        out = self.kubectl("get", "endpointslices", "-l", f"kubernetes.io/service-name={service}", "-o",
                           "jsonpath={range .items[*].endpoints[?(@.conditions.ready==true)]}"
                           "{.addresses[0]} {end}")
        return set(out.split())


def ok_body(r: subprocess.CompletedProcess[str]) -> str:
    """The body of a 200 answer to Bed.curl ('' for anything else)."""
    body, _, code = r.stdout.rpartition("\n")
    return body if r.returncode == 0 and code == "200" else ""


POD_IP = re.compile(r"10\.244\.(\d+)\.\d+")


def node_of_pod_ip(ip: str) -> int:
    m = POD_IP.fullmatch(ip)
    if not m:
        raise ValueError(f"not a pod IP: {ip!r}")
    return int(m.group(1))

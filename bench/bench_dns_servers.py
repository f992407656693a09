"""kproxy-dns side by side with unbound and dnsmasq, driven by dnsperf over 127.0.0.1.

The same generated zone for all three: 10,000 Services (1,000 headless with 5 ready pods each),
one named TCP port each (so SRV records), PTR for every ClusterIP and pod IP. Query mix: 80% A,
10% SRV, 5% NXDOMAIN, 5% PTR. Each server is pinned to one core (taskset -c 1), dnsperf to the
other; the figure that matters is queries answered per CPU-second the server used (utime+stime
from /proc), with dnsperf's average latency and the server's RSS beside it.

  .venv/bin/pytest bench/bench_dns_servers.py --benchmark-enable -s     (KDNS_BENCH_SECONDS=10)
Results go to stdout and to bench/README.md, section "dns".
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import plots  # bench/plots.py: pytest puts bench/ on sys.path
import pytest

ROOT = Path(__file__).resolve().parents[1]
ZONE = "cluster.local"
SERVICES = 10_000
HEADLESS_EVERY = 10  # every 10th Service is headless: 1,000
PODS = 5
NAMESPACES = 100
SECONDS = float(os.environ.get("KDNS_BENCH_SECONDS", "10"))
SERVER_CPU = "1"
CLIENT_CPU = "0"
PACED_QPS = 2000  # for the latency column measured below saturation


def _svc(i: int) -> tuple[str, str]:
    return f"ns{i % NAMESPACES}", f"svc{i}"


def cluster_ip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.96.0.0") + 10 + i)


def pod_ip(i: int, k: int) -> str:
    return str(ipaddress.IPv4Address("10.244.0.0") + 10 + i * PODS + k)


def dashed(ip: str) -> str:
    return ip.replace(".", "-")


def kube_objects() -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    for i in range(SERVICES):
        ns, name = _svc(i)
        headless = i % HEADLESS_EVERY == 0
        spec: dict[str, Any] = {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        if headless:
            spec["clusterIP"] = "None"
        else:
            spec["clusterIP"] = cluster_ip(i)
            spec["clusterIPs"] = [cluster_ip(i)]
        items.append({"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec})
        if headless:
            items.append({
                "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-x", "namespace": ns,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [pod_ip(i, k)], "conditions": {"ready": True}} for k in range(PODS)],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            })
    return {"kind": "List", "apiVersion": "v1", "items": items}


def _fqdn(i: int) -> str:
    ns, name = _svc(i)
    return f"{name}.{ns}.svc.{ZONE}"


def unbound_conf(port: int) -> str:
    lines = [
        "server:",
        "  interface: 127.0.0.1",
        f"  port: {port}",
        "  do-ip6: no",
        "  do-daemonize: no",
        "  use-syslog: no",
        "  username: \"\"",
        "  chroot: \"\"",
        "  num-threads: 1",
        "  verbosity: 0",
        "  so-reuseport: no",
        "  harden-glue: no",
        "  minimal-responses: yes",
        "  access-control: 127.0.0.0/8 allow",
        "  module-config: \"iterator\"",
        f"  local-zone: \"{ZONE}.\" static",
        "  local-zone: \"10.in-addr.arpa.\" static",
    ]
    for i in range(SERVICES):
        fq = _fqdn(i)
        if i % HEADLESS_EVERY == 0:
            for k in range(PODS):
                ip = pod_ip(i, k)
                target = f"{dashed(ip)}.{fq}"
                lines.append(f"  local-data: \"{fq}. 5 IN A {ip}\"")
                lines.append(f"  local-data: \"{target}. 5 IN A {ip}\"")
                lines.append(f"  local-data: \"_http._tcp.{fq}. 5 IN SRV 0 20 8080 {target}.\"")
                lines.append(f"  local-data-ptr: \"{ip} 5 {target}.\"")
        else:
            ip = cluster_ip(i)
            lines.append(f"  local-data: \"{fq}. 5 IN A {ip}\"")
            lines.append(f"  local-data: \"_http._tcp.{fq}. 5 IN SRV 0 100 80 {fq}.\"")
            lines.append(f"  local-data-ptr: \"{ip} 5 {fq}.\"")
    return "\n".join(lines) + "\n"


def dnsmasq_conf(port: int) -> str:
    lines = ["no-resolv", "no-hosts", "no-daemon", "bind-interfaces", "listen-address=127.0.0.1",
             f"port={port}", f"local=/{ZONE}/", "local=/10.in-addr.arpa/", "local-ttl=5", "cache-size=0",
             "user=root"]
    for i in range(SERVICES):
        fq = _fqdn(i)
        if i % HEADLESS_EVERY == 0:
            for k in range(PODS):
                ip = pod_ip(i, k)
                target = f"{dashed(ip)}.{fq}"
                lines.append(f"host-record={target},{ip}")
                lines.append(f"host-record={fq},{ip}")
                lines.append(f"srv-host=_http._tcp.{fq},{target},8080,0,20")
        else:
            ip = cluster_ip(i)
            lines.append(f"host-record={fq},{ip}")
            lines.append(f"srv-host=_http._tcp.{fq},{fq},80,0,100")
    return "\n".join(lines) + "\n"


def query_file(n: int = 100_000, seed: int = 7) -> str:
    """80% A, 10% SRV, 5% NXDOMAIN, 5% PTR over the whole zone."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        r = rnd.random()
        i = rnd.randrange(SERVICES)
        if r < 0.80:
            out.append(f"{_fqdn(i)} A")
        elif r < 0.90:
            out.append(f"_http._tcp.{_fqdn(i)} SRV")
        elif r < 0.95:
            ns, _ = _svc(i)
            out.append(f"nx{i}.{ns}.svc.{ZONE} A")
        else:
            ip = pod_ip(i, rnd.randrange(PODS)) if i % HEADLESS_EVERY == 0 else cluster_ip(i)
            out.append(f"{ipaddress.ip_address(ip).reverse_pointer} PTR")
    return "\n".join(out) + "\n"


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait_answering(port: int, name: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        r = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, "A", "+short", "+tries=1", "+time=1"],
                           capture_output=True, text=True, timeout=10, check=False)
        # dig prints its errors on stdout too: only an address means the zone is loaded.
        if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", r.stdout.strip()):
            time.sleep(0.5)  # let start-up work (GC after the load) finish before CPU is counted
            return
        time.sleep(0.3)
    raise RuntimeError(f"server on port {port} did not answer {name}")


def run_dnsperf(port: int, queries: Path, seconds: float, rate: int = 0) -> dict[str, float]:
    """rate 0: as fast as 256 outstanding queries allow; else a fixed rate (dnsperf -Q), where
    latency is the server's answer time rather than queueing behind the client's window."""
    cmd = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
           "-l", str(seconds), "-q", "256", "-c", "4", "-t", "2", *(["-Q", str(rate)] if rate else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False).stdout
    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0
    return {
        "completed": num(r"Queries completed:\s+(\d+)"),
        "lost": num(r"Queries lost:\s+(\d+)"),
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "latency_ms": num(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "noerror": num(r"NOERROR (\d+)"),
        "nxdomain": num(r"NXDOMAIN (\d+)"),
    }


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the server does not exit within 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(name: str, cmd: list[str], port: int, workdir: Path, queries: Path) -> dict[str, Any]:
    with open(workdir / f"{name}.log", "wb") as log:  # Popen keeps its own copy of the fd
        proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdout=subprocess.DEVNULL, stderr=log,
                                cwd=workdir)
    try:
        _wait_answering(port, _fqdn(1), proc)
        rss_before = _rss_mib(proc.pid)
        cpu0 = _cpu_seconds(proc.pid)
        perf = run_dnsperf(port, queries, SECONDS)
        cpu = _cpu_seconds(proc.pid) - cpu0
        rss = _rss_mib(proc.pid)
        paced = run_dnsperf(port, queries, min(SECONDS, 5.0), rate=PACED_QPS)
    finally:
        stop_process(proc)
    return {"server": name, **perf, "paced_latency_ms": paced["latency_ms"], "paced_lost": paced["lost"],
            "cpu_s": cpu, "qps_per_cpu_s": perf["completed"] / cpu if cpu else 0.0,
            "rss_mib": max(rss, rss_before)}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [("| server | queries completed | lost | qps (wall) | server CPU s | qps per CPU-second | "
              f"avg latency ms (saturated) | avg latency ms at {PACED_QPS} qps | NXDOMAIN | RSS MiB |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['completed']:.0f} | {r['lost']:.0f} | {r['qps']:.0f} | {r['cpu_s']:.2f} | "
                     f"{r['qps_per_cpu_s']:.0f} | {r['latency_ms']:.3f} | {r['paced_latency_ms']:.3f} | "
                     f"{r['nxdomain']:.0f} | {r['rss_mib']:.1f} |")
    return "\n".join(lines)


README = ROOT / "bench" / "README.md"
# bench_dns_memory.py writes this subsection of "## dns"; write_readme() keeps it.
MEMORY_HEADING = "### kproxy-dns memory"


def machine() -> str:
    """Date, CPU, cores and the 1-minute load average, for a figure's caption."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu}, {os.cpu_count()} cores, "
            f"load average {Path('/proc/loadavg').read_text().split()[0]}")


def update_dns_readme(block: str, *, memory: bool = False) -> None:
    """Rewrites one part of bench/README.md's "## dns" section, leaving the rest of the file as it
    is: the servers part (from the heading to the memory subsection) or the memory subsection."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    m = re.search(r"^## dns\n.*?(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    head, sep, tail = (m.group(0) if m else "## dns\n").partition(MEMORY_HEADING)
    parts = [head, sep + tail if sep else ""]
    parts[1 if memory else 0] = block
    section = "".join(p.rstrip("\n") + "\n\n" for p in parts if p)
    text = text[:m.start()] + section + text[m.end():] if m else text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


def write_readme(rows: list[dict[str, Any]]) -> None:
    update_dns_readme(
        "## dns\n\n"
        f"`bench/bench_dns_servers.py`, {machine()}. dnsperf (-q 256, {SECONDS:.0f} s) over 127.0.0.1 against "
        "each server pinned to one core, dnsperf on the other; zone: 10,000 Services (1,000 headless x 5 pods), "
        "SRV and PTR; mix 80% A, 10% SRV, 5% NXDOMAIN, 5% PTR. qps per CPU-second = answers / (server "
        "utime+stime).\n\n"
        + _table(rows) + "\n\n"
        "![DNS qps per CPU-second: kproxy-dns, unbound, dnsmasq](img/dns_qps_per_cpu.png)\n\n"
        "Notes: the machine is shared (2 cores, other suites may run at the same time: look at the "
        "load average printed by the test), so qps (wall) and latency move a lot between runs; qps per "
        "CPU-second is the steadier figure. Saturated latency is dnsperf's average with 256 queries "
        "outstanding (queueing behind the client's window: Little's law); the paced column (dnsperf -Q, "
        "5 s) is the answer time below saturation. kproxy-dns runs its compiled path "
        "(kdns._wire: recvmmsg/sendmmsg batches, pre-encoded answers); RSS is VmRSS after the run with "
        "the zone loaded from `--objects` (as deployed, fed by the API server: see the memory table "
        "below). dnsmasq answers from host-record/srv-host lines and is slow on this zone (it scans "
        "its SRV entries on every query), as the issue reported.\n\n"
        "Measured separately on 2026-12-03 13:17 UTC, same machine (load average 1.7): the answer path "
        "alone (`bench/bench_dns_answer.py`, no sockets) takes 0.25 us per query compiled and 2.52 us "
        "pure (10.0x; 0.85 and 6.3 us on 2026-11-23 at load average 4 to 10).\n")


def _have(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


@pytest.mark.timeout(600)
def test_dns_servers_side_by_side(benchmark: Any) -> None:
    missing = _have("dnsperf", "unbound", "dnsmasq", "taskset", "dig")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages dnsperf unbound dnsmasq-base util-linux dnsutils)")
    kdns = ROOT / ".venv" / "bin" / "kproxy-dns"
    work = Path(tempfile.mkdtemp(prefix="kdns-bench-"))
    try:
        (work / "objects.json").write_text(json.dumps(kube_objects()))
        queries = work / "queries.txt"
        queries.write_text(query_file())
        rows: list[dict[str, Any]] = []

        def run_all() -> None:
            rows.clear()
            p = free_port()
            rows.append(measure("kproxy-dns", [str(kdns), "--objects", str(work / "objects.json"),
                                               "--dns-bind-address", "127.0.0.1", "--dns-port", str(p),
                                               "--health-port", "0", "--upstream", "127.0.0.1:9",
                                               "--v", "warning"], p, work, queries))
            p = free_port()
            (work / "unbound.conf").write_text(unbound_conf(p))
            rows.append(measure("unbound", ["unbound", "-d", "-c", str(work / "unbound.conf")], p, work, queries))
            p = free_port()
            (work / "dnsmasq.conf").write_text(dnsmasq_conf(p))
            rows.append(measure("dnsmasq", ["dnsmasq", "-C", str(work / "dnsmasq.conf")], p, work, queries))

        benchmark.pedantic(run_all, rounds=1, iterations=1)
        print("\n" + _table(rows))
        print("load average:", Path("/proc/loadavg").read_text().strip())
        write_readme(rows)
        plots.record("dns", "dns_qps_per_cpu", "qps per CPU-second (answers / server utime+stime)",
                     {r["server"]: r["qps_per_cpu_s"] for r in rows}, plots.stamp("bench_dns_servers.py"))
        by = {r["server"]: r for r in rows}
        ratio = by["kproxy-dns"]["qps_per_cpu_s"] / max(by["unbound"]["qps_per_cpu_s"], 1.0)
        benchmark.extra_info.update({r["server"]: r for r in rows})
        benchmark.extra_info["kdns_vs_unbound_qps_per_cpu"] = ratio
        print(f"kproxy-dns / unbound qps per CPU-second: {ratio:.2f}")
        # Every server must have answered (a broken config would make the comparison meaningless).
        for r in rows:
            assert r["completed"] > 0, f"{r['server']} answered nothing"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-enable", "-s", "-p", "no:cacheprovider"]))

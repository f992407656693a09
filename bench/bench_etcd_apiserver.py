"""kproxy-apiserver on etcd, side by side in one run with kproxy-apiserver on SQLite and, when the peer
binary exists, kube-apiserver 1.24 on the same etcd 3.4 (shared/peers: KPROXY_PEERS_OUT=OUT_DIR of
its build.sh). Every store's data on tmpfs (/dev/shm), so no one pays an fsync the other does not.

At 10,000 Services: create rate with 32 clients (each its own connection), the full list's time
(best of 5), a 50-watcher fan-out (events/s delivered while 32 clients create 1,000 ConfigMaps; the
creating clients in a process of their own)
and the CPU seconds the API server and etcd spent during it (events per server CPU-second moves
less with the machine's load than events/s), RSS of the API server and of etcd apart.

All servers run at once: each is loaded and listed in turn, then the fan-out goes round them
FANOUT_ROUNDS times (A, B, C, A, B, C, ...), so a change of the machine's load during the run hits
every server's rounds alike; the table shows each server's median round (and the range).

Run: .venv/bin/pytest bench/bench_etcd_apiserver.py --benchmark-enable -s
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import plots  # bench/plots.py: pytest puts bench/ on sys.path
import pytest
import yaml

from controlplane_stub.apiserver.testing import running_apiserver
from controlplane_stub.store.etcd_process import EtcdCluster, etcd_available, free_port, running_etcd

N_SERVICES = 10_000
N_WATCHERS = 50
N_EVENTS = 1000
FANOUT_ROUNDS = int(os.environ.get("KPROXY_BENCH_FANOUT_ROUNDS", "3"))  # more rounds: a steadier median


def _cpu_s(pid: int) -> float:
    """utime + stime of a process so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Target:
    name: str
    url: str
    token: str
    ca_file: str
    pid: int
    etcd_rss: Callable[[], float]
    etcd_pids: Callable[[], list[int]]
    namespace: str = "default"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def _service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i:05d}", "labels": {"app": f"a{i % 100}"}},
            "spec": {"selector": {"app": f"a{i % 100}"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


async def _create_many(t: Target, path: str, bodies: list[dict[str, Any]], concurrency: int) -> float:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    ctx = t.ssl()

    async def worker() -> None:
        async with aiohttp.ClientSession(headers=t.headers) as s:
            while not queue.empty():
                body = queue.get_nowait()
                for _ in range(5):  # kube-apiserver answers 429 beyond its in-flight limit: retry
                    async with s.post(t.url + path, data=json.dumps(body), ssl=ctx) as r:
                        await r.read()
                        if r.status == 201:
                            break
                        assert r.status == 429, (r.status, await r.text())
                    await asyncio.sleep(0.05)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _list_best(t: Target, rounds: int) -> tuple[float, int]:
    ctx = t.ssl()
    best, n = 1e9, 0
    async with aiohttp.ClientSession(headers=t.headers) as s:
        for _ in range(rounds):
            started = time.perf_counter()
            async with s.get(t.url + "/api/v1/services", ssl=ctx) as r:
                body = await r.read()
            best = min(best, time.perf_counter() - started)
            n = len(json.loads(body)["items"])
    return best, n


# The fan-out's 32 creating clients run in a process of their own (started before the round, told
# to go on stdin): in one process with the 50 watchers the bench itself bounded the events/s.
_CREATORS = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import bench_etcd_apiserver as b
url, token, ca, round_ = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t = b.Target("creators", url, token, ca, 0, lambda: 0.0, lambda: [])
bodies = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"fan{round_}-{i}"}} for i in range(b.N_EVENTS)]
sys.stdin.readline()
asyncio.run(b._create_many(t, "/api/v1/namespaces/default/configmaps", bodies, 32))
"""


async def _fanout(t: Target, round_: int) -> float:
    creators = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CREATORS, os.path.dirname(os.path.abspath(__file__)), t.url, t.token, t.ca_file,
        str(round_), stdin=subprocess.PIPE)
    assert creators.stdin is not None
    ctx = t.ssl()
    path = "/api/v1/namespaces/default/configmaps"
    async with aiohttp.ClientSession(headers=t.headers) as s:
        async with s.get(t.url + path, params={"limit": "1"}, ssl=ctx) as r:
            rv = (await r.json())["metadata"]["resourceVersion"]
    ready = asyncio.Event()
    connected = 0
    done_at: list[float] = []

    async def watcher() -> None:
        nonlocal connected
        seen = 0
        async with aiohttp.ClientSession(headers=t.headers, timeout=aiohttp.ClientTimeout(total=None)) as s:
            async with s.get(t.url + path, ssl=ctx, params={"watch": "true", "resourceVersion": rv}) as r:
                connected += 1
                if connected == N_WATCHERS:
                    ready.set()
                # Events are counted by their newlines in whatever the socket delivered: splitting
                # 50,000 lines per round in Python made the bench's own process the bottleneck.
                async for data in r.content.iter_any():
                    seen += data.count(b"\n")
                    if seen >= N_EVENTS:
                        done_at.append(time.perf_counter())
                        return

    tasks = [asyncio.create_task(watcher()) for _ in range(N_WATCHERS)]
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    creators.stdin.write(b"go\n")
    await creators.stdin.drain()
    assert await asyncio.wait_for(creators.wait(), 300) == 0
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    return N_WATCHERS * N_EVENTS / (max(done_at) - started)


def _load(t: Target) -> dict[str, float]:
    out: dict[str, float] = {}
    secs = asyncio.run(_create_many(t, "/api/v1/namespaces/default/services",
                                    [_service(i) for i in range(N_SERVICES)], 32))
    out["creates_per_s"] = N_SERVICES / secs
    best, n = asyncio.run(_list_best(t, 5))
    assert n >= N_SERVICES
    out["list_s"] = best
    return out


def _fanout_round(t: Target, round_: int) -> tuple[float, float, float]:
    """(events/s, server CPU s, etcd CPU s) of one fan-out round."""
    cpu0, etcd0 = _cpu_s(t.pid), sum(_cpu_s(p) for p in t.etcd_pids())
    rate = asyncio.run(_fanout(t, round_))
    return rate, _cpu_s(t.pid) - cpu0, sum(_cpu_s(p) for p in t.etcd_pids()) - etcd0


@contextlib.contextmanager
def _kproxy(storage: str) -> Iterator[Target]:
    data = tempfile.mkdtemp(prefix="kproxy-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        with contextlib.ExitStack() as stack:
            extra = ["-v", "0"]
            etcd: EtcdCluster | None = None
            if storage == "etcd3":
                etcd = stack.enter_context(running_etcd(1))
                extra += ["--storage-backend", "etcd3", "--etcd-servers", etcd.endpoints]
            api = stack.enter_context(running_apiserver(data_dir=data, extra_args=extra, storage=storage))
            assert api.ca_file
            yield Target(f"kproxy-apiserver on {'etcd 3.4' if etcd else 'SQLite'}", api.url, api.token, api.ca_file,
                         api.pid, (lambda: etcd.rss_kib() / 1024) if etcd else (lambda: 0.0),
                         lambda: [m.proc.pid for m in etcd.members if m.proc is not None] if etcd else [])
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def _kube_apiserver(out_dir: str) -> Iterator[Target]:
    """shared/peers/up.sh: etcd 3.4 + kube-apiserver 1.24, etcd's data on tmpfs (TMPDIR)."""
    here = os.path.dirname(os.path.abspath(__file__))
    peers = os.environ.get("KPROXY_PEERS_DIR", os.path.join(here, "..", "..", "shared", "peers"))
    ports = {"ETCD_PORT": str(free_port()), "ETCD_PEER_PORT": str(free_port()), "APISERVER_PORT": str(free_port())}
    env = dict(os.environ, TMPDIR="/dev/shm", **ports)
    subprocess.run(["bash", os.path.join(peers, "up.sh"), out_dir], env=env, check=True, timeout=180,
                   capture_output=True)
    try:
        run = os.path.join(out_dir, "run")
        with open(os.path.join(run, "admin.kubeconfig")) as f:
            kc = yaml.safe_load(f)
        cluster = kc["clusters"][0]["cluster"]
        token = kc["users"][0]["user"]["token"]
        ca = cluster.get("certificate-authority") or os.path.join(run, "pki", "ca.crt")

        def pid(name: str) -> int:
            with open(os.path.join(run, f"{name}.pid")) as f:
                return int(f.read().strip())

        yield Target("kube-apiserver 1.24 on etcd 3.4", cluster["server"], token, ca, pid("kube-apiserver"),
                     lambda: _rss_mib(pid("etcd")), lambda: [pid("etcd")])
    finally:
        subprocess.run(["bash", os.path.join(peers, "down.sh"), out_dir], env=env, timeout=120, capture_output=True)


@pytest.mark.timeout(2400)
@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (apt-get install etcd-server)")
def test_apiservers_on_etcd_side_by_side(benchmark: Any) -> None:
    targets: list[Callable[[], contextlib.AbstractContextManager[Target]]] = [
        lambda: _kproxy("etcd3"), lambda: _kproxy("sqlite")]
    peer = os.environ.get("KPROXY_PEERS_OUT", "")
    if peer and os.access(os.path.join(peer, "bin", "kube-apiserver"), os.X_OK):
        targets.append(lambda: _kube_apiserver(peer))
    else:
        print("\nkube-apiserver 1.24 skipped: set KPROXY_PEERS_OUT to the OUT_DIR of shared/peers/build.sh "
              "(CI has no peer binary)")
    rows: dict[str, dict[str, float]] = {}
    rounds: dict[str, list[tuple[float, float, float]]] = {}

    def run() -> None:
        with contextlib.ExitStack() as stack:
            running = [stack.enter_context(make()) for make in targets]
            for t in running:
                started = time.monotonic()
                rows[t.name] = _load(t)
                print(f"\n{t.name}: {rows[t.name]} ({time.monotonic() - started:.0f} s)", flush=True)
            for i in range(FANOUT_ROUNDS):
                for t in running:
                    rounds.setdefault(t.name, []).append(_fanout_round(t, i))
                    print(f"fan-out round {i} {t.name}: {rounds[t.name][-1]} load {os.getloadavg()[0]:.1f}",
                          flush=True)
            for t in running:
                r = rows[t.name]
                rates = [x[0] for x in rounds[t.name]]
                mid = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
                r["fanout_events_per_s"], r["fanout_server_cpu_s"], r["fanout_etcd_cpu_s"] = rounds[t.name][mid]
                r["fanout_min"], r["fanout_max"] = min(rates), max(rates)
                r["server_rss"] = _rss_mib(t.pid)
                r["etcd_rss"] = t.etcd_rss()

    benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"\n{N_SERVICES} Services, load average {os.getloadavg()[0]:.2f}")
    print("| server | creates/s (32 clients) | full list s | watch fan-out events/s (50 watchers) "
          "| fan-out: server CPU s, etcd CPU s | events per server CPU-second | server RSS MiB | etcd RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        r["fanout_events_per_server_cpu_s"] = N_WATCHERS * N_EVENTS / max(r["fanout_server_cpu_s"], 0.01)
        print(f"| {name} | {r['creates_per_s']:.0f} | {r['list_s']:.3f} | {r['fanout_events_per_s']:.0f} "
              f"({r['fanout_min']:.0f}-{r['fanout_max']:.0f}) "
              f"| {r['fanout_server_cpu_s']:.1f}, {r['fanout_etcd_cpu_s']:.1f} "
              f"| {r['fanout_events_per_server_cpu_s']:.0f} | {r['server_rss']:.0f} | {r['etcd_rss']:.0f} |")
    stamp = plots.stamp("bench_etcd_apiserver.py")
    for fig, key, title, label in (
            ("etcd_fanout", "fanout_events_per_s", f"Watch fan-out: events/s delivered to {N_WATCHERS} watchers while "
             f"32 clients create {N_EVENTS:,} ConfigMaps ({N_SERVICES:,} Services stored)", "events/s"),
            ("etcd_creates", "creates_per_s", f"Service creates/s, 32 clients, up to {N_SERVICES:,} Services",
             "creates/s")):
        points: dict[str, plots.Value] = {
            n: [round(x[0]) for x in rounds[n]] if key == "fanout_events_per_s" else round(r[key])
            for n, r in rows.items()}
        plots.record("etcd", fig, label, points, stamp, kind="bar", title=title, y_label=label, log_x=False,
                     log_y=False)
    benchmark.extra_info.update({k: {m: round(v, 3) for m, v in r.items()} for k, r in rows.items()})
    benchmark.extra_info["fanout_rounds"] = rounds
    for r in rows.values():
        assert r["creates_per_s"] > 0 and r["fanout_events_per_s"] > 0

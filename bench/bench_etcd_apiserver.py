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

Pinned (default on 2+ cores; KPROXY_BENCH_PIN=0 for the old way): the bench, its clients and every
etcd on one core, each API server on the other, so a server's rate is what one core gives it and
not what the clients and etcd leave it; kube-apiserver's Go runtime starts with one core in its
affinity and so GOMAXPROCS=1, as one Python event loop. Per round the table also shows how busy the
server kept its core (near 100%: the server bounds the rate), how long it and its etcd were
runnable but waited for a CPU (other processes on their core; etcd's threads summed) and the
clients' CPU. The creating
clients are one small HTTP/1.1 client (`_Conn`), the same for every server.
KPROXY_BENCH_SERVICES (default 10,000) stores fewer Services for a quick run.

Run: .venv/bin/pytest bench/bench_etcd_apiserver.py --benchmark-enable -s
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import plots  # bench/plots.py: pytest puts bench/ on sys.path
import pytest
import yaml

from controlplane_stub.apiserver.testing import running_apiserver
from controlplane_stub.store.etcd_process import EtcdCluster, etcd_available, free_port, running_etcd

N_SERVICES = int(os.environ.get("KPROXY_BENCH_SERVICES", "10000"))
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


def _runqueue_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat,
    summed): on a shared machine, the time a pinned server lost to other processes on its core."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


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


class _Conn:
    """One HTTP/1.1 connection over TLS that sends prepared requests and reads each answer with as
    little Python as it takes: the same client for every server, and cheap, so that the creating
    clients (they share the bench's core with etcd and the watchers) leave the servers' rates alone.
    aiohttp's client cost about 0.5 s of CPU per 1,000 creates; this one is measured per round."""

    def __init__(self, t: Target) -> None:
        self.t = t
        u = urlsplit(t.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 443
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def request(self, path: str, body: bytes) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.t.token}\r\n"
                f"Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    async def connect(self, ctx: ssl.SSLContext) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=ctx)

    async def send(self, request: bytes, ctx: ssl.SSLContext) -> tuple[int, bytes]:
        await self.connect(ctx)
        assert self.reader is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, lower = int(head[9:12]), head.lower()
        if b"transfer-encoding: chunked" in lower:
            body = b""
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readline()  # the empty trailer
        else:
            at = lower.index(b"content-length:") + 15
            body = await self.reader.readexactly(int(lower[at:lower.index(b"\r\n", at)]))
        if b"connection: close" in lower:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _create_many(t: Target, path: str, bodies: list[dict[str, Any]], concurrency: int,
                       go: Callable[[], Awaitable[None]] | None = None) -> float:
    """Seconds to create `bodies` from `concurrency` connections; with `go`, the connections are
    made first (TLS handshakes included) and the creates start when go() returns: clients of an
    API server keep their connections (informers, controllers, kubectl's keep-alive), and 32
    handshakes at the start of a round would be a fixed cost that weighs more on the faster server."""
    ctx = t.ssl()
    conns = [_Conn(t) for _ in range(concurrency)]
    queue = [conns[0].request(path, json.dumps(b).encode()) for b in reversed(bodies)]
    if go is not None:
        await asyncio.gather(*(c.connect(ctx) for c in conns))
        await go()

    async def worker(conn: _Conn) -> None:
        while queue:
            request = queue.pop()
            for _ in range(5):  # kube-apiserver answers 429 beyond its in-flight limit: retry
                status, body = await conn.send(request, ctx)
                if status == 201:
                    break
                assert status == 429, (status, body)
                await asyncio.sleep(0.05)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return time.perf_counter() - started


async def _list_best(t: Target, rounds: int, limit: int = 0) -> tuple[float, int]:
    """The best time of `rounds` lists of every Service, and how many came (bodies decoded after
    the clock stops); with `limit`, in pages of that many, each asked for with the last page's
    continue token, read from the page's metadata, which both servers write before the items
    (client-go's informers list in pages of 500)."""
    ctx = t.ssl()
    best, n = 1e9, 0
    async with aiohttp.ClientSession(headers=t.headers) as s:
        for _ in range(rounds):
            started = time.perf_counter()
            pages: list[bytes] = []
            token = ""
            while True:
                params = {"limit": str(limit), "continue": token} if limit else {}
                async with s.get(t.url + "/api/v1/services", params=params, ssl=ctx) as r:
                    pages.append(await r.read())
                found = _CONTINUE.search(pages[-1], 0, 4096) if limit else None
                token = found.group(1).decode() if found else ""
                if not token:
                    break
            best = min(best, time.perf_counter() - started)
            n = sum(len(json.loads(page)["items"]) for page in pages)
    return best, n


_CONTINUE = re.compile(rb'"continue":"([^"]+)"')


# The fan-out's 32 creating clients run in a process of their own (started before the round, told
# to go on stdin): in one process with the 50 watchers the bench itself bounded the events/s.
_CREATORS = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
import bench_etcd_apiserver as b
url, token, ca, round_ = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
t = b.Target("creators", url, token, ca, 0, lambda: 0.0, lambda: [])
bodies = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"fan{round_}-{i}"}} for i in range(b.N_EVENTS)]
cpu = [0.0]


async def go() -> None:  # the connections are up: say so, wait for the go
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu[0] = time.process_time()
asyncio.run(b._create_many(t, "/api/v1/namespaces/default/configmaps", bodies, 32, go))
print(time.perf_counter())  # when the last create was answered (CLOCK_MONOTONIC: the bench's clock too)
print(time.process_time() - cpu[0])  # this process's CPU seconds from the go
"""


@dataclass
class Round:
    events_per_s: float
    wall_s: float  # from the go to the last watcher's last event
    server_cpu_s: float
    server_wait_s: float  # runnable, waiting for a CPU (other processes on its core)
    etcd_cpu_s: float
    etcd_wait_s: float  # its threads' waits for a CPU, summed
    creators_cpu_s: float  # the creating clients' process from the go
    watchers_cpu_s: float  # the bench's own process: the 50 watchers
    tail_s: float  # from the last create's answer to the last watcher's last event


async def _fanout(t: Target, round_: int) -> Round:
    """One round; the CPU figures from the go: the watchers' connections (TLS handshakes, the
    initial list) are set up before it and are not the fan-out's work."""
    creators = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CREATORS, os.path.dirname(os.path.abspath(__file__)), t.url, t.token, t.ca_file,
        str(round_), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert creators.stdin is not None and creators.stdout is not None
    # Its imports done before the watchers connect: they would share the bench's core with the round.
    assert await asyncio.wait_for(creators.stdout.readline(), 120) == b"ready\n"
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
    cpu0, etcd0, own0 = _cpu_s(t.pid), sum(_cpu_s(p) for p in t.etcd_pids()), _cpu_s(os.getpid())
    wait0, etcd_wait0 = _runqueue_s(t.pid), sum(_runqueue_s(p) for p in t.etcd_pids())
    started = time.perf_counter()
    creators.stdin.write(b"go\n")
    await creators.stdin.drain()
    out = await asyncio.wait_for(creators.stdout.read(), 300)
    assert await asyncio.wait_for(creators.wait(), 300) == 0
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    cpu, etcd, own = _cpu_s(t.pid) - cpu0, sum(_cpu_s(p) for p in t.etcd_pids()) - etcd0, _cpu_s(os.getpid()) - own0
    wall = max(done_at) - started
    created_at, creators_cpu = (float(x) for x in out.split()[-2:])
    return Round(N_WATCHERS * N_EVENTS / wall, wall, cpu, _runqueue_s(t.pid) - wait0, etcd,
                 sum(_runqueue_s(p) for p in t.etcd_pids()) - etcd_wait0, creators_cpu, own,
                 max(done_at) - created_at)


def _load(t: Target) -> dict[str, float]:
    out: dict[str, float] = {}
    secs = asyncio.run(_create_many(t, "/api/v1/namespaces/default/services",
                                    [_service(i) for i in range(N_SERVICES)], 32))
    out["creates_per_s"] = N_SERVICES / secs
    best, n = asyncio.run(_list_best(t, 5))
    assert n >= N_SERVICES
    out["list_s"] = best
    best, n = asyncio.run(_list_best(t, 5, limit=500))
    assert n >= N_SERVICES
    out["paged_list_s"] = best
    return out


def _fanout_round(t: Target, round_: int) -> Round:
    return asyncio.run(_fanout(t, round_))


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


def _cpus() -> tuple[int, int] | None:
    """(the bench's core, the servers' core) when KPROXY_BENCH_PIN is not 0 and this process may
    run on two cores or more; None: nothing pinned (the old way, every process on every core)."""
    allowed = sorted(os.sched_getaffinity(0))
    if os.environ.get("KPROXY_BENCH_PIN", "1") == "0" or len(allowed) < 2:
        return None
    return allowed[0], allowed[1]


def _pin(pid: int, cpu: int) -> None:
    """Every thread of the process onto one core (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {cpu})


def _pin_bench(stack: contextlib.ExitStack, cpus: tuple[int, int] | None) -> None:
    """This process onto the bench's core until the stack closes. Everything started from here on
    (etcd, the servers, up.sh's etcd and kube-apiserver, the creating clients) inherits the bench's
    core; each server then moves to the other core (_pin). kube-apiserver's Go runtime sizes
    GOMAXPROCS from the affinity it starts with: one core, as one Python event loop has."""
    if cpus:
        stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})


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
    rounds: dict[str, list[Round]] = {}
    cpus = _cpus()
    print(f"\npinned: the bench, its clients and etcd on cpu {cpus[0]}, each server on cpu {cpus[1]}" if cpus
          else "\nnot pinned (KPROXY_BENCH_PIN=0 or one core)")

    def run() -> None:
        with contextlib.ExitStack() as stack:
            _pin_bench(stack, cpus)
            running = [stack.enter_context(make()) for make in targets]
            for t in running:
                if cpus:
                    _pin(t.pid, cpus[1])
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
                by_rate = sorted(rounds[t.name], key=lambda x: x.events_per_s)
                mid = by_rate[len(by_rate) // 2]
                r["fanout_events_per_s"], r["fanout_server_cpu_s"], r["fanout_etcd_cpu_s"] = (
                    mid.events_per_s, mid.server_cpu_s, mid.etcd_cpu_s)
                r["fanout_min"], r["fanout_max"] = by_rate[0].events_per_s, by_rate[-1].events_per_s
                r["fanout_server_cpu_all_s"] = sum(x.server_cpu_s for x in rounds[t.name])
                # How busy the server kept its core in the rounds: near 1, the server bounds the rate.
                walls = sum(x.wall_s for x in rounds[t.name])
                r["fanout_server_busy"] = r["fanout_server_cpu_all_s"] / walls
                r["fanout_server_waiting"] = sum(x.server_wait_s for x in rounds[t.name]) / walls
                r["fanout_creators_cpu_s"] = sum(x.creators_cpu_s for x in rounds[t.name]) / len(rounds[t.name])
                r["fanout_watchers_cpu_s"] = sum(x.watchers_cpu_s for x in rounds[t.name]) / len(rounds[t.name])
                # The last events' wait: the last create answered -> the last watcher's last event.
                r["fanout_tail_ms"] = 1000 * sorted(x.tail_s for x in rounds[t.name])[len(rounds[t.name]) // 2]
                r["fanout_etcd_waiting"] = sum(x.etcd_wait_s for x in rounds[t.name]) / walls
                r["server_rss"] = _rss_mib(t.pid)
                r["etcd_rss"] = t.etcd_rss()

    benchmark.pedantic(run, rounds=1, iterations=1)
    print(f"\n{N_SERVICES} Services, load average {os.getloadavg()[0]:.2f}, "
          + (f"pinned (bench cpu {cpus[0]}, servers cpu {cpus[1]})" if cpus else "not pinned"))
    print("| server | creates/s (32 clients) | full list s | list in pages of 500 s | watch fan-out events/s (50 watchers) "
          "| fan-out: server CPU s, etcd CPU s | events per server CPU-second, median round; all rounds "
          "| server in the rounds: busy; waiting for a CPU | etcd waiting for a CPU | per round: creating clients' CPU s, watchers' CPU s "
          "| tail ms, median | server RSS MiB | etcd RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        r["fanout_events_per_server_cpu_s"] = N_WATCHERS * N_EVENTS / max(r["fanout_server_cpu_s"], 0.01)
        r["fanout_events_per_server_cpu_s_all"] = (N_WATCHERS * N_EVENTS * len(rounds[name])
                                                   / max(r["fanout_server_cpu_all_s"], 0.01))
        print(f"| {name} | {r['creates_per_s']:.0f} | {r['list_s']:.3f} | {r['paged_list_s']:.3f} | {r['fanout_events_per_s']:.0f} "
              f"({r['fanout_min']:.0f}-{r['fanout_max']:.0f}) "
              f"| {r['fanout_server_cpu_s']:.2f}, {r['fanout_etcd_cpu_s']:.2f} "
              f"| {r['fanout_events_per_server_cpu_s']:.0f}; {r['fanout_events_per_server_cpu_s_all']:.0f} "
              f"| {r['fanout_server_busy']:.0%}; {r['fanout_server_waiting']:.0%} | {r['fanout_etcd_waiting']:.0%} | {r['fanout_creators_cpu_s']:.2f}, {r['fanout_watchers_cpu_s']:.2f} "
              f"| {r['fanout_tail_ms']:.1f} | {r['server_rss']:.0f} | {r['etcd_rss']:.0f} |")
    names = list(rounds)
    if len(names) == 3:  # kproxy on etcd against kube-apiserver, round by round
        pairs = [a.events_per_s / b.events_per_s for a, b in zip(rounds[names[0]], rounds[names[2]], strict=True)]
        print("rounds side by side, kproxy on etcd / kube-apiserver: " + ", ".join(f"{x:.2f}" for x in pairs))
    stamp = plots.stamp("bench_etcd_apiserver.py")
    for fig, key, title, label in (
            ("etcd_fanout", "fanout_events_per_s", f"Watch fan-out: events/s delivered to {N_WATCHERS} watchers while "
             f"32 clients create {N_EVENTS:,} ConfigMaps ({N_SERVICES:,} Services stored)", "events/s"),
            ("etcd_creates", "creates_per_s", f"Service creates/s, 32 clients, up to {N_SERVICES:,} Services",
             "creates/s")):
        points: dict[str, plots.Value] = {
            n: [round(x.events_per_s) for x in rounds[n]] if key == "fanout_events_per_s" else round(r[key])
            for n, r in rows.items()}
        plots.record("etcd", fig, label, points, stamp, kind="bar", title=title, y_label=label, log_x=False,
                     log_y=False)
    benchmark.extra_info.update({k: {m: round(v, 3) for m, v in r.items()} for k, r in rows.items()})
    benchmark.extra_info["fanout_rounds"] = {n: [vars(x) for x in rs] for n, rs in rounds.items()}
    benchmark.extra_info["pinned"] = list(cpus) if cpus else None
    for r in rows.values():
        assert r["creates_per_s"] > 0 and r["fanout_events_per_s"] > 0

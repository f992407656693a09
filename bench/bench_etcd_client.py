"""Which etcd v3 client the etcd store uses: the candidates side by side on one etcd 3.4 member.

- gateway: bench/etcd_gateway.py (etcd's gRPC-JSON gateway /v3/ over aiohttp);
- aetcd's Client: the asyncio gRPC client from PyPI (grpcio + protobuf);
- grpc.aio: bench/etcd_grpcaio.py, the store's client before grpc_h2 (grpc.aio with aetcd's
  generated stubs; aetcd's Client speaks to one host without TLS, the store needs several and TLS);
- controlplane_stub.store.etcd_client, the one the store uses: gRPC over HTTP/2 on the event loop
  (controlplane_stub/store/grpc_h2.py) with aetcd's protobuf messages.

Each client runs in its own process (so RSS and CPU are its own): sequential put, get and
compare-and-swap txn latency and the process's CPU per call (all its threads); 32 concurrent puts
(throughput, CPU per put); one watch replaying those 4,000 puts from their first revision
(events/s); VmRSS at the end. etcd's data on tmpfs. KPROXY_BENCH_ROUNDS (default 1) runs every
client that many times, alternating, and prints each run.

Run: .venv/bin/pytest bench/bench_etcd_client.py --benchmark-enable -s
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from controlplane_stub.store.etcd_process import etcd_available, running_etcd

N_SEQ = 500
N_CONC = 4000
CONC = 32

COMMON = """
import asyncio, json, os, sys, time
N_SEQ, N_CONC, CONC = {n_seq}, {n_conc}, {conc}
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e3
async def timed(n, fn):
    lat = []
    cpu = time.process_time()
    for i in range(n):
        t = time.perf_counter(); await fn(i); lat.append(time.perf_counter() - t)
    return {{"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "cpu_us": (time.process_time() - cpu) / n * 1e6}}
ETCD_PID = int(sys.argv[3])
def etcd_cpu():
    with open(f"/proc/{{ETCD_PID}}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
CPU_CONC = [0.0, 0.0]
async def concurrent(fn):
    q = iter(range(N_CONC))
    async def worker():
        for i in q:
            await fn(i)
    t = time.perf_counter()
    cpu, ecpu = time.process_time(), etcd_cpu()
    await asyncio.gather(*(worker() for _ in range(CONC)))
    CPU_CONC[0] = (time.process_time() - cpu) / N_CONC * 1e6
    CPU_CONC[1] = (etcd_cpu() - ecpu) / N_CONC * 1e6
    return N_CONC / (time.perf_counter() - t)
"""

OURS = """
{imports}
async def main(url, tag):
    c = EtcdClient([url])
    p = f"/bench/{{tag}}/".encode()
    out = {{}}
    out["put"] = await timed(N_SEQ, lambda i: c.put(p + b"s%d" % i, b"x" * 600))
    out["get"] = await timed(N_SEQ, lambda i: c.range(p + b"s%d" % i))
    out["txn"] = await timed(N_SEQ, lambda i: c.txn([cmp_create(p + b"t%d" % i, 0)], [put(p + b"t%d" % i, b"x" * 600)],
                                                     [get(p + b"t%d" % i)]))
    rev = (await c.range(p)).revision
    out["put_per_s_32"] = await concurrent(lambda i: c.put(p + b"c%d" % i, b"x" * 600))
    out["put_cpu_us_32"], out["etcd_cpu_us_32"] = CPU_CONC
    got = 0
    t = time.perf_counter()
    async for r in c.watch(p + b"c", prefix_end(p + b"c"), rev + 1):
        got += len(r.events)
        if got >= N_CONC:
            break
    out["watch_events_per_s"] = N_CONC / (time.perf_counter() - t)
    out["rss_mib"] = rss()
    await c.close()
    print(json.dumps(out))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
GATEWAY = OURS.replace("{imports}", """import sys; sys.path.insert(0, "bench")
from etcd_gateway import EtcdClient, cmp_create, op_put as put, op_get as get
from controlplane_stub.store.etcd_client import prefix_end""")
GRPCAIO = OURS.replace("{imports}", """import sys; sys.path.insert(0, "bench")
from etcd_grpcaio import EtcdClient
from controlplane_stub.store.etcd_client import cmp_create, Put as put, Get as get, prefix_end""")
H2 = OURS.replace("{imports}", """from controlplane_stub.store.etcd_client import EtcdClient, cmp_create, Put as put, Get as get, prefix_end""")

AETCD = """
import aetcd
async def main(url, tag):
    host, port = url.split("//")[1].split(":")
    c = aetcd.Client(host=host, port=int(port))
    await c.connect()
    p = f"/bench/{{tag}}/".encode()
    out = {{}}
    out["put"] = await timed(N_SEQ, lambda i: c.put(p + b"s%d" % i, b"x" * 600))
    out["get"] = await timed(N_SEQ, lambda i: c.get(p + b"s%d" % i))
    tx = c.transactions
    out["txn"] = await timed(N_SEQ, lambda i: c.transaction([tx.create(p + b"t%d" % i) == 0],
                                                             [tx.put(p + b"t%d" % i, b"x" * 600)], [tx.get(p + b"t%d" % i)]))
    rev = (await c.get(p + b"s0")).mod_revision + 2 * N_SEQ  # the first concurrent put's revision
    out["put_per_s_32"] = await concurrent(lambda i: c.put(p + b"c%d" % i, b"x" * 600))
    out["put_cpu_us_32"], out["etcd_cpu_us_32"] = CPU_CONC
    got = 0
    t = time.perf_counter()
    watch = await c.watch_prefix(p + b"c", start_revision=rev)
    async for ev in watch:
        got += 1
        if got >= N_CONC:
            break
    last, first = time.perf_counter(), t
    out["watch_events_per_s"] = N_CONC / (last - first)
    out["rss_mib"] = rss()
    await watch.cancel()
    await c.close()
    print(json.dumps(out))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _run(code: str, url: str, tag: str, etcd_pid: int) -> dict[str, object]:
    src = textwrap.dedent(COMMON.format(n_seq=N_SEQ, n_conc=N_CONC, conc=CONC)) + code.format()
    out = subprocess.run([sys.executable, "-c", src, url, tag, str(etcd_pid)], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (apt-get install etcd-server)")
def test_etcd_clients_side_by_side(benchmark: object) -> None:
    clients = (("gateway over aiohttp", GATEWAY), ("aetcd's Client", AETCD), ("grpc.aio (bench/etcd_grpcaio.py)", GRPCAIO),
               ("etcd_client (grpc_h2)", H2))
    wanted = os.environ.get("KPROXY_BENCH_CLIENTS", "")  # e.g. "grpc.aio,etcd_client": a quick A/B
    clients = tuple(c for c in clients if not wanted or any(c[0].startswith(w) for w in wanted.split(",")))
    runs: dict[str, list[dict[str, object]]] = {name: [] for name, _ in clients}
    with running_etcd(1) as etcd:
        url = etcd.urls[0]
        proc = etcd.members[0].proc
        assert proc is not None
        pid = proc.pid
        for i in range(int(os.environ.get("KPROXY_BENCH_ROUNDS", "1"))):
            for name, code in clients:
                runs[name].append(_run(code, url, f"{name.split()[0]}{i}", pid))
        etcd_rss = etcd.rss_kib() / 1024
    print(f"\nload average {os.getloadavg()[0]:.2f}; etcd RSS {etcd_rss:.0f} MiB")
    print("| client | put p50/p99 ms | get p50/p99 ms | CAS txn p50/p99 ms | CPU us per txn "
          "| puts/s (32 concurrent) | CPU us per put: client, etcd (32 concurrent) | watch events/s | client RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = [(name, r) for name in runs for r in runs[name]]
    for name, r in rows:
        def lat(k: str) -> str:
            d = r[k]
            assert isinstance(d, dict)
            return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"
        txn = r["txn"]
        assert isinstance(txn, dict)
        print(f"| {name} | {lat('put')} | {lat('get')} | {lat('txn')} | {txn['cpu_us']:.0f} | {r['put_per_s_32']:.0f} "
              f"| {r['put_cpu_us_32']:.0f}, {r['etcd_cpu_us_32']:.0f} | {r['watch_events_per_s']:.0f} | {r['rss_mib']:.1f} |")
    for _, r in rows:
        assert float(r["put_per_s_32"]) > 0 and float(r["watch_events_per_s"]) > 0  # type: ignore[arg-type]

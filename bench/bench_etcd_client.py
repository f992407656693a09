"""Which etcd v3 client the etcd store uses: two candidates side by side on one etcd 3.4 member.

- gateway: controlplane_stub.store.etcd_client (etcd's gRPC-JSON gateway /v3/ over aiohttp);
- aetcd's Client: the asyncio gRPC client from PyPI (grpcio + protobuf);
- controlplane_stub.store.etcd_client, the one the store uses: grpc.aio with aetcd's generated stubs
  (aetcd's Client speaks to one host without TLS; the store needs several members and TLS).

Each client runs in its own process (so RSS is its own): sequential put, get and compare-and-swap
txn latency; 32 concurrent puts (throughput); one watch replaying those 4,000 puts from
their first revision (events/s); VmRSS at the end. etcd's data on tmpfs.

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
import asyncio, json, sys, time
N_SEQ, N_CONC, CONC = {n_seq}, {n_conc}, {conc}
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * p))] * 1e3
async def timed(n, fn):
    lat = []
    for i in range(n):
        t = time.perf_counter(); await fn(i); lat.append(time.perf_counter() - t)
    return {{"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}}
async def concurrent(fn):
    q = iter(range(N_CONC))
    async def worker():
        for i in q:
            await fn(i)
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONC)))
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
GRPC = OURS.replace("{imports}", """from controlplane_stub.store.etcd_client import EtcdClient, cmp_create, Put as put, Get as get, prefix_end""")

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


def _run(code: str, url: str, tag: str) -> dict[str, object]:
    src = textwrap.dedent(COMMON.format(n_seq=N_SEQ, n_conc=N_CONC, conc=CONC)) + code.format()
    out = subprocess.run([sys.executable, "-c", src, url, tag], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not etcd_available(), reason="etcd not installed (apt-get install etcd-server)")
def test_etcd_clients_side_by_side(benchmark: object) -> None:
    rows = {}
    with running_etcd(1) as etcd:
        url = etcd.urls[0]
        for name, code in (("gateway over aiohttp", GATEWAY), ("aetcd's Client", AETCD),
                           ("etcd_client (grpc.aio, aetcd's stubs)", GRPC)):
            rows[name] = _run(code, url, name.split()[0])
        etcd_rss = etcd.rss_kib() / 1024
    print(f"\nload average {os.getloadavg()[0]:.2f}; etcd RSS {etcd_rss:.0f} MiB")
    print("| client | put p50/p99 ms | get p50/p99 ms | CAS txn p50/p99 ms | puts/s (32 concurrent) "
          "| watch events/s | client RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        def lat(k: str) -> str:
            d = r[k]
            assert isinstance(d, dict)
            return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"
        print(f"| {name} | {lat('put')} | {lat('get')} | {lat('txn')} | {r['put_per_s_32']:.0f} "
              f"| {r['watch_events_per_s']:.0f} | {r['rss_mib']:.1f} |")
    for r in rows.values():
        assert float(r["put_per_s_32"]) > 0 and float(r["watch_events_per_s"]) > 0  # type: ignore[arg-type]

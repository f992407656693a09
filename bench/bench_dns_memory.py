"""kproxy-dns memory as deployed (`--kubeconfig`, fed by kproxy-apiserver) side by side with the
zone loaded from a file (`--objects`), against the issue's limit: under 60 MiB at 10,000 Services.

The zone is bench_dns_servers.py's (10,000 Services, 1,000 of them headless with an EndpointSlice of
5 ready pods). Both servers run one after the other in the same test; each is measured once /ready
says 200 (API: both lists in and encoded) and a name answers, after a short settle, then again after
a burst of queries (the answer path must not grow the heap). Reported per server: VmRSS, and from
/proc/PID/smaps_rollup the anonymous part (heap: what the zone and the decoding left) beside the
file-backed part (shared libraries and extension modules: what imports cost).

  flock /tmp/kproxy-bench.lock .venv/bin/pytest bench/bench_dns_memory.py --benchmark-enable -s -p no:cacheprovider
KDNS_BENCH_DATA_DIR=DIR keeps (and reuses) the populated API server's data directory between runs.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dns_servers import (
    HEADLESS_EVERY,
    MEMORY_HEADING,
    SERVICES,
    _fqdn,
    _wait_answering,
    free_port,
    kube_objects,
    machine,
    stop_process,
    update_dns_readme,
)

testing = pytest.importorskip("controlplane_stub.apiserver.testing", reason="the API server is not in this tree")
ROOT = Path(__file__).resolve().parents[1]
KDNS = ROOT / ".venv" / "bin" / "kproxy-dns"
LIMIT_MIB = 60.0
SETTLE_S = 2.0
# A ConfigMap written after the zone: a reused data dir that has it holds the whole zone.
POPULATED_MARK = "populated"


def smaps(pid: int) -> dict[str, float]:
    """VmRSS and smaps_rollup's split in MiB: anon (heap, stacks) vs file-backed (code, .so)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) / 1024
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return out
    for key in ("Anonymous", "Private_Dirty", "Shared_Clean", "Private_Clean"):
        m = re.search(rf"^{key}:\s+(\d+) kB", rollup, re.MULTILINE)
        if m:
            out[key.lower()] = int(m.group(1)) / 1024
    out["file"] = out.get("rss", 0.0) - out.get("anonymous", 0.0)
    return out


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _query_burst(port: int, names: list[str]) -> int:
    """Plain UDP queries, one outstanding at a time: enough to run the answer path over the zone."""
    import dns.message
    import dns.query
    import dns.rcode

    ok = 0
    for name in names:
        q = dns.message.make_query(name, "A")
        if dns.query.udp(q, "127.0.0.1", port=port, timeout=2).rcode() == dns.rcode.NOERROR:
            ok += 1
    return ok


def measure_kdns(label: str, args: list[str], workdir: Path, timeout: float = 180.0) -> dict[str, Any]:
    port, health = free_port(), free_port()
    cmd = [str(KDNS), "--dns-bind-address", "127.0.0.1", "--dns-port", str(port), "--health-port", str(health),
           "--upstream", "127.0.0.1:9", "--v", "warning", *args]
    with open(workdir / f"{label}.log", "wb") as log:  # Popen keeps its own copy of the fd
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=workdir)
    try:
        deadline = start + timeout
        while _http_status(f"http://127.0.0.1:{health}/ready") != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"{label} exited: {(workdir / f'{label}.log').read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"{label} not ready after {timeout} s"
            time.sleep(0.1)
        ready_s = time.monotonic() - start
        _wait_answering(port, _fqdn(1), proc)
        time.sleep(SETTLE_S)
        at_ready = smaps(proc.pid)
        names = [_fqdn(i) for i in range(0, SERVICES, 5)]
        answered = _query_burst(port, names)
        assert answered == len(names), f"{label}: {len(names) - answered} of {len(names)} names did not answer"
        after = smaps(proc.pid)
    finally:
        stop_process(proc)
    return {"server": label, "ready_s": ready_s, "queries": answered, **{f"{k}_ready": v for k, v in at_ready.items()},
            **{f"{k}_after": v for k, v in after.items()}}


async def _populate(url: str, token: str, ca: str | None, items: list[dict[str, Any]]) -> None:
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=ca) if ca else False
    sem = asyncio.Semaphore(16)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    namespaces = sorted({i["metadata"]["namespace"] for i in items})
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async def post(path: str, body: dict[str, Any]) -> None:
            async with sem, s.post(url + path, data=json.dumps(body)) as r:
                if r.status >= 300 and r.status != 409:
                    raise AssertionError(f"{path}: {r.status} {(await r.text())[:300]}")

        await asyncio.gather(*(post("/api/v1/namespaces", {"metadata": {"name": ns}}) for ns in namespaces))
        kinds = {"Service": ("v1", "/api/v1/namespaces/{}/services"),
                 "EndpointSlice": ("discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices")}
        await asyncio.gather(*(post(kinds[i["kind"]][1].format(i["metadata"]["namespace"]),
                                    {"apiVersion": kinds[i["kind"]][0], **i}) for i in items))
        await post("/api/v1/namespaces/default/configmaps",
                   {"metadata": {"name": POPULATED_MARK}, "data": {"services": str(SERVICES)}})


def _is_populated(url: str, token: str, ca: str | None) -> bool:
    import ssl

    ctx = ssl.create_default_context(cafile=ca) if ca else None
    req = urllib.request.Request(f"{url}/api/v1/namespaces/default/configmaps/{POPULATED_MARK}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return int(json.loads(r.read())["data"]["services"]) == SERVICES
    except (urllib.error.HTTPError, KeyError, ValueError):
        return False


@contextmanager
def zone_apiserver(items: list[dict[str, Any]]) -> Iterator[Any]:
    """kproxy-apiserver holding the bench zone; populated once per data dir (minutes), reused after."""
    keep = os.environ.get("KDNS_BENCH_DATA_DIR", "")
    if keep:
        os.makedirs(keep, exist_ok=True)
    with testing.running_apiserver(data_dir=keep or None, extra_args=["--watch-cache-size", "100000"]) as api:
        if not _is_populated(api.url, api.token, api.ca_file):
            t0 = time.monotonic()
            asyncio.run(_populate(api.url, api.token, api.ca_file, items))
            print(f"\npopulated {len(items)} objects in {time.monotonic() - t0:.0f} s")
        yield api


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['server']} | {r['ready_s']:.1f} | {r['rss_ready']:.1f} | {r['anonymous_ready']:.1f} | "
            f"{r['file_ready']:.1f} | {r['rss_after']:.1f} | {LIMIT_MIB / r['rss_after']:.2f} |")


def table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([
        ("| kproxy-dns zone source | ready s | RSS MiB at ready | anon MiB | file-backed MiB | "
         f"RSS MiB after {rows[0]['queries']} queries | limit {LIMIT_MIB:.0f} MiB / RSS |"),
        "|---|---:|---:|---:|---:|---:|---:|",
        *(_row(r) for r in rows)])


def write_readme(rows: list[dict[str, Any]]) -> None:
    deployed, file = rows[1], rows[0]
    update_dns_readme(
        f"{MEMORY_HEADING} (`bench/bench_dns_memory.py`, {machine()})\n\n"
        f"The same zone (10,000 Services, {SERVICES // HEADLESS_EVERY:,} headless x 5 pods) loaded from a file, and "
        "as deployed: `kproxy-dns --kubeconfig` listing and watching kproxy-apiserver (HTTPS) that holds "
        "those Services and EndpointSlices. Measured once /ready says 200 and a name answers, plus a "
        f"{SETTLE_S:.0f} s settle, then again after {deployed['queries']:,} queries; anon is smaps_rollup's "
        "Anonymous (heap), file-backed the rest of RSS (code, shared libraries). Limit: the issue's 60 MiB at "
        "10,000 Services.\n\n"
        + table(rows) + "\n\n"
        f"The API-fed process costs {deployed['rss_after'] - file['rss_after']:.1f} MiB more than the file-fed one: "
        "the list/watch code and PyYAML, OpenSSL (its code pages, the context, two watch connections with "
        "a 256 KiB read buffer each) and the heap left by decoding list pages. Before this work (commit "
        "932d436) the same measurement gave 74.0 MiB (--kubeconfig) and 56.3 MiB (--objects) on "
        "2026-12-03, load average 2.37. Where it went: aiohttp's client was 12 MiB of imports (the "
        "client is now HTTP/1.1 on asyncio streams); the whole list was decoded before any object was "
        "trimmed, leaving the garbage as holes between kept objects (3.4 MiB: now each page is "
        "compacted as it arrives); decoded objects kept every string and list the decoder made (now "
        "shared or dropped); the system CA store (1 MiB), idle keep-alive connections, emptied sets, "
        "a 4,096-entry name cache and a marker key per Service made up the rest. Tried and kept out: "
        "the pure asyncio loop instead of uvloop saves 2.4 MiB, but with the dnsperf harness of "
        "bench_dns_servers.py (--objects, 8 s, "
        "2026-12-03, load average 1.3 to 2.2) answered 90k qps instead of 172k, 0.47 ms instead of "
        "0.10 ms paced latency.\n",
        memory=True)


@pytest.mark.timeout(1800)
def test_dns_memory_deployed_vs_file(benchmark: Any) -> None:
    if shutil.which("dig") is None:
        pytest.skip("needs dig (Debian package dnsutils)")
    objects = kube_objects()
    work = Path(tempfile.mkdtemp(prefix="kdns-membench-"))
    try:
        (work / "objects.json").write_text(json.dumps(objects))
        rows: list[dict[str, Any]] = []
        with zone_apiserver(objects["items"]) as api:
            def run_both() -> None:
                rows.clear()
                rows.append(measure_kdns("--objects (file)", ["--objects", str(work / "objects.json")], work))
                rows.append(measure_kdns("--kubeconfig (kproxy-apiserver)", ["--kubeconfig", api.kubeconfig], work))

            benchmark.pedantic(run_both, rounds=1, iterations=1)
        load = Path("/proc/loadavg").read_text().split()[:3]
        print("\n" + table(rows))
        print(f"zone: {SERVICES} Services ({SERVICES // HEADLESS_EVERY} headless x 5 pods); load average "
              f"{' '.join(load)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        benchmark.extra_info.update({r["server"]: r for r in rows})
        benchmark.extra_info["load_average"] = load
        write_readme(rows)
        deployed = rows[1]
        assert deployed["rss_after"] < LIMIT_MIB, (
            f"kproxy-dns --kubeconfig: {deployed['rss_after']:.1f} MiB at {SERVICES} Services (limit {LIMIT_MIB})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-enable", "-s", "-p", "no:cacheprovider"]))

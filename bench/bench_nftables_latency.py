"""nftables mode against the iptables mode (both back ends) and the Go kube-proxy's nftables mode,
as real processes fed by the same real API server, in one run (issue 15's benchmark items).

    flock /tmp/kproxy-bench.lock .venv/bin/pytest bench/bench_nftables_latency.py \
        --benchmark-enable -s -p no:cacheprovider [-k "1k"]
    KPROXY_PEERS_OUT=/work/peerbuild/OUT ...   # adds the Go kube-proxy 1.30.3 (shared/peers)

For 1,000 and 10,000 Services x 10 endpoints, each proxy in turn: a fresh copy of the same seeded
kproxy-apiserver store, the proxy in a fresh namespace (bench_iptables_latency.ProxyRun: its
KubeProxyConfiguration sets minSyncPeriod 0 in every mode), then
- start -> first full sync done, and that sync's own time (the proxy's log);
- API write -> rule present: EndpointSlice PUTs each adding an endpoint to another Service, the
  clock stopped by the kernel's notification of the committed rule (bench/nft_events.py), or for
  the legacy back end when the table is replaced; and the syncs those writes caused (partial in
  kproxy; every sync of the Go 1.30 nftables mode is a full one), from the proxy's log;
- RSS (VmRSS, peak VmHWM) of the proxy process after the writes;
- the data plane (kproxy's modes): a client namespace and a backend namespace on either side of
  the node's, the lexicographically last Service (iptables: the last rule of KUBE-SERVICES,
  checked) pointed at the backend's one endpoint, then fresh TCP connections from the client,
  each timed from connect() to the backend's first byte (and to connect() returning: SYN and
  SYN-ACK only, no backend process involved, less noise), alternated with connections through the
  node straight to the backend's own address ("direct": no Service, but still a new connection
  through the proxy's nat hooks, which in iptables mode walk all of KUBE-SERVICES too); and the
  floor: direct connections in the same namespaces before the proxy started (no rules at all).
  Every connection is new, so its first packet goes through the node's nat rules.
The Go kube-proxy runs when KPROXY_PEERS_OUT names the OUT_DIR of shared/peers/build.sh with
bin/kube-proxy in it; otherwise it is skipped with a message (CI has no peer binary).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import plots  # bench/plots.py: pytest puts bench/ on sys.path
import pytest
from bench_iptables_latency import ENDPOINTS, Proxy, ProxyRun, Sync, go_duration, kproxy, netns

from kproxy.relay import enter_netns

WRITES = 7
GO_WRITES_10K = 3  # each is a full rewrite of the whole table by the Go 1.30 nftables mode: minutes
CONNECTIONS = 300  # per target, alternated: bounded in count; each has a 5 s timeout
BACKEND_IP, NODE_BACKEND_IP = "10.250.0.2", "10.250.0.1"
CLIENT_IP, NODE_CLIENT_IP = "192.168.200.2", "192.168.200.1"
RESULTS: list[str] = []
# every connection's times: in the results file only
_RAW = tuple(f"{w}_{k}_s" for w in ("ttfb", "connect") for k in ("service", "direct", "floor"))
_KLOG_TIME = r"^[IWE]\d{4} (\d\d):(\d\d):(\d\d\.\d+) "
_GO_RELOAD = re.compile(_KLOG_TIME + r'.*"Reloading service nftables data" numServices=(\d+) numEndpoints=(\d+)', re.M)
_GO_DONE = re.compile(_KLOG_TIME + r'.*"SyncProxyRules complete" elapsed="([^"]+)"', re.M)


def go_syncs(log: str) -> list[Sync]:
    """The IPv4 proxier's syncs. The Go kube-proxy's nftables mode always runs an IPv6 proxier
    beside it (it assumes both families) and neither's lines name their family: a sync of ours
    is the "SyncProxyRules complete" whose span (its time minus its elapsed) holds a "Reloading
    service nftables data" line with Services in it (the IPv6 proxier has none); where two do, the
    longer (the IPv6 proxier's empty syncs take milliseconds). Every 1.30 sync is a full one."""
    def secs(h: str, m: str, s: str) -> float:
        return int(h) * 3600 + int(m) * 60 + float(s)
    reloads = [(secs(h, m, s), int(eps)) for h, m, s, n, eps in _GO_RELOAD.findall(log) if int(n) > 0]
    done = [(secs(h, m, s), go_duration(e)) for h, m, s, e in _GO_DONE.findall(log)]
    out, last_end = [], 0.0
    for r, eps in reloads:
        # our syncs do not overlap each other: a span starting before our previous end is not ours
        spans = [(e, t) for t, e in done if t >= r and last_end - 1e-3 <= t - e <= r + 1e-3]
        if spans:
            e, last_end = max(spans)
            out.append(Sync(True, e, eps))
    return out


_KPROXY_STEPS = re.compile(r"sync full=(?:True|False) .* ok=True elapsed=([0-9.]+)s waited=([0-9.]+)s "
                           r"checkout=([0-9.]+)s thread=([0-9.]+)s queued_at=([0-9.]+) started_at=([0-9.]+)")


def kproxy_steps(log: str, sent_at: list[float], latency: list[float]) -> list[dict[str, float]]:
    """Each write's way through kproxy, from its sync line (the first sync whose oldest change was
    queued after the write was sent; all times on the one monotonic clock): sent -> queued (the API
    server's watch, the reflector, decoding, the change tracker), queued -> sync start (the runner),
    checkout, the proxier thread's start, the sync (render, kernel), and the kernel's notification."""
    syncs = [tuple(float(x) for x in m) for m in _KPROXY_STEPS.findall(log)]
    out = []
    for t, lat in zip(sent_at, latency):
        mine = [s for s in syncs if s[4] >= t]
        if not mine:
            continue
        elapsed, waited, checkout, thread, queued, started = mine[0]
        out.append({"to_queued_s": queued - t, "waited_s": waited, "checkout_s": checkout, "thread_s": thread,
                    "sync_s": elapsed, "sync_end_s": started + checkout + elapsed - t, "rule_present_s": lat})
    return out


def go_proxy() -> Proxy | None:
    out = os.environ.get("KPROXY_PEERS_OUT", "")
    exe = os.path.join(out, "bin", "kube-proxy")
    if not out or not os.access(exe, os.X_OK):
        return None
    return Proxy("go-nftables", "nft", lambda cfg: [exe, "--config", cfg, "--v=2"], "nftables", go_syncs,
                 lambda n: n * ENDPOINTS, feature_gates={"NFTablesProxyMode": True}, min_sync_period="1ns")


# ---- the data plane ----


BACKEND_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"x")
    finally:
        c.close()
"""


class DataPlane:
    """client ns --veth-- node ns (the proxy's) --veth-- backend ns with a one-byte server on
    BACKEND_IP:8080. The veths are made inside the namespaces (nothing in the root namespace)
    and go with them."""

    def __init__(self, node_ns: str, stack: ExitStack) -> None:
        self.client_ns = client = stack.enter_context(netns("kpnC"))
        backend = stack.enter_context(netns("kpnS"))
        for cmd in (
            ["ip", "-n", node_ns, "link", "add", "kpc0", "type", "veth", "peer", "name", "eth0", "netns", client],
            ["ip", "-n", node_ns, "link", "add", "kps0", "type", "veth", "peer", "name", "eth0", "netns", backend],
            ["ip", "-n", node_ns, "addr", "add", f"{NODE_CLIENT_IP}/24", "dev", "kpc0"],
            ["ip", "-n", node_ns, "addr", "add", f"{NODE_BACKEND_IP}/24", "dev", "kps0"],
            ["ip", "-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"],
            ["ip", "-n", backend, "addr", "add", f"{BACKEND_IP}/24", "dev", "eth0"],
            *(["ip", "-n", ns, "link", "set", dev, "up"] for ns, dev in
              ((node_ns, "kpc0"), (node_ns, "kps0"), (client, "eth0"), (backend, "eth0"))),
            ["ip", "-n", client, "route", "add", "default", "via", NODE_CLIENT_IP],
            ["ip", "-n", backend, "route", "add", "default", "via", NODE_BACKEND_IP],
            ["ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ):
            subprocess.run(cmd, check=True, timeout=30)
        server = subprocess.Popen(["ip", "netns", "exec", backend, sys.executable, "-c", BACKEND_SERVER, BACKEND_IP],
                                  stdout=subprocess.PIPE, text=True)
        stack.callback(lambda: (server.kill(), server.wait(timeout=10)))
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        self.pool = ThreadPoolExecutor(max_workers=1, initializer=enter_netns, initargs=(client,))
        stack.callback(self.pool.shutdown)

    @staticmethod
    def _ttfb(addr: tuple[str, int]) -> tuple[float, float]:
        """(to connect() returning, to the first byte): the first is the SYN and SYN-ACK alone,
        all in the kernels (no process on the backend wakes up for it), so it shows the first
        packet's way through the node with the least scheduling noise; the second is what a
        client sees."""
        s = socket.socket()
        s.settimeout(5)
        try:
            t = time.perf_counter()
            s.connect(addr)
            connected = time.perf_counter() - t
            assert s.recv(1) == b"x", f"{addr}: no byte from the backend"
            took = time.perf_counter() - t
        finally:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()  # RST: no TIME_WAIT pile-up in the client namespace
        return connected, took

    def measure(self, targets: dict[str, tuple[str, int]], count: int) -> dict[str, list[tuple[float, float]]]:
        """(connect, first byte) seconds of `count` fresh connections to each target, alternated so
        the machine's noise hits all alike."""
        def run() -> dict[str, list[tuple[float, float]]]:
            out: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for addr in targets.values():  # warm the ARP entries and the code paths; not counted
                for _ in range(3):
                    self._ttfb(addr)
            for _ in range(count):
                for name, addr in targets.items():
                    out[name].append(self._ttfb(addr))
            return out
        return self.pool.submit(run).result()


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _last_kube_services_ip(run: ProxyRun, backend: str) -> str:
    """The cluster IP of KUBE-SERVICES' last Service rule (the one a first packet reaches last)."""
    out = subprocess.run(["ip", "netns", "exec", run.ns, f"iptables-{backend}", "-w", "-t", "nat", "-S",
                          "KUBE-SERVICES"], capture_output=True, text=True, timeout=600, check=True).stdout
    ips = re.findall(r"^-A KUBE-SERVICES -d ([0-9.]+)/32 ", out, re.M)
    assert ips, out[-2000:]
    return ips[-1]


def ttfb_stats(name: str, pairs: list[tuple[float, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for what, xs in (("connect", [c for c, _ in pairs]), ("ttfb", [t for _, t in pairs])):
        out.update({f"{what}_{name}_s": xs, f"{what}_{name}_median_s": statistics.median(xs),
                    f"{what}_{name}_p99_s": _quantile(xs, 0.99)})
    return out


def dataplane(run: ProxyRun, plane: DataPlane, backend: str) -> dict[str, Any]:
    from controlplane_stub.client import path

    async def target() -> tuple[int, str]:
        """iptables: the Service of KUBE-SERVICES' last rule; nftables (one map lookup whatever the
        Service): the name that lists last, svc-999 / svc-9999."""
        async with run.client() as client:
            if not backend:
                i = max(range(run.n), key=lambda k: f"svc-{k}")
                return i, (await client.get(path("services", "default", f"svc-{i}")))["spec"]["clusterIP"]
            last = await asyncio.get_running_loop().run_in_executor(None, _last_kube_services_ip, run, backend)
            for svc in (await client.get(path("services", "default")))["items"]:
                if svc["spec"]["clusterIP"] == last:
                    return int(svc["metadata"]["name"].removeprefix("svc-")), last
            raise AssertionError(f"no Service has the cluster IP {last} of the last KUBE-SERVICES rule")

    i, cluster_ip = asyncio.run(target())

    async def retarget() -> float:
        async with run.client() as client:
            return await run.write_endpoints(client, i, [BACKEND_IP])
    took = asyncio.run(retarget())
    t = plane.measure({"service": (cluster_ip, 80), "direct": (BACKEND_IP, 8080)}, CONNECTIONS)
    return {"target": f"default/svc-{i}", "cluster_ip": cluster_ip, "retarget_s": took, "connections": CONNECTIONS,
            **ttfb_stats("service", t["service"]), **ttfb_stats("direct", t["direct"]), "load_dataplane": os.getloadavg()}


def _cases() -> Iterator[Any]:
    for n, nid in ((1000, "1k"), (10000, "10k")):
        for mode in ("nftables", "iptables-nft", "iptables-legacy", "go-nftables"):
            yield pytest.param(mode, n, id=f"{mode}-{nid}")


@pytest.mark.timeout(5400)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize(("mode", "n"), list(_cases()))
def test_nftables_side_by_side(benchmark: Any, mode: str, n: int, tmp_path: Path) -> None:
    if mode == "go-nftables":
        peer = go_proxy()
        if peer is None:
            pytest.skip("Go kube-proxy skipped: set KPROXY_PEERS_OUT to the OUT_DIR of shared/peers/build.sh "
                        "with bin/kube-proxy built (CI has no peer binary)")
        proxy, backend = peer, ""
    elif mode == "nftables":
        proxy, backend = kproxy("nftables"), ""
    else:
        backend = mode.split("-")[1]
        proxy = kproxy("iptables", backend)
    writes = GO_WRITES_10K if mode == "go-nftables" and n >= 10000 else WRITES

    planes: list[DataPlane] = []

    def floor(run: ProxyRun) -> None:
        """The same namespaces before the proxy wrote a rule: connections straight to the backend."""
        planes.append(DataPlane(run.ns, run.stack))
        run.result.update(ttfb_stats("floor", planes[0].measure({"floor": (BACKEND_IP, 8080)}, CONNECTIONS)["floor"]))

    def measure() -> dict[str, Any]:
        with closing(ProxyRun(proxy, n, tmp_path, None if mode == "go-nftables" else floor)) as run:
            time.sleep(2.0)
            run.write_latencies(writes)
            if mode != "go-nftables":
                run.result["steps"] = kproxy_steps(run.log_text(), run.result.get("write_sent_at", []),
                                                   run.result["latency_s"])
            if planes:
                run.result.update(dataplane(run, planes[0], backend))
            return run.result
    r = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in r.items() if k not in _RAW})
    lat_ms = [s * 1000 for s in r["latency_s"]]
    partial_ms = [s["s"] * 1000 for s in r["write_syncs"]]
    line = (f"{mode:15} {n:>6} x {ENDPOINTS}: start->first sync {r['start_to_first_sync_s']:.1f} s "
            f"(sync {r['first_full_sync_s']:.2f} s); write->rule median {statistics.median(lat_ms):.0f} ms "
            f"({min(lat_ms):.0f}-{max(lat_ms):.0f}, {len(lat_ms)}); syncs after writes "
            f"{statistics.median(partial_ms) if partial_ms else float('nan'):.0f} ms median "
            f"({len(partial_ms)}, full: {sum(s['full'] for s in r['write_syncs'])}); "
            f"RSS {r.get('proxy_VmRSS_mib', 0):.0f} MiB (peak {r.get('proxy_VmHWM_mib', 0):.0f}); "
            f"load {r['load_after_first_sync'][0]:.1f} / {r['load_avg'][0]:.1f}")
    if r.get("steps"):
        line += "; median ms: " + ", ".join(
            f"{k.removesuffix('_s')} {statistics.median(st[k] for st in r['steps']) * 1e3:.1f}" for k in r["steps"][0])
    if "ttfb_service_s" in r:
        for w in ("ttfb", "connect"):
            line += f"; {w} median (p99): " + ", ".join(
                f"{k} {r[f'{w}_{k}_median_s'] * 1e3:.3f} ms ({r[f'{w}_{k}_p99_s'] * 1e3:.3f})"
                for k in ("service", "direct", "floor"))
    RESULTS.append(line)
    print("\nRESULT " + json.dumps({k: v for k, v in r.items() if k not in _RAW}))
    print("\n".join(RESULTS))
    when, x = plots.stamp("bench_nftables_latency.py"), str(n)
    layout: dict[str, Any] = {"kind": "line", "x_label": "Services (x 10 endpoints, log)", "log_x": True, "log_y": True}
    plots.record("nftables", "modes_write_to_rule", mode, {x: lat_ms}, when,
                 title="API write -> rule present, real proxies, one run (median, min-max)",
                 y_label="ms (log)", **layout)
    plots.record("nftables", "modes_first_sync", mode, {x: r["start_to_first_sync_s"]}, when,
                 title="real proxies, one run: start -> first full sync done", y_label="seconds (log)", **layout)
    plots.record("nftables", "modes_rss", mode, {x: r.get("proxy_VmRSS_mib", 0.0)}, when,
                 title="real proxies, one run: RSS after the writes", y_label="MiB (log)", **layout)
    if "ttfb_service_s" in r:
        for w, fig, what in (("ttfb", "modes_first_byte", "time to first byte"),
                             ("connect", "modes_connect", "connect() (SYN to SYN-ACK)")):
            xs = [s * 1000 for s in r[f"{w}_service_s"]]
            plots.record("nftables", fig, mode, {x: [min(xs), statistics.median(xs), _quantile(xs, 0.99)]}, when,
                         title=f"new connection to the last Service: {what} (median, min-p99)",
                         y_label="ms (log)", **layout)

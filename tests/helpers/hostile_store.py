"""Hostile objects in the API server's store, for the end-to-end test of every proxy mode
(tests/iptables/test_iptables_hostile.py, tests/nftables/test_nftables_hostile.py,
tests/userspace/test_userspace_hostile.py): the same object set, the same expectations of what
kproxy counts and logs, and the same change while the API server is down; each mode's test checks
what that mode programmed.

The objects are written straight into the API server's SQLite store (controlplane_stub.store),
around the API server's validation, as a buggy or hostile writer (or another API server sharing
the data) would: one Service per kind of bad field, bad EndpointSlices for valid Services, a Node
whose only address is garbage, and objects whose fields have the wrong JSON type. kproxy must skip
exactly those, program the 100 valid Services beside them, count each skipped object in
kproxy_invalid_objects_total; a bad entry of a list kube-proxy filters entry by entry (an external
IP, a load balancer ingress IP) is left out instead, counted in kproxy_invalid_values_total, and the
rest of its Service programmed.

controlplane_stub is imported when used: a test module does
`pytest.importorskip("controlplane_stub.apiserver.testing")` first."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from helpers.kproxy_e2e import apiserver_for
from helpers.netns import fresh_netns
from kproxy.relay import socket_in_netns

GOOD = 100
INJECT = "\n-A INPUT -j ACCEPT"
NODE = "node-1"
METRICS = "127.0.0.1:10249"
HEALTHZ = "127.0.0.1:10256"

# One Service per kind of bad field; all but bad-clusterip on 10.96.9.x, which must never show up.
# name -> (spec fields over the base, status, the reason kproxy counts it under)
BAD_SERVICES: dict[str, tuple[dict[str, Any], dict[str, Any] | None, str]] = {
    "bad-lb-ingress": ({"type": "LoadBalancer", "ports": [{"name": "http", "port": 80, "nodePort": 30001}]},
                       {"loadBalancer": {"ingress": [{"ip": "198.51.100.7" + INJECT}]}}, "ip"),
    "bad-port-name": ({"ports": [{"name": 'a" -j ACCEPT -m comment --comment "b', "port": 80}]}, None, "name"),
    "bad-port": ({"ports": [{"name": "http", "port": 70000}]}, None, "port"),
    "bad-node-port": ({"type": "NodePort", "ports": [{"name": "http", "port": 80, "nodePort": 99999}]}, None, "port"),
    "bad-protocol": ({"ports": [{"name": "http", "port": 80, "protocol": "ICMP"}]}, None, "protocol"),
    "bad-cluster-ip": ({"clusterIP": "10.96.9.300", "clusterIPs": ["10.96.9.300"]}, None, "ip"),
    "bad-external-ip": ({"externalIPs": ["192.0.2.1 -j ACCEPT"]}, None, "ip"),
    "bad-source-range": ({"type": "LoadBalancer", "loadBalancerSourceRanges": ["0.0.0.0/0" + INJECT],
                          "ports": [{"name": "http", "port": 80, "nodePort": 30002}]}, None, "cidr"),
    "bad-affinity": ({"sessionAffinity": "ClientIP",
                      "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10**9}}}, None, "timeout"),
    "bad-type": ({"type": "Bogus"}, None, "type"),
    "BAD-NAME": ({}, None, "name"),
    "bad-wrong-type": ({"ports": "80"}, None, "decode"),
}
# Of those, the Services whose only bad field is one entry of a filtered list: programmed without
# that entry (kube/ingest.py service_ports), with their cluster IP and endpoint.
PARTIAL = {"bad-lb-ingress", "bad-external-ip"}
# Values from rejected objects or entries (and the rest of INJECT) that no dump may hold: the bad
# slices' endpoints, the bad ingress IP, the bad external IP, the bad port name's rule text.
REJECTED_MARKERS = ("10.1.201.", "198.51.100.7", "192.0.2.1", "ACCEPT -m comment")
GOOD_NAMES = frozenset(f"svc-{i}" for i in range(GOOD))
# What is programmed once kproxy has the store as _seed writes it, and after _change.
FIRST = GOOD_NAMES | PARTIAL
SECOND = (GOOD_NAMES - {"svc-3"}) | PARTIAL | {"bad-wrong-type"}


def cluster_ip(i: int) -> str:
    """svc-i's ClusterIP."""
    return f"10.96.{1 + i // 200}.{i % 200 + 1}"


def good_endpoints(i: int) -> tuple[str, str]:
    """svc-i's endpoint addresses (its good slice, port 8080)."""
    return f"10.1.{i}.1", f"10.1.{i}.2"


def bad_cluster_ip(j: int) -> str:
    """The ClusterIP of the j-th of BAD_SERVICES (bad-cluster-ip's own is not an address)."""
    return f"10.96.9.{j + 1}"


def bad_endpoint(j: int) -> str:
    """The endpoint address of the j-th of BAD_SERVICES' slice (port 8080)."""
    return f"10.1.200.{j + 1}"


def _meta(name: str, i: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": "default", "uid": f"00000000-0000-0000-0000-{i:012d}",
            "creationTimestamp": "2026-12-06T00:00:00Z", **extra}


def _service(name: str, i: int, vip: str, spec: dict[str, Any] | None = None,
             status: dict[str, Any] | None = None) -> dict[str, Any]:
    base = {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, i),
            "spec": {**base, **(spec or {})}, "status": status or {}}


def _slice(name: str, service: str, i: int, ips: list[str], port: Any = 8080,
           endpoints: Any = None) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": _meta(name, 10_000 + i, labels={"kubernetes.io/service-name": service}),
            "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": endpoints if endpoints is not None else
            [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-2"} for ip in ips]}


async def seed(data_dir: str) -> None:
    """The store kproxy first lists: the Node, GOOD valid Services with a slice each, BAD_SERVICES
    with a slice each, and three bad slices for svc-0, svc-1 and svc-2."""
    from controlplane_stub.apiserver.resources import BY_ID
    from controlplane_stub.store.sqlite import SQLiteStore

    store = SQLiteStore(os.path.join(data_dir, "store.db"))
    svc, es, nodes = BY_ID["services"], BY_ID["endpointslices.discovery.k8s.io"], BY_ID["nodes"]
    try:
        await store.create(nodes.key("", NODE), {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "uid": "node-1-uid", "creationTimestamp": "2026-12-06T00:00:00Z"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1" + INJECT},
                                     {"type": "Hostname", "address": NODE}]}})
        writes = []
        for i in range(GOOD):
            name = f"svc-{i}"
            writes.append(store.create(svc.key("default", name), _service(name, i, cluster_ip(i))))
            writes.append(store.create(es.key("default", f"{name}-a"),
                                       _slice(f"{name}-a", name, i, list(good_endpoints(i)))))
        for j, (name, (spec, status, _reason)) in enumerate(BAD_SERVICES.items()):
            writes.append(store.create(svc.key("default", name),
                                       _service(name, 500 + j, bad_cluster_ip(j), spec, status)))
            writes.append(store.create(es.key("default", f"{name}-a"),
                                       _slice(f"{name}-a", name, 500 + j, [bad_endpoint(j)])))
        # Bad slices for valid Services: each is skipped, the Service keeps its good slice.
        writes.append(store.create(es.key("default", "svc-0-bad"), _slice("svc-0-bad", "svc-0", 900, ["10.1.201.1" + INJECT])))
        writes.append(store.create(es.key("default", "svc-1-bad"), _slice("svc-1-bad", "svc-1", 901, ["10.1.201.2"], port=70000)))
        writes.append(store.create(es.key("default", "svc-2-bad"), _slice("svc-2-bad", "svc-2", 902, [], endpoints="x")))
        await asyncio.gather(*writes)
    finally:
        await store.close()
        store.close_sync()


async def change(data_dir: str) -> None:
    """While the API server is down: svc-3 becomes type-wrong, bad-wrong-type is fixed, bad-port
    is deleted. Written as store updates, so they are events the resumed watch delivers."""
    from controlplane_stub.apiserver.resources import BY_ID
    from controlplane_stub.store.sqlite import SQLiteStore

    store = SQLiteStore(os.path.join(data_dir, "store.db"))
    svc = BY_ID["services"]
    try:
        broken = store.get(svc.key("default", "svc-3"))
        assert broken is not None
        broken["spec"]["ports"] = {"port": 80}
        await store.update(svc.key("default", "svc-3"), broken)
        fixed = store.get(svc.key("default", "bad-wrong-type"))
        assert fixed is not None
        fixed["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP"}]
        await store.update(svc.key("default", "bad-wrong-type"), fixed)
        await store.delete(svc.key("default", "bad-port"))
    finally:
        await store.close()
        store.close_sync()


@contextmanager
def hostile_apiserver(netns: str) -> Iterator[tuple[Any, str]]:
    """A running API server on a store seeded by `seed` (a temporary directory, removed after),
    reachable from inside `netns`; yields its process (controlplane_stub.apiserver.testing: stop(),
    start(), kubeconfig) and the store's directory."""
    data_dir = tempfile.mkdtemp(prefix="kproxy-hostile-")
    try:
        asyncio.run(seed(data_dir))
        with apiserver_for(netns, data_dir=data_dir) as api:
            yield api.proc, data_dir
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def restart_with_changes(api: Any, data_dir: str) -> None:
    """Stop the API server, `change` its store, start it again (the same port: kproxy resumes its
    watches)."""
    api.stop()
    asyncio.run(change(data_dir))
    api.start()


def ns_output(netns: str, *cmd: str) -> str:
    """stdout of `ip netns exec NETNS CMD...` (whatever its exit code)."""
    return subprocess.run(["ip", "netns", "exec", netns, *cmd], capture_output=True, text=True, timeout=60,
                          check=False).stdout


def iptables_save(netns: str, backend: str) -> str:
    """The namespace's whole firewall as `iptables-<backend>-save` prints it (backend nft or legacy)."""
    return ns_output(netns, f"iptables-{backend}-save")


def kproxy_args(api: Any, mode: str, *extra: str) -> list[str]:
    """kproxy's flags for the scenario in `mode` (metrics and healthz on the namespace's loopback)."""
    return ["--kubeconfig", api.kubeconfig, "--proxy-mode", mode, "--hostname-override", NODE,
            "--cluster-cidr", "10.0.0.0/8", "--healthz-bind-address", HEALTHZ,
            "--metrics-bind-address", METRICS, *extra]


def wait_programmed(read: Callable[[], tuple[set[str], str]], want: set[str] | frozenset[str],
                    proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> str:
    """Poll `read` (the Service names a mode has programmed, and the dump they came from) until the
    names, without the API server's own `kubernetes` Service, are exactly `want`; returns the dump.
    Fails at once if kproxy exits, and after `timeout` s with what is missing or extra."""
    deadline = time.monotonic() + timeout
    while True:
        names, dump = read()
        got = names - {"kubernetes"}
        if got == want:
            return dump
        assert proc.poll() is None, f"kproxy exited {proc.returncode}: {log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, (
            f"programmed {len(got)}: missing {sorted(want - got)[:5]} extra {sorted(got - want)[:5]}\n"
            + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def assert_no_rejected_values(dump: str) -> None:
    """No value of a rejected object or list entry is in `dump` (a mode's firewall dump as text)."""
    for marker in REJECTED_MARKERS:
        assert marker not in dump, marker


def assert_counted_and_logged(netns: str, log: Path) -> None:
    """kproxy's metrics count every bad object under its kind and reason (the partly-bad Services'
    entries as values), and its log says so with the hostile values escaped."""
    metrics = ns_output(netns, "curl", "-s", f"http://{METRICS}/metrics")
    for name, (_spec, _status, reason) in BAD_SERVICES.items():
        counter = "kproxy_invalid_values_total" if name in PARTIAL else "kproxy_invalid_objects_total"
        assert f'{counter}{{kind="Service",reason="{reason}"}}' in metrics, (name, reason)
    for reason in ("ip", "port", "decode"):
        assert f'kproxy_invalid_objects_total{{kind="EndpointSlice",reason="{reason}"}}' in metrics, reason
    text = log.read_text(errors="replace")
    assert "has no valid InternalIP/ExternalIP address" in text
    # Log lines carry hostile values escaped (repr): none of them starts a line of its own.
    assert "'198.51.100.7\\n-A INPUT -j ACCEPT'" in text
    assert not any(line.startswith("-A ") for line in text.splitlines())


def assert_watch_resumed(proc: subprocess.Popen[bytes], log: Path) -> None:
    """After restart_with_changes: kproxy still runs, nothing raised, and the Services' watch was
    resumed, not replaced by a relist."""
    assert proc.poll() is None
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert "relisting reflector=services" not in text  # the watch was kept, not restarted by a list


ENDPOINTS = "10.1.0.0/16"  # every endpoint address `seed` writes, good or bad
ENDPOINT_PORT = 8080


class EndpointServer:
    """Every endpoint of the store, served inside a node namespace the test made: ENDPOINTS routed
    to the namespace's lo (`ip route add local`), one listener on 0.0.0.0:ENDPOINT_PORT that
    answers each connection with the local address it reached ("10.1.0.2\\n") and remembers it.
    Nothing outside the namespace is touched; the route goes with the namespace."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.reached: list[str] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        subprocess.run(["ip", "-n", self.netns, "route", "add", "local", ENDPOINTS, "dev", "lo"],
                       check=True, capture_output=True, timeout=30)
        sock = socket_in_netns(self.netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", ENDPOINT_PORT))
        sock.listen(256)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="kpt-hostile-endpoints", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed by __exit__
                return
            with conn:
                local = conn.getsockname()[0]
                self.reached.append(local)
                try:
                    conn.sendall(f"{local}\n".encode())
                except OSError:
                    pass

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)


def reach(netns: str, ip: str, port: int = 80, timeout: float = 5.0) -> str:
    """A TCP connection from the node namespace to ip:port: the endpoint address that answered
    (EndpointServer's line); raises OSError when nothing answered."""
    with socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((ip, port))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                raise ConnectionError(f"{ip}:{port}: closed after {buf!r}")
            buf += chunk
    return buf.decode().strip()


@contextmanager
def hostile_node(prefix: str) -> Iterator[str]:
    """A node namespace of the test's own (helpers.netns.fresh_netns: unique name, removed even on
    failure) for the scenario with traffic: eth0 192.168.7.2/24 and eth1 10.0.0.5/24 (a veth pair,
    up), a default route to 192.168.7.254, which nobody answers (a ClusterIP no rule rewrites goes
    nowhere, as on a node). Endpoints: EndpointServer."""
    with fresh_netns(prefix, {"eth0": "192.168.7.2/24", "eth1": "10.0.0.5/24"}, up=True) as netns:
        subprocess.run(["ip", "-n", netns, "route", "add", "default", "via", "192.168.7.254"],
                       check=True, capture_output=True, timeout=30)
        yield netns


def service_addresses() -> dict[str, tuple[str, frozenset[str]]]:
    """Every Service of the store with an address for a ClusterIP (all but bad-cluster-ip):
    name -> (ClusterIP, the addresses of its valid endpoints)."""
    out = {f"svc-{i}": (cluster_ip(i), frozenset(good_endpoints(i))) for i in range(GOOD)}
    for j, name in enumerate(BAD_SERVICES):
        if name != "bad-cluster-ip":
            out[name] = (bad_cluster_ip(j), frozenset({bad_endpoint(j)}))
    return out


def _answer(netns: str, ip: str, timeout: float) -> str | None:
    try:
        return reach(netns, ip, timeout=timeout)
    except OSError:
        return None


def assert_traffic(netns: str, programmed: frozenset[str], silent_after: float = 1.0) -> None:
    """With EndpointServer running: a connection from the node to the ClusterIP of each
    `programmed` Service reaches one of its valid endpoints, and every one of them is reached
    within 40 connections (random or round robin, as the mode picks; at least 2n+2 connections for
    n endpoints, so a round robin over one more shows it); the ClusterIP of every other
    Service of the store (rejected, deleted, made type-wrong) answers nothing within
    `silent_after` s (tried all at once)."""
    table = service_addresses()
    for name in sorted(programmed):
        vip, valid = table[name]
        seen: set[str] = set()
        for n in range(40):
            try:
                got = reach(netns, vip)
            except OSError as exc:
                raise AssertionError(f"{name} at {vip}: no endpoint answered: {exc!r}") from None
            assert got in valid, f"{name} at {vip}: reached {got}, its endpoints are {sorted(valid)}"
            seen.add(got)
            if seen == valid and n >= 2 * len(valid) + 1:  # a round robin's whole round, and more
                break
        assert seen == valid, f"{name} at {vip}: 40 connections reached {sorted(seen)} of {sorted(valid)}"
    others = sorted(set(table) - programmed)
    assert others, "no Service left to be silent"
    with ThreadPoolExecutor(len(others)) as pool:
        answers = dict(zip(others, pool.map(lambda n: _answer(netns, table[n][0], silent_after), others)))
    answered = {n: a for n, a in answers.items() if a is not None}
    assert answered == {}, f"Services that must not be programmed answered: {answered}"

"""kubectl 1.32 logs and exec against the one-machine cluster (real kubectl, API server, node agent,
container processes in pod namespaces), plus unit tests of the pure parts (log options, log files,
exec status and resize messages)."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_helpers import Cluster, wait_for
from hypothesis import given
from hypothesis import strategies as st

from controlplane_stub.agent import spdy
from controlplane_stub.agent.logs import ContainerLog, LogQuery, LogQueryError, read
from controlplane_stub.agent.portforward import parse_port
from controlplane_stub.agent.streaming import exit_status, parse_resize

TS = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


# -- units ---------------------------------------------------------------------------------------
def test_log_query_parses_and_refuses_bad_values() -> None:
    q = LogQuery.parse({"follow": "true", "tailLines": "3", "sinceSeconds": "10", "limitBytes": "5",
                        "timestamps": "1", "container": "c"})
    assert (q.follow, q.tail_lines, q.since_seconds, q.limit_bytes, q.timestamps, q.container) == (
        True, 3, 10, 5, True, "c")
    assert LogQuery.parse(q.to_query()) == LogQuery(follow=True, timestamps=True, tail_lines=3,
                                                     since_seconds=10, limit_bytes=5)
    for bad in ({"tailLines": "-1"}, {"tailLines": "x"}, {"sinceSeconds": "0"}, {"limitBytes": "0"},
                {"follow": "maybe"}, {"sinceTime": "2020-01-01T00:00:00Z"}):
        with pytest.raises(LogQueryError):
            LogQuery.parse(bad)


async def _collect(log: ContainerLog, q: LogQuery) -> bytes:
    return b"".join([b async for b in read(log, q, lambda: False)])


def test_log_files_previous_tail_limit_and_timestamps(tmp_path: Path) -> None:
    async def main() -> None:
        log = ContainerLog(tmp_path, "c", max_bytes=200)
        for instance in range(2):
            log.new_instance()
            r = asyncio.StreamReader()
            r.feed_data(b"".join(b"i%d line %d\n" % (instance, n) for n in range(20)) + b"no newline")
            r.feed_eof()
            await log.pump(r, "stdout")
        assert log.current.with_name("c.log.1").exists(), "rotated by size"
        cur = await _collect(log, LogQuery())
        assert cur.splitlines()[-2:] == [b"i1 line 19", b"no newline"]
        assert b"i0" not in cur
        prev = await _collect(log, LogQuery(previous=True))
        assert b"i0 line 19" in prev and b"i1" not in prev
        assert await _collect(log, LogQuery(tail_lines=2)) == b"i1 line 19\nno newline\n"
        assert await _collect(log, LogQuery(limit_bytes=7)) == b"i1 line"[:7]
        stamped = await _collect(log, LogQuery(tail_lines=1, timestamps=True))
        assert TS.match(stamped) and stamped.endswith(b" no newline\n")
        assert await _collect(log, LogQuery(since_seconds=1)) != b""
        assert await _collect(log, LogQuery(tail_lines=0)) == b""

    asyncio.run(main())


def test_exec_exit_status_is_what_kubectl_reads() -> None:
    assert exit_status(0, ["true"]) == {"metadata": {}, "status": "Success"}
    s = exit_status(7, ["sh", "-c", "exit 7"])
    assert s["reason"] == "NonZeroExitCode" and s["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]


@given(st.binary(max_size=64))
def test_resize_parser_never_raises(data: bytes) -> None:
    r = parse_resize(data)
    assert r is None or (0 <= r[0] < 65536 and 0 <= r[1] < 65536)


def test_resize_parser_reads_kubectl_messages() -> None:
    assert parse_resize(b'{"Width":80,"Height":24}') == (80, 24)
    assert parse_resize(b'{"Width":-1,"Height":24}') is None
    assert parse_resize(b'{"Width":"80","Height":24}') is None


def test_spdy_frames_round_trip_through_one_compression_context_each_way() -> None:
    client, server = spdy.Framer(), spdy.Framer()
    wire = b"".join(client.syn_stream(sid, {"streamType": kind, "port": "5000", "requestID": "0"})
                    for sid, kind in ((1, "error"), (3, "data")))
    wire += client.data(3, b"GET / HTTP/1.1\r\n\r\n", fin=True) + client.ping(7)
    frames = []
    for i in range(0, len(wire), 5):  # the frames split anywhere across WebSocket messages
        frames += server.feed(wire[i:i + 5])
    assert [(f.type, f.stream_id) for f in frames] == [(spdy.SYN_STREAM, 1), (spdy.SYN_STREAM, 3), (0, 3),
                                                       (spdy.PING, 0)]
    assert frames[1].headers == {"streamtype": "data", "port": "5000", "requestid": "0"}
    assert frames[2].data == b"GET / HTTP/1.1\r\n\r\n" and frames[2].flags == spdy.FLAG_FIN
    assert frames[3].value == 7
    replies = client.feed(server.syn_reply(1, {}) + server.syn_reply(3, {}))
    assert [(f.type, f.stream_id, f.headers) for f in replies] == [(spdy.SYN_REPLY, 1, {}), (spdy.SYN_REPLY, 3, {})]


def test_spdy_refuses_oversized_and_malformed_frames() -> None:
    with pytest.raises(spdy.SpdyError):
        spdy.Framer().feed(struct.pack(">II", 1, spdy.MAX_FRAME + 1))
    with pytest.raises(spdy.SpdyError):
        spdy.Framer().feed(struct.pack(">HHI", 0x8002, 1, 10) + bytes(10))  # SPDY/2
    with pytest.raises(spdy.SpdyError):
        spdy.decode_headers(struct.pack(">I", spdy.MAX_HEADERS + 1))
    bomb = zlib.compressobj(zdict=spdy.DICTIONARY)
    block = bomb.compress(struct.pack(">I", 1) + bytes(spdy.MAX_HEADER_BLOCK * 4)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(spdy.SpdyError):
        spdy.Framer().feed(struct.pack(">HHI", 0x8003, 1, 10 + len(block)) + bytes(10) + block)


@given(st.binary(max_size=200))
def test_spdy_framer_raises_only_spdy_errors(data: bytes) -> None:
    try:
        spdy.Framer().feed(data)
    except spdy.SpdyError:
        pass


@given(st.text(max_size=8))
def test_port_header_parses_to_a_port_or_nothing(value: str) -> None:
    p = parse_port(value)
    assert p is None or (0 < p < 65536 and str(p) == value.lstrip("0"))


# -- kubectl against the cluster ------------------------------------------------------------------

def e2e(test: Callable[..., None]) -> Callable[..., None]:
    marked: Callable[..., None] = pytest.mark.e2e(pytest.mark.kubectl(pytest.mark.timeout(240)(test)))
    return marked


TICKER = ["sh", "-c", "echo started >&2; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"]
CRASHER = ["sh", "-c", "echo instance-$$; echo to-stderr >&2; sleep 2; exit 1"]


@pytest.fixture(scope="module")
def io_cluster(small_cluster: Cluster) -> Iterator[Cluster]:
    c = small_cluster
    for name, cmd in (("ticker", TICKER), ("crasher", CRASHER)):
        c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                 "spec": {"containers": [{"name": "main", "image": "busybox", "command": cmd}]}})
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "kio-web"}},
             "spec": {"containers": [{"name": "web", "image": "flask-kubernetes:latest",
                                      "ports": [{"containerPort": 5000}]}]}})
    c.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kio-web"},
             "spec": {"selector": {"app": "kio-web"}, "ports": [{"port": 6000, "targetPort": 5000}]}})
    for name in ("ticker", "crasher", "web"):
        wait_for(lambda n=name: c.json("pod", n).get("status", {}).get("phase") == "Running", timeout=60,
                 what=f"pod {name} running")
    yield c
    c.kubectl("delete", "pod", "ticker", "crasher", "web", "--wait=false", check=False)
    c.kubectl("delete", "svc", "kio-web", "--wait=false", check=False)


def run(c: Cluster, *args: str, input: str | None = None, kubeconfig: str = "",
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(c.env, KUBECONFIG=kubeconfig) if kubeconfig else c.env
    return subprocess.run(["kubectl", *args], env=env, input=input, capture_output=True, text=True,
                          timeout=timeout, check=False)


@e2e
def test_kubectl_logs_tail_timestamps_and_errors(io_cluster: Cluster) -> None:
    c = io_cluster
    wait_for(lambda: "tick 3" in c.kubectl("logs", "ticker"), timeout=20, what="ticker's output")
    out = c.kubectl("logs", "ticker")
    assert out.startswith("started\ntick 0\ntick 1\n"), out[:200]  # stderr and stdout, in order
    tail = c.kubectl("logs", "ticker", "--tail=2", "--timestamps").encode().splitlines()
    assert len(tail) == 2 and all(TS.match(line + b"\n") for line in tail), tail
    assert c.kubectl("logs", "ticker", "-c", "main", "--limit-bytes=4") == "star"
    r = run(c, "logs", "nosuch")
    assert r.returncode != 0 and 'pods "nosuch" not found' in r.stderr
    r = run(c, "logs", "ticker", "-c", "other")
    assert r.returncode != 0 and "container other is not valid for pod ticker" in r.stderr
    # A pod on no node: an empty log, as upstream; exec refused with its Status.
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nowhere"},
             "spec": {"nodeSelector": {"kio": "no-such-node"},
                      "containers": [{"name": "main", "image": "busybox", "command": TICKER}]}})
    try:
        r = run(c, "logs", "nowhere")
        assert (r.returncode, r.stdout) == (0, ""), r
        r = run(c, "exec", "nowhere", "--", "true")
        assert r.returncode != 0 and "pod nowhere does not have a host assigned" in r.stderr, r.stderr
    finally:
        c.kubectl("delete", "pod", "nowhere", "--wait=false", check=False)
    # No previous instance yet: the kubelet's error.
    r = run(c, "logs", "ticker", "--previous")
    assert r.returncode != 0 and 'previous terminated container "main" in pod "ticker" not found' in r.stderr


@e2e
def test_kubectl_logs_follow_sees_new_lines_until_killed(io_cluster: Cluster) -> None:
    c = io_cluster
    p = subprocess.Popen(["kubectl", "logs", "-f", "--tail=1", "ticker"], env=c.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        seen: list[int] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(seen) < 3:
            ready, _, _ = select.select([p.stdout], [], [], 1.0)
            if ready:
                line = p.stdout.readline()
                assert line, f"kubectl logs -f ended early: {p.stderr.read() if p.stderr else ''}"
                seen.append(int(line.split()[1]))
        # --tail=1 gave the latest line at the start; the next ones were written after it started.
        assert len(seen) == 3 and seen == sorted(seen) and seen[2] > seen[0], seen
        assert p.poll() is None, "kubectl logs -f is still following"
    finally:
        p.kill()
        assert p.wait(10) != 0


@e2e
def test_kubectl_logs_previous_after_a_restart(io_cluster: Cluster) -> None:
    c = io_cluster

    def restarted_and_running() -> bool:
        cs = (c.json("pod", "crasher").get("status", {}).get("containerStatuses") or [{}])[0]
        return cs.get("restartCount", 0) >= 1 and "running" in cs.get("state", {})

    wait_for(restarted_and_running, timeout=40, what="crasher restarted")
    prev = c.kubectl("logs", "crasher", "--previous")
    cur = c.kubectl("logs", "crasher")
    prev_id = re.findall(r"instance-(\d+)", prev)
    cur_id = re.findall(r"instance-(\d+)", cur)
    assert len(prev_id) == 1 and len(cur_id) == 1 and prev_id != cur_id, (prev, cur)
    assert "to-stderr" in prev
    # Between two runs (the back-off) the container is not running: exec gets the kubelet's words.
    wait_for(lambda: 'unable to upgrade connection: container not found ("main")'
             in run(c, "exec", "crasher", "--", "true").stderr, timeout=30, interval=0.3,
             what="exec into crasher while it is not running")


@e2e
def test_kubectl_exec_output_exit_code_stdin_and_namespaces(io_cluster: Cluster) -> None:
    c = io_cluster
    r = run(c, "exec", "ticker", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr.splitlines()[0]) == (7, "out\n", "err"), r
    r = run(c, "exec", "ticker", "--", "true")
    assert (r.returncode, r.stdout) == (0, "")
    data = "".join(f"line {i} of stdin\n" for i in range(2000))
    r = run(c, "exec", "-i", "ticker", "--", "cat", input=data)
    assert r.returncode == 0 and r.stdout == data, r.stderr
    # The container's view: its hostname (UTS namespace), its network namespace (the pod IP), its
    # user (unprivileged), and the cluster's directory hidden (mount namespace).
    pod_ip = c.json("pod", "ticker")["status"]["podIP"]
    cluster_dir = Path(c.home) / c.name
    r = run(c, "exec", "ticker", "--", "sh", "-c",
            f"cat /proc/sys/kernel/hostname; id -u; ip -o -4 addr show; ls -A {cluster_dir} | wc -l")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "ticker" and lines[1] != "0" and f" {pod_ip}/" in r.stdout and lines[-1] == "0", r.stdout
    assert os.listdir(cluster_dir), "the cluster directory is not empty outside the pod"
    r = run(c, "exec", "ticker", "--", "no-such-program")
    assert r.returncode != 0 and r.returncode != 7
    r = run(c, "exec", "nosuch", "--", "true")
    assert r.returncode != 0 and 'pods "nosuch" not found' in r.stderr


@e2e
def test_kubectl_exec_with_a_terminal(io_cluster: Cluster) -> None:
    c = io_cluster
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(c.env)
        os.execvp("kubectl", ["kubectl", "exec", "-it", "ticker", "--", "sh"])
    out = b""
    try:
        os.write(fd, b"tty && echo answer-$((6*7))\n")
        deadline = time.monotonic() + 20
        while b"answer-42" not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 1.0)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        assert b"answer-42" in out and b"/dev/pts/" in out, out
        os.write(fd, b"exit 3\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)


@e2e
def test_read_only_identity_reads_logs_but_cannot_exec(io_cluster: Cluster) -> None:
    c = io_cluster
    ro = str(Path(c.home) / c.name / "apiserver" / "readonly.kubeconfig")
    assert Path(ro).exists()
    r = run(c, "logs", "ticker", "--tail=1", kubeconfig=ro)
    assert r.returncode == 0 and r.stdout.startswith("tick "), r.stderr
    r = run(c, "exec", "ticker", "--", "true", kubeconfig=ro)
    assert r.returncode != 0
    assert 'cannot create resource "pods/exec" in API group "" in the namespace "default"' in r.stderr, r.stderr


def forwarded_port(p: subprocess.Popen[str]) -> int:
    """The local port of `kubectl port-forward ... :PORT` (it picks a free one and says which)."""
    assert p.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if select.select([p.stdout], [], [], 1.0)[0]:
            line = p.stdout.readline()
            m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) ->", line)
            if m:
                return int(m.group(1))
            assert line, f"kubectl port-forward ended: {p.stderr.read() if p.stderr else ''}"
    raise AssertionError("kubectl port-forward did not say where it listens")


def curl(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"], capture_output=True,
                          text=True, timeout=20, check=False)


@e2e
def test_kubectl_port_forward_to_a_pod_and_a_service(io_cluster: Cluster) -> None:
    c = io_cluster
    wait_for(lambda: c.json("pod", "web")["status"].get("podIP") and any(
        cs.get("ready") for cs in c.json("pod", "web")["status"].get("containerStatuses") or []), timeout=60,
        what="pod web ready")
    for target, remote in (("pod/web", "5000"), ("svc/kio-web", "6000")):
        p = subprocess.Popen(["kubectl", "port-forward", target, f":{remote}"], env=c.env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            port = forwarded_port(p)
            # The app may still be starting right after Ready: a few tries, bounded.
            wait_for(lambda port=port: "Hello from Kubernetes!" in curl(port).stdout, timeout=20,
                     what=f"curl through port-forward {target}")
            # Several connections over the one session, each its own pair of streams.
            for _ in range(5):
                r = curl(port)
                assert "Hello from Kubernetes!" in r.stdout, r
            assert p.poll() is None
        finally:
            p.kill()
            p.wait(10)
    # Nothing listens on 5999 in the pod: the connection fails and kubectl is told why.
    p = subprocess.Popen(["kubectl", "port-forward", "pod/web", ":5999"], env=c.env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = forwarded_port(p)
        r = curl(port)
        assert "Hello" not in r.stdout and r.returncode != 0
    finally:
        p.kill()
        _, err = p.communicate(timeout=10)
    assert "error forwarding port 5999 to pod default/web" in err, err


@e2e
def test_read_only_identity_cannot_port_forward(io_cluster: Cluster) -> None:
    c = io_cluster
    ro = str(Path(c.home) / c.name / "apiserver" / "readonly.kubeconfig")
    p = subprocess.run(["kubectl", "port-forward", "pod/web", ":5000"], env=dict(c.env, KUBECONFIG=ro),
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode != 0
    assert 'cannot create resource "pods/portforward"' in p.stderr, p.stderr

"""The one-machine cluster under hostile or broken conditions (issue 13): every component
supervised with the kubelet's back-off (the API server too, no lifetime cap), a `status` that tells
the truth, pods that run unprivileged and cannot read the cluster's secrets, and a `down` that
removes only what the cluster recorded that it made. Real processes and namespaces throughout."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import BIN, Cluster, needs_root, wait_for

from controlplane_stub.agent.record import Record, proc_start

pytestmark = [pytest.mark.e2e, pytest.mark.kubectl, pytest.mark.timeout(180)]
Obj = dict[str, Any]


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def cli(home: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kproxy-cluster"), *args],
        env=dict(os.environ, KPROXY_CLUSTER_HOME=home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_down_removes_only_what_the_cluster_recorded() -> None:
    needs_root()
    name = "kpf" + secrets.token_hex(3)
    home = tempfile.mkdtemp(prefix="kpf-home-")
    # Namespaces named like the cluster's but not made by it (another tool's, a user's).
    foreign = [f"{name}-net", f"{name}-n1", f"{name}-client", f"{name}-other"]
    mine = f"{name}-mine"
    try:
        for ns in foreign:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        r = cli(home, "down", "--name", name)
        assert r.returncode == 0 and "removed 0 netns" in r.stdout, r
        assert set(foreign) <= netns_list(), "down removed namespaces it never made"
        # A recorded namespace that is still the one made goes; a recorded name whose namespace
        # was made again by someone else (another inode) stays.
        d = Path(home) / name
        d.mkdir(mode=0o700)
        rec = Record(d / "owned.jsonl")
        rec.netns_intent(mine)
        subprocess.run(["ip", "netns", "add", mine], check=True)
        rec.netns_made(mine)
        with rec.path.open("a") as f:
            f.write(json.dumps({"netns": f"{name}-net", "ino": 1}) + "\n")
        r = cli(home, "down", "--name", name)
        assert r.returncode == 0 and "removed 1 netns" in r.stdout, r
        left = netns_list()
        assert mine not in left and set(foreign) <= left
    finally:
        for ns in [*foreign, mine]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_up_never_adopts_a_namespace_it_did_not_make() -> None:
    needs_root()
    name = "kpf" + secrets.token_hex(3)
    home = tempfile.mkdtemp(prefix="kpf-home-")
    squatter = f"{name}-net"
    try:
        subprocess.run(["ip", "netns", "add", squatter], check=True)
        r = cli(
            home, "up", "--name", name, "--nodes", "1", "--no-dns", "--no-localhost-lb", "--timeout", "60"
        )
        log = (Path(home) / name / "logs" / "supervisor.log").read_text(errors="replace")
        assert r.returncode != 0, r
        assert "exists and this cluster did not make it" in log, log[-2000:]
        assert squatter in netns_list()
        r = cli(home, "down", "--name", name)
        assert r.returncode == 0 and squatter in netns_list()
        assert not [n for n in netns_list() if n.startswith(name) and n != squatter]
    finally:
        cli(home, "down", "--name", name)
        subprocess.run(["ip", "netns", "del", squatter], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


# -- pods ---------------------------------------------------------------------------------------
def run_pod(c: Cluster, name: str, script: str, sc: Obj | None = None, pod_sc: Obj | None = None) -> None:
    ctr: Obj = {"name": "c", "image": "busybox", "command": ["sh", "-c", script]}
    if sc is not None:
        ctr["securityContext"] = sc
    spec: Obj = {"restartPolicy": "Never", "containers": [ctr]}
    if pod_sc is not None:
        spec["securityContext"] = pod_sc
    c.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def pod_output(c: Cluster, name: str) -> str:
    wait_for(
        lambda: (c.json("pod", name).get("status") or {}).get("phase") in ("Succeeded", "Failed"),
        timeout=60,
        what=f"pod {name} done",
    )
    r = c.cli("logs", name)
    assert r.returncode == 0, r
    return r.stdout


def secrets_of(c: Cluster) -> tuple[list[str], list[str]]:
    """(files holding the cluster's tokens and keys, the token strings themselves)."""
    d = Path(c.home) / c.name
    files = [d / "kubeconfig", *sorted((d / "apiserver").rglob("*.kubeconfig"))]
    files += sorted((d / "apiserver").rglob("*.key")) + sorted((d / "apiserver").rglob("tokens.csv"))
    tokens = [
        line.split(",")[0]
        for line in (d / "apiserver" / "tokens.csv").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(files) >= 4 and tokens
    return [str(f) for f in files], tokens


def test_pods_run_unprivileged_and_cannot_read_the_clusters_secrets(small_cluster: Cluster) -> None:
    c = small_cluster
    files, tokens = secrets_of(c)
    probe = (
        "echo uid=$(id -u) gid=$(id -g) groups=$(id -G); "
        + "".join(f"echo '== {f}'; cat '{f}' 2>&1 | head -c 400; " for f in files)
        + f"echo '== ls'; ls -la '{Path(c.home) / c.name}' 2>&1; "
        + "echo '== env'; env; echo '== fds'; ls /proc/$$/fd; echo '== end'"
    )
    run_pod(c, "plain", probe)
    run_pod(c, "asroot", probe, sc={"runAsUser": 0})
    run_pod(
        c, "custom", probe, sc={"runAsUser": 1234}, pod_sc={"runAsGroup": 2345, "supplementalGroups": [3456]}
    )
    run_pod(c, "nonroot", "true", sc={"runAsUser": 0, "runAsNonRoot": True})
    outs = {n: pod_output(c, n) for n in ("plain", "asroot", "custom")}
    assert "uid=65534 gid=65534" in outs["plain"], outs["plain"]
    assert "uid=0 gid=0" in outs["asroot"], outs["asroot"]
    m = re.search(r"uid=(\d+) gid=(\d+) groups=([\d ]+)", outs["custom"])
    assert m and m.group(1) == "1234" and m.group(2) == "2345" and "3456" in m.group(3).split(), outs[
        "custom"
    ]
    for name, out in outs.items():
        # Not a token, not a private key, not the cluster's marker, not a descriptor of the agent.
        assert not [t for t in tokens if t in out], f"pod {name} read a token:\n{out}"
        assert "PRIVATE KEY" not in out and "client-key-data" not in out, f"pod {name} read a key:\n{out}"
        env = out.split("== env", 1)[1].split("== fds", 1)[0]
        assert "KPC_CLUSTER" not in env and "KUBECONFIG" not in env, env
        fds = out.split("== fds", 1)[1].split("== end", 1)[0].split()
        assert fds == ["0", "1", "2"], f"pod {name} inherited descriptors: {fds}"
    cs = wait_for(
        lambda: (
            ((c.json("pod", "nonroot").get("status") or {}).get("containerStatuses") or [{}])[0]
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "CreateContainerConfigError"
        ),
        what="runAsNonRoot with uid 0 refused",
    )
    assert cs
    c.kubectl("delete", "pod", "plain", "asroot", "custom", "nonroot", "--wait=false")


# -- supervision and status ---------------------------------------------------------------------
def supervised(c: Cluster, name: str) -> Obj:
    c.refresh()
    return dict(c.state["supervised"][name])


def running_again(c: Cluster, name: str, old_pid: int) -> Obj | None:
    v = supervised(c, name)
    return v if v["state"] == "running" and v["pid"] != old_pid and proc_start(v["pid"]) else None


def gone(pid: int) -> bool:
    return proc_start(pid) is None  # exited (a zombie counts as exited)


def test_the_api_server_is_restarted_and_status_tells_the_truth(small_cluster: Cluster) -> None:
    c = small_cluster
    sup = int(c.state["supervisor_pid"])
    api_pid = supervised(c, "apiserver")["pid"]
    r = c.cli("status")
    assert r.returncode == 0 and f"cluster {c.name}: up " in r.stdout, r
    # The supervisor paused, so that `status` sees the moment between the crash and the restart.
    os.kill(sup, signal.SIGSTOP)
    try:
        os.kill(api_pid, signal.SIGKILL)
        wait_for(lambda: gone(api_pid), what="the API server gone")
        r = c.cli("status", timeout=60)
    finally:
        os.kill(sup, signal.SIGCONT)
    text = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in text, text
    assert f"cluster {c.name}: degraded: apiserver not running" in r.stdout, text
    assert re.search(r"apiserver\s+DOWN", r.stdout), text
    v = wait_for(lambda: running_again(c, "apiserver", api_pid), timeout=60, what="the API server restarted")
    assert v["restarts"] >= 1 and v["last_exit"] == -9
    wait_for(lambda: "node-1" in c.kubectl("get", "nodes", check=False), timeout=30, what="the API answering")
    r = c.cli("status")
    assert r.returncode == 0 and f"cluster {c.name}: up " in r.stdout and "Ready=True" in r.stdout, r
    log = (Path(c.home) / c.name / "logs" / "supervisor.log").read_text()
    assert f"component=apiserver pid={api_pid} exited rc=-9" in log
    assert re.search(r"component=apiserver restarted pid=\d+ \(restart #1\)", log), log[-2000:]
    # An API server that runs but does not answer: status says so in one line, within its timeout.
    api_pid = v["pid"]
    os.kill(api_pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = c.cli("status", timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        os.kill(api_pid, signal.SIGCONT)
    assert "Traceback" not in r.stdout + r.stderr and "nodes: the API server did not answer" in r.stdout, r


def test_a_component_is_restarted_after_any_number_of_crashes_with_a_log_line_each(
    small_cluster: Cluster,
) -> None:
    c = small_cluster
    log = Path(c.home) / c.name / "logs" / "supervisor.log"
    before = log.read_text().count("component=controllers restarted")
    for _ in range(7):  # more than the old lifetime cap of 5
        pid = supervised(c, "controllers")["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pid: running_again(c, "controllers", p), timeout=30, what="controllers restarted")
    text = log.read_text()
    assert text.count("component=controllers restarted") - before == 7
    delays = [float(x) for x in re.findall(r"component=controllers pid=\d+ exited .*? in ([\d.]+) s", text)]
    # This cluster's back-off: 1 s doubling to a 2 s cap (`up --backoff-base 1 --backoff-cap 2`).
    assert delays[-7:] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0], delays
    assert supervised(c, "controllers")["restarts"] >= 7


def test_the_clusters_files_are_the_owners_only(small_cluster: Cluster) -> None:
    d = Path(small_cluster.home) / small_cluster.name
    assert d.stat().st_mode & 0o777 == 0o700
    loose = []
    for p in [d, *d.rglob("*")]:
        st = p.lstat()
        if p.is_symlink():
            continue
        if st.st_mode & 0o077:
            loose.append(f"{p} {oct(st.st_mode & 0o777)}")
    assert not loose, "readable by others: " + ", ".join(loose)
    assert (d / "apiserver" / "tokens.csv").exists() and (d / "owned.jsonl").exists()

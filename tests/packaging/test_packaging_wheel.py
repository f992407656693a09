"""The package as a user gets it: `python -m build` (an sdist, then the wheel built from that sdist,
Cython extensions included), the wheel installed into fresh virtualenvs with only the extras named
here, and the seed app run by that installation alone: `kproxy-cluster up` from the venv, started in
a directory outside the checkout with no PYTHONPATH, the seed manifest shipped in the wheel applied
with kubectl, "Hello from Kubernetes!" over the LoadBalancer IP, `down`.

pip installs from the configured package indexes and its cache only (no checkout on any path)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from email.parser import HeaderParser
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.kubectl, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# What `kproxy-cluster up` with the seed app needs beyond a node's kproxy.
CLUSTER_EXTRAS = "controlplane,dns,demo"
# Only test and demo tools: a node's `pip install kproxy` must not bring them.
NOT_ON_A_NODE = {"flask", "dnspython", "pyroute2", "scapy", "kubernetes", "cryptography", "aetcd", "uvloop",
                 "aiohttp"}


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that leads back to the checkout or its venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ROOT)
    )
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root for the cluster's network namespaces")
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    d = Path(tempfile.mkdtemp(prefix="kpt-pkg-"))
    # Pods run as nobody and import Flask from the venv: its folders must be enterable.
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def dist(work: Path) -> tuple[Path, Path]:
    out = work / "dist"
    # Isolated build: the build requirements in pyproject.toml alone must suffice.
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=work, timeout=600)
    wheels, sdists = sorted(out.glob("kproxy-*.whl")), sorted(out.glob("kproxy-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def node_venv(work: Path, dist: tuple[Path, Path]) -> Path:
    """A fresh virtualenv with the wheel alone (a node's install); the cluster test adds its extras
    to the same venv afterwards (one venv: its creation and the base dependencies cost once)."""
    bindir = work / "venv" / "bin"
    # The interpreter the checkout's venv was made from, not that venv.
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(work / "venv")], cwd=work, timeout=120)
    run([str(bindir / "pip"), "install", "-q", str(dist[0])], cwd=work, timeout=600)
    return bindir


def test_wheel_carries_the_programs_data_extensions_and_license(dist: tuple[Path, Path]) -> None:
    wheel, sdist = dist
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("controlplane_stub/seed/app.py", "controlplane_stub/seed/images.yaml",
              "controlplane_stub/seed/flask-kubernetes.yaml", "kdns/cli.py", "kproxy/cli.py"):
        assert f in names, f
    assert any(n.startswith("kproxy/_fastpath.") and n.endswith(".so") for n in names), "no compiled fastpath"
    assert not any(n.startswith(("examples/", "tests/", "dns/")) for n in names)
    license = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert license, "LICENSE missing from the wheel"
    assert "Apache License" in zipfile.ZipFile(wheel).read(license[0]).decode()
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = HeaderParser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    base = {r.split(";")[0].split(">")[0].split("=")[0].strip().lower()
            for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r}
    assert base and not base & NOT_ON_A_NODE, base
    assert {"dns", "controlplane", "demo", "test"} <= set(meta.get_all("Provides-Extra") or [])
    with tarfile.open(sdist) as t:
        members = t.getnames()
    assert any(m.endswith("/LICENSE") for m in members) and any(m.endswith("_fastpath.pxd") for m in members)


def test_a_node_install_has_kproxy_only(work: Path, node_venv: Path) -> None:
    bindir = node_venv
    installed = {
        line.split("==")[0].lower()
        for line in run([str(bindir / "pip"), "freeze"], cwd=work, timeout=60).split()
    }
    assert not installed & NOT_ON_A_NODE, installed & NOT_ON_A_NODE
    assert "--proxy-mode" in run([str(bindir / "kproxy"), "--help"], cwd=work, timeout=60)
    # Every mode's code and the daemon itself import with the node's dependencies alone.
    modes = "import kproxy.server, kproxy.proxiers.iptables, kproxy.proxiers.ipvs, kproxy.proxiers.nftables, " \
            "kproxy.proxiers.userspace; print('imported')"
    assert run([str(bindir / "python"), "-c", modes], cwd=work, timeout=60).strip() == "imported"
    # The compiled hot path, not the pure-Python twin, is what the installed kproxy imports.
    so = run([str(bindir / "python"), "-c", "import kproxy._fastpath as f; print(f.__file__)"], cwd=work, timeout=60)
    assert so.strip().endswith(".so") and str(work) in so


def test_seed_app_from_the_installed_package(work: Path, dist: tuple[Path, Path], node_venv: Path) -> None:
    bindir = node_venv
    run([str(bindir / "pip"), "install", "-q", f"{dist[0]}[{CLUSTER_EXTRAS}]"], cwd=work, timeout=600)
    where = (
        "from controlplane_stub import seed; from controlplane_stub.agent.catalog import DEFAULT_CATALOG;"
        "print(seed.path('flask-kubernetes.yaml')); print(DEFAULT_CATALOG)"
    )
    seed = run([str(bindir / "python"), "-c", where], cwd=work, timeout=60).split()
    assert all(Path(p).resolve().is_relative_to(work / "venv") for p in seed), seed
    manifest = seed[0]
    name = "kpk" + secrets.token_hex(3)
    home = work / "home"
    env = clean_env(KPROXY_CLUSTER_HOME=str(home))
    kubeconfig = str(home / name / "kubeconfig")
    kenv = clean_env(KPROXY_CLUSTER_HOME=str(home), KUBECONFIG=kubeconfig)
    cluster = str(bindir / "kproxy-cluster")
    try:
        run([cluster, "up", "--name", name, "--nodes", "2", "--no-localhost-lb", "--timeout", "150"],
            cwd=work, timeout=240, env=env)
        run(["kubectl", "apply", "-f", manifest], cwd=work, timeout=60, env=kenv)
        run(["kubectl", "rollout", "status", "deployment/flask-kubernetes", "--timeout=180s"],
            cwd=work, timeout=200, env=kenv)
        deadline, lb, body = time.monotonic() + 90, "", ""
        while time.monotonic() < deadline and "Hello from Kubernetes!" not in body:
            lb = lb or run(["kubectl", "get", "svc", "flask-kubernetes-service", "-o",
                            "jsonpath={.status.loadBalancer.ingress[0].ip}"], cwd=work, timeout=30, env=kenv)
            if lb:
                r = subprocess.run([cluster, "exec", "--name", name, "--", "curl", "-s", "-m", "3",
                                    f"http://{lb}:6000/"], cwd=work, env=env, capture_output=True,
                                   text=True, timeout=30, check=False)
                body = r.stdout
            if "Hello from Kubernetes!" not in body:
                time.sleep(1)
        assert body == "Hello from Kubernetes!\n", (lb, body)
    finally:
        down = subprocess.run([cluster, "down", "--name", name], cwd=work, env=env,
                              capture_output=True, text=True, timeout=180, check=False)
    assert down.returncode == 0, down.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert name not in left, left

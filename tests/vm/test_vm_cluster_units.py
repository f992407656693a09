"""Host-side, no VM: the unit files vagrant/provision.sh writes, read by tests/vm/cluster/units.py
(the stand-in for systemd in the VM cluster bed), and units.py's parsing itself."""
from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vm_cluster import Bed, BedError, VMCannotStart

HERE = Path(__file__).resolve().parent
PROVISION = HERE.parents[1] / "vagrant" / "provision.sh"


def _units() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vm_cluster_units", HERE / "cluster" / "units.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


units = _units()


def _provision_units(root: Path, role: str, index: int, mode: str) -> Path:
    ip = f"10.250.0.{10 + index}"
    r = subprocess.run(["bash", str(PROVISION), "--role", role, "--node-ip", ip, "--server-ip", "10.250.0.11",
                        "--repo", "/srv/kproxy", "--root", str(root), "--steps", "units", "--proxy-mode", mode,
                        "--cluster-dir", "/kproxy-cluster"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return root / "etc" / "systemd" / "system"


@pytest.mark.parametrize("mode", ["ipvs", "iptables"])
def test_provision_units_parse_and_wire_the_node(tmp_path: Path, mode: str) -> None:
    d = _provision_units(tmp_path, "server", 1, mode)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["kproxy-apiserver.service", "kproxy-controllers.service", "kproxy-dns.service",
                     "kproxy-node-agent.service", "kproxy.service"]
    parsed = {p.name: units.parse_unit(p) for p in d.iterdir()}
    kp = parsed["kproxy.service"]
    assert kp.start[:3] == ["/opt/kproxy/venv/bin/kproxy", "--proxy-mode", mode]
    flags = dict(zip(kp.start[3::2], kp.start[4::2], strict=False))
    assert flags["--hostname-override"] == "node-1" and flags["--nodeport-addresses"] == "10.250.0.11/32"
    assert flags["--kubeconfig"] == "/kproxy-cluster/kubeconfig"
    assert kp.stop_post == [["/opt/kproxy/venv/bin/kproxy", "--proxy-mode", mode, "--cleanup"]]
    agent = parsed["kproxy-node-agent.service"]
    assert agent.start[1:2] == ["_agent"] and agent.start[agent.start.index("--node-index") + 1] == "1"
    assert parsed["kproxy-apiserver.service"].post == [["/opt/kproxy/bin/kproxy-publish-kubeconfig"]]
    for name in ("kproxy-controllers.service", "kproxy-dns.service", "kproxy-node-agent.service"):
        assert parsed[name].pre == [["/opt/kproxy/bin/kproxy-wait-kubeconfig"]]
    for helper in ("kproxy-wait-kubeconfig", "kproxy-publish-kubeconfig"):
        f = tmp_path / "opt" / "kproxy" / "bin" / helper
        assert subprocess.run(["sh", "-n", str(f)], check=False).returncode == 0
    assert "server: https://10.250.0.11:6443" in (tmp_path / "opt/kproxy/bin/kproxy-publish-kubeconfig").read_text()


def test_provision_units_of_a_plain_node(tmp_path: Path) -> None:
    d = _provision_units(tmp_path, "node", 3, "ipvs")
    assert sorted(p.name for p in d.iterdir()) == ["kproxy-node-agent.service", "kproxy.service"]
    kp = units.parse_unit(d / "kproxy.service")
    assert "node-3" in kp.start and "10.250.0.13/32" in kp.start


def test_provision_refuses_a_bad_mode_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(PROVISION), "--proxy-mode", "userspace", "--node-ip", "10.250.0.11"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "provision.sh: --proxy-mode must be ipvs or iptables, got 'userspace'"]


def test_unit_parser_refuses_variable_expansion_and_missing_exec_start(tmp_path: Path) -> None:
    f = tmp_path / "x.service"
    f.write_text("[Service]\nExecStart=/bin/sh -c 'echo $HOME'\n")
    with pytest.raises(ValueError, match="variable expansion"):
        units.parse_unit(f)
    f.write_text("[Unit]\nExecStart=/bin/true\n[Service]\nRestart=always\n")
    with pytest.raises(ValueError, match="no ExecStart"):
        units.parse_unit(f)


words = st.lists(st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]),
                         min_size=1, max_size=12), min_size=1, max_size=6)


@given(words)
def test_unit_parser_round_trips_quoted_arguments(argv: list[str]) -> None:
    # Any argv written with shell quoting and systemd's "$$" for a dollar comes back as written.
    line = shlex.join(argv).replace("$", "$$")
    with tempfile.TemporaryDirectory(prefix="kptvc-unit-") as d:
        path = Path(d) / "x.service"
        path.write_text(f"[Service]\nExecStart={line}\nExecStartPre={line}\n")
        u = units.parse_unit(path)
    assert u.start == argv and u.pre == [argv]


@pytest.mark.parametrize("code,says,cannot_start", [(125, "[vm] VM cannot start: no UML kernel", True),
                                                    (125, "[vm] something else", False),
                                                    (1, "[vm] VM cannot start: no UML kernel", False)])
def test_bed_tells_a_vm_that_cannot_start_from_one_that_stopped(code: int, says: str, cannot_start: bool) -> None:
    """Only the runner's exit 125 with its "VM cannot start" line is VMCannotStart (the bed's tests
    skip on it, as the single-VM tests do); any other stop of a VM is a BedError with the logs."""
    bed = Bed(mode="ipvs", nodes=1, vm_timeout=10)
    try:
        (bed.dir / "vm-1.out").write_text(f"console noise\n{says}\n")
        bed.procs[1] = subprocess.Popen(["sh", "-c", f"exit {code}"])
        bed.procs[1].wait(10)
        with pytest.raises(BedError) as err:
            bed.check_vms()
        assert isinstance(err.value, VMCannotStart) == cannot_start
        assert (str(err.value) == says) if cannot_start else ("VM node-1 stopped" in str(err.value))
    finally:
        shutil.rmtree(bed.dir, ignore_errors=True)

"""tests/vm/run itself: exit status, clean separated output, timeout, no leftover processes."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _live_uml_processes(umid: str) -> set[int]:
    """The live processes of the VM with this umid (other test runs may have VMs of their own)."""
    mark = f" umid={umid} ".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if mark in cmdline and state != "Z":
            pids.add(int(entry.name))
    return pids


@pytest.mark.vm
@pytest.mark.timeout(90)
def test_ipvs_runner_status_output_and_kernel(vm: Callable[..., Any], tmp_path: Path) -> None:
    # One boot checks: exit status passes through, stdout and stderr stay apart and free of
    # console noise, cwd is the caller's, the kernel has what the IPVS suite needs (autoloaded
    # modules, dummy links), host writes vanish but --share persists.
    script = (
        "echo out-line; echo err-line >&2; pwd; "
        "ipvsadm -A -t 10.9.9.9:80 -s rr && ipvsadm -Ln | grep -c 10.9.9.9:80; "
        "ip link add kpt-d0 type dummy && echo dummy-ok; "
        "echo vanish > /etc/kptvm-should-vanish; echo kept > "
        f"{tmp_path}/shared.txt; exit 7"
    )
    res = vm(["bash", "-c", script], timeout=60, extra=["--share", str(tmp_path)])
    assert res.returncode == 7, res.stderr
    assert res.stdout.splitlines() == ["out-line", str(Path(__file__).resolve().parents[2]), "1", "dummy-ok"]
    assert res.stderr.splitlines()[0] == "err-line"
    assert "Linux version" not in res.stdout + res.stderr
    assert not os.path.exists("/etc/kptvm-should-vanish")
    assert (tmp_path / "shared.txt").read_text() == "kept\n"


@pytest.mark.vm
@pytest.mark.timeout(90)
def test_ipvs_runner_timeout_kills_the_vm(vm: Callable[..., Any], tmp_path: Path) -> None:
    umid_file = tmp_path / "umid"
    # 15 s: the VM boots in ~2 s, but two CI runs at once made a 6 s budget run out before the
    # boot, and the runner reports that as "cannot start" (a skip, not this test's check).
    res = vm(["bash", "-c", "echo started; sleep 300"], timeout=15, extra=["--umid-file", str(umid_file)])
    assert res.returncode == 124
    assert res.stdout == "started\n"
    assert "timed out after 15s" in res.stderr
    # None of the VM's processes (found by the runner's umid) may outlive it; zombies aside.
    umid = umid_file.read_text().strip()
    assert umid.startswith("kptvm-")
    assert _live_uml_processes(umid) == set()


@pytest.mark.vm
@pytest.mark.timeout(90)
def test_ipvs_runner_works_from_a_checkout_under_tmp(vm: Callable[..., Any]) -> None:
    # A checkout cloned under the system's temporary directory: the VM mounts its own tmpfs on
    # /tmp, which used to hide the caller's directory ("cd: ...: No such file or directory").
    # The runner itself is copied there too, as it is in such a checkout.
    checkout = Path(tempfile.mkdtemp(prefix="kptvm-checkout-", dir="/tmp"))
    try:
        runner = checkout / "tests" / "vm" / "run"
        runner.parent.mkdir(parents=True)
        shutil.copy2(Path(__file__).resolve().parent / "run", runner)
        (checkout / "marker.txt").write_text("from-the-checkout\n")
        script = "pwd; cat marker.txt; echo tmp-write > /tmp/x && cat /tmp/x; touch in-vm-only.txt"
        res = vm(["bash", "-c", script],
                 timeout=60, runner=runner, cwd=checkout)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == [str(checkout), "from-the-checkout", "tmp-write"]
        # The checkout is seen through the VM's overlay: writes there stay in the VM.
        assert not (checkout / "in-vm-only.txt").exists()
    finally:
        shutil.rmtree(checkout, ignore_errors=True)

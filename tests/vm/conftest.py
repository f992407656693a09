"""Host side of the VM tests: the suite under inside/ needs IPVS and dummy links, which this
host kernel lacks, so the host's pytest never collects it; test_ipvs_vm.py runs it inside a
User-Mode Linux VM through ./run, where KPROXY_IN_VM=1 lets it be collected."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from vm_cluster import VM_CANNOT_START  # tests/vm is on sys.path (pytest puts a conftest's dir there)

collect_ignore = [] if os.environ.get("KPROXY_IN_VM") == "1" else ["inside"]

RUNNER = Path(__file__).resolve().parent / "run"
REPO = RUNNER.parents[2]


@dataclass
class VMResult:
    returncode: int
    stdout: str
    stderr: str


def run_in_vm(command: list[str], timeout: int, extra: list[str] | None = None,
              runner: Path = RUNNER, cwd: Path = REPO) -> VMResult:
    """Runs COMMAND in one VM boot. Skips the calling test only when the VM cannot start.

    The runner gets its own session so that a pytest timeout here kills the whole runner group;
    the runner itself kills the UML processes it started."""
    args = [str(runner), "--timeout", str(timeout), *(extra or []), "--", *command]
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode == VM_CANNOT_START and "VM cannot start" in err:
        pytest.skip(f"User-Mode Linux VM cannot start here: {err.strip().splitlines()[-1]}")
    return VMResult(proc.returncode, out, err)


@pytest.fixture
def vm() -> Callable[..., VMResult]:
    """run_in_vm, for tests: vm(["cmd", ...], timeout=60[, runner=..., cwd=...])."""
    return run_in_vm


@pytest.fixture
def venv_bin() -> Path:
    """This venv's bin/ (its python is the real interpreter, not a pyenv shim: process starts
    are slow in UML)."""
    return Path(sys.executable).parent

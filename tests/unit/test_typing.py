"""kproxy/, dns/ and controlplane_stub/ stay `mypy --strict` clean."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_mypy_strict() -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed in this environment (it is in the [test] extra)")
    proc = subprocess.run(
        [mypy, "--strict", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache"), "kproxy", "dns",
         "controlplane_stub"],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

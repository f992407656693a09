"""kproxy/ and dns/ stay `mypy --strict` clean (shared/DESIGN.md §4)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_mypy_strict_kproxy_and_dns() -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed in this environment (it is in the [test] extra)")
    proc = subprocess.run(
        [mypy, "--strict", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache"), "kproxy", "dns"],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""The IPVS suite (tests/vm/inside) in ONE User-Mode Linux boot: this host kernel has no IPVS
and no dummy links, the VM's kernel has both. The inner pytest output is printed here."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_ipvs_suite_in_vm(vm: Callable[..., Any], venv_bin: Path) -> None:
    res = vm([str(venv_bin / "pytest"), "tests/vm/inside", "-q", "-p", "no:cacheprovider",
              "-o", "addopts=", "-rfEs", "--durations=5"], timeout=560)
    print(res.stdout)
    print(res.stderr)
    assert res.returncode == 0, f"inner IPVS suite failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1]

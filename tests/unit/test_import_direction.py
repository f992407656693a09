"""The control plane and the node programs meet only on the wire (shared/DESIGN.md §1). The one
exception is the Kubernetes client library, kproxy.kube's client modules (issue 14: one client for
kproxy, kdns and the control plane): a library that speaks the wire, importing nothing else of
kproxy."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# folder -> import roots it must never use. kproxy: no aiohttp either (kproxy/httpserve.py serves its
# endpoints; importing aiohttp.web cost the node daemon ~12 MiB of RSS).
FORBIDDEN = {
    "controlplane_stub": {"kproxy", "kdns"},
    "kproxy": {"controlplane_stub", "aiohttp"},
    "dns": {"controlplane_stub"},
}
# The client library: what controlplane_stub may import of kproxy (not ingest/validate: those turn
# objects into kproxy's own model).
CLIENT_LIBRARY = {f"kproxy.kube.{m}" for m in ("client", "kubeconfig", "reflector", "informer", "types")}


_PYX_IMPORT = re.compile(r"^\s*(?:from|c?import)\s+([A-Za-z_]\w*)", re.M)


def _imported_modules(path: Path) -> set[str]:
    if path.suffix == ".pyx":
        # Cython syntax is not Python's; its import lines are, so a line match is exact enough.
        return set(_PYX_IMPORT.findall(path.read_text(encoding="utf-8")))
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def _imported_roots(path: Path, allowed: frozenset[str] | set[str] = frozenset()) -> set[str]:
    return {m.split(".")[0] for m in _imported_modules(path) - allowed}


def _sources(folder: str) -> list[Path]:
    return sorted(p for ext in ("*.py", "*.pyx") for p in (ROOT / folder).rglob(ext))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_forbidden_imports(folder: str) -> None:
    files = _sources(folder)
    assert files, f"{folder}/ has no sources to check"
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_roots(p, CLIENT_LIBRARY if folder == "controlplane_stub" else set())
                                         & FORBIDDEN[folder])
        for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_client_library_imports_nothing_else_of_kproxy() -> None:
    """What controlplane_stub may import stays a client library: no proxy, model or kernel code."""
    for module in sorted(CLIENT_LIBRARY):
        path = ROOT / (module.replace(".", "/") + ".py")
        others = {m for m in _imported_modules(path) if m.split(".")[0] == "kproxy"} - CLIENT_LIBRARY - {"kproxy"}
        assert others == set(), f"{module} imports {sorted(others)}"


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom kproxy.kube import ingest\nfrom kproxy.kube.client import ApiClient\n"
                   "import controlplane_stub.store as s\n")
    assert _imported_roots(bad) >= {"kproxy", "controlplane_stub"}
    # `from kproxy.kube import ingest` names the package, which is not the client library
    assert "kproxy" in _imported_roots(bad, CLIENT_LIBRARY)
    ok = tmp_path / "ok.py"
    ok.write_text("from kproxy.kube.client import ApiClient\nimport kproxy.kube.reflector\n")
    assert _imported_roots(ok, CLIENT_LIBRARY) == set()
    pyx = tmp_path / "bad.pyx"
    pyx.write_text("cpdef int f(int x):\n    return x\nfrom controlplane_stub.store import y\n")
    assert "controlplane_stub" in _imported_roots(pyx)


def test_no_top_level_dns_package_is_installed_by_us() -> None:
    # dnspython owns `dns`; ours must resolve to dnspython, not to this repo's dns/ folder.
    import dns.version

    assert Path(dns.__file__ or "").parent != ROOT / "dns"
    import kdns

    assert Path(kdns.__file__ or "").parent.name == "dns"

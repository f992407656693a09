"""Build hook for the Cython hot paths and the package list; metadata lives in pyproject.toml."""
from __future__ import annotations

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

# The cluster DNS lives in dns/ but is imported as `kdns`: a top-level `dns` would shadow dnspython.
_ROOTS = {"kproxy": "kproxy", "controlplane_stub": "controlplane_stub", "kdns": "dns"}


def _packages() -> list[str]:
    found: list[str] = []
    for package, folder in _ROOTS.items():
        found.append(package)
        found.extend(f"{package}.{sub}" for sub in find_packages(where=folder))
    return found


def _extensions() -> list[Extension]:
    exts: list[Extension] = []
    for package, folder in _ROOTS.items():
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.pyx"), recursive=True)):
            rel = os.path.relpath(path, folder)[: -len(".pyx")]
            exts.append(Extension(".".join([package, *rel.split(os.sep)]), [path], extra_compile_args=["-O2"]))
    # Hot paths kept as ONE Python source that Cython compiles in pure-Python mode (the loader
    # imports the same file uncompiled when KPROXY_PURE=1). The iptables renderer's source is
    # importable uncompiled as kproxy._purepath and compiled as kproxy._fastpath, typed by
    # kproxy/_fastpath.pxd (Cython finds the .pxd by the module's name).
    # The nfnetlink encoder kproxy.backends.nftnl and the nftables proxier's element bookkeeping
    # kproxy.proxiers.nftelements are compiled the same way (their pure twins:
    # kproxy.fastpath.pure_twin).
    for module, source in (("kproxy._nftpath", "kproxy._nftpath"), ("kproxy._fastpath", "kproxy._purepath"),
                           ("kproxy.backends.nftnl", "kproxy.backends.nftnl"),
                           ("kproxy.proxiers.nftelements", "kproxy.proxiers.nftelements")):
        path = os.path.join(*source.split(".")) + ".py"
        exts.append(Extension(module, [path], extra_compile_args=["-O2"]))
    return exts


setup(
    packages=_packages(),
    # controlplane_stub.seed: the seed app's manifests and the image catalog, read through
    # importlib.resources by an installed kproxy-cluster (examples/ links to them).
    package_data={"": ["*.pyi", "*.pyx", "*.pxd", "py.typed"], "controlplane_stub.seed": ["*.yaml"]},
    ext_modules=cythonize(
        _extensions(),
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)

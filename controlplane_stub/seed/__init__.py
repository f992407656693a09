"""The seed app and the local image catalog, shipped inside the package (package data).

`examples/` in the repository links to these files: one copy, found by an installed
`kproxy-cluster` through importlib.resources rather than by looking for a checkout.
"""

from __future__ import annotations

from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path

# as_file may extract a resource to a temporary file (a zipped install); the catalog's {dir} and
# the applied manifest must outlive one call, so the extractions live as long as the process.
_KEEP = ExitStack()


def path(name: str) -> Path:
    """The file system path of one of this package's files (images.yaml, app.py, a manifest)."""
    resource = files(__name__).joinpath(name)
    if isinstance(resource, Path):
        return resource
    return _KEEP.enter_context(as_file(resource))

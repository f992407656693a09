"""The local image catalog: image name -> the command a container of that image runs.

There is no container runtime on the one-machine cluster; a container is a process in its pod's
network namespace. The catalog plays the image's ENTRYPOINT/CMD: a container's `command` replaces
the image's command and its `args` replace the image's args, as in Kubernetes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane_stub import seed

# The catalog shipped in the package (examples/flask-kubernetes/images.yaml links to it).
DEFAULT_CATALOG = seed.path("images.yaml")


class ImageError(Exception):
    """The container cannot start: reason is a kubelet waiting reason (ErrImageNeverPull...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Image:
    command: list[str]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""


class Catalog:
    def __init__(self, images: dict[str, Image]) -> None:
        self.images = images

    @staticmethod
    def load(file: str | Path | None = None) -> Catalog:
        p = Path(file) if file else DEFAULT_CATALOG
        if not p.exists():
            if file:
                raise ValueError(f"--image-catalog {p}: no such file")
            return Catalog({})
        doc = yaml.safe_load(p.read_text()) or {}
        subst = {"python": sys.executable, "dir": str(p.resolve().parent)}
        images: dict[str, Image] = {}
        for name, spec in (doc.get("images") or {}).items():
            if not isinstance(spec, dict) or not isinstance(spec.get("command", []), list):
                raise ValueError(
                    f"--image-catalog {p}: images.{name}: expected a mapping with a command list"
                )

            def fill(v: Any) -> str:
                return str(v).format(**subst)

            images[str(name)] = Image(
                command=[fill(c) for c in spec.get("command") or []],
                args=[fill(a) for a in spec.get("args") or []],
                env={str(k): fill(v) for k, v in (spec.get("env") or {}).items()},
                working_dir=fill(spec.get("workingDir", "")),
            )
        return Catalog(images)

    def lookup(self, image: str) -> Image | None:
        if image in self.images:
            return self.images[image]
        if ":" not in image.rsplit("/", 1)[-1]:
            return self.images.get(image + ":latest")
        return None

    def resolve(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
        """The argv, the image's env and the working dir for a pod's container."""
        img = self.lookup(str(container.get("image", "")))
        command = list(container.get("command") or [])
        args = list(container.get("args") or [])
        if img is None:
            if not command:
                raise ImageError(
                    "ErrImageNeverPull",
                    f'image "{container.get("image")}" is not in the local image catalog and the container '
                    "has no command (add it to the catalog, see examples/flask-kubernetes/README.md)",
                )
            return command + args, {}, str(container.get("workingDir") or "")
        if command:
            argv = command + args
        else:
            argv = img.command + (args if "args" in container else img.args)
        return argv, dict(img.env), str(container.get("workingDir") or img.working_dir)

    def program_paths(self, container: dict[str, Any]) -> list[str]:
        """The absolute paths in the catalog image's command and args (and where their links
        lead) when the container runs them: paths the operator's catalog vouches for. None for a
        container's own `command`: a pod spec does not choose what the node shows it."""
        img = self.lookup(str(container.get("image", "")))
        if img is None or container.get("command"):
            return []
        words = img.command + ([] if "args" in container else img.args)
        paths = [w for w in words if os.path.isabs(w)]
        return list(dict.fromkeys(paths + [os.path.realpath(p) for p in paths]))

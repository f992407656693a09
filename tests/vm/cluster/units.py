"""Runs the systemd units vagrant/provision.sh wrote, without systemd (inside a User-Mode Linux VM
of the cluster bed, where there is no systemd): what `systemctl start` does with a unit's
ExecStartPre= (in order, each must succeed), ExecStart= (the service, in the background) and
ExecStartPost= lines, and what `systemctl stop` does (SIGTERM, then ExecStopPost=). Restart= is
not emulated: a service that exits stays down, and the bed reports it.

    python units.py --units-dir /etc/systemd/system --logs DIR --until FILE UNIT...

Each service's output goes to DIR/UNIT.log. The services run until FILE exists (the host's signal
to stop) or this process gets SIGTERM; then every unit is stopped in reverse order.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Unit:
    name: str
    pre: list[list[str]] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    post: list[list[str]] = field(default_factory=list)
    stop_post: list[list[str]] = field(default_factory=list)


def parse_unit(path: Path) -> Unit:
    """The [Service] Exec lines of a unit file. systemd's own quoting is shell-like; "$$" is its
    literal dollar (provision.sh writes no other "$" into Exec lines: its helpers are scripts)."""
    unit = Unit(path.name.removesuffix(".service"))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if "$" in value.replace("$$", ""):
            raise ValueError(f"{path}: {key}= uses systemd variable expansion, which this runner does not do")
        argv = shlex.split(value.replace("$$", "$"))
        if key == "ExecStartPre":
            unit.pre.append(argv)
        elif key == "ExecStart":
            unit.start = argv
        elif key == "ExecStartPost":
            unit.post.append(argv)
        elif key == "ExecStopPost":
            unit.stop_post.append(argv)
    if not unit.start:
        raise ValueError(f"{path}: no ExecStart=")
    return unit


def run_step(argv: list[str], log: Path, timeout: float) -> None:
    with log.open("ab") as out:
        out.write(f"--- {shlex.join(argv)}\n".encode())
        out.flush()
        subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                       timeout=timeout, check=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units-dir", default="/etc/systemd/system")
    ap.add_argument("--logs", required=True)
    ap.add_argument("--until", required=True)
    ap.add_argument("--limit", type=float, default=1800, help="stop after this many seconds anyway")
    ap.add_argument("units", nargs="+")
    args = ap.parse_args()
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    units = [parse_unit(Path(args.units_dir) / f"{u}.service") for u in args.units]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        for u in units:
            log = logs / f"{u.name}.log"
            for argv in u.pre:
                run_step(argv, log, 150)
            with log.open("ab") as out:
                out.write(f"--- {shlex.join(u.start)}\n".encode())
                out.flush()
                procs[u.name] = subprocess.Popen(u.start, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)
            for argv in u.post:
                run_step(argv, log, 150)
            print(f"started {u.name}", flush=True)
        deadline = time.monotonic() + args.limit
        reported: set[str] = set()
        while not stopping and not os.path.exists(args.until) and time.monotonic() < deadline:
            for name, p in procs.items():
                if p.poll() is not None and name not in reported:
                    reported.add(name)
                    print(f"{name} exited with {p.returncode}", file=sys.stderr, flush=True)
            time.sleep(0.5)
    finally:
        for u in reversed(units):
            p = procs.get(u.name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for argv in u.stop_post:
                try:
                    run_step(argv, logs / f"{u.name}.log", 60)
                except (subprocess.SubprocessError, OSError) as e:
                    print(f"{u.name}: ExecStopPost failed: {e}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

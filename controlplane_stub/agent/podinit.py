"""The first program of every container (and exec probe): sets up what a runtime would, then execs.

Run as root by the node agent inside the pod's network namespace and a new UTS and mount namespace
(`ip netns exec POD unshare --uts --mount --propagation private -- python -I -m
controlplane_stub.agent.podinit ... -- ARGV`; -I: the pod's PYTHON* variables do not reach this
root process). In order:

1. the hostname (the pod's name);
2. each --hide directory (the cluster's state: tokens, keys, kubeconfigs) covered by an empty
   read-only tmpfs, in this mount namespace only;
3. each --expose DIR NAME: DIR covered by a tmpfs that shows only DIR/NAME (moved there with
   open_tree/move_mount), so that a catalog image's program below a directory the user cannot enter
   (/root) runs without opening the rest of DIR;
4. supplementary groups, gid, uid (all three ids, so nothing is left to regain root), no_new_privs
   if asked; the process keeps no capability once its uid is not 0;
5. umask 022, the working directory, no descriptor above 2, then exec ARGV with the environment it
   was given (the pod's, built by the agent; nothing of the agent's).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
# Syscall numbers from 424 on are the same on every architecture Linux supports here.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
PR_SET_NO_NEW_PRIVS = 38

libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def mount_tmpfs(target: str, mode: str, flags: int) -> None:
    _check(
        libc.mount(b"kpc-pod", target.encode(), b"tmpfs", flags, f"mode={mode},size=64k".encode()),
        f"mount tmpfs on {target}",
    )


def expose(parent: str, names: list[str]) -> None:
    """parent shows only parent/NAME for each name (the same trees, bind-mounted)."""
    if parent == "/":
        raise OSError(f"refusing to cover / (expose {names})")
    trees = []
    for name in names:
        src = os.path.join(parent, name)
        fd = _check(
            libc.syscall(
                SYS_OPEN_TREE,
                AT_FDCWD,
                src.encode(),
                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE,
            ),
            f"open_tree {src}",
        )
        trees.append((name, fd, os.path.isdir(src)))
    mount_tmpfs(parent, "0755", MS_NOSUID | MS_NODEV)
    for name, fd, is_dir in trees:
        dst = os.path.join(parent, name)
        if is_dir:
            os.mkdir(dst, 0o755)
        else:
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644))
        _check(
            libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, dst.encode(), MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount {dst}",
        )
        os.close(fd)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="podinit")
    p.add_argument("--hostname", default="")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--groups", default="", help="comma-separated supplementary gids")
    p.add_argument("--no-new-privs", action="store_true")
    p.add_argument("--hide", action="append", default=[])
    p.add_argument("--expose", nargs=2, action="append", default=[], metavar=("DIR", "NAME"))
    p.add_argument("--workdir", default="")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        print("podinit: no command", file=sys.stderr)
        return 127
    try:
        if a.hostname:
            socket.sethostname(a.hostname)
        for d in a.hide:
            if os.path.isdir(d):
                mount_tmpfs(d, "0555", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        by_parent: dict[str, list[str]] = {}
        for parent, name in a.expose:
            by_parent.setdefault(parent, []).append(name)
        for parent, names in by_parent.items():
            expose(parent, names)
        groups = [int(g) for g in a.groups.split(",") if g]
        os.setgroups(groups)
        os.setresgid(a.gid, a.gid, a.gid)
        os.setresuid(a.uid, a.uid, a.uid)
        if a.no_new_privs:
            _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
        os.umask(0o022)
        os.chdir(a.workdir or "/")
    except OSError as e:
        print(f"podinit: {e}", file=sys.stderr, flush=True)
        return 128
    os.closerange(3, 65536)
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        # A runtime reports a missing program as 127 and one it may not run as 126.
        print(f"podinit: exec {cmd[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return 127 if isinstance(e, FileNotFoundError) else 126
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The first program of every container (and exec probe): sets up what a runtime would, then execs.

Run as root by the node agent inside the pod's network namespace and a new UTS and mount namespace
(`ip netns exec POD unshare --uts --mount --propagation private -- python -I -S .../podinit.py ...
-- ARGV`; -I: the pod's PYTHON* variables do not reach this root process; -S and a stdlib-only
module: no site-packages scan, so a container start costs one small Python start-up). In order:

1. the hostname (the pod's name);
2. each --expose DIR NAME: DIR covered by a tmpfs that shows only DIR/NAME (moved there with
   open_tree/move_mount), so that a catalog image's program below a directory the user cannot enter
   (/root) runs without opening the rest of DIR;
3. each --hide directory (the cluster's state: tokens, keys, kubeconfigs) covered by an empty
   read-only tmpfs, in this mount namespace only;
4. supplementary groups, gid, uid (all three ids, so nothing is left to regain root), no_new_privs
   if asked; the process keeps no capability once its uid is not 0;
5. umask 022, the working directory, no descriptor above 2, then exec ARGV with the environment it
   was given (the pod's, built by the agent; nothing of the agent's).
"""

from __future__ import annotations

import ctypes
import os
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


class Args:
    """What the agent asked for (a plain class: dataclasses would import inspect)."""

    def __init__(self) -> None:
        self.uid = self.gid = -1
        self.hostname = self.workdir = ""
        self.groups: list[int] = []
        self.no_new_privs = False
        self.hide: list[str] = []
        self.expose: list[tuple[str, str]] = []
        self.command: list[str] = []


def parse(argv: list[str]) -> Args:
    """The flags the agent writes (no argparse: it would double this program's start-up time,
    which every container start and exec probe pays)."""
    a, i = Args(), 0
    while i < len(argv):
        f = argv[i]
        if f == "--":
            a.command = argv[i + 1 :]
            break
        if f == "--no-new-privs":
            a.no_new_privs, i = True, i + 1
            continue
        n = 3 if f == "--expose" else 2
        if i + n > len(argv):
            raise ValueError(f"{f}: missing value")
        v = argv[i + 1 : i + n]
        if f == "--uid":
            a.uid = int(v[0])
        elif f == "--gid":
            a.gid = int(v[0])
        elif f == "--groups":
            a.groups = [int(g) for g in v[0].split(",") if g]
        elif f == "--hostname":
            a.hostname = v[0]
        elif f == "--hide":
            a.hide.append(v[0])
        elif f == "--expose":
            a.expose.append((v[0], v[1]))
        elif f == "--workdir":
            a.workdir = v[0]
        else:
            raise ValueError(f"unknown flag {f}")
        i += n
    if a.uid < 0 or a.gid < 0 or not a.command:
        raise ValueError("--uid, --gid and a command after -- are required")
    return a


def main(argv: list[str]) -> int:
    try:
        a = parse(argv)
    except ValueError as e:
        print(f"podinit: {e}", file=sys.stderr, flush=True)
        return 127
    cmd = a.command
    try:
        if a.hostname:
            host = a.hostname.encode()
            _check(libc.sethostname(host, len(host)), "sethostname")
        by_parent: dict[str, list[str]] = {}
        for parent, name in a.expose:
            by_parent.setdefault(parent, []).append(name)
        for parent, names in by_parent.items():
            expose(parent, names)
        # Hidden after the exposures: a hidden directory below an exposed parent is already out of
        # sight (isdir is False), and one that covers an exposed folder wins, as it should.
        for d in a.hide:
            if os.path.isdir(d):
                mount_tmpfs(d, "0555", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.setgroups(a.groups)
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
    err = execvp(cmd)
    # A runtime reports a missing program as 127 and one it may not run as 126.
    print(f"podinit: exec {cmd[0]}: {err.strerror}", file=sys.stderr, flush=True)
    return 127 if isinstance(err, FileNotFoundError) else 126


def execvp(cmd: list[str]) -> OSError:
    """os.execvp's PATH search, without its lazy `import warnings`: by now this process runs as
    the container's user, who may not be able to read this Python's standard library."""
    dirs = [""] if "/" in cmd[0] else os.environ.get("PATH", "/usr/bin:/bin").split(":")
    denied: OSError | None = None
    for d in dirs:
        try:
            os.execv(os.path.join(d, cmd[0]) if d else cmd[0], cmd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as e:  # as glibc's execvp: go on, and report it if nothing runs
            denied = denied or e
        except OSError as e:  # found, but not a program
            return e
    return denied or FileNotFoundError(2, "No such file or directory")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

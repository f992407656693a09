"""Pure pieces of the hardened cluster: the crash-loop back-off, a container's identity and what
of the host it is shown, the record of what a cluster made, a damaged state file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.agent import podinit
from controlplane_stub.agent.backoff import CrashLoopBackoff
from controlplane_stub.agent.record import Record, proc_start
from controlplane_stub.agent.security import (
    MAX_ID,
    NOBODY,
    NOGROUP,
    Identity,
    SecurityContextError,
    exposures,
    identity,
)
from controlplane_stub.cluster.state import State

pytestmark = pytest.mark.timeout(60)


def test_backoff_is_the_kubelets_and_has_no_lifetime_cap() -> None:
    b = CrashLoopBackoff()
    # The first restart at once, then 10 s doubling to 5 min, and never a last restart.
    delays = [b.after_exit(1.0) for _ in range(40)]
    assert delays[:8] == [0.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert delays[8:] == [300.0] * 32
    # Ten minutes of running resets the sequence.
    assert b.after_exit(600.0) == 0.0 and b.after_exit(5.0) == 10.0
    with pytest.raises(ValueError):
        CrashLoopBackoff(initial=0)
    with pytest.raises(ValueError):
        CrashLoopBackoff(initial=5, cap=1)


@given(
    initial=st.floats(0.001, 100),
    factor=st.floats(1, 100),
    runs=st.lists(st.floats(0, 2000), max_size=80),
)
def test_backoff_delays_stay_between_zero_and_the_cap(
    initial: float, factor: float, runs: list[float]
) -> None:
    b = CrashLoopBackoff(initial=initial, cap=initial * factor, reset_after=600.0)
    prev = -1.0
    for ran in runs:
        d = b.after_exit(ran)
        assert 0.0 <= d <= b.cap
        if ran >= 600.0:
            assert d == 0.0
        elif prev >= 0:
            assert d >= prev or d == b.cap  # grows until the cap, between resets
        prev = d


def test_identity_defaults_to_nobody_and_honours_run_as_user_like_the_kubelet() -> None:
    assert identity({}, {"name": "c"}) == Identity(NOBODY, NOGROUP)
    assert identity({"securityContext": {"runAsUser": 0}}, {}) == Identity(0, 0)
    # The container's fields win over the pod's.
    pod = {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 2000, "supplementalGroups": [5], "fsGroup": 6}
    }
    assert identity(pod, {"securityContext": {"runAsUser": 1234}}) == Identity(1234, 2000, (5, 6))
    assert identity(pod, {"securityContext": {"runAsGroup": 3}}).gid == 3
    # A uid without a group: its primary group from the host's passwd (nogroup when unknown).
    assert identity({}, {"securityContext": {"runAsUser": NOBODY}}).gid == NOGROUP
    assert identity({}, {"securityContext": {"runAsUser": 4242424}}).gid == NOGROUP
    assert identity({}, {"securityContext": {"allowPrivilegeEscalation": False}}).no_new_privs
    with pytest.raises(SecurityContextError, match="runAsNonRoot"):
        identity({"securityContext": {"runAsNonRoot": True}}, {"securityContext": {"runAsUser": 0}})
    for bad in ("0", True, -1, MAX_ID + 1, 1.5):
        with pytest.raises(SecurityContextError):
            identity({}, {"securityContext": {"runAsUser": bad}})
    with pytest.raises(SecurityContextError):
        identity({"securityContext": {"supplementalGroups": ["x"]}}, {})
    with pytest.raises(SecurityContextError):
        identity({"securityContext": "root"}, {})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
ctx_keys = st.sampled_from(
    ["runAsUser", "runAsGroup", "runAsNonRoot", "supplementalGroups", "fsGroup", "allowPrivilegeEscalation"]
)


@settings(max_examples=300)
@given(
    pod=st.dictionaries(ctx_keys, json_values, max_size=6),
    ctr=st.dictionaries(ctx_keys, json_values, max_size=6),
)
def test_identity_from_any_input_is_valid_ids_or_a_clear_error(
    pod: dict[str, Any], ctr: dict[str, Any]
) -> None:
    try:
        who = identity({"securityContext": pod}, {"securityContext": ctr})
    except SecurityContextError as e:
        assert str(e)
        return
    for v in (who.uid, who.gid, *who.groups):
        assert type(v) is int and 0 <= v <= MAX_ID
    assert who.uid != 0 or not (ctr.get("runAsNonRoot", pod.get("runAsNonRoot")) is True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path lies below a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="kpc-expose-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_exposures_lift_only_the_first_closed_directory(open_dir: Path) -> None:
    tmp_path = open_dir
    closed = tmp_path / "home"
    (closed / "py" / "bin").mkdir(parents=True)
    (closed / "py" / "bin" / "python").write_text("")
    (closed / "secret").mkdir()
    (closed / "secret" / "inner").mkdir()
    (closed / "secret" / "inner" / "f").write_text("")
    os.chmod(closed, 0o700)
    os.chmod(closed / "secret", 0o700)
    nobody = Identity(NOBODY, NOGROUP)
    prog = str(closed / "py" / "bin" / "python")
    assert exposures([prog], nobody) == [(str(closed), "py")]
    assert exposures([prog], Identity(0, 0)) == []  # root enters anything
    assert exposures(["relative/path", str(tmp_path)], nobody) == []
    # A second closed directory on the way stays closed: only (home, secret) is lifted, and
    # secret itself (0700) still keeps nobody out of secret/inner/f.
    assert exposures([str(closed / "secret" / "inner" / "f")], nobody) == [(str(closed), "secret")]
    # The owner of a closed directory, or its group with g+x, may enter it.
    os.chown(closed, 4321, 0)
    assert exposures([prog], Identity(4321, 4321)) == []
    os.chmod(closed, 0o710)
    os.chown(closed, 0, 777)
    assert exposures([prog], Identity(NOBODY, NOGROUP, (777,))) == []


def test_record_lists_what_was_made_and_survives_torn_lines(tmp_path: Path) -> None:
    rec = Record(tmp_path / "owned.jsonl")
    rec.netns_intent("x-net")
    rec.process("me", os.getpid())
    with rec.path.open("a") as f:
        f.write('{"netns": "torn\n[1,2]\n{"pid": true, "start": 1}\n')
    assert (rec.path.stat().st_mode & 0o777) == 0o600
    o = rec.load()
    assert o.netns == {"x-net": None}
    assert o.live_pids() == {os.getpid(): "me"}
    # A recycled pid (same number, another start time) is not ours.
    o.pids[os.getpid()] = (proc_start(os.getpid()) + 1, "me")  # type: ignore[operator]
    assert o.live_pids() == {}
    assert o.owns_netns("x-net") and not o.owns_netns("other")
    # Recorded with an inode: a namespace of the same name with another inode is not ours.
    o.netns["x-net"] = 1
    assert not o.owns_netns("x-net")
    rec.forget()
    assert rec.load().netns == {}


def test_a_damaged_state_file_still_loads(tmp_path: Path) -> None:
    base = {
        "name": "a",
        "prefix": "a-",
        "data_dir": str(tmp_path),
        "nodes": 1,
        "proxy_mode": "none",
        "lb_pool": "x",
    }
    (tmp_path / "state.json").write_text(
        json.dumps({**base, "pids": "oops", "supervisor_pid": True, "junk": 1})
    )
    s = State.load(tmp_path)
    assert s is not None and s.pids == {} and s.supervisor_pid == 0
    (tmp_path / "state.json").write_text("[1]")
    assert State.load(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    assert State.load(tmp_path) is None
    s = State(**base)
    s.save()
    assert (s.path.stat().st_mode & 0o777) == 0o600


def test_podinit_flags() -> None:
    a = podinit.parse(
        ["--uid", "1", "--gid", "2", "--groups", "3,4", "--no-new-privs", "--hide", "/d"]
        + ["--expose", "/root", ".pyenv", "--workdir", "/w", "--", "sh", "-c", "--uid"]
    )
    assert (a.uid, a.gid, a.groups, a.no_new_privs, a.hide, a.expose, a.workdir) == (
        1,
        2,
        [3, 4],
        True,
        ["/d"],
        [("/root", ".pyenv")],
        "/w",
    )
    assert a.command == ["sh", "-c", "--uid"]
    for bad in (["--uid", "1", "--", "x"], ["--uid", "1", "--gid", "2"], ["--uid"], ["--bogus", "1"]):
        with pytest.raises(ValueError):
            podinit.parse(bad)
    assert podinit.main(["--uid", "x"]) == 127

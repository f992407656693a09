"""Container logs as the kubelet keeps them: one file per container instance, rotated by size.

Each line of a log file is `RFC3339NANO STREAM TEXT` (STREAM is stdout or stderr), as CRI's log
format without the partial flag: a line longer than MAX_LINE is cut into several. The current
instance writes NAME.log (and NAME.log.1 once NAME.log passed max_bytes); when the container starts
again those become NAME.previous.log(.1), which `kubectl logs --previous` reads.

LogQuery is the parsed, validated form of the pods/log options (the same names as PodLogOptions);
it is built from a query string here and in the API server, so a bad value is refused before any
file is opened.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

MAX_LINE = 16 * 1024
DEFAULT_MAX_BYTES = 4 * 1024 * 1024
FOLLOW_POLL = 0.2


class LogQueryError(ValueError):
    """A pods/log option that is not valid (the API server answers 400 with it)."""


def _int(q: Mapping[str, str], key: str, minimum: int) -> int | None:
    v = q.get(key)
    if v is None or v == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise LogQueryError(f"{key}: invalid value {v!r}: must be an integer") from None
    if n < minimum:
        raise LogQueryError(f"{key}: invalid value {n}: must be greater than or equal to {minimum}")
    return n


def _bool(q: Mapping[str, str], key: str) -> bool:
    v = q.get(key, "false").lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0", ""):
        return False
    raise LogQueryError(f"{key}: invalid value {v!r}: must be true or false")


@dataclass(frozen=True)
class LogQuery:
    container: str = ""
    follow: bool = False
    previous: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    since_seconds: int | None = None
    limit_bytes: int | None = None

    @classmethod
    def parse(cls, q: Mapping[str, str]) -> LogQuery:
        if q.get("sinceTime"):
            raise LogQueryError("sinceTime is not supported here; use sinceSeconds")
        lq = cls(
            container=q.get("container", ""),
            follow=_bool(q, "follow"),
            previous=_bool(q, "previous"),
            timestamps=_bool(q, "timestamps"),
            tail_lines=_int(q, "tailLines", 0),
            since_seconds=_int(q, "sinceSeconds", 1),
            limit_bytes=_int(q, "limitBytes", 1),
        )
        if lq.follow and lq.previous:
            # The kubelet has no instance to follow once it reads the previous one.
            return cls(lq.container, False, True, lq.timestamps, lq.tail_lines, lq.since_seconds, lq.limit_bytes)
        return lq

    def to_query(self) -> dict[str, str]:
        out = {"follow": str(self.follow).lower(), "previous": str(self.previous).lower(),
               "timestamps": str(self.timestamps).lower()}
        for k, v in (("tailLines", self.tail_lines), ("sinceSeconds", self.since_seconds),
                     ("limitBytes", self.limit_bytes)):
            if v is not None:
                out[k] = str(v)
        return out


def rfc3339nano(t: float) -> bytes:
    whole = int(t)
    return (datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode()
            + b".%09dZ" % int((t - whole) * 1e9))


def _parse_ts(ts: bytes) -> float:
    try:
        head, _, frac = ts.rstrip(b"Z").partition(b".")
        base = datetime.strptime(head.decode(), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        return base + (int(frac) / 10 ** len(frac) if frac else 0.0)
    except ValueError:
        return 0.0


class ContainerLog:
    """The log files of one container (all its instances) in a pod's log directory."""

    def __init__(self, directory: Path, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.dir = directory
        self.name = name
        self.max_bytes = max_bytes
        self.current = directory / f"{name}.log"
        self.previous = directory / f"{name}.previous.log"
        self.instance = 0  # grows at each start; a follower of an earlier instance then stops

    def files(self, previous: bool) -> list[Path]:
        base = self.previous if previous else self.current
        return [p for p in (base.with_name(base.name + ".1"), base) if p.exists()]

    def new_instance(self) -> None:
        """A container (re)start: this instance's files become the previous one's."""
        # The earlier previous instance goes entirely, also its rotated part when this one has none.
        self.previous.with_name(self.previous.name + ".1").unlink(missing_ok=True)
        self.previous.unlink(missing_ok=True)
        for p in self.files(False):
            p.replace(self.previous.with_name(p.name.replace(".log", ".previous.log", 1)))
        self.instance += 1

    async def pump(self, stream: asyncio.StreamReader, name: str) -> None:
        """Copies one of the process's pipes into the log, a timestamped line at a time."""
        tag = b" " + name.encode() + b" "
        out = self.current.open("ab")
        try:
            while True:
                try:
                    line = await stream.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    line = e.partial
                except asyncio.LimitOverrunError as e:
                    line = await stream.readexactly(min(e.consumed, MAX_LINE))
                if not line:
                    return
                for i in range(0, len(line), MAX_LINE):
                    chunk = line[i:i + MAX_LINE]
                    out.write(rfc3339nano(time.time()) + tag + chunk + (b"" if chunk.endswith(b"\n") else b"\n"))
                out.flush()
                if out.tell() > self.max_bytes:
                    out.close()
                    # Both pumps may rotate; the second finds a small file and keeps it.
                    if self.current.exists() and self.current.stat().st_size > self.max_bytes:
                        self.current.replace(self.current.with_name(self.current.name + ".1"))
                    out = self.current.open("ab")
        finally:
            out.close()


def _records(paths: list[Path]) -> Iterator[tuple[bytes, bytes]]:
    for p in paths:
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            continue
        for line in data.splitlines(keepends=True):
            yield _split(line)


def _split(line: bytes) -> tuple[bytes, bytes]:
    ts, _, rest = line.partition(b" ")
    _, _, text = rest.partition(b" ")
    return ts, text


def log_text(log: ContainerLog) -> bytes:
    """The current instance's text, as `kubectl logs` shows it."""
    return b"".join(text for _, text in _records(log.files(False)))


def render(ts: bytes, text: bytes, q: LogQuery) -> bytes:
    return ts + b" " + text if q.timestamps else text


async def read(log: ContainerLog, q: LogQuery, running: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The log as kubectl asks for it; with follow, new lines until the instance stops or restarts."""
    budget = q.limit_bytes
    cutoff = time.time() - q.since_seconds if q.since_seconds else 0.0

    def emit(ts: bytes, text: bytes) -> bytes | None:
        nonlocal budget
        if cutoff and _parse_ts(ts) < cutoff:
            return None
        b = render(ts, text, q)
        if budget is not None:
            b, budget = b[:budget], budget - len(b[:budget])
        return b

    paths = log.files(q.previous)
    instance = log.instance
    # The size at the start: a follower continues from exactly there.
    start_size = paths[-1].stat().st_size if paths and not q.previous else 0
    recs: Iterator[tuple[bytes, bytes]] | deque[tuple[bytes, bytes]] = _records(paths)
    if q.tail_lines is not None:
        recs = deque(recs, maxlen=q.tail_lines)
    for ts, text in recs:
        b = emit(ts, text)
        if b:
            yield b
        if budget == 0:
            return
    if not q.follow or q.previous:
        return
    pos, f = start_size, None
    pending = b""
    try:
        while budget != 0:
            if f is None:
                try:
                    f = log.current.open("rb")
                    f.seek(pos)
                except FileNotFoundError:
                    f = None
            chunk = f.read(256 * 1024) if f is not None else b""
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    b = emit(*_split(line + b"\n"))
                    if b:
                        yield b
                continue
            if log.instance != instance or not running():
                return
            if f is not None and (not log.current.exists()
                                  or os.fstat(f.fileno()).st_ino != log.current.stat().st_ino):
                f.close()  # rotated by size: go on with the new file from its start
                f, pos = None, 0
                continue
            await asyncio.sleep(FOLLOW_POLL)
    finally:
        if f is not None:
            f.close()

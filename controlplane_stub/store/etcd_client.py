"""An asyncio etcd v3 client on gRPC (grpc.aio with the etcdserverpb stubs that the aetcd package ships).

Chosen by measurement over etcd's gRPC-JSON gateway driven by aiohttp (bench/bench_etcd_client.py,
figures in bench/README.md): about 3x the writes per second with 32 writers and a quarter of the
tail latency. aetcd's own Client is not used: it speaks to one host, without TLS; only its
generated protobuf stubs are.

Endpoints: every --etcd-servers address goes into one channel with gRPC's pick_first policy, so a
member that dies is left for the next one by gRPC itself. Requests wait for a connected channel
(wait_for_ready) up to the timeout instead of failing while it reconnects. A request that was sent
and lost its answer raises EtcdUnavailable and is not retried when it writes: a write must not be
applied twice; reads are retried.

Everything read from etcd is turned into the typed values below before the store uses it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from aetcd import rpc


class EtcdError(Exception):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No member answered in time, or the connection broke mid-request."""


class EtcdCompacted(EtcdError):
    """A read or watch at a revision etcd has compacted away."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def prefix_end(prefix: bytes) -> bytes:
    """etcd's GetPrefixRangeEnd: the first key after every key starting with prefix."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


@dataclass(slots=True)
class KV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@dataclass(slots=True)
class RangeResult:
    revision: int
    kvs: list[KV]
    more: bool
    count: int


@dataclass(slots=True)
class TxnResult:
    revision: int
    succeeded: bool
    # One entry per op of the branch that ran: ("range", [KV...]) | ("put", [prev KV]) | ("delete", [prev KVs]).
    responses: list[tuple[str, list[KV]]]


@dataclass(slots=True)
class WatchEvent:
    type: str  # PUT | DELETE
    kv: KV


@dataclass(slots=True)
class WatchResponse:
    revision: int
    events: list[WatchEvent] = field(default_factory=list)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""


# -- transaction parts -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Cmp:
    """target(key) result value: target MOD | CREATE | VERSION, result EQUAL | GREATER | LESS | NOT_EQUAL."""

    key: bytes
    target: str
    value: int
    result: str = "EQUAL"


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    prev_kv: bool = False


Op = Put | Get | Delete


def cmp_mod(key: bytes, revision: int, result: str = "EQUAL") -> Cmp:
    """mod_revision(key) RESULT revision (a missing key has 0)."""
    return Cmp(key, "MOD", revision, result)


def cmp_create(key: bytes, revision: int, result: str = "EQUAL") -> Cmp:
    return Cmp(key, "CREATE", revision, result)


def cmp_version(key: bytes, version: int, result: str = "EQUAL") -> Cmp:
    return Cmp(key, "VERSION", version, result)


_TARGET = {"VERSION": 0, "CREATE": 1, "MOD": 2}
_RESULT = {"EQUAL": 0, "GREATER": 1, "LESS": 2, "NOT_EQUAL": 3}
_FIELD = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}


def _compare(c: Cmp) -> Any:
    return rpc.Compare(key=c.key, target=_TARGET[c.target], result=_RESULT[c.result], **{_FIELD[c.target]: c.value})


def _request_op(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key, value=op.value, lease=op.lease))
    if isinstance(op, Get):
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=op.key))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key, prev_kv=op.prev_kv))


def _kv(m: Any) -> KV:
    return KV(bytes(m.key), bytes(m.value), int(m.create_revision), int(m.mod_revision), int(m.version), int(m.lease))


def _target(endpoints: list[str]) -> tuple[str, str, bool]:
    """One gRPC target for all endpoint URLs: (target, TLS host name, tls)."""
    addrs: list[str] = []
    hostname = ""
    tls = False
    for url in endpoints:
        u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"etcd server {url!r}: want http(s)://HOST:PORT")
        tls = tls or u.scheme == "https"
        port = u.port or 2379
        try:
            ips = [str(ipaddress.ip_address(u.hostname))]
        except ValueError:
            hostname = hostname or u.hostname
            # gRPC takes one DNS name per target; names are resolved here so all members fit in one.
            ips = sorted({str(a[4][0]) for a in socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)})
        for ip in ips:
            addrs.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    return "ipv4:" + ",".join(addrs) if all(not a.startswith("[") for a in addrs) else "ipv6:" + ",".join(addrs), \
        hostname, tls


def _error(e: grpc.aio.AioRpcError, what: str) -> EtcdError:
    detail = e.details() or ""
    if "compacted" in detail:
        return EtcdCompacted(f"etcd {what}: {detail}")
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return EtcdUnavailable(f"etcd {what}: {e.code().name}: {detail}")
    return EtcdError(f"etcd {what}: {e.code().name}: {detail}")


class EtcdClient:
    def __init__(self, endpoints: list[str], *, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 timeout: float = 10.0) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint URL is needed")
        self.endpoints = endpoints
        target, hostname, tls = _target(endpoints)
        options: list[tuple[str, Any]] = [
            ("grpc.lb_policy_name", "pick_first"),
            # A member that hangs (not only one that dies) is noticed within ~10 s.
            ("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls or ca_file or cert_file:
            def read(path: str) -> bytes | None:
                if not path:
                    return None
                with open(path, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
            if hostname:
                options.append(("grpc.ssl_target_name_override", hostname))
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self.timeout = timeout
        self._kv = rpc.KVStub(self._channel)
        self._lease = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, what: str, method: Any, request: Any, *, retry: bool) -> Any:
        attempts = 3 if retry else 1
        for attempt in range(attempts):
            try:
                return await method(request, timeout=self.timeout, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                err = _error(e, what)
                if not isinstance(err, EtcdUnavailable) or attempt == attempts - 1:
                    raise err from None
                await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    async def range(self, key: bytes, range_end: bytes = b"", *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False, count_only: bool = False) -> RangeResult:
        r = await self._call("range", self._kv.Range, rpc.RangeRequest(
            key=key, range_end=range_end, limit=limit, revision=revision, keys_only=keys_only,
            count_only=count_only), retry=True)
        return RangeResult(int(r.header.revision), [_kv(k) for k in r.kvs], bool(r.more), int(r.count))

    async def txn(self, compare: list[Cmp], success: list[Op], failure: list[Op] | None = None) -> TxnResult:
        r = await self._call("txn", self._kv.Txn, rpc.TxnRequest(
            compare=[_compare(c) for c in compare], success=[_request_op(o) for o in success],
            failure=[_request_op(o) for o in failure or []]), retry=False)
        responses: list[tuple[str, list[KV]]] = []
        for op in r.responses:
            which = op.WhichOneof("response")
            if which == "response_range":
                responses.append(("range", [_kv(k) for k in op.response_range.kvs]))
            elif which == "response_put":
                has = op.response_put.HasField("prev_kv")
                responses.append(("put", [_kv(op.response_put.prev_kv)] if has else []))
            elif which == "response_delete_range":
                responses.append(("delete", [_kv(k) for k in op.response_delete_range.prev_kvs]))
            else:
                responses.append(("other", []))
        return TxnResult(int(r.header.revision), bool(r.succeeded), responses)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        r = await self._call("put", self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease), retry=False)
        return int(r.header.revision)

    async def delete(self, key: bytes, range_end: bytes = b"") -> int:
        r = await self._call("delete", self._kv.DeleteRange, rpc.DeleteRangeRequest(key=key, range_end=range_end),
                             retry=False)
        return int(r.header.revision)

    async def compact(self, revision: int) -> None:
        await self._call("compact", self._kv.Compact, rpc.CompactionRequest(revision=revision), retry=False)

    async def lease_grant(self, ttl: int) -> int:
        r = await self._call("lease grant", self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl), retry=True)
        if r.error:
            raise EtcdError(f"etcd lease grant: {r.error}")
        return int(r.ID)

    async def lease_keepalive(self, lease_id: int) -> int:
        """One keep-alive; returns the remaining TTL (0 or less: the lease has expired)."""
        async def one() -> int:
            call = self._lease.LeaseKeepAlive(timeout=self.timeout, wait_for_ready=True)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                await call.done_writing()
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable("etcd lease keepalive: stream ended")
                return int(resp.TTL)
            finally:
                call.cancel()
        try:
            return await one()
        except grpc.aio.AioRpcError as e:
            raise _error(e, "lease keepalive") from None

    async def lease_revoke(self, lease_id: int) -> None:
        await self._call("lease revoke", self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease_id), retry=False)

    def watch(self, key: bytes, range_end: bytes, start_revision: int, *, progress_notify: bool = True,
              prev_kv: bool = False) -> Watch:
        return Watch(self, rpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision,
                                                  progress_notify=progress_notify, prev_kv=prev_kv))


class Watch:
    """One etcd watch stream: iterate for responses; request_progress() asks etcd for a header with
    its current revision once every event up to it has been sent (etcd >= 3.4)."""

    def __init__(self, client: EtcdClient, create: Any) -> None:
        self._client = client
        self._create = create
        self._call: Any = None
        self._writes: set[asyncio.Task[None]] = set()

    def request_progress(self) -> None:
        if self._call is None or self._call.done():
            return
        # The stream's send side stays open while the watch lives: progress requests go on it.
        task = asyncio.ensure_future(self._write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, request: Any) -> None:
        try:
            await self._call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
            pass  # the stream ended: the reader sees why

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def __aiter__(self) -> AsyncIterator[WatchResponse]:
        self._call = self._client._watch.Watch(wait_for_ready=True)
        try:
            await self._call.write(rpc.WatchRequest(create_request=self._create))
            while True:
                r = await self._call.read()
                if r is grpc.aio.EOF:
                    break
                out = WatchResponse(int(r.header.revision),
                                    [WatchEvent("DELETE" if e.type == 1 else "PUT", _kv(e.kv)) for e in r.events],
                                    bool(r.created), bool(r.canceled), int(r.compact_revision), str(r.cancel_reason))
                if out.compact_revision and out.canceled:
                    raise EtcdCompacted(f"etcd watch: revision compacted (oldest {out.compact_revision})",
                                        out.compact_revision)
                if out.canceled:
                    raise EtcdError(f"etcd watch canceled: {out.cancel_reason}")
                yield out
        except grpc.aio.AioRpcError as e:
            raise _error(e, "watch") from None
        finally:
            self._call.cancel()
        raise EtcdUnavailable("etcd watch: stream ended")

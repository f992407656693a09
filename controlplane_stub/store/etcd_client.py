"""An asyncio etcd v3 client: gRPC over HTTP/2 on the event loop (grpc_h2.py) with the etcdserverpb
protobuf messages that the aetcd package ships.

Chosen by measurement (bench/bench_etcd_client.py, figures in bench/README.md): gRPC over etcd's
gRPC-JSON gateway (about 3x the writes per second, a quarter of the tail latency), and our own
HTTP/2 transport over grpc.aio (its calls complete on gRPC's threads and hop to the event loop;
bench/etcd_grpcaio.py keeps that client as the peer). aetcd's own Client is not used: it speaks to
one host, without TLS.

Endpoints: --etcd-servers addresses are tried in order (gRPC's pick_first); when the connection to
one is lost the next call connects to the next that answers. Requests wait for a connection
(wait_for_ready) up to the timeout instead of failing while members restart. A request that was sent
and lost its answer raises EtcdUnavailable and is not retried when it writes: a write must not be
applied twice; reads are retried, and so is any request the server refused without processing it
(GOAWAY, REFUSED_STREAM).

Everything read from etcd is turned into the typed values below before the store uses it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aetcd import rpc
from google.protobuf.message import DecodeError

from .grpc_h2 import CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, Channel, GrpcError, Stream


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


# A transaction's request is encoded here, not through the protobuf classes: building the nested
# messages (a Compare and a RequestOp per part) and serializing them was ~6% of the API server's
# CPU per create in the 50-watcher fan-out (bench/README.md etcd). The wire format is protobuf's
# (field numbers of etcd's rpc.proto; proto3: zero scalars left out, a oneof member always written);
# tests/etcd/test_etcd_units.py checks it byte for byte against protobuf's own encoding.

def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return bytes((n,))
    n &= (1 << 64) - 1  # an int64 below zero: ten bytes, two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes or a message); numbers below 16 take one tag byte."""
    return bytes((number << 3 | 2,)) + _varint(len(data)) + data


def _compare_wire(c: Cmp) -> bytes:
    result, target = _RESULT[c.result], _TARGET[c.target]
    out = (b"\x08" + _varint(result) if result else b"") + (b"\x10" + _varint(target) if target else b"")
    if c.key:
        out += _field(3, c.key)
    return out + bytes(((4 + target) << 3,)) + _varint(c.value)  # version 4, create_revision 5, mod_revision 6


def _op_wire(op: Op) -> bytes:
    key = _field(1, op.key) if op.key else b""
    if isinstance(op, Put):
        return _field(2, key + (_field(2, op.value) if op.value else b"")
                      + (b"\x18" + _varint(op.lease) if op.lease else b""))
    if isinstance(op, Get):
        return _field(1, key)
    return _field(3, key + (b"\x18\x01" if op.prev_kv else b""))


def txn_request(compare: list[Cmp], success: list[Op], failure: list[Op]) -> bytes:
    """A serialized etcdserverpb.TxnRequest."""
    return b"".join([*(_field(1, _compare_wire(c)) for c in compare), *(_field(2, _op_wire(o)) for o in success),
                     *(_field(3, _op_wire(o)) for o in failure)])


# The same parts as protobuf messages: bench/etcd_grpcaio.py's peer client builds its requests so.
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


def parse_endpoints(endpoints: list[str]) -> tuple[list[tuple[str, int]], str, bool]:
    """(addresses, TLS host name or "", tls) of --etcd-servers URLs; DNS names resolved here."""
    addrs: list[tuple[str, int]] = []
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
            ips = sorted({str(a[4][0]) for a in socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)})
        addrs.extend((ip, port) for ip in ips)
    return addrs, hostname, tls


def tls_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    """Client TLS for etcd: the CA (else the system's), our certificate if given, HTTP/2 by ALPN."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    ctx.set_alpn_protocols(["h2"])
    return ctx


def _error(e: GrpcError, what: str) -> EtcdError:
    if "compacted" in e.message:
        return EtcdCompacted(f"etcd {what}: {e.message}")
    if e.code in (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED):
        return EtcdUnavailable(f"etcd {what}: {e.code_name}: {e.message}")
    return EtcdError(f"etcd {what}: {e.code_name}: {e.message}")


_KV = "/etcdserverpb.KV/"
_LEASE = "/etcdserverpb.Lease/"
_WATCH = "/etcdserverpb.Watch/Watch"
REFUSED_RETRIES = 4  # a request the server did not take is sent again (also a write): this often at most


class EtcdClient:
    def __init__(self, endpoints: list[str], *, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 timeout: float = 10.0) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint URL is needed")
        self.endpoints = endpoints
        addrs, hostname, tls = parse_endpoints(endpoints)
        ctx = tls_context(ca_file, cert_file, key_file) if tls or ca_file or cert_file else None
        self._channel = Channel(addrs, ssl_context=ctx, server_hostname=hostname or None)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, what: str, method: str, request: Any, response: Any, *, retry: bool) -> Any:
        """One unary call; `request` a message or its serialized bytes, `response` the response
        message class. Reads are retried when etcd is unavailable, writes only when the request
        was not taken."""
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        attempts = 3 if retry else 1
        attempt = refused = 0
        while True:
            try:
                data = await self._channel.unary(method, payload, self.timeout)
            except GrpcError as e:
                err = _error(e, what)
                if not e.sent and refused < REFUSED_RETRIES:
                    refused += 1
                    continue
                attempt += 1
                if not isinstance(err, EtcdUnavailable) or attempt >= attempts:
                    raise err from None
                await asyncio.sleep(0.1 * attempt)
                continue
            try:
                return response.FromString(data)
            except DecodeError as e:
                raise EtcdError(f"etcd {what}: undecodable response: {e}") from None

    async def range(self, key: bytes, range_end: bytes = b"", *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False, count_only: bool = False) -> RangeResult:
        r = await self._call("range", _KV + "Range", rpc.RangeRequest(
            key=key, range_end=range_end, limit=limit, revision=revision, keys_only=keys_only,
            count_only=count_only), rpc.RangeResponse, retry=True)
        return RangeResult(int(r.header.revision), [_kv(k) for k in r.kvs], bool(r.more), int(r.count))

    async def txn(self, compare: list[Cmp], success: list[Op], failure: list[Op] | None = None) -> TxnResult:
        r = await self._call("txn", _KV + "Txn", txn_request(compare, success, failure or []), rpc.TxnResponse,
                             retry=False)
        return txn_result(r)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        r = await self._call("put", _KV + "Put", rpc.PutRequest(key=key, value=value, lease=lease),
                             rpc.PutResponse, retry=False)
        return int(r.header.revision)

    async def delete(self, key: bytes, range_end: bytes = b"") -> int:
        r = await self._call("delete", _KV + "DeleteRange", rpc.DeleteRangeRequest(key=key, range_end=range_end),
                             rpc.DeleteRangeResponse, retry=False)
        return int(r.header.revision)

    async def compact(self, revision: int) -> None:
        await self._call("compact", _KV + "Compact", rpc.CompactionRequest(revision=revision),
                         rpc.CompactionResponse, retry=False)

    async def lease_grant(self, ttl: int) -> int:
        r = await self._call("lease grant", _LEASE + "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl),
                             rpc.LeaseGrantResponse, retry=True)
        if r.error:
            raise EtcdError(f"etcd lease grant: {r.error}")
        return int(r.ID)

    async def lease_keepalive(self, lease_id: int) -> int:
        """One keep-alive; returns the remaining TTL (0 or less: the lease has expired)."""
        loop = asyncio.get_running_loop()
        try:
            st = await self._channel.stream(_LEASE + "LeaseKeepAlive", self.timeout, loop.time() + self.timeout)
            try:
                st.send(rpc.LeaseKeepAliveRequest(ID=lease_id).SerializeToString(), end=True)
                data = await st.read()
                if data is None:
                    raise EtcdUnavailable("etcd lease keepalive: stream ended")
                return int(rpc.LeaseKeepAliveResponse.FromString(data).TTL)
            finally:
                st.cancel()
        except GrpcError as e:
            raise _error(e, "lease keepalive") from None
        except DecodeError as e:
            raise EtcdError(f"etcd lease keepalive: undecodable response: {e}") from None

    async def lease_revoke(self, lease_id: int) -> None:
        await self._call("lease revoke", _LEASE + "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id),
                         rpc.LeaseRevokeResponse, retry=False)

    def watch(self, key: bytes, range_end: bytes, start_revision: int, *, progress_notify: bool = True,
              prev_kv: bool = False) -> Watch:
        return Watch(self, rpc.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision,
                                                  progress_notify=progress_notify, prev_kv=prev_kv))


def txn_result(r: Any) -> TxnResult:
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


def watch_response(r: Any) -> WatchResponse:
    """A typed WatchResponse; EtcdCompacted / EtcdError when etcd canceled the watch."""
    out = WatchResponse(int(r.header.revision),
                        [WatchEvent("DELETE" if e.type == 1 else "PUT", _kv(e.kv)) for e in r.events],
                        bool(r.created), bool(r.canceled), int(r.compact_revision), str(r.cancel_reason))
    if out.compact_revision and out.canceled:
        raise EtcdCompacted(f"etcd watch: revision compacted (oldest {out.compact_revision})", out.compact_revision)
    if out.canceled:
        raise EtcdError(f"etcd watch canceled: {out.cancel_reason}")
    return out


class Watch:
    """One etcd watch stream: iterate for responses; request_progress() asks etcd for a header with
    its current revision once every event up to it has been sent (etcd >= 3.4)."""

    def __init__(self, client: EtcdClient, create: Any) -> None:
        self._client = client
        self._create = create
        self._stream: Stream | None = None
        self._cancelled = False

    def request_progress(self) -> None:
        # The stream's send side stays open while the watch lives: progress requests go on it.
        if self._stream is not None:
            self._stream.send(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()).SerializeToString())

    def cancel(self) -> None:
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()

    async def __aiter__(self) -> AsyncIterator[WatchResponse]:
        try:
            st = self._stream = await self._client._channel.stream(_WATCH, self._client.timeout)
            if self._cancelled:
                st.cancel()
            st.send(rpc.WatchRequest(create_request=self._create).SerializeToString())
            while True:
                data = await st.read()
                if data is None:
                    break
                try:
                    r = rpc.WatchResponse.FromString(data)
                except DecodeError as e:
                    raise EtcdError(f"etcd watch: undecodable response: {e}") from None
                yield watch_response(r)
        except GrpcError as e:
            raise _error(e, "watch") from None
        finally:
            if self._stream is not None:
                self._stream.cancel()
        raise EtcdUnavailable("etcd watch: stream ended")

"""An asyncio etcd v3 client: gRPC over HTTP/2 on the event loop (grpc_h2.py), etcd's protobuf
messages encoded and decoded by etcd_wire.py (neither grpc nor protobuf is imported: ~20 MiB of RSS).

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
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from . import etcd_wire as wire
from .etcd_wire import (
    KV,
    Cmp,
    Delete,
    Get,
    Op,
    Put,
    RangeResult,
    TxnResult,
    WatchEvent,
    WatchResponse,
    WireError,
    txn_request,
)
from .grpc_h2 import CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, Channel, GrpcError, Stream

__all__ = ["KV", "Cmp", "Delete", "EtcdClient", "EtcdCompacted", "EtcdError", "EtcdUnavailable", "Get", "Op", "Put",
           "RangeResult", "TxnResult", "Watch", "WatchEvent", "WatchResponse", "cmp_create", "cmp_mod", "cmp_version",
           "parse_endpoints", "prefix_end", "tls_context", "txn_request", "watch_response"]

T = TypeVar("T")


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


def cmp_mod(key: bytes, revision: int, result: str = "EQUAL") -> Cmp:
    """mod_revision(key) RESULT revision (a missing key has 0)."""
    return Cmp(key, "MOD", revision, result)


def cmp_create(key: bytes, revision: int, result: str = "EQUAL") -> Cmp:
    return Cmp(key, "CREATE", revision, result)


def cmp_version(key: bytes, version: int, result: str = "EQUAL") -> Cmp:
    return Cmp(key, "VERSION", version, result)


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

    async def _call(self, what: str, method: str, request: bytes, decode: Callable[[bytes], T], *,
                    retry: bool) -> T:
        """One unary call with a serialized request, its answer decoded by `decode`. Reads are retried
        when etcd is unavailable, writes only when the request was not taken."""
        attempts = 3 if retry else 1
        attempt = refused = 0
        while True:
            try:
                data = await self._channel.unary(method, request, self.timeout)
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
                return decode(data)
            except WireError as e:
                raise EtcdError(f"etcd {what}: undecodable response: {e}") from None

    async def range(self, key: bytes, range_end: bytes = b"", *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False, count_only: bool = False) -> RangeResult:
        request = wire.range_request(key, range_end, limit=limit, revision=revision, keys_only=keys_only,
                                     count_only=count_only)
        return await self._call("range", _KV + "Range", request, wire.range_response, retry=True)

    async def txn(self, compare: list[Cmp], success: list[Op], failure: list[Op] | None = None) -> TxnResult:
        return await self._call("txn", _KV + "Txn", txn_request(compare, success, failure or []), wire.txn_response,
                                retry=False)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return await self._call("put", _KV + "Put", wire.put_request(key, value, lease), wire.header_revision,
                                retry=False)

    async def delete(self, key: bytes, range_end: bytes = b"") -> int:
        return await self._call("delete", _KV + "DeleteRange", wire.delete_range_request(key, range_end),
                                wire.header_revision, retry=False)

    async def compact(self, revision: int) -> None:
        await self._call("compact", _KV + "Compact", wire.int_request(revision), wire.header_revision, retry=False)

    async def lease_grant(self, ttl: int) -> int:
        r = await self._call("lease grant", _LEASE + "LeaseGrant", wire.int_request(ttl), wire.lease_grant_response,
                             retry=True)
        if r.error:
            raise EtcdError(f"etcd lease grant: {r.error[:200]}")
        return r.id

    async def lease_keepalive(self, lease_id: int) -> int:
        """One keep-alive; returns the remaining TTL (0 or less: the lease has expired)."""
        loop = asyncio.get_running_loop()
        try:
            st = await self._channel.stream(_LEASE + "LeaseKeepAlive", self.timeout, loop.time() + self.timeout)
            try:
                st.send(wire.int_request(lease_id), end=True)
                data = await st.read()
                if data is None:
                    raise EtcdUnavailable("etcd lease keepalive: stream ended")
                return wire.lease_keepalive_ttl(data)
            finally:
                st.cancel()
        except GrpcError as e:
            raise _error(e, "lease keepalive") from None
        except WireError as e:
            raise EtcdError(f"etcd lease keepalive: undecodable response: {e}") from None

    async def lease_revoke(self, lease_id: int) -> None:
        await self._call("lease revoke", _LEASE + "LeaseRevoke", wire.int_request(lease_id), wire.header_revision,
                         retry=False)

    def watch(self, key: bytes, range_end: bytes, start_revision: int, *, progress_notify: bool = True,
              prev_kv: bool = False) -> Watch:
        return Watch(self, wire.watch_create_request(key, range_end, start_revision, progress_notify=progress_notify,
                                                     prev_kv=prev_kv))


def watch_response(data: bytes) -> WatchResponse:
    """A typed WatchResponse; EtcdCompacted / EtcdError when etcd canceled the watch."""
    try:
        out = wire.watch_response(data)
    except WireError as e:
        raise EtcdError(f"etcd watch: undecodable response: {e}") from None
    if out.compact_revision and out.canceled:
        raise EtcdCompacted(f"etcd watch: revision compacted (oldest {out.compact_revision})", out.compact_revision)
    if out.canceled:
        raise EtcdError(f"etcd watch canceled: {out.cancel_reason[:200]}")
    return out


class Watch:
    """One etcd watch stream: iterate for responses; request_progress() asks etcd for a header with
    its current revision once every event up to it has been sent (etcd >= 3.4)."""

    def __init__(self, client: EtcdClient, create: bytes) -> None:
        self._client = client
        self._create = create
        self._stream: Stream | None = None
        self._cancelled = False

    def request_progress(self) -> None:
        # The stream's send side stays open while the watch lives: progress requests go on it.
        if self._stream is not None:
            self._stream.send(wire.WATCH_PROGRESS_REQUEST)

    def cancel(self) -> None:
        self._cancelled = True
        if self._stream is not None:
            self._stream.cancel()

    async def __aiter__(self) -> AsyncIterator[WatchResponse]:
        try:
            st = self._stream = await self._client._channel.stream(_WATCH, self._client.timeout)
            if self._cancelled:
                st.cancel()
            st.send(self._create)
            while True:
                data = await st.read()
                if data is None:
                    break
                yield watch_response(data)
        except GrpcError as e:
            raise _error(e, "watch") from None
        finally:
            if self._stream is not None:
                self._stream.cancel()
        raise EtcdUnavailable("etcd watch: stream ended")

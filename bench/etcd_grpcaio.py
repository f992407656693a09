"""The etcd client the store used before grpc_h2.py, kept as bench_etcd_client.py's peer: the same
calls over grpc.aio (a gRPC channel with every member, pick_first).
Only what the bench calls: put, range, txn, watch."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from controlplane_stub.store import etcd_wire as wire
from controlplane_stub.store.etcd_client import (
    Cmp,
    EtcdError,
    Op,
    RangeResult,
    TxnResult,
    WatchResponse,
    parse_endpoints,
    txn_request,
    watch_response,
)


def _raw(b: bytes) -> bytes:
    return b


class EtcdClient:
    """Requests and responses are the bytes etcd_wire.py encodes and decodes, as in the store's
    client, so the two differ by their transport only."""

    def __init__(self, endpoints: list[str], timeout: float = 10.0) -> None:
        addrs, _, _ = parse_endpoints(endpoints)
        target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in addrs)
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.lb_policy_name", "pick_first"), ("grpc.max_receive_message_length", 256 << 20)])
        self._range = self._channel.unary_unary("/etcdserverpb.KV/Range", _raw, _raw)
        self._txn = self._channel.unary_unary("/etcdserverpb.KV/Txn", _raw, _raw)
        self._put = self._channel.unary_unary("/etcdserverpb.KV/Put", _raw, _raw)
        self._watch = self._channel.stream_stream("/etcdserverpb.Watch/Watch", _raw, _raw)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: grpc.aio.UnaryUnaryMultiCallable, request: bytes) -> bytes:
        try:
            out: bytes = await method(request, timeout=self.timeout, wait_for_ready=True)
            return out
        except grpc.aio.AioRpcError as e:
            raise EtcdError(f"etcd: {e.code().name}: {e.details()}") from None

    async def range(self, key: bytes, range_end: bytes = b"") -> RangeResult:
        return wire.range_response(await self._call(self._range, wire.range_request(key, range_end)))

    async def txn(self, compare: list[Cmp], success: list[Op], failure: list[Op] | None = None) -> TxnResult:
        return wire.txn_response(await self._call(self._txn, txn_request(compare, success, failure or [])))

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return wire.header_revision(await self._call(self._put, wire.put_request(key, value, lease)))

    async def watch(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[WatchResponse]:
        call = self._watch(wait_for_ready=True)
        try:
            await call.write(wire.watch_create_request(key, range_end, start_revision))
            while (r := await call.read()) is not grpc.aio.EOF:
                assert isinstance(r, bytes)
                yield watch_response(r)
        finally:
            call.cancel()

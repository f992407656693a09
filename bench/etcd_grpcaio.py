"""The etcd client the store used before grpc_h2.py, kept as bench_etcd_client.py's peer: the same
calls over grpc.aio (a gRPC channel with every member, pick_first, aetcd's generated stubs).
Only what the bench calls: put, range, txn, watch."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from aetcd import rpc

from controlplane_stub.store.etcd_client import (
    Cmp,
    EtcdError,
    Op,
    RangeResult,
    TxnResult,
    WatchResponse,
    _compare,
    _kv,
    _request_op,
    parse_endpoints,
    txn_result,
    watch_response,
)


class EtcdClient:
    def __init__(self, endpoints: list[str], timeout: float = 10.0) -> None:
        addrs, _, _ = parse_endpoints(endpoints)
        target = "ipv4:" + ",".join(f"{h}:{p}" for h, p in addrs)
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.lb_policy_name", "pick_first"), ("grpc.max_receive_message_length", 256 << 20)])
        self._kv = rpc.KVStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise EtcdError(f"etcd: {e.code().name}: {e.details()}") from None

    async def range(self, key: bytes, range_end: bytes = b"") -> RangeResult:
        r = await self._call(self._kv.Range, rpc.RangeRequest(key=key, range_end=range_end))
        return RangeResult(int(r.header.revision), [_kv(k) for k in r.kvs], bool(r.more), int(r.count))

    async def txn(self, compare: list[Cmp], success: list[Op], failure: list[Op] | None = None) -> TxnResult:
        return txn_result(await self._call(self._kv.Txn, rpc.TxnRequest(
            compare=[_compare(c) for c in compare], success=[_request_op(o) for o in success],
            failure=[_request_op(o) for o in failure or []])))

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return int((await self._call(self._kv.Put, rpc.PutRequest(key=key, value=value, lease=lease))).header.revision)

    async def watch(self, key: bytes, range_end: bytes, start_revision: int) -> AsyncIterator[WatchResponse]:
        call = self._watch.Watch(wait_for_ready=True)
        try:
            await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=key, range_end=range_end, start_revision=start_revision)))
            while (r := await call.read()) is not grpc.aio.EOF:
                yield watch_response(r)
        finally:
            call.cancel()

"""etcd_wire.py, the etcd client's hand-made protobuf: every request byte for byte against protobuf's own
serialization (aetcd's generated etcdserverpb messages, a test dependency only), every response decoder
against messages protobuf encoded, malformed bytes refused with WireError and nothing else, and the API
server on etcd without grpc or protobuf loaded."""
from __future__ import annotations

import json
import ssl
import urllib.request
from typing import Any

import pytest
from aetcd import rpc
from hypothesis import given
from hypothesis import strategies as st

from controlplane_stub.apiserver.testing import running_apiserver
from controlplane_stub.store import etcd_wire as wire
from controlplane_stub.store.etcd_process import EtcdCluster
from controlplane_stub.store.etcd_wire import KV, Cmp, Delete, Get, Op, Put, WireError, txn_request

_INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
_KEY = st.binary(max_size=40)
_CMPS = st.builds(Cmp, _KEY, st.sampled_from(["VERSION", "CREATE", "MOD"]), _INT64,
                  st.sampled_from(["EQUAL", "GREATER", "LESS", "NOT_EQUAL"]))
_OPS = st.one_of(st.builds(Put, _KEY, st.binary(max_size=300), _INT64),
                 st.builds(Get, _KEY), st.builds(Delete, _KEY, st.booleans()))
_KVS = st.builds(KV, _KEY, st.binary(max_size=300), _INT64, _INT64, _INT64, _INT64)


def _compare(c: Cmp) -> Any:
    field = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}[c.target]
    return rpc.Compare(key=c.key, target=wire.TARGET[c.target], result=wire.RESULT[c.result], **{field: c.value})


def _request_op(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key, value=op.value, lease=op.lease))
    if isinstance(op, Get):
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=op.key))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key, prev_kv=op.prev_kv))


def _kv_pb(kv: KV) -> Any:
    return rpc.KeyValue(key=kv.key, value=kv.value, create_revision=kv.create_revision,
                        mod_revision=kv.mod_revision, version=kv.version, lease=kv.lease)


def _header(revision: int) -> Any:
    return rpc.ResponseHeader(cluster_id=14841639068965178418, member_id=10276657743932975437, revision=revision,
                              raft_term=7)


# -- requests ----------------------------------------------------------------------------------

@given(st.lists(_CMPS, max_size=4), st.lists(_OPS, max_size=4), st.lists(_OPS, max_size=4))
def test_txn_request_is_protobufs_encoding_byte_for_byte(compare: list[Cmp], success: list[Op],
                                                         failure: list[Op]) -> None:
    message = rpc.TxnRequest(compare=[_compare(c) for c in compare], success=[_request_op(o) for o in success],
                             failure=[_request_op(o) for o in failure])
    encoded = txn_request(compare, success, failure)
    assert encoded == message.SerializeToString()
    assert rpc.TxnRequest.FromString(encoded) == message


@given(_KEY, _KEY, _INT64, _INT64, st.booleans(), st.booleans())
def test_range_request_is_protobufs_encoding(key: bytes, end: bytes, limit: int, revision: int, keys_only: bool,
                                             count_only: bool) -> None:
    assert wire.range_request(key, end, limit=limit, revision=revision, keys_only=keys_only,
                              count_only=count_only) == rpc.RangeRequest(
        key=key, range_end=end, limit=limit, revision=revision, keys_only=keys_only,
        count_only=count_only).SerializeToString()


@given(_KEY, st.binary(max_size=300), _INT64, _KEY)
def test_put_delete_and_int_requests_are_protobufs_encoding(key: bytes, value: bytes, n: int, end: bytes) -> None:
    assert wire.put_request(key, value, n) == rpc.PutRequest(key=key, value=value, lease=n).SerializeToString()
    assert wire.delete_range_request(key, end) == rpc.DeleteRangeRequest(key=key, range_end=end).SerializeToString()
    for message in (rpc.CompactionRequest(revision=n), rpc.LeaseGrantRequest(TTL=n), rpc.LeaseRevokeRequest(ID=n),
                    rpc.LeaseKeepAliveRequest(ID=n)):
        assert wire.int_request(n) == message.SerializeToString()


@given(_KEY, _KEY, _INT64, st.booleans(), st.booleans())
def test_watch_requests_are_protobufs_encoding(key: bytes, end: bytes, start: int, progress: bool,
                                               prev_kv: bool) -> None:
    assert wire.watch_create_request(key, end, start, progress_notify=progress, prev_kv=prev_kv) == rpc.WatchRequest(
        create_request=rpc.WatchCreateRequest(key=key, range_end=end, start_revision=start, progress_notify=progress,
                                              prev_kv=prev_kv)).SerializeToString()
    assert wire.WATCH_PROGRESS_REQUEST == rpc.WatchRequest(
        progress_request=rpc.WatchProgressRequest()).SerializeToString()


# -- responses ---------------------------------------------------------------------------------

@given(_INT64, st.lists(_KVS, max_size=5), st.booleans(), _INT64)
def test_range_response_decodes_protobufs_encoding(revision: int, kvs: list[KV], more: bool, count: int) -> None:
    data = rpc.RangeResponse(header=_header(revision), kvs=[_kv_pb(k) for k in kvs], more=more,
                             count=count).SerializeToString()
    assert wire.range_response(data) == wire.RangeResult(revision, kvs, more, count)


_RESPONSE_OPS = st.one_of(
    st.tuples(st.just("range"), st.lists(_KVS, max_size=3)),
    st.tuples(st.just("put"), st.lists(_KVS, max_size=1)),
    st.tuples(st.just("delete"), st.lists(_KVS, max_size=3)),
    st.tuples(st.just("other"), st.just([])))


def _response_op_pb(kind: str, kvs: list[KV]) -> Any:
    pbs = [_kv_pb(k) for k in kvs]
    if kind == "range":
        return rpc.ResponseOp(response_range=rpc.RangeResponse(header=_header(3), kvs=pbs, count=len(pbs)))
    if kind == "put":
        return rpc.ResponseOp(response_put=rpc.PutResponse(header=_header(3), prev_kv=pbs[0] if pbs else None))
    if kind == "delete":
        return rpc.ResponseOp(response_delete_range=rpc.DeleteRangeResponse(header=_header(3), deleted=len(pbs),
                                                                            prev_kvs=pbs))
    return rpc.ResponseOp(response_txn=rpc.TxnResponse(header=_header(3), succeeded=True))


@given(_INT64, st.booleans(), st.lists(_RESPONSE_OPS, max_size=4))
def test_txn_response_decodes_protobufs_encoding(revision: int, succeeded: bool,
                                                 ops: list[tuple[str, list[KV]]]) -> None:
    data = rpc.TxnResponse(header=_header(revision), succeeded=succeeded,
                           responses=[_response_op_pb(k, kvs) for k, kvs in ops]).SerializeToString()
    assert wire.txn_response(data) == wire.TxnResult(revision, succeeded, ops)


@given(_INT64, st.lists(st.tuples(st.sampled_from(["PUT", "DELETE"]), _KVS), max_size=5), st.booleans(),
       st.booleans(), _INT64, st.text(max_size=40))
def test_watch_response_decodes_protobufs_encoding(revision: int, events: list[tuple[str, KV]], created: bool,
                                                   canceled: bool, compact: int, reason: str) -> None:
    data = rpc.WatchResponse(
        header=_header(revision), watch_id=5, created=created, canceled=canceled, compact_revision=compact,
        cancel_reason=reason, events=[rpc.Event(type=1 if t == "DELETE" else 0, kv=_kv_pb(kv), prev_kv=_kv_pb(kv))
                                      for t, kv in events]).SerializeToString()
    assert wire.watch_response(data) == wire.WatchResponse(
        revision, [wire.WatchEvent(t, kv) for t, kv in events], created, canceled, compact, reason)


@given(_INT64, _INT64, _INT64, st.text(max_size=40))
def test_lease_and_header_responses_decode_protobufs_encoding(revision: int, lease: int, ttl: int,
                                                              error: str) -> None:
    assert wire.lease_grant_response(rpc.LeaseGrantResponse(
        header=_header(revision), ID=lease, TTL=ttl, error=error).SerializeToString()) == wire.LeaseGrant(lease, ttl,
                                                                                                         error)
    assert wire.lease_keepalive_ttl(rpc.LeaseKeepAliveResponse(header=_header(revision), ID=lease,
                                                               TTL=ttl).SerializeToString()) == ttl
    for message in (rpc.PutResponse(header=_header(revision), prev_kv=rpc.KeyValue(key=b"k", mod_revision=ttl)),
                    rpc.DeleteRangeResponse(header=_header(revision), deleted=3),
                    rpc.CompactionResponse(header=_header(revision)), rpc.LeaseRevokeResponse(header=_header(revision))):
        assert wire.header_revision(message.SerializeToString()) == revision


# -- malformed input ---------------------------------------------------------------------------

_DECODERS = (wire.range_response, wire.txn_response, wire.watch_response, wire.header_revision,
             wire.lease_grant_response, wire.lease_keepalive_ttl)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    for decode in _DECODERS:
        try:
            decode(data)
        except WireError:
            pass


@given(st.lists(_KVS, min_size=1, max_size=3), st.data())
def test_a_truncated_or_corrupted_message_is_a_wire_error_or_decodes(kvs: list[KV], data: st.DataObject) -> None:
    valid = rpc.WatchResponse(header=_header(9), events=[rpc.Event(kv=_kv_pb(kv)) for kv in kvs]).SerializeToString()
    cut = data.draw(st.integers(0, len(valid) - 1))
    at, byte = data.draw(st.integers(0, len(valid) - 1)), data.draw(st.integers(0, 255))
    for broken in (valid[:cut], valid[:at] + bytes((byte,)) + valid[at + 1:]):
        for decode in _DECODERS:
            try:
                decode(broken)
            except WireError:
                pass


@pytest.mark.parametrize("data, message", [
    (b"\x12\x05ab", "past the end"),  # kvs: 5 bytes announced, 2 there
    (b"\x12\x03\x0a\x05abc", "past the end"),  # a key longer than its KeyValue
    (b"\x20" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),  # count
    (b"\x20\xff", "truncated varint"),
    (b"\x0b\x0c", "wire type 3"),  # a group
    (b"\x00\x01", "field number 0"),
    (b"\x12\x02\x08\x01", "wire type 0, want 2"),  # a KeyValue whose key is a varint
    (b"\x1a\x01\x01", "wire type 2, want 0"),  # more (a bool) as bytes
    (b"\x0a\x02\x08\xff", "truncated varint"),  # the header's cluster_id
    (b"\x0a\x0c\x10" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),  # the header's member_id
    (b"\x0a\x02\x18\x80", "truncated varint"),  # the header's revision
])
def test_malformed_range_responses_are_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.range_response(data)


def test_more_items_than_the_cap_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_ITEMS", 3)
    kv = _kv_pb(KV(b"/k", b"v", 1, 1, 1))
    assert len(wire.range_response(rpc.RangeResponse(kvs=[kv] * 3).SerializeToString()).kvs) == 3
    with pytest.raises(WireError, match="more than 3"):
        wire.range_response(rpc.RangeResponse(kvs=[kv] * 4).SerializeToString())
    with pytest.raises(WireError, match="more than 3"):
        wire.watch_response(rpc.WatchResponse(events=[rpc.Event(kv=kv)] * 4).SerializeToString())


# -- the server --------------------------------------------------------------------------------

def _mapped(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if line.rstrip().endswith(".so")}


def test_apiserver_on_etcd_loads_neither_grpc_nor_protobuf(etcd1: EtcdCluster, prefix: str) -> None:
    """A real kproxy-apiserver on a real etcd, after a create, a list and a watch: neither grpc's C core
    (cygrpc) nor protobuf's (upb's _message) is mapped into it; with grpc imported they would be."""
    with running_apiserver(storage="etcd3", extra_args=["--storage-backend", "etcd3", "--etcd-servers",
                                                        etcd1.endpoints, "--etcd-prefix", prefix]) as api:
        ctx = ssl.create_default_context(cafile=api.ca_file)
        headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
        body = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "wire"}}).encode()
        base = api.url + "/api/v1/namespaces/default/configmaps"
        with urllib.request.urlopen(urllib.request.Request(base, body, headers, method="POST"), context=ctx,
                                    timeout=10) as r:
            assert r.status == 201
        with urllib.request.urlopen(urllib.request.Request(base, headers=headers), context=ctx, timeout=10) as r:
            listed = json.load(r)
        assert [i["metadata"]["name"] for i in listed["items"]] == ["wire"]
        watch = f"{base}?watch=1&resourceVersion=0&timeoutSeconds=1"
        with urllib.request.urlopen(urllib.request.Request(watch, headers=headers), context=ctx, timeout=10) as r:
            assert json.loads(r.readline())["object"]["metadata"]["name"] == "wire"
        libs = _mapped(api.pid)
        assert any(lib.startswith(("libssl", "_ssl")) for lib in libs), libs  # the check sees .so files
        assert not [lib for lib in libs if "grpc" in lib or lib.startswith("_message") or "protobuf" in lib], libs

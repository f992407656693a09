"""etcd v3's messages on the wire (protobuf, field numbers of etcd's api/etcdserverpb/rpc.proto and
api/mvccpb/kv.proto), encoded and decoded here by hand into the typed values the store uses.

Why not the generated protobuf classes: they came from the aetcd package, whose __init__ imports
aetcd's client and so grpc, ~20 MiB of the API server's resident memory on etcd (~100 MiB in all at
10,000 Services; bench/README.md etcd) for a library the server does not call: the transport is
grpc_h2.py. The few messages the client sends and reads are small; tests/etcd/test_etcd_wire.py
checks every encoder byte for byte against protobuf's own serialization and every decoder against
messages protobuf encoded (protobuf and aetcd stay test and bench dependencies).

Everything here reads untrusted bytes: a malformed message (a truncated field, a length past the
end, a field of the wrong wire type, a varint longer than 10 bytes, a group) raises WireError, never
anything else; unknown fields are skipped as protobuf does. A message is at most grpc_h2.MAX_MESSAGE
bytes (the transport's bound), and one list in it (key-values, events, a transaction's responses)
at most MAX_ITEMS long.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MAX_ITEMS = 1 << 20  # key-values (or events) in one message; a range page is 1,000 (etcd.py)


class WireError(ValueError):
    """A message that is not what etcd's protocol says."""


# -- typed values ------------------------------------------------------------------------------

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


@dataclass(slots=True)
class LeaseGrant:
    id: int
    ttl: int
    error: str


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

TARGET = {"VERSION": 0, "CREATE": 1, "MOD": 2}
RESULT = {"EQUAL": 0, "GREATER": 1, "LESS": 2, "NOT_EQUAL": 3}


# -- encoding ----------------------------------------------------------------------------------
# proto3: a zero scalar or empty bytes field is left out, a oneof member always written, fields in
# number order (as protobuf serializes).

# One-byte values and tags, built once: bytes((n,)) per field was most of a create's Txn encoding
# (11.6 us before, on the bench machine).
_BYTE = tuple(bytes((i,)) for i in range(256))


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _BYTE[n]
    n &= (1 << 64) - 1  # an int64 below zero: ten bytes, two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (bytes or a message); numbers below 16 take one tag byte."""
    n = len(data)
    return _BYTE[number << 3 | 2] + (_BYTE[n] if n < 0x80 else _varint(n)) + data


def _bytes(number: int, data: bytes) -> bytes:
    return _field(number, data) if data else b""


def _int(number: int, n: int) -> bytes:
    """An int64 or bool (as 0/1) field, numbers below 16."""
    return _BYTE[number << 3] + _varint(int(n)) if n else b""


# Compare.result and .target as their field bytes (result 1, target 2; EQUAL and VERSION are 0: absent).
_RESULT_WIRE = {name: _int(1, v) for name, v in RESULT.items()}
_TARGET_WIRE = {name: _int(2, v) for name, v in TARGET.items()}
_VALUE_TAG = {name: _BYTE[(4 + v) << 3] for name, v in TARGET.items()}  # version 4, create_revision 5, mod_revision 6


def _compare_wire(c: Cmp) -> bytes:
    return (_RESULT_WIRE[c.result] + _TARGET_WIRE[c.target] + _bytes(3, c.key) + _VALUE_TAG[c.target]
            + _varint(c.value))


def _op_wire(op: Op) -> bytes:
    key = _bytes(1, op.key)
    if isinstance(op, Put):
        return _field(2, key + _bytes(2, op.value) + _int(3, op.lease))
    if isinstance(op, Get):
        return _field(1, key)
    return _field(3, key + _int(3, op.prev_kv))


def txn_request(compare: list[Cmp], success: list[Op], failure: list[Op]) -> bytes:
    """A serialized etcdserverpb.TxnRequest."""
    out = [_field(1, _compare_wire(c)) for c in compare]
    out.extend(_field(2, _op_wire(o)) for o in success)
    out.extend(_field(3, _op_wire(o)) for o in failure)
    return b"".join(out)


def range_request(key: bytes, range_end: bytes = b"", *, limit: int = 0, revision: int = 0,
                  keys_only: bool = False, count_only: bool = False) -> bytes:
    return (_bytes(1, key) + _bytes(2, range_end) + _int(3, limit) + _int(4, revision) + _int(8, keys_only)
            + _int(9, count_only))


def put_request(key: bytes, value: bytes, lease: int = 0) -> bytes:
    return _bytes(1, key) + _bytes(2, value) + _int(3, lease)


def delete_range_request(key: bytes, range_end: bytes = b"") -> bytes:
    return _bytes(1, key) + _bytes(2, range_end)


def int_request(n: int) -> bytes:
    """A message whose only field is int64 number 1: CompactionRequest (revision), LeaseGrantRequest
    (TTL), LeaseRevokeRequest and LeaseKeepAliveRequest (ID)."""
    return _int(1, n)


def watch_create_request(key: bytes, range_end: bytes, start_revision: int, *, progress_notify: bool = False,
                         prev_kv: bool = False) -> bytes:
    """A WatchRequest with its create_request."""
    return _field(1, _bytes(1, key) + _bytes(2, range_end) + _int(3, start_revision) + _int(4, progress_notify)
                  + _int(6, prev_kv))


WATCH_PROGRESS_REQUEST = _field(3, b"")  # a WatchRequest with an (empty) progress_request


# -- decoding ----------------------------------------------------------------------------------

def _uvarint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    """(value, next offset) of the varint at i; protobuf's limit of 10 bytes, 64 bits kept."""
    result = shift = 0
    while i < end:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, i
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")
    raise WireError("truncated varint")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: bytes, i: int, end: int) -> list[tuple[int, int, int, int]]:
    """The fields of the message in buf[i:end] as (number, wire type, value, stop): a varint's value
    and stop 0; a length-delimited field's start offset and stop; fixed32/64 fields are left out
    (etcd's messages have none)."""
    out: list[tuple[int, int, int, int]] = []
    while i < end:
        tag = buf[i]
        if tag < 0x80:
            i += 1
        else:
            tag, i = _uvarint(buf, i, end)
        number, wt = tag >> 3, tag & 7
        if number == 0:
            raise WireError("field number 0")
        if wt == 0:
            if i < end and buf[i] < 0x80:
                out.append((number, 0, buf[i], 0))
                i += 1
            else:
                v, i = _uvarint(buf, i, end)
                out.append((number, 0, v, 0))
        elif wt == 2:
            n, i = (buf[i], i + 1) if i < end and buf[i] < 0x80 else _uvarint(buf, i, end)
            if n > end - i:
                raise WireError(f"field {number}: length {n} past the end of the message")
            out.append((number, 2, i, i + n))
            i += n
        elif wt == 1 or wt == 5:
            i += 8 if wt == 1 else 4
            if i > end:
                raise WireError(f"field {number}: truncated fixed-size value")
        else:
            raise WireError(f"field {number}: wire type {wt} not supported")
    return out


def _want(number: int, wt: int, expected: int) -> None:
    if wt != expected:
        raise WireError(f"field {number}: wire type {wt}, want {expected}")


def _int_field(buf: bytes, i: int, end: int, number: int) -> int:
    """The int64 field `number` of the message in buf[i:end] (0 when absent; the last one counts)."""
    out = 0
    for n, wt, v, _ in _fields(buf, i, end):
        if n == number:
            _want(n, wt, 0)
            out = _int64(v)
    return out


def _header_revision(buf: bytes, i: int, end: int) -> int:
    """ResponseHeader.revision. Every response has a header: cluster_id and member_id are 10-byte
    varints there, stepped over without being computed (a create's Txn answer decoded in 4 us instead of 10)."""
    start, rev = i, 0
    while i < end:
        tag = buf[i]
        i += 1
        if tag == 0x18:
            v, i = _uvarint(buf, i, end)
            rev = _int64(v)
        elif tag == 0x08 or tag == 0x10 or tag == 0x20:  # cluster_id, member_id, raft_term
            at = i
            while i < end and buf[i] >= 0x80:
                i += 1
            if i >= end or i - at >= 10:
                raise WireError("truncated varint" if i >= end else "varint longer than 10 bytes")
            i += 1
        else:
            return _int_field(buf, start, end, 3)  # anything else: the general reader
    return rev


_KV_INTS = {0x10: 0, 0x18: 1, 0x20: 2, 0x30: 3}  # create_revision, mod_revision, version, lease as varints


def _kv(buf: bytes, i: int, end: int) -> KV:
    """A mvccpb.KeyValue. Every key-value of a list page and a watch event passes here: the fields as
    etcd writes them are read in one loop; anything else (an unknown field, a wrong wire type) goes to
    the general reader, which skips or refuses it."""
    start = i
    key = value = b""
    ints = [0, 0, 0, 0]
    while i < end:
        tag = buf[i]
        i += 1
        if tag == 0x0A or tag == 0x2A:
            n, i = (buf[i], i + 1) if i < end and buf[i] < 0x80 else _uvarint(buf, i, end)
            if n > end - i:
                raise WireError(f"field {tag >> 3}: length {n} past the end of the message")
            if tag == 0x0A:
                key = buf[i:i + n]
            else:
                value = buf[i:i + n]
            i += n
        elif (slot := _KV_INTS.get(tag)) is not None:
            ints[slot], i = (buf[i], i + 1) if i < end and buf[i] < 0x80 else _uvarint(buf, i, end)
        else:
            return _kv_general(buf, start, end)
    c, m, v, lease = ints
    return KV(key, value, _int64(c), _int64(m), _int64(v), _int64(lease))


def _kv_general(buf: bytes, i: int, end: int) -> KV:
    kv = KV(b"", b"", 0, 0, 0, 0)
    for number, wt, v, stop in _fields(buf, i, end):
        if number == 1 or number == 5:
            _want(number, wt, 2)
            if number == 1:
                kv.key = buf[v:stop]
            else:
                kv.value = buf[v:stop]
        elif 2 <= number <= 6:
            _want(number, wt, 0)
            if number == 2:
                kv.create_revision = _int64(v)
            elif number == 3:
                kv.mod_revision = _int64(v)
            elif number == 4:
                kv.version = _int64(v)
            else:
                kv.lease = _int64(v)
    return kv


def _add(items: list[KV], kv: KV) -> None:
    if len(items) >= MAX_ITEMS:
        raise WireError(f"more than {MAX_ITEMS} key-values in one message")
    items.append(kv)


def header_revision(buf: bytes) -> int:
    """The revision of any response's header (field 1): Put, DeleteRange, Compaction, LeaseRevoke."""
    rev = 0
    for number, wt, v, stop in _fields(buf, 0, len(buf)):
        if number == 1:
            _want(1, wt, 2)
            rev = _header_revision(buf, v, stop)
    return rev


def _range(buf: bytes, i: int, end: int) -> RangeResult:
    out = RangeResult(0, [], False, 0)
    for number, wt, v, stop in _fields(buf, i, end):
        if number == 1:
            _want(1, wt, 2)
            out.revision = _header_revision(buf, v, stop)
        elif number == 2:
            _want(2, wt, 2)
            _add(out.kvs, _kv(buf, v, stop))
        elif number == 3:
            _want(3, wt, 0)
            out.more = bool(v)
        elif number == 4:
            _want(4, wt, 0)
            out.count = _int64(v)
    return out


def range_response(buf: bytes) -> RangeResult:
    return _range(buf, 0, len(buf))


def _response_op(buf: bytes, i: int, end: int) -> tuple[str, list[KV]]:
    out: tuple[str, list[KV]] = ("other", [])
    for number, wt, v, stop in _fields(buf, i, end):  # a oneof: the last member wins, as in protobuf
        if 1 <= number <= 4:
            _want(number, wt, 2)
        kvs: list[KV] = []
        if number == 1:
            out = ("range", _range(buf, v, stop).kvs)
        elif number == 2:
            for n, w, s, e in _fields(buf, v, stop):
                if n == 2:
                    _want(2, w, 2)
                    kvs[:] = [_kv(buf, s, e)]
            out = ("put", kvs)
        elif number == 3:
            for n, w, s, e in _fields(buf, v, stop):
                if n == 3:
                    _want(3, w, 2)
                    _add(kvs, _kv(buf, s, e))
            out = ("delete", kvs)
        elif number == 4:
            out = ("other", [])
    return out


def txn_response(buf: bytes) -> TxnResult:
    out = TxnResult(0, False, [])
    for number, wt, v, stop in _fields(buf, 0, len(buf)):
        if number == 1:
            _want(1, wt, 2)
            out.revision = _header_revision(buf, v, stop)
        elif number == 2:
            _want(2, wt, 0)
            out.succeeded = bool(v)
        elif number == 3:
            _want(3, wt, 2)
            if len(out.responses) >= MAX_ITEMS:
                raise WireError(f"more than {MAX_ITEMS} responses in one transaction")
            out.responses.append(_response_op(buf, v, stop))
    return out


def _text(buf: bytes, i: int, end: int) -> str:
    return buf[i:end].decode("utf-8", "replace")


def lease_grant_response(buf: bytes) -> LeaseGrant:
    out = LeaseGrant(0, 0, "")
    for number, wt, v, stop in _fields(buf, 0, len(buf)):
        if number in (2, 3):
            _want(number, wt, 0)
            if number == 2:
                out.id = _int64(v)
            else:
                out.ttl = _int64(v)
        elif number == 4:
            _want(4, wt, 2)
            out.error = _text(buf, v, stop)
    return out


def lease_keepalive_ttl(buf: bytes) -> int:
    """The TTL of a LeaseKeepAliveResponse (0 or less: the lease has expired)."""
    return _int_field(buf, 0, len(buf), 3)


def _event(buf: bytes, i: int, end: int) -> WatchEvent:
    ev = WatchEvent("PUT", KV(b"", b"", 0, 0, 0, 0))
    for number, wt, v, stop in _fields(buf, i, end):
        if number == 1:
            _want(1, wt, 0)
            ev.type = "DELETE" if v == 1 else "PUT"
        elif number == 2:
            _want(2, wt, 2)
            ev.kv = _kv(buf, v, stop)
    return ev


def watch_response(buf: bytes) -> WatchResponse:
    out = WatchResponse(0)
    for number, wt, v, stop in _fields(buf, 0, len(buf)):
        if number == 1:
            _want(1, wt, 2)
            out.revision = _header_revision(buf, v, stop)
        elif number in (3, 4, 5):
            _want(number, wt, 0)
            if number == 3:
                out.created = bool(v)
            elif number == 4:
                out.canceled = bool(v)
            else:
                out.compact_revision = _int64(v)
        elif number == 6:
            _want(6, wt, 2)
            out.cancel_reason = _text(buf, v, stop)
        elif number == 11:
            _want(11, wt, 2)
            if len(out.events) >= MAX_ITEMS:
                raise WireError(f"more than {MAX_ITEMS} events in one watch response")
            out.events.append(_event(buf, v, stop))
    return out

"""The candidate the etcd store did not take: etcd v3 over etcd's gRPC-JSON gateway (/v3/...), on aiohttp.

Kept for bench/bench_etcd_client.py, which measures it side by side with the gRPC client that
controlplane_stub/store/etcd_client.py is (figures and the choice in bench/README.md). int64 fields
arrive as JSON strings, bytes as base64.

Endpoints: requests go to one member; when it refuses the connection the next one is tried (the
request was never sent, so a retry cannot apply a write twice). A request that was sent and lost its
answer raises EtcdUnavailable and is not retried: a write must not be applied twice.
"""
from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from controlplane_stub.store.etcd_client import (
    KV,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    RangeResult,
    TxnResult,
    WatchEvent,
    WatchResponse,
)

JSON = dict[str, Any]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        return b""
    return base64.b64decode(text, validate=True)


def _int(v: Any) -> int:
    """int64 fields come as decimal strings (proto3 JSON); absent means 0."""
    if v is None:
        return 0
    if isinstance(v, bool):
        raise EtcdError(f"etcd answer: expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.lstrip("-").isdigit():
        return int(v)
    raise EtcdError(f"etcd answer: expected an integer, got {v!r}")


def _parse_kv(d: Any) -> KV:
    if not isinstance(d, dict):
        raise EtcdError(f"etcd answer: expected a key-value, got {type(d).__name__}")
    return KV(_unb64(d.get("key")), _unb64(d.get("value")), _int(d.get("create_revision")),
              _int(d.get("mod_revision")), _int(d.get("version")), _int(d.get("lease")))


# -- request builders (proto3 JSON of etcdserverpb messages) -----------------------------------

def op_put(key: bytes, value: bytes, lease: int = 0) -> JSON:
    req: JSON = {"key": b64(key), "value": b64(value)}
    if lease:
        req["lease"] = str(lease)
    return {"request_put": req}


def op_get(key: bytes) -> JSON:
    return {"request_range": {"key": b64(key)}}


def op_delete(key: bytes, prev_kv: bool = False) -> JSON:
    return {"request_delete_range": {"key": b64(key), "prev_kv": prev_kv}}


def cmp_mod(key: bytes, revision: int, result: str = "EQUAL") -> JSON:
    """mod_revision(key) RESULT revision (0 = the key does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": result, "mod_revision": str(revision)}


def cmp_create(key: bytes, revision: int, result: str = "EQUAL") -> JSON:
    return {"key": b64(key), "target": "CREATE", "result": result, "create_revision": str(revision)}


def cmp_version(key: bytes, version: int, result: str = "EQUAL") -> JSON:
    return {"key": b64(key), "target": "VERSION", "result": result, "version": str(version)}


def _raise_for(status: int, body: Any) -> None:
    err = body.get("error") if isinstance(body, dict) else None
    msg = (body.get("message") or err) if isinstance(body, dict) else None
    text = str(msg or body)[:300]
    code = _int(body.get("code")) if isinstance(body, dict) and body.get("code") is not None else 0
    if "compacted" in text:
        raise EtcdCompacted(text)
    if status in (502, 503, 504) or code in (4, 14) or "no leader" in text or "timed out" in text:
        raise EtcdUnavailable(text)
    raise EtcdError(f"etcd: HTTP {status}: {text} (code {code})")


class EtcdClient:
    def __init__(self, endpoints: list[str], *, ca_file: str = "", cert_file: str = "", key_file: str = "",
                 timeout: float = 10.0) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint URL is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._current = 0
        self._ssl: ssl.SSLContext | bool = False
        if any(e.startswith("https://") for e in self.endpoints):
            ctx = ssl.create_default_context(cafile=ca_file or None)
            if cert_file:
                ctx.load_cert_chain(cert_file, key_file or None)
            self._ssl = ctx
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Keep-alive connections are reused; the limit bounds what one process holds open.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, ssl=self._ssl),
                json_serialize=lambda o: msgspec.json.encode(o).decode())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, path: str, body: JSON, *, idempotent: bool = False) -> JSON:
        last: Exception | None = None
        n = len(self.endpoints)
        for attempt in range(n * (2 if idempotent else 1)):
            idx = (self._current + attempt) % n
            url = self.endpoints[idx] + path
            try:
                async with self._http().post(url, data=msgspec.json.encode(body),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    raw = await resp.read()
                    status = resp.status
            except aiohttp.ClientConnectorError as e:
                last = e  # not sent: the next member may take it
                continue
            except (TimeoutError, aiohttp.ClientError) as e:
                if idempotent:
                    last = e
                    continue
                raise EtcdUnavailable(f"etcd {url}: {e or type(e).__name__} (the write may or may not "
                                      "have been applied)") from e
            self._current = idx
            try:
                out = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                raise EtcdError(f"etcd {url}: HTTP {status}: not JSON: {raw[:200]!r}") from None
            if status != 200 or not isinstance(out, dict):
                if status in (502, 503, 504) and idempotent:
                    last = EtcdUnavailable(str(out)[:200])
                    continue
                _raise_for(status, out)
            assert isinstance(out, dict)
            return out
        raise EtcdUnavailable(f"etcd: no member of {','.join(self.endpoints)} answered: {last}")

    @staticmethod
    def _revision(out: JSON) -> int:
        header = out.get("header")
        return _int(header.get("revision")) if isinstance(header, dict) else 0

    async def range(self, key: bytes, range_end: bytes = b"", *, limit: int = 0, revision: int = 0,
                    keys_only: bool = False, count_only: bool = False) -> RangeResult:
        req: JSON = {"key": b64(key)}
        if range_end:
            req["range_end"] = b64(range_end)
        if limit:
            req["limit"] = str(limit)
        if revision:
            req["revision"] = str(revision)
        if keys_only:
            req["keys_only"] = True
        if count_only:
            req["count_only"] = True
        out = await self._post("/v3/kv/range", req, idempotent=True)
        kvs = out.get("kvs") or []
        if not isinstance(kvs, list):
            raise EtcdError("etcd answer: kvs is not a list")
        return RangeResult(self._revision(out), [_parse_kv(k) for k in kvs], bool(out.get("more")),
                           _int(out.get("count")))

    async def txn(self, compare: list[JSON], success: list[JSON], failure: list[JSON] = []) -> TxnResult:
        out = await self._post("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure})
        responses: list[tuple[str, list[KV]]] = []
        for r in out.get("responses") or []:
            if not isinstance(r, dict):
                raise EtcdError("etcd answer: a txn response is not an object")
            if "response_range" in r:
                responses.append(("range", [_parse_kv(k) for k in (r["response_range"] or {}).get("kvs") or []]))
            elif "response_put" in r:
                prev = (r["response_put"] or {}).get("prev_kv")
                responses.append(("put", [_parse_kv(prev)] if prev else []))
            elif "response_delete_range" in r:
                prevs = (r["response_delete_range"] or {}).get("prev_kvs") or []
                responses.append(("delete", [_parse_kv(k) for k in prevs]))
            else:
                responses.append(("other", []))
        return TxnResult(self._revision(out), bool(out.get("succeeded")), responses)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        req = op_put(key, value, lease)["request_put"]
        return self._revision(await self._post("/v3/kv/put", req))

    async def watch(self, key: bytes, range_end: bytes, start_revision: int, *,
                    progress_notify: bool = True, prev_kv: bool = False) -> AsyncIterator[WatchResponse]:
        """Watch responses until the stream breaks (EtcdUnavailable) or etcd cancels it.

        A start revision that etcd has compacted raises EtcdCompacted (the caller relists).
        """
        req: JSON = {"key": b64(key), "range_end": b64(range_end), "start_revision": str(start_revision),
                     "progress_notify": progress_notify, "prev_kv": prev_kv}
        body = msgspec.json.encode({"create_request": req})
        n = len(self.endpoints)
        resp: aiohttp.ClientResponse | None = None
        last: Exception | None = None
        for attempt in range(n):
            idx = (self._current + attempt) % n
            try:
                resp = await self._http().post(self.endpoints[idx] + "/v3/watch", data=body,
                                               timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout))
                self._current = idx
                break
            except aiohttp.ClientError as e:
                last = e
        if resp is None:
            raise EtcdUnavailable(f"etcd watch: no member of {','.join(self.endpoints)} answered: {last}")
        try:
            if resp.status != 200:
                _raise_for(resp.status, msgspec.json.decode(await resp.read()))
            buf = b""
            while True:
                try:
                    chunk = await resp.content.readany()
                except (TimeoutError, aiohttp.ClientError) as e:
                    raise EtcdUnavailable(f"etcd watch stream broke: {e or type(e).__name__}") from e
                if not chunk:
                    raise EtcdUnavailable("etcd watch stream ended")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield self._watch_response(line)
                if len(buf) > 64 << 20:
                    raise EtcdError("etcd watch: a response line over 64 MiB")
        finally:
            resp.close()

    def _watch_response(self, line: bytes) -> WatchResponse:
        try:
            msg = msgspec.json.decode(line)
        except msgspec.DecodeError:
            raise EtcdError(f"etcd watch: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise EtcdError("etcd watch: a response is not an object")
        if "error" in msg:
            _raise_for(500, msg["error"] if isinstance(msg["error"], dict) else msg)
        r = msg.get("result")
        if not isinstance(r, dict):
            raise EtcdError(f"etcd watch: no result: {line[:200]!r}")
        events = []
        for e in r.get("events") or []:
            if not isinstance(e, dict):
                raise EtcdError("etcd watch: an event is not an object")
            events.append(WatchEvent("DELETE" if e.get("type") in ("DELETE", 1) else "PUT", _parse_kv(e.get("kv"))))
        out = WatchResponse(self._revision(r), events, bool(r.get("created")), bool(r.get("canceled")),
                            _int(r.get("compact_revision")), str(r.get("cancel_reason") or ""))
        if out.compact_revision and out.canceled:
            raise EtcdCompacted(f"etcd watch: revision compacted (oldest {out.compact_revision})",
                                out.compact_revision)
        return out

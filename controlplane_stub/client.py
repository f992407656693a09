"""A small async Kubernetes API client for the controllers and node agents.

It speaks only the documented REST wire (list, watch with resume and 410 relist, create, update,
patch, delete), so controllers and agents run unchanged against a real kube-apiserver. It never
imports kproxy or kdns: the control plane and the node programs meet only on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import yaml

log = logging.getLogger("kpc.client")

Obj = dict[str, Any]


class ApiError(Exception):
    """A failed request, carrying the server's meta/v1 Status (reason, code, message)."""

    def __init__(self, code: int, status: Obj) -> None:
        self.code = code
        self.status = status
        self.reason = str(status.get("reason", ""))
        super().__init__(f"{code} {self.reason}: {status.get('message', '')}")


# (group/version, plural, namespaced) for the resources the control plane uses.
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "pods": ("v1", "pods", True),
    "services": ("v1", "services", True),
    "endpoints": ("v1", "endpoints", True),
    "nodes": ("v1", "nodes", False),
    "namespaces": ("v1", "namespaces", False),
    "events": ("v1", "events", True),
    "endpointslices": ("discovery.k8s.io/v1", "endpointslices", True),
    "deployments": ("apps/v1", "deployments", True),
    "replicasets": ("apps/v1", "replicasets", True),
    "leases": ("coordination.k8s.io/v1", "leases", True),
}


def path(resource: str, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
    """The REST path of a resource collection or object, e.g. /api/v1/namespaces/ns/pods/p/status."""
    gv, plural, namespaced = RESOURCES[resource]
    base = "/api/v1" if gv == "v1" else f"/apis/{gv}"
    if namespaced and namespace:
        base += f"/namespaces/{quote(namespace)}"
    base += f"/{plural}"
    if name:
        base += f"/{quote(name)}"
    if sub:
        base += f"/{sub}"
    return base


def obj_path(resource: str, obj: Obj, sub: str = "") -> str:
    md = obj["metadata"]
    return path(resource, md.get("namespace"), md["name"], sub)


@dataclass
class Config:
    """What a kubeconfig gives a client: where the server is and how to trust and authenticate."""

    server: str
    token: str = ""
    ca_file: str = ""
    insecure: bool = False
    cert_file: str = ""
    key_file: str = ""
    # Inline kubeconfig data (*-data) stays in memory: nothing is written where it could be left.
    ca_data: bytes = b""
    cert_data: bytes = b""
    key_data: bytes = b""

    @staticmethod
    def from_kubeconfig(file: str | Path) -> Config:
        """Reads the current context of a kubeconfig file (token or client-cert auth)."""
        p = Path(file)
        try:
            doc = yaml.safe_load(p.read_text())
        except OSError as e:
            raise ValueError(f"--kubeconfig {p}: cannot read: {e}") from e
        ctx_name = doc.get("current-context") or (doc.get("contexts") or [{}])[0].get("name")
        ctx = next((c["context"] for c in doc.get("contexts", []) if c.get("name") == ctx_name), None)
        if ctx is None:
            raise ValueError(f"--kubeconfig {p}: current-context {ctx_name!r} not found under contexts")
        cluster = next((c["cluster"] for c in doc.get("clusters", []) if c["name"] == ctx["cluster"]), None)
        user = next((u.get("user") or {} for u in doc.get("users", []) if u["name"] == ctx.get("user")), {})
        if cluster is None:
            raise ValueError(f"--kubeconfig {p}: cluster {ctx['cluster']!r} not found under clusters")

        def data(key: str, src: dict[str, Any]) -> bytes:
            return base64.b64decode(src[key]) if src.get(key) else b""

        def file(data_key: str, file_key: str, src: dict[str, Any]) -> str:
            f = "" if src.get(data_key) else src.get(file_key, "")
            return str((p.parent / f).resolve()) if f else ""

        token = user.get("token", "")
        if not token and user.get("tokenFile"):
            token = (p.parent / user["tokenFile"]).read_text().strip()
        return Config(
            server=cluster["server"].rstrip("/"),
            token=token,
            ca_file=file("certificate-authority-data", "certificate-authority", cluster),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            cert_file=file("client-certificate-data", "client-certificate", user),
            key_file=file("client-key-data", "client-key", user),
            ca_data=data("certificate-authority-data", cluster),
            cert_data=data("client-certificate-data", user),
            key_data=data("client-key-data", user),
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(
                cafile=self.ca_file or None, cadata=self.ca_data.decode("ascii") if self.ca_data else None
            )
        if self.cert_file or self.cert_data:
            self._load_cert_chain(ctx)
        return ctx

    def _load_cert_chain(self, ctx: ssl.SSLContext) -> None:
        # ssl loads a certificate chain only from files: inline data goes through a private
        # temporary directory removed right after loading (the key file is the owner's only).
        with tempfile.TemporaryDirectory(prefix="kpc-tls-") as tmp:
            cert, key = self.cert_file, self.key_file
            if self.cert_data:
                cert = os.path.join(tmp, "client.crt")
                Path(cert).write_bytes(self.cert_data)
            if self.key_data:
                key = os.path.join(tmp, "client.key")
                with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
                    fh.write(self.key_data)
            ctx.load_cert_chain(cert, key or None)


RETRYABLE = {429, 500, 502, 503, 504}


class Client:
    """One aiohttp session to one API server. Writes retry transient failures with backoff."""

    def __init__(self, config: Config, *, user_agent: str = "kproxy-cluster", qps_burst: int = 0) -> None:
        self.config = config
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0  # API write requests sent (the bench reports the rate)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": self.user_agent, "Accept": "application/json"}
            if self.config.token:
                headers["Authorization"] = f"Bearer {self.config.token}"
            conn = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=64)
            self._session = aiohttp.ClientSession(
                self.config.server, headers=headers, connector=conn, json_serialize=json.dumps
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        attempts: int = 6,
    ) -> Obj:
        delay = 0.1
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        if method != "GET":
            self.writes += 1
        for attempt in range(attempts):
            try:
                async with self.session().request(
                    method,
                    url,
                    data=data,
                    params=params,
                    headers={"Content-Type": content_type} if data is not None else None,
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as resp:
                    raw = await resp.read()
                    doc: Obj = json.loads(raw) if raw else {}
                    if resp.status < 400:
                        return doc
                    if resp.status in RETRYABLE and attempt + 1 < attempts:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                    if doc.get("kind") != "Status":
                        doc = {
                            "kind": "Status",
                            "code": resp.status,
                            "message": raw[:200].decode(errors="replace"),
                        }
                    raise ApiError(resp.status, doc)
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                if attempt + 1 >= attempts:
                    raise ApiError(
                        503, {"reason": "ServiceUnavailable", "message": f"{method} {url}: {e!r}"}
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def get(self, url: str, params: dict[str, str] | None = None) -> Obj:
        return await self.request("GET", url, params=params)

    async def create(self, url: str, obj: Obj) -> Obj:
        return await self.request("POST", url, body=obj)

    async def update(self, url: str, obj: Obj) -> Obj:
        return await self.request("PUT", url, body=obj)

    async def patch(self, url: str, patch: Any, kind: str = "merge") -> Obj:
        ct = {
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
            "strategic": "application/strategic-merge-patch+json",
        }[kind]
        # A patch without metadata.resourceVersion cannot be stale: the real server retries it on a
        # write race internally; a server that answers 409 anyway gets it re-sent.
        pinned = isinstance(patch, dict) and bool((patch.get("metadata") or {}).get("resourceVersion"))
        for attempt in range(8):
            try:
                return await self.request("PATCH", url, body=patch, content_type=ct)
            except ApiError as e:
                if e.code != 409 or pinned or attempt == 7:
                    raise
                await asyncio.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    async def delete(
        self, url: str, grace_seconds: int | None = None, uid: str = "", propagation: str = ""
    ) -> Obj | None:
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation:
            body["propagationPolicy"] = propagation
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        if uid:
            body["preconditions"] = {"uid": uid}
        for attempt in range(6):
            try:
                return await self.request("DELETE", url, body=body)
            except ApiError as e:
                if e.code == 404:
                    return None
                # Without a precondition a delete cannot be stale; a 409 is a server-side race
                # (e.g. its cascade to dependents), so try again.
                if e.code != 409 or uid or attempt == 5:
                    raise
                await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")

    async def update_with_retry(
        self, url: str, mutate: Callable[[Obj], bool], attempts: int = 8
    ) -> Obj | None:
        """GET, mutate (returns False when nothing needs writing), PUT; again on 409 Conflict."""
        for _ in range(attempts):
            try:
                cur = await self.get(url)
            except ApiError as e:
                if e.code == 404:
                    return None
                raise
            if not mutate(cur):
                return cur
            try:
                return await self.update(url, cur)
            except ApiError as e:
                if e.code != 409:
                    raise
                await asyncio.sleep(random.uniform(0.01, 0.1))
        raise ApiError(
            409, {"reason": "Conflict", "message": f"{url}: still conflicting after {attempts} tries"}
        )

    async def list(
        self, url: str, params: dict[str, str] | None = None, page: int = 500
    ) -> tuple[list[Obj], str]:
        """All items (paginated) and the list's resourceVersion."""
        items: list[Obj] = []
        cont = ""
        while True:
            q = dict(params or {})
            q["limit"] = str(page)
            if cont:
                q["continue"] = cont
            doc = await self.get(url, q)
            items.extend(doc.get("items") or [])
            md = doc.get("metadata") or {}
            cont = md.get("continue") or ""
            if not cont:
                return items, str(md.get("resourceVersion", ""))

    async def watch(
        self,
        url: str,
        resource_version: str,
        params: dict[str, str] | None = None,
        timeout_seconds: int = 300,
    ) -> AsyncIterator[Obj]:
        """Watch events (dicts with type and object) from resource_version until the server closes."""
        q = dict(params or {})
        q.update(
            watch="true",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        async with self.session().get(
            url + "?" + urlencode(q),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_seconds + 30),
        ) as resp:
            if resp.status >= 400:
                raw = await resp.read()
                try:
                    doc = json.loads(raw)
                except ValueError:
                    doc = {"message": raw[:200].decode(errors="replace")}
                raise ApiError(resp.status, doc)
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)


Handler = Callable[[str, Obj, Obj | None], Awaitable[None] | None]


def _older(rv: Any, than: Any) -> bool:
    """True when both versions are numeric and rv < than (our server's are etcd-like revisions;
    opaque ones are never compared)."""
    a, b = str(rv or ""), str(than or "")
    return a.isdigit() and b.isdigit() and int(a) < int(b)


def key_of(obj: Obj) -> str:
    md = obj["metadata"]
    ns = md.get("namespace")
    return f"{ns}/{md['name']}" if ns else str(md["name"])


class Informer:
    """List+watch one resource into a cache and tell handlers (event, new, old) about every change.

    Lists once, then watches from the list's resourceVersion (bookmarks advance it); on 410 Gone it
    relists and synthesizes the differences; on a dropped connection it resumes from the last seen
    version with capped, jittered backoff.
    """

    def __init__(
        self,
        client: Client,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> None:
        self.client = client
        self.resource = resource
        self.url = path(resource, namespace)
        self.params: dict[str, str] = {}
        if label_selector:
            self.params["labelSelector"] = label_selector
        if field_selector:
            self.params["fieldSelector"] = field_selector
        self.cache: dict[str, Obj] = {}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self.rv = ""
        self.relists = 0
        self.tombstones: dict[str, str] = {}

    async def assume(self, obj: Obj) -> None:
        """Puts the object a write returned into the cache at once, so that a sync that runs
        before the watch delivers it does not act twice (the upstream controllers' "expectations")."""
        k = key_of(obj)
        prev = self.cache.get(k)
        if prev is not None and _older(
            obj["metadata"].get("resourceVersion"), prev["metadata"].get("resourceVersion")
        ):
            return
        self.cache[k] = obj
        await self._emit("ADDED" if prev is None else "MODIFIED", obj, prev)

    async def assume_deleted(self, obj: Obj) -> None:
        k = key_of(obj)
        uid = obj["metadata"].get("uid", "")
        if uid:
            self.tombstones[uid] = obj["metadata"].get("resourceVersion", "")
        prev = self.cache.pop(k, None)
        if prev is not None:
            await self._emit("DELETED", prev, prev)

    def add_handler(self, h: Handler) -> None:
        self.handlers.append(h)

    async def _emit(self, event: str, new: Obj, old: Obj | None) -> None:
        for h in self.handlers:
            r = h(event, new, old)
            if r is not None:
                await r

    async def _relist(self) -> None:
        items, rv = await self.client.list(self.url, self.params)
        fresh = {key_of(o): o for o in items}
        old_cache = self.cache
        self.cache = fresh
        self.tombstones.clear()
        self.rv = rv
        self.relists += 1
        for k, o in fresh.items():
            prev = old_cache.get(k)
            if prev is None:
                await self._emit("ADDED", o, None)
            elif prev["metadata"].get("resourceVersion") != o["metadata"].get("resourceVersion"):
                await self._emit("MODIFIED", o, prev)
        for k, o in old_cache.items():
            if k not in fresh:
                await self._emit("DELETED", o, o)
        self.synced.set()

    async def run(self) -> None:
        backoff = 0.2
        need_list = not self.rv  # a preset rv resumes a watch without listing first
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                async for ev in self.client.watch(self.url, self.rv, self.params):
                    backoff = 0.2
                    typ, obj = ev.get("type"), ev.get("object") or {}
                    if typ == "ERROR":
                        if obj.get("code") == 410:
                            need_list = True
                            break
                        raise ApiError(int(obj.get("code", 500)), obj)
                    rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        self.rv = rv
                    if typ == "BOOKMARK":
                        continue
                    k = key_of(obj)
                    uid = (obj.get("metadata") or {}).get("uid", "")
                    if typ == "DELETED":
                        if self.tombstones.pop(uid, None) is not None and k not in self.cache:
                            continue  # already assumed deleted
                        prev = self.cache.pop(k, None)
                        await self._emit("DELETED", obj, prev)
                    else:
                        if uid in self.tombstones:
                            continue  # a late event for an object this client deleted
                        prev = self.cache.get(k)
                        if prev is not None and _older(rv, prev["metadata"].get("resourceVersion")):
                            continue  # the cache already holds a newer, assumed, version
                        self.cache[k] = obj
                        await self._emit("ADDED" if prev is None else "MODIFIED", obj, prev)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.code == 410:
                    need_list = True
                    continue
                log.warning("informer resource=%s error=%s", self.resource, e)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                log.info("informer resource=%s watch dropped=%r; resuming rv=%s", self.resource, e, self.rv)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 5.0)


class WorkQueue:
    """Deduplicating key queue (client-go's workqueue semantics): a key queued many times while
    waiting is processed once, and never by two workers at a time; a key added while it is being
    processed is processed again afterwards."""

    def __init__(self) -> None:
        self._q: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._delayed: dict[str, asyncio.TimerHandle] = {}

    def add(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._q.put_nowait(key)

    def add_after(self, key: str, seconds: float) -> None:
        if key in self._delayed:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._delayed.pop(key, None)
            self.add(key)

        self._delayed[key] = loop.call_later(seconds, fire)

    async def get(self) -> str:
        key = await self._q.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return self._q.qsize()


async def run_worker(
    name: str,
    queue: WorkQueue,
    sync: Callable[[str], Awaitable[None]],
    failures: dict[str, int] | None = None,
) -> None:
    """Processes keys forever; a failed sync is retried with backoff instead of killing the loop."""
    failures = {} if failures is None else failures
    while True:
        key = await queue.get()
        try:
            await sync(key)
            failures.pop(key, None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one bad object must not stop a controller
            n = failures[key] = failures.get(key, 0) + 1
            level = logging.DEBUG if isinstance(e, ApiError) and e.code == 409 else logging.WARNING
            log.log(level, "controller=%s key=%s error=%r retry=%d", name, key, e, n)
            queue.add_after(key, min(0.05 * 2**n, 10.0))
        finally:
            queue.done(key)


class EventRecorder:
    """Writes core/v1 Events about objects (what `kubectl describe` lists under Events), fire and
    forget: an Event that fails to be written is only logged, it never fails the caller."""

    def __init__(self, client: Client, component: str, host: str = "") -> None:
        self.client = client
        self.component = component
        self.host = host
        self._tasks: set[asyncio.Task[None]] = set()

    def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        md = obj["metadata"]
        ns = md.get("namespace") or "default"
        from datetime import datetime, timezone

        t = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        ev = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named as client-go's recorder names them: OBJECT.UNIQUE-HEX.
            "metadata": {"name": f"{md['name']}.{random.getrandbits(64):016x}", "namespace": ns},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", "v1"),
                "kind": obj.get("kind", ""),
                "namespace": ns,
                "name": md["name"],
                "uid": md.get("uid", ""),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "count": 1,
            "firstTimestamp": t,
            "lastTimestamp": t,
            "source": {"component": self.component, **({"host": self.host} if self.host else {})},
            "reportingComponent": self.component,
            "reportingInstance": self.host or self.component,
        }

        async def send() -> None:
            try:
                await self.client.create(path("events", ns), ev)
            except ApiError as e:
                log.debug("event %s/%s %s not written: %s", ns, md["name"], reason, e)

        t_ = asyncio.get_running_loop().create_task(send())
        self._tasks.add(t_)
        t_.add_done_callback(self._tasks.discard)

"""The control plane's side of the one Kubernetes client (kproxy.kube): controllers and node agents
read and write whole objects as dicts.

kproxy.kube does the wire (kubeconfig, TLS, HTTP/1.1, list+watch with resume, bookmarks and 410
relist); this adds what only controllers need: the resource path table, JSON dicts, retries of
transient failures and conflicts, an informer cache that takes assumed writes (the upstream
controllers' "expectations"), a work queue and an Event recorder. It speaks only the documented
REST wire, so controllers and agents run unchanged against a real kube-apiserver; sharing the
client library does not make the control plane and the node programs meet anywhere but the wire.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import msgspec

from kproxy.kube.client import ApiClient, ApiError
from kproxy.kube.kubeconfig import ClusterAccess, load_kubeconfig
from kproxy.kube.reflector import Backoff, Reflector
from kproxy.kube.types import Status

__all__ = ["ApiError", "ClusterAccess", "load_kubeconfig", "Client", "Informer", "WorkQueue", "EventRecorder"]


class Config:
    """The former name, for callers not yet moved: Config.from_kubeconfig(path) is
    kproxy.kube's load_kubeconfig(path) (a ClusterAccess)."""

    from_kubeconfig = staticmethod(load_kubeconfig)


log = logging.getLogger("kpc.client")

Obj = dict[str, Any]


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
    "daemonsets": ("apps/v1", "daemonsets", True),
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


RETRYABLE = {429, 500, 502, 503, 504}
_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


def _error(code: int, reason: str, message: str) -> ApiError:
    return ApiError(Status(status="Failure", code=code, reason=reason, message=message))


class Client:
    """Dict-in, dict-out requests over one kproxy.kube.ApiClient. Writes retry transient failures
    with backoff. Keeps up to 64 requests in flight and their connections alive (a controller
    writes all the time; a new TLS handshake per request would cost more than the request)."""

    def __init__(self, access: ClusterAccess, *, user_agent: str = "kproxy-cluster") -> None:
        self.access = access
        self.user_agent = user_agent
        self.api = ApiClient(access, user_agent=user_agent, request_timeout=30.0, max_idle=64,
                             idle_seconds=30.0, max_connections=64)
        self.writes = 0  # API write requests sent (the bench reports the rate)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.api.close()

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
        data = None if body is None else (body if isinstance(body, bytes) else msgspec.json.encode(body))
        if method != "GET":
            self.writes += 1
        for attempt in range(attempts):
            try:
                raw = await self.api.request(method, url, params, data, content_type)
            except ApiError as e:
                if e.code not in RETRYABLE or attempt + 1 >= attempts:
                    raise
            except (TimeoutError, OSError) as e:  # OSError: ConnectionError too
                if attempt + 1 >= attempts:
                    raise _error(503, "ServiceUnavailable", f"{method} {url}: {e!r}") from e
            else:
                try:
                    doc: Obj = msgspec.json.decode(raw) if raw else {}
                except msgspec.DecodeError as e:  # answered, so not sent again (a write happened)
                    raise _error(500, "InternalError", f"{method} {url}: the answer is not JSON: {e}") from e
                return doc
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
        ct = _PATCH_TYPES[kind]
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
        raise _error(409, "Conflict", f"{url}: still conflicting after {attempts} tries")

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
        q.update(resourceVersion=resource_version, allowWatchBookmarks="true", timeoutSeconds=str(timeout_seconds))
        async for line in self.api.watch(url, q, read_timeout=timeout_seconds + 30):
            yield msgspec.json.decode(line)


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


def _keyable(obj: Obj) -> bool:
    md = obj.get("metadata")
    return isinstance(md, dict) and isinstance(md.get("name"), str) and bool(md["name"])


class Informer:
    """One resource in a cache, fed by kproxy.kube's Reflector (list, then watch from the list's
    resourceVersion with bookmarks; 410 Gone relists, a dropped watch resumes with capped,
    jittered backoff); handlers hear (event, new, old) for every change, relists as the
    differences. Writes this client made can be put into the cache at once (assume)."""

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
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.cache: dict[str, Obj] = {}
        self.handlers: list[Handler] = []
        self.synced = asyncio.Event()
        self.rv = ""  # set before run(): watch from there without listing first
        self.tombstones: dict[str, str] = {}
        self._reflector: Reflector[dict[Any, Any]] | None = None

    @property
    def relists(self) -> int:
        return self._reflector.lists if self._reflector is not None else 0

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

    # ReflectorStore[dict]: the Reflector awaits these.
    async def replace(self, items: list[Obj], resource_version: str) -> None:
        fresh = {key_of(o): o for o in items if _keyable(o)}
        old_cache = self.cache
        self.cache = fresh
        self.tombstones.clear()
        self.rv = resource_version
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

    async def apply(self, typ: str, obj: Obj) -> None:
        if not _keyable(obj):
            log.warning("informer resource=%s skipping an object without metadata.name", self.resource)
            return
        md = obj["metadata"]
        rv = md.get("resourceVersion")
        if rv:
            self.rv = str(rv)
        k = key_of(obj)
        uid = md.get("uid", "")
        if typ == "DELETED":
            if self.tombstones.pop(uid, None) is not None and k not in self.cache:
                return  # already assumed deleted
            prev = self.cache.pop(k, None)
            await self._emit("DELETED", obj, prev)
            return
        if uid in self.tombstones:
            return  # a late event for an object this client deleted
        prev = self.cache.get(k)
        if prev is not None and _older(rv, prev["metadata"].get("resourceVersion")):
            return  # the cache already holds a newer, assumed, version
        self.cache[k] = obj
        await self._emit("ADDED" if prev is None else "MODIFIED", obj, prev)

    async def run(self) -> None:
        # Controllers want to be back soon after an API server restart: 0.2 s doubling to 5 s.
        self._reflector = Reflector(
            self.client.api, self.url, dict, self, label_selector=self.label_selector,
            field_selector=self.field_selector, name=self.resource, resume_from=self.rv,
            backoff=Backoff(initial=0.2, cap=5.0, jitter=0.5, reset_after=30.0),
        )
        await self._reflector.run()


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

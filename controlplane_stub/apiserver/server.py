"""HTTP layer: routing of Kubernetes REST paths, authentication/authorization, lists and discovery."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from ..store.base import Compacted, FutureRevision, Obj, Store
from . import bodies, discovery, limits, podio, rbac, rbac_escalation, semantics, serviceaccounts
from .errors import StatusError, bad_request, gone
from .metrics import APIMetrics
from .pki import User
from .registry import Registry
from .resources import BY_GROUP_VERSION, BY_ID, RESOURCES, Resource
from .satokens import TokenAuthority
from .selectors import Matcher, object_matcher
from .watch import WatchHub, WatchRequest

log = logging.getLogger("kproxy.apiserver")
_encode = msgspec.json.encode
_decode = msgspec.json.decode

_ANONYMOUS_PATHS = ("/healthz", "/livez", "/readyz", "/version")
_READ_METHODS = ("GET", "HEAD")
_PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
                "application/strategic-merge-patch+json", "application/apply-patch+yaml")


_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def _no_such_path() -> StatusError:
    """kube-apiserver's 404 for a path it does not serve."""
    return StatusError(404, "NotFound", "the server could not find the requested resource")


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(obj), status=status, content_type="application/json")


def status_response(err: StatusError) -> web.Response:
    resp = json_response(err.to_status(), err.code)
    if err.retry_after:
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def _is_watch(request: web.BaseRequest) -> bool:
    if request.query.get("watch") in ("true", "1"):
        return True
    parts = request.path.split("/", 5)  # "", api, v1, watch | "", apis, group, version, watch
    return ((len(parts) > 3 and parts[1] == "api" and parts[3] == "watch")
            or (len(parts) > 4 and parts[1] == "apis" and parts[4] == "watch"))


@dataclass(slots=True)
class Target:
    res: Resource
    namespace: str
    name: str
    sub: str
    watch_path: bool


class APIServer:
    def __init__(self, store: Store, registry: Registry, users: dict[str, User], *, bookmark_interval: float = 60.0,
                 min_request_timeout: float = 1800.0, external_address: str = "",
                 send_timeout: float = limits.DEFAULT_SEND_TIMEOUT,
                 max_requests_inflight: int = limits.DEFAULT_MAX_REQUESTS_INFLIGHT,
                 max_mutating_requests_inflight: int = limits.DEFAULT_MAX_MUTATING_REQUESTS_INFLIGHT,
                 connections: limits.ConnectionGuard | None = None,
                 request_timeout: float = limits.DEFAULT_REQUEST_TIMEOUT,
                 token_authority: TokenAuthority | None = None) -> None:
        self.store = store
        # ServiceAccount tokens (serviceaccounts.py): None = only the token file's users.
        self.token_authority = token_authority
        self.registry = registry
        self.users = users
        self.send_timeout = send_timeout
        self.request_timeout = request_timeout
        self.inflight = limits.InflightLimiter(max_requests_inflight, max_mutating_requests_inflight)
        self.connections = connections
        self.metrics = APIMetrics(lambda: self.store.revision, lambda: self.watches.active,
                                  lambda mutating: self.inflight.current[int(mutating)],
                                  pumped=lambda: self.watches.pumped)
        self.watches = WatchHub(store, bookmark_interval, min_request_timeout, send_timeout=send_timeout,
                                on_slow_watcher=lambda res: self.metrics.terminated_watchers.labels(res).inc())
        self.external_address = external_address
        self.ready = False
        self.pod_io: podio.PodIO | None = None  # pods/log, exec: set when there are node agents to call
        # RBAC (rbac.py): the bootstrap policy, the read-only identity's reads included.
        self.rbac = rbac.StoredPolicy(store, ((r.group, r.plural) for r in RESOURCES))
        # _route's fixed paths: GET and HEAD ones, and the POST-only reviews (under /apis/).
        self._gets: dict[str, _Handler] = {
            "/healthz": self._health, "/livez": self._health, "/readyz": self._health, "/version": self._version,
            "/metrics": self._metrics, "/openapi/v2": self._openapi_v2, "/openapi/v3": self._openapi_v3}
        self._reviews: dict[str, _Handler] = {
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews": self._access_review,
            "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews": self._rules_review,
            "/apis/authentication.k8s.io/v1/selfsubjectreviews": self._whoami}

    def server(self, **kwargs: Any) -> web.Server:
        """aiohttp's low-level server with this class's own routing (_route) in place of an
        Application: for 16 fixed routes, the Application's router, middleware chain and Request
        subclass cost ~17 us of every request (51.5 vs 34.5 us of server CPU per request,
        bench/bench_apiserver_http.py)."""
        loop = asyncio.get_running_loop()

        def request_factory(message: Any, payload: Any, protocol: Any, writer: Any,
                            task: asyncio.Task[None]) -> web.BaseRequest:
            # kube-apiserver's 3 MiB request limit (bodies.py) already while reading: no client makes
            # this server buffer more than that per request (aiohttp's own default is 1 MiB).
            return web.BaseRequest(message, payload, protocol, writer, task, loop,
                                   client_max_size=bodies.MAX_REQUEST_BYTES)

        return web.Server(self._handle, request_factory=request_factory, **kwargs)  # kwargs: RequestHandler's

    async def shutdown(self) -> None:
        """Ends the watch streams and pod I/O (before the server waits for its handlers to finish)."""
        self.watches.stop()
        if self.pod_io is not None:
            await self.pod_io.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        return await self._middleware(request, self._route)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        """The routes: /api and /apis trees (any method), the reviews (POST), health, version,
        metrics and OpenAPI (GET and HEAD; another method is 405 with Allow, as aiohttp's router)."""
        path = request.path
        if path.startswith(("/api/", "/apis/")):
            if request.method == "POST":
                review = self._reviews.get(path)
                if review is not None:
                    return await review(request)
            return await self._dispatch(request)
        if path == "/api":
            return await self._api_root(request)
        if path == "/apis":
            return await self._apis_root(request)
        handler = self._gets.get(path)
        if handler is None:
            if path.startswith(("/healthz/", "/livez/", "/readyz/")):
                handler = self._health
            elif path.startswith("/openapi/v3/"):
                handler = self._openapi_v3_gv
            else:
                raise _no_such_path()
        if request.method not in _READ_METHODS:
            raise web.HTTPMethodNotAllowed(request.method, _READ_METHODS)
        return await handler(request)

    # -- middleware: auth and Status errors ----------------------------------------------------

    async def _middleware(self, request: web.BaseRequest, handler: _Handler) -> web.StreamResponse:
        started = time.monotonic()
        if self.connections is not None:
            self.connections.request_started(request.protocol)
        counted: bool | None = None  # None: not counted; else whether it holds a mutating slot
        try:
            if not request.path.startswith(_ANONYMOUS_PATHS):
                user = self._authenticate(request)
                request["user"] = user
                counted = self._admit(request, user)
                if request.body_exists:
                    await self._read_body_in_time(request)
            resp: web.StreamResponse = await handler(request)
        except StatusError as e:
            resp = status_response(e)
        except web.HTTPException:
            raise
        except Exception as e:
            log.exception("event=internal_error method=%s path=%s", request.method, request.path)
            resp = status_response(StatusError(500, "InternalError", f"Internal error occurred: {e}"))
        finally:
            if counted is not None:
                self.inflight.release(counted)
        metric = request.get("metric")
        if metric is not None:
            verb, resource, sub = metric
            # Watches are long-running: counted, but their duration is not request latency.
            self.metrics.observe(verb, resource, sub, resp.status,
                                 0.0 if verb == "WATCH" else time.monotonic() - started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("method=%s path=%s code=%s ms=%.1f", request.method, request.path_qs, resp.status,
                      (time.monotonic() - started) * 1000)
        return resp

    async def _read_body_in_time(self, request: web.BaseRequest) -> None:
        """Reads (and caches) the body within --request-timeout: a client that sends it slowly, or
        never, would hold its in-flight slot and connection for ever (upstream answers 504 after
        --request-timeout too). Handlers' later request.read() returns the cached bytes."""
        try:
            if request.content.is_eof():  # all of it already arrived (most bodies): no wait, no timer
                await request.read()
            else:
                async with asyncio.timeout(self.request_timeout):
                    await request.read()
        except web.HTTPRequestEntityTooLarge:  # aiohttp's plain-text 413: answer a Status
            raise bodies.too_large(request.content_length or bodies.MAX_REQUEST_BYTES + 1) from None
        except TimeoutError:
            raise StatusError(504, "Timeout", "Timeout: request did not complete within the allotted timeout "
                              f"({self.request_timeout:g} s) while reading its body") from None

    def _admit(self, request: web.BaseRequest, user: User) -> bool | None:
        """Takes an in-flight slot (429 when none is free); None for requests that hold none.

        As upstream's WithMaxInFlightLimit: watches are long-running and not counted, and
        system:masters is served even when the cap is reached, without taking a slot.
        """
        # Long-running requests (watches, and logs/exec as upstream's) hold no in-flight slot.
        if (request.method == "GET" and _is_watch(request)) or podio.match(request.path):
            return None
        mutating = request.method not in _READ_METHODS
        if self.inflight.acquire(mutating):
            return mutating
        if user.is_admin:
            return None
        self.metrics.rejected(mutating)
        raise limits.too_many_requests()

    def _authenticate(self, request: web.BaseRequest) -> User:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        user = self.users.get(token) if scheme.lower() == "bearer" else None
        if user is None and scheme.lower() == "bearer" and self.token_authority is not None:
            user = serviceaccounts.authenticate(self.store, self.token_authority, token)
        if user is None:
            raise StatusError(401, "Unauthorized", "Unauthorized")
        return user

    def _authorize(self, request: web.BaseRequest, verb: str, t: Target) -> None:
        request["metric"] = (verb.upper(), t.res.id, t.sub)
        user: User = request["user"]
        # RBAC as kube-apiserver: system:masters is cluster-admin, the read-only identity is `view`
        # plus reads of what is served here, never Secrets (their values are credentials).
        a = rbac.Attributes(user.name, frozenset(user.groups), verb, t.namespace, t.res.group, t.res.plural,
                            t.sub, t.name)
        if self.rbac.current().authorize(a)[0]:
            return
        what = f'{t.res.plural}/{t.sub}' if t.sub else t.res.plural
        obj = f'{what} "{t.name}"' if t.name else what
        where = f' in the namespace "{t.namespace}"' if t.namespace else ""
        raise StatusError(403, "Forbidden", f'{obj} is forbidden: User "{user.name}" cannot {verb} resource '
                          f'"{what}" in API group "{t.res.group}"{where}', kind=t.res.plural, name=t.name,
                          group=t.res.group)

    async def _access_review(self, request: web.BaseRequest) -> web.Response:
        """kubectl auth can-i: a SelfSubjectAccessReview answered by the RBAC policy."""
        return await self._review(request, "SelfSubjectAccessReview", rbac.access_review)

    async def _rules_review(self, request: web.BaseRequest) -> web.Response:
        """kubectl auth can-i --list: a SelfSubjectRulesReview, the user's rules in a namespace."""
        return await self._review(request, "SelfSubjectRulesReview", rbac_escalation.rules_review)

    async def _review(self, request: web.BaseRequest, kind: str,
                      answer: Callable[[rbac.Policy, str, frozenset[str], object], dict[str, Any]]) -> web.Response:
        user: User = request["user"]
        # kubectl sends it as protobuf; the body checks are the ones every create gets.
        body = bodies.decode_request(await request.read(), request.content_type).obj
        try:
            review = answer(self.rbac.current(), user.name, frozenset(user.groups), body)
        except rbac.RBACError as e:
            raise bad_request(f"{kind}: {e}") from None
        return json_response(review, status=201)

    def _no_escalation(self, request: web.BaseRequest, t: Target, obj: Any) -> None:
        """403 when a Role or binding written by this user would grant what it does not hold
        (rbac_escalation.py: upstream's escalate/bind checks)."""
        if t.res.group != rbac.API_GROUP or not isinstance(obj, dict):
            return
        user: User = request["user"]
        why = rbac_escalation.check_write(self.rbac.current(), user.name, frozenset(user.groups), t.res.plural,
                                          t.namespace, obj)
        if why:
            name = t.name or str((obj.get("metadata") or {}).get("name", ""))
            raise StatusError(403, "Forbidden", f'{t.res.plural}.{t.res.group} "{name}" is forbidden: {why}',
                              kind=t.res.plural, name=name, group=t.res.group)

    async def _whoami(self, request: web.BaseRequest) -> web.Response:
        """kubectl auth whoami: a SelfSubjectReview with the requesting user's attributes."""
        user: User = request["user"]
        bodies.decode_request(await request.read(), request.content_type)  # the usual body checks
        groups = list(user.groups) + ([] if rbac.AUTHENTICATED in user.groups else [rbac.AUTHENTICATED])
        info: dict[str, Any] = {"username": user.name, "groups": groups}
        if user.uid:
            info["uid"] = user.uid
        return json_response({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
                              "metadata": {"creationTimestamp": None}, "status": {"userInfo": info}}, status=201)

    # -- unversioned endpoints -----------------------------------------------------------------

    async def _health(self, request: web.BaseRequest) -> web.Response:
        if request.path.startswith("/readyz") and not self.ready:
            return web.Response(text="[-]bootstrap failed: not ready\nreadyz check failed", status=500)
        if "verbose" in request.query:
            return web.Response(text=f"[+]ping ok\n[+]etcd ok\n{request.path.strip('/')} check passed\n")
        return web.Response(text="ok")

    async def _metrics(self, request: web.BaseRequest) -> web.Response:
        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _version(self, request: web.BaseRequest) -> web.Response:
        return json_response(discovery.version())

    async def _openapi_v2(self, request: web.BaseRequest) -> web.Response:
        if "application/com.github.proto-openapi.spec.v2" in request.headers.get("Accept", ""):
            pb = semantics.openapi_v2_protobuf()
            if pb is not None:
                # kube-openapi answers the protobuf with application/octet-stream: the requested type
                # has an "@" that Go's mime.ParseMediaType rejects (kubectl 1.20 fails on it).
                return web.Response(body=pb, headers={"Content-Type": "application/octet-stream"})
        return json_response(semantics.openapi_v2())

    async def _openapi_v3(self, request: web.BaseRequest) -> web.Response:
        idx = semantics.openapi_v3_index()
        if idx is None:
            raise _no_such_path()
        return json_response(idx)

    async def _openapi_v3_gv(self, request: web.BaseRequest) -> web.Response:
        doc = semantics.openapi_v3_group(request.path[len("/openapi/v3/"):])
        if doc is None:
            raise _no_such_path()
        return json_response(doc)

    async def _api_root(self, request: web.BaseRequest) -> web.Response:
        if discovery.wants_aggregated(request.headers.get("Accept", "")):
            return self._aggregated(True)
        return json_response(discovery.api_versions(self.external_address))

    async def _apis_root(self, request: web.BaseRequest) -> web.Response:
        if discovery.wants_aggregated(request.headers.get("Accept", "")):
            return self._aggregated(False)
        return json_response(discovery.api_group_list())

    @staticmethod
    def _aggregated(core: bool) -> web.Response:
        return web.Response(body=_encode(discovery.aggregated(core)), headers={"Content-Type": discovery.AGGREGATED_V2})

    # -- resource paths ------------------------------------------------------------------------

    def _parse(self, path: str) -> Target | web.Response:
        parts = [p for p in path.split("/") if p]
        if parts[0] == "api":
            if len(parts) == 2:
                return json_response(discovery.resource_list("", parts[1])) if parts[1] == "v1" else self._404()
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) == 2:
                g = discovery.api_group(parts[1])
                return json_response(g) if g else self._404()
            group, version, rest = parts[1], parts[2], parts[3:]
            if not rest:
                rl = discovery.resource_list(group, version)
                return json_response(rl) if rl else self._404()
        table = BY_GROUP_VERSION.get((group, version))
        if table is None:
            return self._404()
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in table and table[rest[2]].namespaced:
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in table or len(rest) > 3:
            return self._404()
        res = table[rest[0]]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and sub not in res.subresources:
            return self._404()
        return Target(res, namespace, name, sub, watch_path)

    @staticmethod
    def _404() -> web.Response:
        return status_response(_no_such_path())

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        if not request.path.split("/", 2)[2].strip("/"):  # /api/ and /apis/: the discovery roots
            return await (self._api_root if request.path.startswith("/api/") else self._apis_root)(request)
        io = podio.match(request.path)
        if io is not None:
            self._authorize(request, podio.VERBS[io[2]], Target(BY_ID["pods"], *io, False))
            if self.pod_io is None:
                raise StatusError(503, "ServiceUnavailable", "this server has no kubelet credentials")
            return await self.pod_io.handle(request, *io)
        parsed = self._parse(request.path)
        if isinstance(parsed, web.Response):
            return parsed
        t = parsed
        q = request.query
        method = request.method
        dry_run = q.get("dryRun") == "All"
        if "dryRun" in q and not dry_run:
            raise bad_request(f"unsupported dry run option {q['dryRun']!r}: want All")
        # The real server's default for an unset fieldValidation is Warn (kubectl sends Strict).
        field_validation = q.get("fieldValidation", "Warn")
        if field_validation not in ("Ignore", "Warn", "Strict"):
            raise bad_request(f"fieldValidation must be Ignore, Warn or Strict, not {field_validation!r}")
        warnings: list[str] = []
        if t.sub in ("binding", "token") and method != "POST":
            raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                              "resource")
        if t.sub == "token":
            self._authorize(request, "create", t)
            if self.token_authority is None:
                raise StatusError(503, "ServiceUnavailable", "this server issues no service account tokens")
            body = await self._read_body(request)
            review = serviceaccounts.token_request(self.store, self.token_authority, t.namespace, t.name, body.obj)
            return json_response(review, 201)
        if method == "GET":
            is_watch = t.watch_path or q.get("watch") in ("true", "1")
            if is_watch:
                self._authorize(request, "watch", t)
                return await self._watch(request, t)
            if t.name:
                self._authorize(request, "get", t)
                return await self._get(request, t)
            self._authorize(request, "list", t)
            return await self._list(request, t)
        if t.watch_path:
            raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                              "resource")
        if method == "POST" and t.sub == "binding":
            self._authorize(request, "create", t)
            body = await self._read_body(request)
            await self.registry.bind(t.namespace, t.name, body.obj, dry_run=dry_run)
            return json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                  "code": 201}, 201)
        if method == "POST" and not t.name:
            self._authorize(request, "create", t)
            body = await self._read_body(request)
            self.registry.check_fields(t.res, body.obj, field_validation, warnings, body.duplicates)
            self._no_escalation(request, t, body.obj)
            created = await self.registry.create(t.res, t.namespace, body.obj, dry_run=dry_run)
            return self._warn(self._object_response(request, t, created, 201), warnings)
        if method == "PUT" and t.name:
            self._authorize(request, "update", t)
            body = await self._read_body(request)
            if t.sub == "scale":
                return json_response(await self._update_scale(t, body.obj, dry_run))
            self.registry.check_fields(t.res, body.obj, field_validation, warnings, body.duplicates)
            self._no_escalation(request, t, body.obj)
            updated = await self.registry.update(t.res, t.namespace, t.name, body.obj, t.sub, dry_run=dry_run)
            return self._warn(self._object_response(request, t, updated, 200), warnings)
        if method == "PATCH" and t.name:
            self._authorize(request, "patch", t)
            ctype = request.content_type
            if ctype not in _PATCH_TYPES:
                raise StatusError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                                  f"accepted media types include: {', '.join(_PATCH_TYPES)}")
            raw = await request.read()
            if t.sub == "scale":
                return json_response(await self._patch_scale(t, ctype, raw, dry_run))
            if t.res.group == rbac.API_GROUP:
                # The escalation check needs the patched object: patch as a dry run first.
                preview, _ = await self.registry.patch(t.res, t.namespace, t.name, ctype, raw, t.sub, dry_run=True,
                                                       field_manager=q.get("fieldManager", ""),
                                                       force=q.get("force") == "true",
                                                       field_validation=field_validation, warnings=[])
                self._no_escalation(request, t, preview)
            obj, was_created = await self.registry.patch(t.res, t.namespace, t.name, ctype, raw, t.sub, dry_run=dry_run,
                                               field_manager=q.get("fieldManager", ""),
                                               force=q.get("force") == "true", field_validation=field_validation,
                                               warnings=warnings)
            return self._warn(self._object_response(request, t, obj, 201 if was_created else 200), warnings)
        if method == "DELETE":
            options: Obj = {}
            if request.body_exists:  # already read (and cached) by the middleware: can_read_body is False
                raw = await request.read()
                if raw.strip():
                    options = bodies.decode_json(raw, "error decoding DeleteOptions").obj
            if "propagationPolicy" in q:
                options["propagationPolicy"] = q["propagationPolicy"]
            if "gracePeriodSeconds" in q:
                options["gracePeriodSeconds"] = q["gracePeriodSeconds"]
            options = bodies.check_delete_options(options)
            if (options.get("dryRun") or []) == ["All"]:
                dry_run = True
            if t.name and not t.sub:
                self._authorize(request, "delete", t)
                gone_obj = await self.registry.delete(t.res, t.namespace, t.name, options, dry_run=dry_run)
                return json_response(gone_obj)
            if not t.name:
                self._authorize(request, "deletecollection", t)
                return await self._delete_collection(request, t, options, dry_run)
        raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    @staticmethod
    def _warn(resp: web.Response, warnings: list[str]) -> web.Response:
        for w in warnings:
            resp.headers.add("Warning", bodies.warning_header(w))
        return resp

    @staticmethod
    async def _read_body(request: web.BaseRequest) -> bodies.Decoded:
        return bodies.decode_request(await request.read(), request.content_type)

    # -- get / list ----------------------------------------------------------------------------

    @staticmethod
    def _wants_table(request: web.BaseRequest) -> bool:
        accept = request.headers.get("Accept", "")
        first = accept.split(",")[0]
        return "as=Table" in first

    def _object_response(self, request: web.BaseRequest, t: Target, obj: Obj, status: int) -> web.Response:
        if self._wants_table(request):
            table = semantics.to_table(t.res.id, [obj], request.query.get("includeObject", "Metadata"))
            table.setdefault("metadata", {})["resourceVersion"] = obj["metadata"].get("resourceVersion", "")
            return json_response(table, status)
        return json_response(obj, status)

    async def _get(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        if t.sub == "scale":
            return json_response(self._scale_of(self.registry.get(t.res, t.namespace, t.name)))
        if not self._wants_table(request) and hasattr(self.store, "get_raw"):
            raw = self.store.get_raw(t.res.key(t.namespace, t.name))
            if raw is None:
                raise self.registry_not_found(t)
            return await self._send_body(request, [raw])  # an object may be MiBs: not whole per client
        return self._object_response(request, t, self.registry.get(t.res, t.namespace, t.name), 200)

    @staticmethod
    def registry_not_found(t: Target) -> StatusError:
        from .errors import not_found

        return not_found(t.res.plural, t.name, t.res.group)

    def _selectors(self, request: web.BaseRequest, t: Target) -> tuple[Matcher | None, str]:
        q = request.query
        return object_matcher(q.get("labelSelector", ""), q.get("fieldSelector", ""), t.res.kind)

    async def _list(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        q = request.query
        matcher, _ = self._selectors(request, t)
        try:
            limit = int(q.get("limit", "0") or 0)
        except ValueError:
            raise bad_request(f"invalid limit: {q.get('limit')!r}") from None
        prefix = t.res.prefix(t.namespace)
        start_after = ""
        revision = 0
        cont = q.get("continue", "")
        rv = q.get("resourceVersion", "")
        match = q.get("resourceVersionMatch", "")
        if cont:
            if rv:
                raise bad_request("specifying resource version is not allowed when using continue")
            revision, start_after = self._decode_continue(cont, prefix)
        elif rv:
            try:
                want = int(rv)
            except ValueError:
                raise bad_request(f"invalid resource version: {rv!r}") from None
            if want > self.store.revision and want != 0:
                raise StatusError(504, "Timeout", f"Too large resource version: {want}, current: "
                                  f"{self.store.revision}", causes=[{"reason": "ResourceVersionTooLarge",
                                                                     "message": "Too large resource version"}],
                                  retry_after=1)
            if match == "Exact":
                revision = want
        elif match:
            raise bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
        if not revision and limit:
            revision = self.store.revision  # pin every page of this list to one revision
        items: list[tuple[str, bytes]] = []
        more = False
        try:
            while True:
                chunk = self.store.list(prefix, start_after=start_after, limit=limit, revision=revision)
                revision = chunk.revision
                if matcher is None:
                    items.extend(chunk.items)
                else:
                    items.extend((k, v) for k, v in chunk.items if matcher(_decode(v)))
                more = chunk.more
                if not limit or not more or len(items) >= limit:
                    break
                start_after = chunk.items[-1][0]
        except Compacted:
            if cont:
                raise gone("The provided continue parameter is too old to display a consistent list result. You can "
                           "start a new list without the continue parameter.") from None
            raise gone("The resourceVersion for the provided list is too old.") from None
        except FutureRevision as e:
            raise StatusError(504, "Timeout", str(e)) from None
        if limit and len(items) > limit:
            items, more = items[:limit], True
        meta: dict[str, Any] = {"resourceVersion": str(revision)}
        if more and items:
            meta["continue"] = self._encode_continue(revision, items[-1][0])
        if self._wants_table(request):
            table = semantics.to_table(t.res.id, [_decode(v) for _, v in items], q.get("includeObject", "Metadata"))
            table["metadata"] = meta
            return await self._send_body(request, [_encode(table)])
        head = (b'{"kind":"' + t.res.list_kind.encode() + b'","apiVersion":"' + t.res.api_version.encode()
                + b'","metadata":' + _encode(meta) + b',"items":[')
        parts = [head]
        for i, (_, v) in enumerate(items):
            if i:
                parts.append(b",")
            parts.append(v)
        parts.append(b"]}")
        return await self._send_body(request, parts)

    async def _send_body(self, request: web.BaseRequest, parts: list[bytes]) -> web.StreamResponse:
        """A JSON body made of parts (shared, already encoded values), small or streamed.

        A big body is never joined into one buffer per client: it is written piece by piece into a
        capped transport buffer, and a client that stops reading is disconnected after the send
        timeout (it would otherwise hold the whole response in the server, per request).
        """
        total = sum(len(p) for p in parts)
        if total <= limits.SEND_PIECE:
            return web.Response(body=b"".join(parts), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = total
        limits.cap_send_buffer(request)
        await resp.prepare(request)
        try:
            for piece in limits.pieces(parts):
                await limits.send(resp, piece, self.send_timeout)
        except limits.SlowClient:
            log.info("event=slow_client_closed verb=list path=%s total_bytes=%d", request.path, total)
            limits.disconnect(request)
        except ConnectionError:
            pass  # the client went away mid-response: nothing to answer
        return resp

    @staticmethod
    def _encode_continue(revision: int, last_key: str) -> str:
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": revision, "start": last_key}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @staticmethod
    def _decode_continue(token: str, prefix: str) -> tuple[int, str]:
        try:
            raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            rv, start = int(raw["rv"]), str(raw["start"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad_request("continue key is not valid: incorrect encoded start resourceVersion "
                              "(version meta.k8s.io/v1)") from None
        if not start.startswith(prefix):
            raise bad_request("continue key is not valid: the continue token does not belong to this list")
        return rv, start

    # -- watch ---------------------------------------------------------------------------------

    async def _watch(self, request: web.BaseRequest, t: Target) -> web.StreamResponse:
        q = request.query
        matcher, pinned = self._selectors(request, t)
        name = t.name or pinned
        sie = q.get("sendInitialEvents")
        send_initial: bool | None = None if sie is None else sie == "true"
        allow_bm = q.get("allowWatchBookmarks") == "true"
        if send_initial is not None:
            if q.get("resourceVersionMatch") != "NotOlderThan":
                raise StatusError(422, "Invalid", "resourceVersionMatch: Forbidden: sendInitialEvents requires "
                                  "setting resourceVersionMatch to NotOlderThan",
                                  causes=[{"reason": "FieldValueForbidden", "field": "resourceVersionMatch",
                                           "message": "Forbidden: sendInitialEvents requires setting "
                                                      "resourceVersionMatch to NotOlderThan"}])
            if send_initial and not allow_bm:
                raise StatusError(422, "Invalid", "allowWatchBookmarks: Forbidden: sendInitialEvents requires "
                                  "allowWatchBookmarks")
        # An integer number of seconds (upstream's int64): "inf" or "nan" would never time out.
        raw_timeout = q.get("timeoutSeconds", "") or "0"
        try:
            timeout = int(raw_timeout)
        except ValueError:
            timeout = -1
        if timeout < 0:
            raise bad_request(f"invalid timeoutSeconds: {raw_timeout!r}: want a whole number of seconds >= 0")
        wr = WatchRequest(
            res=t.res,
            prefix=t.res.prefix(t.namespace),
            exact_key=t.res.key(t.namespace, name) if name else "",
            matcher=matcher,
            resource_version=q.get("resourceVersion", ""),
            send_initial_events=send_initial,
            allow_bookmarks=allow_bm,
            timeout_seconds=timeout,
            table_include=q.get("includeObject", "Metadata") if self._wants_table(request) else None,
        )
        return await self.watches.serve(request, wr)

    # -- scale subresource ---------------------------------------------------------------------

    @staticmethod
    def _scale_of(obj: Obj) -> Obj:
        meta = obj["metadata"]
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        labels = ((spec.get("selector") or {}).get("matchLabels") or {})
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": spec.get("replicas", 1)},
            "status": {"replicas": status.get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items()))},
        }

    async def _apply_scale(self, t: Target, current: Obj, scale: Any, dry_run: bool) -> Obj:
        if not isinstance(scale, dict):
            raise bad_request("the body of the request was in an unknown format")
        rv = (scale.get("metadata") or {}).get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            from .errors import conflict

            raise conflict(t.res.plural, t.name, "the object has been modified; please apply your changes to the "
                           "latest version and try again", t.res.group)
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            from .errors import invalid

            raise invalid("Scale", t.name, [{"reason": "FieldValueInvalid", "field": "spec.replicas",
                                             "message": f"Invalid value: {replicas!r}: must be greater than or "
                                                        f"equal to 0"}], "autoscaling")
        new = json.loads(json.dumps(current))
        new.setdefault("spec", {})["replicas"] = replicas
        updated = await self.registry.update(t.res, t.namespace, t.name, new, "", dry_run=dry_run)
        return self._scale_of(updated)

    async def _update_scale(self, t: Target, body: Any, dry_run: bool) -> Obj:
        current = self.registry.get(t.res, t.namespace, t.name)
        return await self._apply_scale(t, current, body, dry_run)

    async def _patch_scale(self, t: Target, ctype: str, raw: bytes, dry_run: bool) -> Obj:
        current = self.registry.get(t.res, t.namespace, t.name)
        scale = self._scale_of(current)
        if ctype == "application/apply-patch+yaml":
            applied = bodies.decode_yaml(raw).obj or {}
            if not isinstance(applied, dict):
                raise bad_request("the body of an apply patch must be an object")
            patched = semantics.server_side_apply(scale, applied, "", True)
        else:
            patched = semantics.apply_patch(ctype, scale, raw, "scale")
        return await self._apply_scale(t, current, patched, dry_run)

    # -- deletecollection ----------------------------------------------------------------------

    async def _delete_collection(self, request: web.BaseRequest, t: Target, options: Obj, dry_run: bool) -> web.Response:
        matcher, _ = self._selectors(request, t)
        deleted: list[Obj] = []
        for _, value in self.store.list(t.res.prefix(t.namespace)).items:
            obj = _decode(value)
            if matcher is not None and not matcher(obj):
                continue
            meta = obj["metadata"]
            try:
                deleted.append(await self.registry.delete(t.res, meta.get("namespace", ""), meta["name"], options,
                                                    dry_run=dry_run))
            except StatusError as e:
                if e.code != 404:
                    raise
        return json_response({"kind": t.res.list_kind, "apiVersion": t.res.api_version,
                              "metadata": {"resourceVersion": str(self.store.revision)}, "items": deleted})

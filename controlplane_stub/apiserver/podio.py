"""pods/log, pods/exec and pods/portforward: checked here, then proxied to the pod's node agent.

As kube-apiserver: the pod must exist and be bound to a node, the container must be one of the
pod's (or the pod has only one), exec needs a pod not yet completed; then the request goes to the
node's kubelet endpoint (the agent's streaming.py, at the port the Node advertises in
status.daemonEndpoints, on loopback: see streaming.py) with the cluster's kubelet token. Logs are
streamed through as they come; exec and port-forward are WebSockets relayed message by message,
in the subprotocol kubectl and the agent agreed: v5.channel.k8s.io or v4 for exec, and for
port-forward SPDY/3.1+portforward.k8s.io (kubectl 1.32's default: SPDY tunnelled in the WebSocket;
the agent speaks SPDY, agent/spdy.py). kubectl falls back to a plain SPDY upgrade only when the
WebSocket upgrade fails, which it does not here; a SPDY upgrade gets 400.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from ..agent.logs import LogQuery, LogQueryError
from ..store.base import Obj, Store
from .errors import StatusError, bad_request, not_found
from .resources import BY_ID

# The verb each subresource needs (upstream: exec/attach/portforward are "create" even over a
# WebSocket GET since 1.30; logs are "get", which `view` has).
VERBS = {"log": "get", "exec": "create", "portforward": "create"}
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD_PROTOCOLS = ("SPDY/3.1+portforward.k8s.io",)
KUBELET_HOST = "127.0.0.1"
MAX_WS_MESSAGE = 1024 * 1024
UPGRADE_REQUIRED = "Upgrade request required"  # also the agent's answer when the container runs


def match(path: str) -> tuple[str, str, str] | None:
    """(namespace, pod, subresource) for /api/v1/namespaces/NS/pods/NAME/{log,exec,portforward}."""
    parts = path.strip("/").split("/")
    if len(parts) == 7 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods" and parts[6] in VERBS:
        return parts[3], parts[5], parts[6]
    return None


class PodIO:
    def __init__(self, store: Store, kubelet_token: str) -> None:
        self.store = store
        self.token = kubelet_token
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _pod(self, ns: str, name: str) -> Obj:
        pod = self.store.get(BY_ID["pods"].key(ns, name))
        if pod is None:
            raise not_found("pods", name)
        return pod

    @staticmethod
    def _container(pod: Obj, requested: str) -> str:
        name = pod["metadata"]["name"]
        spec = pod.get("spec") or {}
        names = [str(c.get("name")) for c in spec.get("containers") or []]
        init = [str(c.get("name")) for c in spec.get("initContainers") or []]
        if not requested:
            if len(names) == 1:
                return names[0]
            raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                              f"[{' '.join(names)}]" + (f" or one of the init containers: [{' '.join(init)}]"
                                                        if init else ""))
        if requested not in names + init:
            raise bad_request(f"container {requested} is not valid for pod {name}")
        return requested

    def _endpoint(self, pod: Obj) -> str:
        node_name = (pod.get("spec") or {}).get("nodeName") or ""
        if not node_name:
            raise bad_request(f"pod {pod['metadata']['name']} does not have a host assigned")
        node = self.store.get(BY_ID["nodes"].key("", node_name))
        port = ((((node or {}).get("status") or {}).get("daemonEndpoints") or {}).get("kubeletEndpoint")
                or {}).get("Port")
        if not self.token or not isinstance(port, int) or not 0 < port < 65536:
            raise StatusError(503, "ServiceUnavailable", f'node "{node_name}" has no kubelet endpoint')
        return f"http://{KUBELET_HOST}:{port}"

    async def handle(self, request: web.BaseRequest, ns: str, name: str, sub: str) -> web.StreamResponse:
        pod = self._pod(ns, name)
        if sub == "log" and not (pod.get("spec") or {}).get("nodeName"):
            # As upstream: the log of a pod on no node is empty (exec and port-forward are refused).
            self._container(pod, request.query.get("container", ""))
            return web.Response(body=b"", content_type="text/plain")
        base = self._endpoint(pod)
        if sub == "portforward":
            return await self._upgrade(request, f"{base}/portForward/{ns}/{name}", PORTFORWARD_PROTOCOLS, [],
                                       f'pod not found ("{name}")')
        container = self._container(pod, request.query.get("container", ""))
        path = f"{ns}/{name}/{container}"
        if sub == "log":
            if request.method != "GET":
                raise StatusError(405, "MethodNotAllowed", "the server does not allow this method on the "
                                  "requested resource")
            try:
                q = LogQuery.parse(request.query)
            except LogQueryError as e:
                raise bad_request(str(e)) from None
            return await self._logs(request, f"{base}/containerLogs/{path}", q)
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            raise bad_request(f"cannot exec into a container in a completed pod; current phase is {phase}")
        params = [(k, v) for k, v in request.query.items() if k in ("command", "stdin", "stdout", "stderr", "tty")]
        return await self._upgrade(request, f"{base}/exec/{path}", EXEC_PROTOCOLS, params, f'container not found ("{container}")')

    async def _not_websocket(self, url: str, params: list[tuple[str, str]], supported: tuple[str, ...],
                             what: str) -> StatusError:
        """The error for a request that is no WebSocket upgrade: kubectl's SPDY fallback after a
        refused WebSocket upgrade. It shows the error to the user, so it must be the real one: the
        agent is asked (without an upgrade, so nothing runs) whether the container runs."""
        try:
            async with self.session().get(url, params=params) as r:
                body = await r.content.read(64 * 1024)
        except aiohttp.ClientError as e:
            return StatusError(503, "ServiceUnavailable", f"the node agent did not answer: {e}")
        if r.status in (400, 404) and UPGRADE_REQUIRED.encode() not in body:
            return bad_request(f"unable to upgrade connection: {what}")
        return bad_request(f"{UPGRADE_REQUIRED} (this server speaks WebSocket: {', '.join(supported)}; not SPDY)")

    async def _logs(self, request: web.BaseRequest, url: str, q: LogQuery) -> web.StreamResponse:
        try:
            upstream = await self.session().get(url, params=q.to_query())
        except aiohttp.ClientError as e:
            raise StatusError(503, "ServiceUnavailable", f"the node agent did not answer: {e}") from None
        async with upstream:
            if upstream.status != 200:
                body = await upstream.read()
                return web.Response(body=body[:64 * 1024], status=upstream.status, content_type="application/json")
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except (ConnectionResetError, aiohttp.ClientError):
                pass
            await resp.write_eof()
            return resp

    async def _upgrade(self, request: web.BaseRequest, url: str, supported: tuple[str, ...],
                       params: list[tuple[str, str]], what: str) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise await self._not_websocket(url, params, supported, what)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        protocols = [p for p in offered if p in supported]
        if not protocols:
            raise bad_request(f"none of the offered subprotocols is supported: want one of {supported}")
        try:
            upstream = await self.session().ws_connect(url, params=params, protocols=protocols,
                                                       max_msg_size=MAX_WS_MESSAGE)
        except aiohttp.WSServerHandshakeError as e:
            # The kubelet's words when the runtime has no such running container (or pod).
            raise StatusError(e.status if e.status >= 400 else 500, "BadRequest" if e.status == 400 else
                              "InternalError", f"unable to upgrade connection: {what}") from None
        except aiohttp.ClientError as e:
            raise StatusError(503, "ServiceUnavailable", f"the node agent did not answer: {e}") from None
        ws = web.WebSocketResponse(protocols=(upstream.protocol or protocols[0],), max_msg_size=MAX_WS_MESSAGE)
        try:
            await ws.prepare(request)
            await _relay(ws, upstream)
        finally:
            await upstream.close()
            await ws.close()
        return ws


async def _relay(client: web.WebSocketResponse, node: aiohttp.ClientWebSocketResponse) -> None:
    async def pump(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)

    tasks = [asyncio.create_task(pump(client, node)), asyncio.create_task(pump(node, client))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""A small asynchronous Kubernetes REST client on aiohttp: GET (list/get) and streaming watch.

Only documented API behaviour: JSON over HTTP(S), bearer/basic/client-certificate auth, Status
bodies for errors, newline-delimited watch events.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Self

import aiohttp

from kproxy import __version__
from kproxy.kube.kubeconfig import ClusterAccess
from kproxy.kube.types import Status, decode_status

USER_AGENT = f"kproxy/{__version__}"


class ApiError(Exception):
    """A non-2xx answer from the API server, with the decoded Status."""

    def __init__(self, status: Status, method: str = "GET", path: str = "") -> None:
        self.status = status
        super().__init__(f"{method} {path}: {status.code} {status.reason or ''} {status.message}".strip())

    @property
    def code(self) -> int:
        return self.status.code


class ApiClient:
    """One aiohttp session per client; create and use it inside a running event loop."""

    def __init__(self, access: ClusterAccess, *, connect_timeout: float = 10.0,
                 request_timeout: float = 60.0) -> None:
        self.access = access
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self._ssl = access.ssl_context()

    @property
    def server(self) -> str:
        return self.access.server

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False, limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"Accept": "application/json", "User-Agent": USER_AGENT},
                # Kubernetes JSON is never compressed unless asked; no cookies are involved.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        auth = self.access.auth_header()
        return {"Authorization": auth} if auth else {}

    def _request_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.access.tls_server_name:
            kw["server_hostname"] = self.access.tls_server_name
        return kw

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> bytes:
        """GET path and return the body; non-2xx raises ApiError with the server's Status."""
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=self._request_timeout, connect=self._connect_timeout)
        async with session.get(self.server + path, params=dict(params or {}), headers=self._headers(),
                               timeout=timeout, **self._request_kwargs()) as resp:
            body = await resp.read()
            if resp.status >= 300:
                raise ApiError(decode_status(body, resp.status), "GET", path)
            return body

    async def watch(self, path: str, params: Mapping[str, str], *,
                    read_timeout: float) -> AsyncIterator[bytes]:
        """Open a watch and yield one raw JSON event per line until the server ends the stream.

        Lines are split by hand rather than with StreamReader.readline, whose line limit
        (128 KiB) a large EndpointSlice event can exceed."""
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout, sock_read=read_timeout)
        query = dict(params)
        query["watch"] = "true"
        async with session.get(self.server + path, params=query, headers=self._headers(),
                               timeout=timeout, **self._request_kwargs()) as resp:
            if resp.status >= 300:
                raise ApiError(decode_status(await resp.read(), resp.status), "WATCH", path)
            buf = bytearray()
            async for chunk in resp.content.iter_any():
                buf += chunk
                start = 0
                while True:
                    nl = buf.find(b"\n", start)
                    if nl < 0:
                        break
                    if nl > start:
                        yield bytes(buf[start:nl])
                    start = nl + 1
                if start:
                    del buf[:start]
            if buf.strip():
                yield bytes(buf)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
            # Lets the connector close its transports before the loop goes away (aiohttp docs).
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

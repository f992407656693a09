"""A mutual-TLS HTTPS endpoint on loopback for client tests (tests/core, tests/cluster): a minimal
aiohttp app, because the control plane stub authenticates with tokens only and client certificates
must be shown to work as well; and the kubeconfig that points a client at it."""
from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import yaml
from aiohttp import web


def write_kubeconfig(path: Path, cluster: dict[str, object], user: dict[str, object]) -> str:
    """A one-context kubeconfig (cluster "k", user "u") written at path; returns the path."""
    path.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "clusters": [{"name": "k", "cluster": cluster}], "users": [{"name": "u", "user": user}]}))
    return str(path)


@asynccontextmanager
async def mtls_nodes_server(trust: Path, cert: Path, key: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """https://127.0.0.1:PORT (port 0: the kernel's choice) serving an empty NodeList at
    /api/v1/nodes to clients whose certificate `trust` verifies (no certificate, no handshake).
    Yields the URL and the list of client certificate common names, one per request served."""
    seen: list[str] = []

    async def nodes(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        seen.append(dict(x[0] for x in peer["subject"])["commonName"] if peer else "")
        return web.json_response({"kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": []})

    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(trust))
    sctx.load_cert_chain(str(cert), str(key))
    sctx.verify_mode = ssl.CERT_REQUIRED
    app = web.Application()
    app.router.add_get("/api/v1/nodes", nodes)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sctx).start()
        host, port = runner.addresses[0][:2]
        yield f"https://{host}:{port}", seen
    finally:
        await runner.cleanup()

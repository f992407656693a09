"""The node agent's kubelet-style endpoint: container logs, exec and port-forward, for the API server only.

Bound to loopback (the agents and the API server of the one-machine cluster share the host's
network namespace; a node's own address lives in its netns, which the API server cannot reach)
and authenticated with the cluster's kubelet token (a bearer token only the API server holds;
compared in constant time). Paths as the kubelet's:

- GET /containerLogs/NS/POD/CONTAINER?follow&previous&timestamps&tailLines&sinceSeconds&limitBytes
- GET /exec/NS/POD/CONTAINER?command=..&stdin&stdout&stderr&tty (WebSocket, channel protocol
  v5.channel.k8s.io or v4.channel.k8s.io: each binary message is one channel byte then data;
  0 stdin, 1 stdout, 2 stderr, 3 the final Status, 4 terminal resize, 255 close (v5)).
- GET /portForward/NS/POD (WebSocket, SPDY/3.1+portforward.k8s.io: portforward.py).

exec joins the container's network, mount and UTS namespaces (nsenter on its pid) and becomes its
user with setpriv, so the command sees what the container sees (hidden cluster state included).
"""

from __future__ import annotations

import asyncio
import fcntl
import hmac
import json
import logging
import os
import pty
import struct
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from controlplane_stub.agent import netns, portforward
from controlplane_stub.agent.catalog import ImageError
from controlplane_stub.agent.logs import LogQuery, LogQueryError, read

if TYPE_CHECKING:
    from controlplane_stub.agent.node import NodeAgent
    from controlplane_stub.agent.pods import ContainerRunner, PodWorker

log = logging.getLogger("kpc.agent.streaming")
EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
MAX_COMMAND_ARGS = 1024
MAX_WS_MESSAGE = 1024 * 1024
UPGRADE_REQUIRED = "Upgrade request required"


def status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return web.json_response(body, status=code)


def exit_status(rc: int, command: list[str]) -> dict[str, Any]:
    """The Status the kubelet writes on the error channel when an exec ends (v4 and later)."""
    if rc == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure",
            "message": f"command terminated with non-zero exit code: error executing command {command}, "
                       f"exit code {rc}",
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": str(rc)}]}}


def parse_resize(data: bytes) -> tuple[int, int] | None:
    """{"Width":W,"Height":H} from the resize channel; None for anything else (then ignored)."""
    try:
        obj = json.loads(data)
        w, h = obj["Width"], obj["Height"]
    except (ValueError, TypeError, KeyError):
        return None
    if not (isinstance(w, int) and isinstance(h, int) and 0 <= w < 65536 and 0 <= h < 65536):
        return None
    return w, h


class StreamingServer:
    def __init__(self, agent: NodeAgent, token: str) -> None:
        self.agent = agent
        self.token = token.encode()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/containerLogs/{ns}/{pod}/{container}", self._logs)
        app.router.add_get("/exec/{ns}/{pod}/{container}", self._exec)
        app.router.add_get("/portForward/{ns}/{pod}", self._port_forward)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        scheme, _, tok = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(tok.strip().encode(), self.token):
            return status(401, "Unauthorized", "Unauthorized")
        resp: web.StreamResponse = await handler(request)
        return resp

    def _worker(self, request: web.Request) -> PodWorker | web.Response:
        ns, pod = request.match_info["ns"], request.match_info["pod"]
        worker = next((w for w in self.agent.workers.values() if w.key == f"{ns}/{pod}"), None)
        return worker if worker is not None else status(404, "NotFound", f'pods "{pod}" not found')

    def _container(self, request: web.Request) -> ContainerRunner | web.Response:
        worker = self._worker(request)
        if isinstance(worker, web.Response):
            return worker
        name, pod = request.match_info["container"], request.match_info["pod"]
        c = next((c for c in worker.containers + worker.init_containers if c.name == name), None)
        if c is None:
            return status(400, "BadRequest", f"container {name} is not valid for pod {pod}")
        return c

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        c = self._container(request)
        if isinstance(c, web.Response):
            return c
        try:
            q = LogQuery.parse(request.query)
        except LogQueryError as e:
            return status(400, "BadRequest", str(e))
        pod = c.worker.pod["metadata"]["name"]
        if c.log is None:
            reason = c.state.get("waiting", {}).get("reason", "ContainerCreating")
            return status(400, "BadRequest", f'container "{c.name}" in pod "{pod}" is waiting to start: {reason}')
        if q.previous and not c.log.files(True):
            return status(400, "BadRequest", f'previous terminated container "{c.name}" in pod "{pod}" not found')
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        proc = c.proc
        async for chunk in read(c.log, q, lambda: proc is not None and proc.returncode is None):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    def _exec_argv(self, c: ContainerRunner, command: list[str]) -> list[str]:
        who = c.who
        assert c.proc is not None and who is not None
        argv = ["nsenter", "--target", str(c.proc.pid), "--net", "--mount", "--uts", "--",
                "setpriv", f"--reuid={who.uid}", f"--regid={who.gid}"]
        argv += [f"--groups={','.join(map(str, who.groups))}"] if who.groups else ["--clear-groups"]
        argv += ["--no-new-privs"] if who.no_new_privs else []
        return argv + ["--", *command]

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        c = self._container(request)
        if isinstance(c, web.Response):
            return c
        command = request.query.getall("command", [])
        if not command or len(command) > MAX_COMMAND_ARGS:
            return status(400, "BadRequest", "you must specify at least one command for the container")
        q = request.query
        flags = {k: q.get(k, "false").lower() in ("true", "1") for k in ("stdin", "stdout", "stderr", "tty")}
        if c.proc is None or c.proc.returncode is not None or c.who is None:
            pod = c.worker.pod["metadata"]["name"]
            return status(400, "BadRequest", f"container {c.name} is not running in pod {pod}")
        try:
            _, image_env, _ = self.agent.catalog.resolve(c.spec)
        except ImageError as e:  # the image went away since the container started
            return status(400, "BadRequest", f"container {c.name}: {e}")
        ws = web.WebSocketResponse(protocols=EXEC_PROTOCOLS, max_msg_size=MAX_WS_MESSAGE, heartbeat=30)
        if not ws.can_prepare(request).ok:  # the API server asking whether the container runs
            return status(400, "BadRequest", UPGRADE_REQUIRED)
        await ws.prepare(request)
        env = c.worker.container_env(c.spec, image_env, c.who)
        if flags["tty"]:
            env.setdefault("TERM", "xterm")
        await ExecSession(ws, self._exec_argv(c, command), env, command, **flags).run()
        return ws

    async def _port_forward(self, request: web.Request) -> web.StreamResponse:
        w = self._worker(request)
        if isinstance(w, web.Response):
            return w
        if not w.pod_ip:
            return status(400, "BadRequest", f"pod {w.key} has no IP yet")
        ws = web.WebSocketResponse(protocols=portforward.PROTOCOLS, max_msg_size=MAX_WS_MESSAGE, heartbeat=30)
        if not ws.can_prepare(request).ok:
            return status(400, "BadRequest", UPGRADE_REQUIRED)
        await ws.prepare(request)
        node_ns, pod_ip = self.agent.node.netns, w.pod_ip

        async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            # From the node's network namespace, as a kubelet's connection to the pod would go.
            s = await asyncio.to_thread(netns.socket_in, node_ns, netns.family_of(pod_ip))
            s.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(s, (pod_ip, port))
            except BaseException:
                s.close()
                raise
            return await asyncio.open_connection(sock=s)

        await portforward.PortForwardSession(ws, connect, w.key).run()
        return ws


class ExecSession:
    """One exec: the process, and the relay between its stdio and the WebSocket's channels."""

    def __init__(self, ws: web.WebSocketResponse, argv: list[str], env: dict[str, str], command: list[str], *,
                 stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
        self.ws, self.argv, self.env, self.command = ws, argv, env, command
        self.stdin, self.stdout, self.stderr, self.tty = stdin, stdout, stderr, tty
        self.v5 = ws.ws_protocol == "v5.channel.k8s.io"

    async def run(self) -> None:
        master = -1
        if self.tty:
            master, slave = pty.openpty()
            proc = await asyncio.create_subprocess_exec(*self.argv, env=self.env, stdin=slave, stdout=slave,
                                                        stderr=slave, start_new_session=True)
            os.close(slave)
            outputs = [asyncio.create_task(self._pump_pty(master))]
        else:
            pipe = asyncio.subprocess.PIPE
            proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdin=pipe if self.stdin else asyncio.subprocess.DEVNULL,
                stdout=pipe if self.stdout else asyncio.subprocess.DEVNULL,
                stderr=pipe if self.stderr else asyncio.subprocess.DEVNULL, start_new_session=True)
            outputs = [asyncio.create_task(self._pump(s, ch))
                       for s, ch in ((proc.stdout, STDOUT), (proc.stderr, STDERR)) if s is not None]
        reader = asyncio.create_task(self._from_client(proc, master))
        try:
            rc = await proc.wait()
            await asyncio.wait(outputs, timeout=2.0)
            if rc < 0:
                rc = 128 - rc
            await self.ws.send_bytes(bytes([ERROR]) + json.dumps(exit_status(rc, self.command)).encode())
        except ConnectionResetError:
            pass
        finally:
            reader.cancel()
            for t in outputs:
                t.cancel()
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, 9)
                except ProcessLookupError:
                    pass
                await proc.wait()
            if master >= 0:
                os.close(master)
            await self.ws.close()

    async def _pump(self, stream: asyncio.StreamReader, channel: int) -> None:
        while data := await stream.read(32 * 1024):
            await self.ws.send_bytes(bytes([channel]) + data)

    async def _pump_pty(self, master: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.run_in_executor(None, os.read, master, 32 * 1024)
            except OSError:  # EIO: every holder of the terminal's other end is gone
                return
            if not data:
                return
            await self.ws.send_bytes(bytes([STDOUT]) + data)

    async def _from_client(self, proc: asyncio.subprocess.Process, master: int) -> None:
        async for msg in self.ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            ch, data = msg.data[0], msg.data[1:]
            if ch == STDIN and self.stdin:
                if master >= 0:
                    await asyncio.to_thread(os.write, master, data)
                elif proc.stdin is not None:
                    proc.stdin.write(data)
                    try:
                        await proc.stdin.drain()
                    except ConnectionResetError:
                        return
            elif ch == RESIZE and master >= 0:
                size = parse_resize(data)
                if size is not None:
                    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
            elif ch == CLOSE and self.v5 and data[:1] == bytes([STDIN]):
                if master >= 0:
                    await asyncio.to_thread(os.write, master, b"\x04")  # end of input for the terminal
                elif proc.stdin is not None:
                    proc.stdin.close()
        # The client went away: the command must not outlive it.
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass

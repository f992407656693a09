"""Container probes (httpGet, tcpSocket, exec) as the kubelet runs them, from the node's netns."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from controlplane_stub.agent import netns


def resolve_port(port: Any, container: dict[str, Any]) -> int:
    """A probe port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"probe port {port!r} is not a named port of container {container.get('name')!r}")


async def _connect(node_ns: str, host: str, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    # The probe connects from the node's namespace (as the kubelet does from the node).
    sock = await asyncio.to_thread(netns.socket_in, node_ns, netns.family_of(host))
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def http_get(
    node_ns: str, host: str, port: int, path: str, timeout: float, headers: list[dict[str, str]] | None = None
) -> tuple[bool, str]:
    sock = await _connect(node_ns, host, port, timeout)
    try:
        reader, writer = await asyncio.open_connection(sock=sock)
        extra = "".join(f"{h['name']}: {h['value']}\r\n" for h in headers or [])
        writer.write(
            f"GET {path or '/'} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\n"
            f"{extra}\r\n".encode()
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        writer.close()
        parts = line.split()
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}"
    finally:
        sock.close()


async def tcp_socket(node_ns: str, host: str, port: int, timeout: float) -> tuple[bool, str]:
    sock = await _connect(node_ns, host, port, timeout)
    sock.close()
    return True, ""


async def exec_in(
    pod_ns: str, command: list[str], timeout: float, wrapper: list[str] | None = None
) -> tuple[bool, str]:
    """The command in the pod's netns, behind `wrapper` (the container's podinit: its user)."""
    if not command:
        return False, "exec probe has no command"
    proc = await asyncio.create_subprocess_exec(
        "ip",
        "netns",
        "exec",
        pod_ns,
        *(wrapper or []),
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        cwd="/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, f"command {command!r} timed out"
    return proc.returncode == 0, out.decode(errors="replace")[-200:]


async def run_probe(
    probe: dict[str, Any],
    container: dict[str, Any],
    node_ns: str,
    pod_ns: str,
    pod_ip: str,
    exec_wrapper: list[str] | None = None,
) -> tuple[bool, str]:
    """One probe attempt: (success, message)."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            h = probe["httpGet"]
            return await http_get(
                node_ns,
                h.get("host") or pod_ip,
                resolve_port(h.get("port"), container),
                h.get("path", "/"),
                timeout,
                h.get("httpHeaders"),
            )
        if "tcpSocket" in probe:
            t = probe["tcpSocket"]
            return await tcp_socket(
                node_ns, t.get("host") or pod_ip, resolve_port(t.get("port"), container), timeout
            )
        if "exec" in probe:
            cmd = [str(x) for x in probe["exec"].get("command") or []]
            return await exec_in(pod_ns, cmd, timeout, exec_wrapper)
    except (TimeoutError, OSError, ValueError) as e:
        return False, f"probe failed: {e!r}"
    return False, "probe has no handler (httpGet, tcpSocket or exec)"

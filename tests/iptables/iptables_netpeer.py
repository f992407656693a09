"""Real endpoints and clients for the iptables e2e tests, run inside a test namespace.

  serve NAME                      TCP :8080 and UDP :8053 (and :8054) answer "NAME PEER_IP" (the
                                  peer address as the backend sees it: proves SNAT or not)
  tcp HOST PORT COUNT TIMEOUT     COUNT fresh connections; prints a JSON list of results
  udp HOST PORT COUNT TIMEOUT SRC COUNT datagrams from source port SRC (0: ephemeral)

Every loop is bounded by COUNT and every socket by TIMEOUT; the server exits when its parent
test kills it (the fixture does so in finally).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def serve(name: str) -> None:
    # One socket per family (IPv6 ones V6ONLY): an IPv4 peer stays "10.1.0.3", not "::ffff:10.1.0.3".
    tcps, udps = [], []
    for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        tcp.bind((any_addr, 8080))
        tcp.listen(128)
        tcps.append(tcp)
        for port in (8053, 8054):
            u = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            u.bind((any_addr, port))
            udps.append(u)

    def tcp_loop(tcp: socket.socket) -> None:
        while True:
            conn, peer = tcp.accept()
            try:
                conn.sendall(f"{name} {peer[0]}\n".encode())
            finally:
                conn.close()

    def udp_loop(u: socket.socket) -> None:
        while True:
            _data, peer = u.recvfrom(2048)
            u.sendto(f"{name} {peer[0]}".encode(), peer)

    for tcp in tcps:
        threading.Thread(target=tcp_loop, args=(tcp,), daemon=True).start()
    for u in udps:
        threading.Thread(target=udp_loop, args=(u,), daemon=True).start()
    print("ready", flush=True)
    time.sleep(600)  # bounded lifetime even if a fixture forgot to kill us


def tcp_client(host: str, port: int, count: int, timeout: float) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for _ in range(count):
        t0 = time.monotonic()
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            data = s.recv(256).decode().strip()
            out.append({"reply": data, "err": "", "elapsed": time.monotonic() - t0})
        except ConnectionRefusedError:
            out.append({"reply": "", "err": "refused", "elapsed": time.monotonic() - t0})
        except TimeoutError:
            out.append({"reply": "", "err": "timeout", "elapsed": time.monotonic() - t0})
        except OSError as e:
            out.append({"reply": "", "err": f"oserror:{e.errno}", "elapsed": time.monotonic() - t0})
        finally:
            s.close()
    return out


def udp_client(host: str, port: int, count: int, timeout: float, src: int) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    v6 = ":" in host
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if v6 else "0.0.0.0", src))
    s.settimeout(timeout)
    try:
        for i in range(count):
            t0 = time.monotonic()
            try:
                s.sendto(f"ping {i}".encode(), (host, port))
                data, _ = s.recvfrom(256)
                out.append({"reply": data.decode(), "err": "", "elapsed": time.monotonic() - t0})
            except TimeoutError:
                out.append({"reply": "", "err": "timeout", "elapsed": time.monotonic() - t0})
            except ConnectionRefusedError:
                out.append({"reply": "", "err": "refused", "elapsed": time.monotonic() - t0})
    finally:
        s.close()
    return out


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "serve":
        serve(argv[1])
    elif mode == "tcp":
        print(json.dumps(tcp_client(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))))
    elif mode == "udp":
        print(json.dumps(udp_client(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), int(argv[5]))))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

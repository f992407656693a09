"""Types of the compiled hot path (kdns/_wire.pyx); kdns/_purewire.py is its pure twin."""
import socket
from collections.abc import Container
from typing import Any

UDP_CAP: int
BUCKETS: tuple[float, ...]

class Table:
    answers: dict[bytes, bytes]
    names: Container[bytes]
    zone: bytes
    pod_zone: bytes
    soa_tail: bytes
    synced: bool
    def __init__(self) -> None: ...
    def update(self, answers: dict[bytes, bytes], names: Container[bytes], zone: bytes, pod_zone: bytes,
               soa_tail: bytes, synced: bool) -> None: ...

class Stats:
    def __init__(self) -> None: ...
    def record(self, qtype: int, rcode: int, seconds: float) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...

def answer(query: bytes, table: Table, tcp: bool) -> bytes | None: ...
def drain_udp(sock: socket.socket, table: Table, stats: Stats,
              max_batches: int) -> list[tuple[bytes, Any, list[tuple[int, int, bytes]]]]: ...
def forget_socket(sock: socket.socket) -> None: ...

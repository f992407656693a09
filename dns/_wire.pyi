"""Types of the compiled hot path (kdns/_wire.pyx); kdns/_purewire.py is its pure twin."""
import socket
from collections.abc import Container
from typing import Any

UDP_SIZE: int
UDP_SIZE_MAX: int
LOOPBACK4: bytes
LOOPBACK6: bytes
BUCKETS: tuple[float, ...]

class Table:
    answers: dict[bytes, bytes]
    names: Container[bytes]
    zone: bytes
    pod_zone: bytes
    soa_tail: bytes
    synced: bool
    allow4: bytes
    allow6: bytes
    udp_size: int
    def __init__(self) -> None: ...
    def guard(self, allow4: bytes, allow6: bytes, udp_size: int) -> None: ...
    def update(self, answers: dict[bytes, bytes], names: Container[bytes], zone: bytes, pod_zone: bytes,
               soa_tail: bytes, synced: bool) -> None: ...

class Stats:
    def __init__(self) -> None: ...
    def record(self, qtype: int, rcode: int, seconds: float) -> None: ...
    def snapshot(self) -> dict[str, Any]: ...

def allowed(addr: Any, table: Table) -> bool: ...
def answer(query: bytes, table: Table, tcp: bool) -> bytes | None: ...
def drain_udp(sock: socket.socket, table: Table, stats: Stats,
              max_batches: int) -> list[tuple[bytes, Any, list[tuple[int, int, bytes]]]]: ...
def forget_socket(sock: socket.socket) -> None: ...

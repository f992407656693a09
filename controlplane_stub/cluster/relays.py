"""Socket relays between the host and the cluster's network namespaces (no rules, no routes)."""

from __future__ import annotations

import asyncio


async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        if r.at_eof():
            w.close()

"""kproxy-apiserver's storage flags (kube-apiserver's names) and opening the chosen store.

The etcd back end (and its gRPC client, ~15 MiB of RSS) is imported only when --storage-backend
etcd3 is chosen, so the default SQLite server does not pay for it (tests/unit/test_lazy_etcd_import.py)."""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from .base import API_PREFIX, Store
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .etcd import EtcdStore

BACKENDS = ("sqlite", "etcd3")


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-backend", default=os.environ.get("KPROXY_STORAGE_BACKEND", "sqlite"),
                   help="sqlite (default: DATA/store.db) or etcd3 (--etcd-servers)")
    p.add_argument("--etcd-servers", default=os.environ.get("KPROXY_ETCD_SERVERS", ""),
                   help="etcd client URLs, comma-separated (http://127.0.0.1:2379,...)")
    p.add_argument("--etcd-cafile", default="", help="CA bundle to verify etcd's serving certificates")
    p.add_argument("--etcd-certfile", default="", help="client certificate for etcd (TLS)")
    p.add_argument("--etcd-keyfile", default="", help="client key for etcd (TLS)")
    p.add_argument("--etcd-prefix", default=API_PREFIX, help="key prefix of every object in etcd (default /registry)")
    p.add_argument("--etcd-compaction-interval", default="5m",
                   help="how often etcd is compacted (Go duration: 5m, 30s; 0 = never; default 5m)")


def _fail(msg: str) -> SystemExit:
    return SystemExit(f"kproxy-apiserver: {msg}")


async def open_store(args: argparse.Namespace, data_dir: str) -> Store:
    """The store the flags name, ready to serve (for etcd: the mirror is loaded and following)."""
    if args.storage_backend not in BACKENDS:
        raise _fail(f"--storage-backend {args.storage_backend!r}: want one of {', '.join(BACKENDS)}")
    if args.storage_backend == "sqlite":
        return SQLiteStore(os.path.join(data_dir, "store.db"), window=args.watch_cache_size)
    from .etcd import open_etcd_store, parse_duration

    servers = [s.strip() for s in args.etcd_servers.split(",") if s.strip()]
    if not servers:
        raise _fail("--storage-backend etcd3 needs --etcd-servers URL[,URL...]")
    for s in servers:
        if not s.startswith(("http://", "https://")):
            raise _fail(f"--etcd-servers {s!r}: want http://HOST:PORT or https://HOST:PORT")
    for flag in ("etcd_cafile", "etcd_certfile", "etcd_keyfile"):
        path = getattr(args, flag)
        if path and not os.access(path, os.R_OK):
            raise _fail(f"--{flag.replace('_', '-')} {path}: not readable")
    if bool(args.etcd_certfile) != bool(args.etcd_keyfile):
        raise _fail("--etcd-certfile and --etcd-keyfile go together")
    try:
        interval = parse_duration(args.etcd_compaction_interval)
    except ValueError as e:
        raise _fail(f"--etcd-compaction-interval: {e}") from None
    if interval < 0:
        raise _fail("--etcd-compaction-interval: want a duration >= 0")
    prefix = args.etcd_prefix
    if not prefix.startswith("/") or "//" in prefix:
        raise _fail(f"--etcd-prefix {prefix!r}: want an absolute key prefix such as /registry")
    try:
        store = open_etcd_store(servers, ca_file=args.etcd_cafile, cert_file=args.etcd_certfile,
                                key_file=args.etcd_keyfile, prefix=prefix, window=args.watch_cache_size,
                                compaction_interval=interval)
    except ValueError as e:
        raise _fail(f"--etcd-servers: {e}") from None
    await _start(store)
    return store


async def _start(store: EtcdStore) -> None:
    from .etcd_client import EtcdError

    try:
        await store.start()
    except EtcdError as e:
        await store.close()
        raise _fail(f"etcd ({','.join(store.client.endpoints)}): {e}") from None


def share_allocations(store: Store, allocator: object) -> None:
    """On etcd, make the Service allocator's picks binding across API servers (allocators.py:
    EtcdReservations); SQLite has one server, nothing to share."""
    if isinstance(store, SQLiteStore):
        return
    from .etcd import EtcdStore

    if not isinstance(store, EtcdStore):
        return
    from ..apiserver.allocators import EtcdReservations, ServiceAllocator

    if not isinstance(allocator, ServiceAllocator):  # semantics' stand-in when the allocators are absent
        return
    sync = EtcdReservations(allocator, store.internal_key)
    store.write_hooks.append(sync)
    store.event_observers.append(sync.observe)

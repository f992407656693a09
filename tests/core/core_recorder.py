"""A recording Proxier for running the real `kproxy` command in tests (mode name "recording").

Each sync appends one JSON line (with $KPROXY_TEST_RECORD_BRIEF set: only sizes and a timestamp) to $KPROXY_TEST_RECORD describing the SyncRequest it got and
whether it reported success; while the file "$KPROXY_TEST_RECORD.fail" exists, syncs fail.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from kproxy.proxiers.base import Proxier, SyncRequest, SyncResult


class RecordingProxier(Proxier):
    mode = "recording"

    def __init__(self, path: str, config: Any) -> None:
        self.path = path
        self.config = config

    def sync(self, request: SyncRequest) -> SyncResult:
        ok = not os.path.exists(self.path + ".fail")
        if os.environ.get("KPROXY_TEST_RECORD_BRIEF"):  # benchmarks: sizes and time only
            brief = {"ok": ok, "full": request.full, "t": time.time(), "services": len(request.services),
                     "endpoints": sum(len(e) for e in request.endpoints.values()),
                     "changed": sorted(str(s) for s in request.changed)}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(brief) + "\n")
            return SyncResult(ok=ok)
        line = {
            "ok": ok,
            "full": request.full,
            "changed": sorted(str(s) + "/" + s.protocol for s in request.changed),
            "services": {str(s) + "/" + s.protocol: [list(p.cluster_ips), p.port, p.type, p.node_port]
                         for s, p in request.services.items()},
            "endpoints": {str(s) + "/" + s.protocol: [[e.addr, e.ready, e.is_local] for e in eps]
                          for s, eps in request.endpoints.items()},
            "stale_endpoints": sorted(f"{s}/{s.protocol}={e.addr}" for s, e in request.stale_endpoints),
            "stale_services": sorted(str(s) + "/" + s.protocol for s in request.stale_services),
            "node_ips": list(self.config.node_ips),
            "node_name": self.config.node_name,
        }
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return SyncResult(ok=ok, rules_total={"nat": len(request.services)}, error="" if ok else "told to fail")

    def cleanup(self) -> bool:
        with open(self.path + ".cleanup", "w", encoding="utf-8") as f:
            f.write("cleaned\n")
        return True


def new_proxier(config: Any) -> Proxier:
    return RecordingProxier(os.environ["KPROXY_TEST_RECORD"], config)

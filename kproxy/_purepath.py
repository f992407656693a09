"""Pure-Python twins of every function in kproxy/_fastpath.pyx.

Each function here must return exactly what its compiled twin returns for the same input;
tests/unit/test_fastpath_twins.py runs both over the same cases.
"""
from __future__ import annotations

import base64
import hashlib


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """The 16-character suffix of kube-proxy's per-service chain names.

    Stable across restarts and releases because chain names must survive a kproxy upgrade
    without a flush: sha256 over name + protocol, base32, first 16 characters, as upstream.
    """
    digest = hashlib.sha256((service_port_name + protocol).encode()).digest()
    return base64.b32encode(digest)[:16].decode("ascii")

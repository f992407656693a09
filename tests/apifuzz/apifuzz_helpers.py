"""The fuzz campaign's client: every response checked (see FuzzClient.send).

Plain HTTP (the server's --insecure-port, still token-authenticated): what is fuzzed is the
request handling, and TLS would only spend the shared CPU on the handshake of the one keep-alive
connection. Every response is checked by FuzzClient.send: no 5xx other than a 504 Timeout Status,
and every error is a Kubernetes Status.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import requests

from controlplane_stub.apiserver.testing import APIServerProcess

FUZZ_NAMESPACE = "fuzz"


class FuzzClient:
    def __init__(self, api: APIServerProcess) -> None:
        self.api = api
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = f"Bearer {api.token}"
        self.codes: Counter[int] = Counter()
        self.sent = 0
        self.reconnects = 0
        self.reasons: Counter[str] = Counter()  # for the printed summary

    def send(self, method: str, path: str, body: bytes | None = None, content_type: str | None = "application/json",
             params: dict[str, str] | None = None) -> requests.Response:
        headers = {} if content_type is None else {"Content-Type": content_type}
        what = f"{method} {path} params={params} ctype={content_type} body={(body or b'')[:300]!r}"
        for attempt in (1, 2):
            try:
                r = self.session.request(method, self.api.url + path, data=body, params=params, headers=headers,
                                         timeout=30)
                break
            except requests.ConnectionError as e:
                # The server may close a keep-alive connection after an answer that left the body
                # unread (a 404 route); a reused connection then fails once. A crash fails twice.
                self.reconnects += 1
                if attempt == 2 or self.api.proc is None or self.api.proc.poll() is not None:
                    raise AssertionError(f"connection lost on {what}: {e}; server log: {self.api._tail()}") from None
        self.sent += 1
        self.codes[r.status_code] += 1
        assert r.status_code < 500 or (r.status_code == 504 and r.json().get("reason") == "Timeout"), \
            f"{r.status_code} for {what}: {r.text[:500]}"
        if r.status_code >= 400 and r.status_code != 404 or path.startswith(("/api/", "/apis/")):
            try:
                doc: Any = r.json()
            except ValueError:
                raise AssertionError(f"{r.status_code} without a JSON body for {what}: {r.text[:300]}") from None
            if r.status_code >= 400:
                assert doc.get("kind") == "Status" and doc.get("code") == r.status_code, (what, doc)
                self.reasons[f"{r.status_code} {str(doc.get('message'))[:50]}"] += 1
        return r

    def json(self, method: str, path: str, obj: Any, **params: str) -> requests.Response:
        return self.send(method, path, json.dumps(obj).encode(), params=params or None)


def assert_alive(client: FuzzClient) -> None:
    """The server still answers, still stores and serves an ordinary object, and logged no 500."""
    api = client.api
    assert api.proc is not None and api.proc.poll() is None, "the API server process died"
    assert client.session.get(api.url + "/healthz", timeout=10).status_code == 200
    ns = f"/api/v1/namespaces/{FUZZ_NAMESPACE}/services"
    svc = {"metadata": {"name": "alive-check"}, "spec": {"ports": [{"port": 80}]}}
    client.send("DELETE", f"{ns}/alive-check")
    assert client.json("POST", ns, svc).status_code == 201
    listed = client.send("GET", ns).json()
    assert "alive-check" in [i["metadata"]["name"] for i in listed["items"]]
    assert client.send("DELETE", f"{ns}/alive-check").status_code == 200
    with open(api.log_path, "rb") as f:
        log = f.read().decode(errors="replace")
    assert "event=internal_error" not in log, log[-3000:]


def fuzz_examples(default: int) -> int:
    """KPROXY_FUZZ_SCALE=N multiplies the campaign (longer runs by hand); CI runs the default."""
    return int(default * float(os.environ.get("KPROXY_FUZZ_SCALE", "1")))

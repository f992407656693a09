"""Helpers for the apiserver tests: a small HTTP client for a real server, object builders."""
from __future__ import annotations

import json
from typing import Any

import requests

from controlplane_stub.apiserver.testing import APIServerProcess


class Client:
    """requests against the server with a bearer token; returns (status, decoded JSON body)."""

    def __init__(self, api: APIServerProcess, token: str | None) -> None:
        self.api = api
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=; proxies are not wanted
        self.session.verify = api.ca_file or False
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                headers: dict[str, str] | None = None, **params: Any) -> tuple[int, Any]:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        h = {"Content-Type": content_type, **(headers or {})}
        r = self.session.request(method, self.api.url + path, data=data, params=params, headers=h, timeout=30)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, r.text

    def get(self, path: str, **params: Any) -> tuple[int, Any]:
        return self.request("GET", path, **params)

    def post(self, path: str, body: Any, **params: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **params)

    def put(self, path: str, body: Any, **params: Any) -> tuple[int, Any]:
        return self.request("PUT", path, body, **params)

    def patch(self, path: str, body: Any, content_type: str = "application/merge-patch+json",
              **params: Any) -> tuple[int, Any]:
        return self.request("PATCH", path, body, content_type=content_type, **params)

    def delete(self, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        return self.request("DELETE", path, body, **params)

    def watch_lines(self, path: str, **params: Any) -> requests.Response:
        return self.session.get(self.api.url + path, params={"watch": "true", **params}, stream=True, timeout=30)


def service(name: str, port: int = 80, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "protocol": "TCP"}], **spec}}

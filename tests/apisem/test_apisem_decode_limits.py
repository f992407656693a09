"""Request bodies as kube-apiserver classifies them: a value of the wrong JSON type, also inside a
list of scalars, is a decode error (400 BadRequest, "cannot be handled as a"), not a validation
error (422); a body over MaxRequestBodyBytes (3 MiB) is 413 RequestEntityTooLarge as a Status,
with Content-Length or chunked, refused while it is read (aiohttp's client_max_size is the limit)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
import urllib3

from controlplane_stub.apiserver.bodies import MAX_REQUEST_BYTES
from controlplane_stub.apiserver.openapi import type_error
from controlplane_stub.apiserver.testing import APIServerProcess, running_apiserver


def _svc(**spec: object) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"ports": [{"port": 80}], **spec}}


@pytest.mark.parametrize("spec,found", [
    ({"ipFamilies": [1]}, "cannot unmarshal number into Go struct field ServiceSpec.spec.ipFamilies of type string"),
    ({"ipFamilies": ["IPv4", {}]}, "cannot unmarshal object into Go struct field ServiceSpec.spec.ipFamilies"),
    ({"ipFamilies": "IPv4"}, "cannot unmarshal string into Go struct field ServiceSpec.spec.ipFamilies of type []"),
    ({"clusterIPs": [True]}, "cannot unmarshal bool into Go struct field ServiceSpec.spec.clusterIPs of type string"),
    ({"ipFamilies": ["IPv4", None]}, None),  # null decodes to "": validation's (422)
    ({"ipFamilies": ["IPv4", "IPv6"]}, None),
])
def test_type_errors_in_lists_of_scalars(spec: dict[str, object], found: str | None) -> None:
    got = type_error("services", _svc(**spec))
    assert (got is None) if found is None else (got is not None and found in got), got


@pytest.fixture(scope="module")
def session(storage_backend: str) -> Iterator[tuple[APIServerProcess, requests.Session]]:
    """On SQLite, then on etcd (tests/conftest.py: storage_backend)."""
    urllib3.disable_warnings()
    with running_apiserver() as api:
        s = requests.Session()
        s.trust_env = False
        s.verify = api.ca_file or False
        s.headers["Authorization"] = f"Bearer {api.token}"
        yield api, s


def test_wrong_types_are_400_and_store_nothing(session: tuple[APIServerProcess, requests.Session]) -> None:
    api, s = session
    path = f"{api.url}/api/v1/namespaces/default/services"
    for spec in ({"ipFamilies": [1]}, {"ipFamilies": "IPv4"}, {"ipFamilyPolicy": 3}, {"ports": [{"port": "80"}]}):
        r = s.post(path, json=_svc(**spec))
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["reason"] == "BadRequest" and 'Service in version "v1" cannot be handled as a Service: json: ' \
            "cannot unmarshal" in body["message"], body
    r = s.post(path, json=_svc(ipFamilies=["IPv4", "IPv5"]))
    assert r.status_code == 422 and r.json()["reason"] == "Invalid"  # a string, but no family: validation's
    assert s.get(f"{path}/s").status_code == 404


def test_bodies_over_3_mib_are_413_status(session: tuple[APIServerProcess, requests.Session]) -> None:
    api, s = session
    path = f"{api.url}/api/v1/namespaces/default/configmaps"
    head = b'{"metadata":{"name":"big"},"data":{"a":"'

    def body(size: int) -> bytes:
        return head + b"x" * (size - len(head) - 3) + b'"}}'

    chunk = os.urandom(1024).hex().encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: 8 MiB in 2 KiB chunks
        yield head
        for _ in range(4096):
            yield chunk
    for data in (body(MAX_REQUEST_BYTES + 1), body(20 * 1024 * 1024), chunked()):
        r = s.post(path, data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:300]
        st = r.json()
        assert st["kind"] == "Status" and st["reason"] == "RequestEntityTooLarge", st
        assert f"limit is {MAX_REQUEST_BYTES}" in st["message"]
    r = s.post(path, data=body(MAX_REQUEST_BYTES - 1024 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "Too long" in r.json()["message"], r.text[:300]  # read, then ConfigMap's 1 MiB rule
    assert s.get(f"{path}/big").status_code == 404

from __future__ import annotations

from typing import Any

import pytest

from controlplane_stub.apiserver import openapi
from controlplane_stub.apiserver.validation import strict_decoding_error, unknown_fields

KINDS = [(g, v, k) for g, v, k, *_ in openapi.KINDS]


def _resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = doc
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def supports_field_validation(doc: dict[str, Any], group: str, version: str, kind: str) -> bool:
    """kubectl's supportsQueryParamV3: a PATCH for the GVK that takes ?fieldValidation."""
    for item in doc["paths"].values():
        op = item.get("patch")
        if op and op.get("x-kubernetes-group-version-kind") == {"group": group, "version": version, "kind": kind}:
            return any(p["name"] == "fieldValidation" and p["in"] == "query" for p in op["parameters"])
    return False


@pytest.mark.timeout(10)
def test_v3_index_and_group_documents_let_kubectl_skip_client_validation() -> None:
    index = openapi.openapi_v3_index()
    assert set(index["paths"]) == {"api/v1", "apis/apps/v1", "apis/discovery.k8s.io/v1", "apis/coordination.k8s.io/v1",
                                   "apis/networking.k8s.io/v1"}
    for gv, entry in index["paths"].items():
        assert entry["serverRelativeURL"].startswith(f"/openapi/v3/{gv}?hash=")
    for group, version, kind in KINDS:
        gv = f"apis/{group}/{version}" if group else f"api/{version}"
        doc = openapi.openapi_v3_group(gv)
        assert doc is not None and doc["openapi"].startswith("3.")
        assert supports_field_validation(doc, group, version, kind), kind
        # kubectl explain / patch lookups find the kind's schema by its GVK extension.
        schemas = [s for s in doc["components"]["schemas"].values()
                   if {"group": group, "version": version, "kind": kind} in s.get("x-kubernetes-group-version-kind", [])]
        assert len(schemas) == 1, kind
        # Every $ref resolves inside the document.
        stack: list[Any] = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if "$ref" in node:
                    _resolve(doc, node["$ref"])
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
    assert openapi.openapi_v3_group("apps/v1") == openapi.openapi_v3_group("apis/apps/v1")
    assert openapi.openapi_v3_group("apis/batch/v1") is None


@pytest.mark.timeout(10)
def test_patch_metadata_is_published() -> None:
    doc = openapi.openapi_v3_group("api/v1")
    assert doc is not None
    schemas = doc["components"]["schemas"]
    containers = schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]
    assert containers["x-kubernetes-patch-merge-key"] == "name" and containers["x-kubernetes-patch-strategy"] == "merge"
    ports = schemas["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"]
    assert ports["x-kubernetes-list-map-keys"] == ["port", "protocol"]
    target = schemas["io.k8s.api.core.v1.ServicePort"]["properties"]["targetPort"]
    assert target["x-kubernetes-int-or-string"] is True
    patch_op = doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["patch"]
    # Strategic merge is left out on purpose: kubectl then uses its compiled-in merge keys.
    assert "application/strategic-merge-patch+json" not in patch_op["requestBody"]["content"]
    assert "application/apply-patch+yaml" in patch_op["requestBody"]["content"]


@pytest.mark.timeout(10)
def test_v2_json_document() -> None:
    doc = openapi.openapi_v2()
    assert doc["swagger"] == "2.0"
    dep = doc["definitions"]["io.k8s.api.apps.v1.Deployment"]
    assert dep["x-kubernetes-group-version-kind"] == [{"group": "apps", "version": "v1", "kind": "Deployment"}]
    op = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"]
    assert any(p["name"] == "fieldValidation" for p in op["parameters"])
    assert _resolve(doc, dep["properties"]["spec"]["$ref"])["properties"]["replicas"]["type"] == "integer"


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _decode_proto(data: bytes) -> dict[int, list[bytes]]:
    """A minimal protobuf wire decoder (length-delimited fields only, which is all we emit)."""
    fields: dict[int, list[bytes]] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        assert key & 7 == 2, "only length-delimited fields expected"
        length, i = _varint(data, i)
        fields.setdefault(key >> 3, []).append(data[i:i + length])
        i += length
    assert i == len(data)
    return fields


@pytest.mark.timeout(10)
def test_v2_protobuf_is_a_gnostic_document() -> None:
    doc = _decode_proto(openapi.openapi_v2_protobuf())
    assert doc[1] == [b"2.0"]  # Document.swagger
    info = _decode_proto(doc[2][0])  # Document.info
    assert info[1] == [b"Kubernetes"] and info[2] == [openapi.KUBERNETES_VERSION.encode()]
    assert doc[8] == [b""]  # Document.paths, present and empty
    assert 9 not in doc  # no definitions: old clients skip schema validation


@pytest.mark.timeout(10)
def test_unknown_fields_for_strict_validation(seed_deployment: dict[str, Any]) -> None:
    assert unknown_fields("deployments.apps", seed_deployment) == []
    seed_deployment["spec"]["replicaz"] = 1
    seed_deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    seed_deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostt"] = 1
    seed_deployment["metadata"]["labelz"] = {}
    # Free-form parts (affinity, probes, securityContext) are not second-guessed.
    seed_deployment["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {"anything": True}}
    # In document order, as the decoder meets them.
    assert unknown_fields("deployments.apps", seed_deployment) == [
        "metadata.labelz", "spec.template.spec.containers[0].ports[0].hostt",
        "spec.template.spec.containers[0].imagee", "spec.replicaz"]
    err = strict_decoding_error("Deployment", "v1", ['unknown field "spec.replicaz"', 'unknown field "spec.x"'])
    assert err.code == 400 and err.reason == "BadRequest"
    assert err.message == ('Deployment in version "v1" cannot be handled as a Deployment: strict decoding error: '
                           'unknown field "spec.replicaz", unknown field "spec.x"')
    assert unknown_fields("services", {"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": 1}]},
                                       "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}) == []
    assert unknown_fields("widgets.example.com", {"x": 1}) == []

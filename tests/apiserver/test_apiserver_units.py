"""Pure logic of the server core: selectors, protobuf decoding, continue tokens, discovery facts."""
from __future__ import annotations

import base64

import pytest

from controlplane_stub.apiserver import discovery
from controlplane_stub.apiserver.errors import StatusError
from controlplane_stub.apiserver.protobuf import MAGIC, decode_object
from controlplane_stub.apiserver.selectors import object_matcher, parse_label_selector
from controlplane_stub.apiserver.server import APIServer

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(("selector", "labels", "want"), [
    ("app=web", {"app": "web"}, True),
    ("app=web", {"app": "db"}, False),
    ("app==web,tier!=front", {"app": "web"}, True),
    ("app==web,tier!=front", {"app": "web", "tier": "front"}, False),
    ("app in (web, db)", {"app": "db"}, True),
    ("app notin (web,db)", {}, True),
    ("app notin (web,db)", {"app": "web"}, False),
    ("example.com/role", {"example.com/role": ""}, True),
    ("!example.com/role", {"example.com/role": "x"}, False),
    ("env in (prod),!canary", {"env": "prod"}, True),
])
def test_label_selector(selector: str, labels: dict[str, str], want: bool) -> None:
    m = parse_label_selector(selector)
    assert m is not None and m(labels) is want


@pytest.mark.parametrize("bad", ["app=we b", "-app=x", "app in (a b)", "a" * 64 + "=x"])
def test_label_selector_errors_are_400(bad: str) -> None:
    with pytest.raises(StatusError) as e:
        parse_label_selector(bad)
    assert e.value.code == 400 and "unable to parse requirement" in e.value.message


def test_field_selector_pins_name_and_rejects_unknown_fields() -> None:
    m, name = object_matcher("", "metadata.name=a,spec.nodeName=n1", "Pod")
    assert name == "a" and m is not None
    assert m({"metadata": {"name": "a"}, "spec": {"nodeName": "n1"}})
    assert not m({"metadata": {"name": "a"}, "spec": {"nodeName": "n2"}})
    with pytest.raises(StatusError) as e:
        object_matcher("", "spec.replicas=3", "Deployment")
    assert e.value.code == 400 and "field label not supported" in e.value.message


def test_event_field_selector_as_kubectl_describe_sends_it() -> None:
    sel = "involvedObject.name=web-1,involvedObject.namespace=default,involvedObject.uid=u1"
    m, _ = object_matcher("", sel, "Event")
    assert m is not None
    ev = {"involvedObject": {"name": "web-1", "namespace": "default", "uid": "u1"}, "source": {"component": "s"}}
    assert m(ev)
    assert not m({**ev, "involvedObject": {**ev["involvedObject"], "uid": "u0"}})  # an earlier pod of that name
    src, _ = object_matcher("", "source=s,reason!=Killing", "Event")
    assert src is not None and src(ev)


def _field(num: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([num << 3 | 2, len(payload)]) + payload


def _varint_field(num: int, value: int) -> bytes:
    assert value < 128
    return bytes([num << 3, value])


def test_protobuf_configmap_and_service() -> None:
    meta = _field(1, b"cfg") + _field(3, b"ns1") + _field(11, _field(1, b"app") + _field(2, b"web")) \
        + _field(2, b"") + _varint_field(7, 0)  # gogo writes empty/zero non-pointer fields
    cm = _field(1, meta) + _field(2, _field(1, b"k") + _field(2, b"v")) + _field(3, _field(1, b"bin") + _field(2, b"\x00\xff"))
    envelope = MAGIC + _field(1, _field(1, b"v1") + _field(2, b"ConfigMap")) + _field(2, cm)
    obj = decode_object(envelope)
    assert obj == {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "cfg", "namespace": "ns1", "labels": {"app": "web"}},
                   "data": {"k": "v"}, "binaryData": {"bin": base64.b64encode(b"\x00\xff").decode()}}
    port = _field(1, b"http") + _varint_field(3, 80) + _field(4, _varint_field(1, 1) + _field(3, b"web"))
    svc = _field(1, _field(1, b"s")) + _field(2, _field(1, port) + _field(4, b"NodePort"))
    obj = decode_object(MAGIC + _field(1, _field(1, b"v1") + _field(2, b"Service")) + _field(2, svc))
    assert obj["spec"] == {"ports": [{"name": "http", "port": 80, "targetPort": "web"}], "type": "NodePort"}


def test_protobuf_errors() -> None:
    with pytest.raises(StatusError) as e:
        decode_object(b"{}")
    assert e.value.code == 400
    with pytest.raises(StatusError) as e:
        decode_object(MAGIC + _field(1, _field(1, b"v1") + _field(2, b"Node")) + _field(2, b""))
    assert e.value.code == 415 and "Node" in e.value.message
    with pytest.raises(StatusError) as e:
        decode_object(MAGIC + _field(1, _field(1, b"v1") + _field(2, b"ConfigMap")) + b"\x12\x50")
    assert e.value.code == 400


def test_continue_token_round_trip_and_scope() -> None:
    token = APIServer._encode_continue(42, "/registry/services/default/b")
    assert APIServer._decode_continue(token, "/registry/services/") == (42, "/registry/services/default/b")
    with pytest.raises(StatusError):
        APIServer._decode_continue(token, "/registry/pods/")
    with pytest.raises(StatusError):
        APIServer._decode_continue("%%%", "/registry/services/")


def test_discovery_documents() -> None:
    v1 = discovery.resource_list("", "v1")
    assert v1 is not None
    names = {r["name"]: r for r in v1["resources"]}
    assert names["pods/binding"]["verbs"] == ["create"] and names["services"]["shortNames"] == ["svc"]
    assert names["endpoints"]["shortNames"] == ["ep"] and names["events"]["shortNames"] == ["ev"]
    groups = discovery.api_group_list()["groups"]
    assert [g["name"] for g in groups] == ["apps", "discovery.k8s.io", "coordination.k8s.io", "rbac.authorization.k8s.io",
                                           "networking.k8s.io"]
    assert discovery.resource_list("apps", "v2") is None and discovery.api_group("nope") is None


def test_aggregated_discovery_negotiation_and_shape() -> None:
    kubectl_accept = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                      "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json")
    assert discovery.wants_aggregated(kubectl_accept)
    assert not discovery.wants_aggregated("application/json, */*")
    assert not discovery.wants_aggregated("")
    core = discovery.aggregated(True)
    assert core["kind"] == "APIGroupDiscoveryList" and [i["metadata"]["name"] for i in core["items"]] == [""]
    pods = next(r for r in core["items"][0]["versions"][0]["resources"] if r["resource"] == "pods")
    assert pods["scope"] == "Namespaced" and pods["shortNames"] == ["po"]
    assert {s["subresource"] for s in pods["subresources"]} == {"status", "binding"}
    apps = discovery.aggregated(False)
    deploy = next(r for i in apps["items"] if i["metadata"]["name"] == "apps"
                  for r in i["versions"][0]["resources"] if r["resource"] == "deployments")
    scale = next(s for s in deploy["subresources"] if s["subresource"] == "scale")
    assert scale["responseKind"] == {"group": "autoscaling", "version": "v1", "kind": "Scale"}

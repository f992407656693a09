"""Services and EndpointSlices trimmed to the fields cluster DNS serves (msgspec skips the rest
while decoding, so a whole object is never materialized)."""
from __future__ import annotations

from sys import intern
from typing import Self

import msgspec

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class ObjectMeta(msgspec.Struct, rename="camel", gc=False):
    """The metadata DNS needs: the name, the Service-name label of slices, and resourceVersion
    (the Reflector resumes its watch from it). Narrower than kproxy.kube.types.ObjectMeta, whose
    uid/generation/deletionTimestamp per object would cost memory at 10,000 Services."""

    name: str = ""
    namespace: str = ""
    resource_version: str = ""
    labels: dict[str, str] | None = None

    def compact(self) -> None:
        # The Reflector has read resourceVersion before the object reaches the index, and a
        # slice's only label read is the Service name: neither is worth keeping per object.
        self.namespace = intern(self.namespace)
        self.resource_version = ""
        if self.labels:
            svc = self.labels.get(SERVICE_NAME_LABEL)
            self.labels = {SERVICE_NAME_LABEL: svc} if svc else None


class ServicePort(msgspec.Struct, rename="camel", gc=False):
    name: str = ""
    port: int = 0
    protocol: str = "TCP"


class ServiceSpec(msgspec.Struct, rename="camel", gc=False):
    type: str = "ClusterIP"
    # "IP" is upper case on the wire, which rename="camel" would not produce.
    cluster_ip: str = msgspec.field(default="", name="clusterIP")
    cluster_ips: list[str] = msgspec.field(default_factory=list, name="clusterIPs")
    ports: list[ServicePort] | None = None
    external_name: str = ""
    publish_not_ready_addresses: bool = False


class Service(msgspec.Struct, gc=False):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ServiceSpec = msgspec.field(default_factory=ServiceSpec)

    def compact(self) -> Self:
        """The object as the index keeps it: the strings that repeat across Services shared, the
        ones it never reads dropped (the decoder makes a fresh copy of every string; at 10,000
        Services that is about 3 MiB of the process's 60)."""
        self.metadata.compact()
        spec = self.spec
        spec.type = intern(spec.type)
        if spec.cluster_ips and spec.cluster_ips[0] == spec.cluster_ip:
            spec.cluster_ips[0] = spec.cluster_ip
        for p in spec.ports or ():
            p.name = intern(p.name)
            p.protocol = intern(p.protocol)
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.metadata.namespace, self.metadata.name)

    @property
    def headless(self) -> bool:
        return self.spec.cluster_ip == "None" or (not self.spec.cluster_ip and not self.spec.cluster_ips
                                                  and self.spec.type != "ExternalName")


class EndpointConditions(msgspec.Struct, gc=False):
    ready: bool | None = None  # nil means ready (discovery.k8s.io/v1)


class Endpoint(msgspec.Struct, gc=False):
    addresses: list[str] = []
    conditions: EndpointConditions = msgspec.field(default_factory=EndpointConditions)
    hostname: str | None = None


class EndpointPort(msgspec.Struct, gc=False):
    name: str | None = None
    port: int | None = None
    protocol: str | None = "TCP"


class EndpointSlice(msgspec.Struct, rename="camel", gc=False):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    address_type: str = "IPv4"
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None

    def compact(self) -> Self:
        """As Service.compact."""
        self.metadata.compact()
        self.address_type = intern(self.address_type)
        for p in self.ports or ():
            p.name = intern(p.name) if p.name else p.name
            p.protocol = intern(p.protocol) if p.protocol else p.protocol
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.metadata.namespace, self.metadata.name)

    @property
    def service_key(self) -> tuple[str, str] | None:
        svc = (self.metadata.labels or {}).get(SERVICE_NAME_LABEL)
        return (self.metadata.namespace, svc) if svc else None


class KubeList(msgspec.Struct):
    """A file of objects for --objects (a v1 List, as `kubectl get svc,endpointslices -A -o json`)."""

    items: list[msgspec.Raw] = []


class _Kind(msgspec.Struct):
    kind: str = ""


def load_objects(data: bytes) -> tuple[list[Service], list[EndpointSlice]]:
    """Services and EndpointSlices from a JSON List; other kinds are ignored."""
    services: list[Service] = []
    slices: list[EndpointSlice] = []
    for raw in msgspec.json.decode(data, type=KubeList).items:
        kind = msgspec.json.decode(raw, type=_Kind).kind
        if kind == "Service":
            services.append(msgspec.json.decode(raw, type=Service))
        elif kind == "EndpointSlice":
            slices.append(msgspec.json.decode(raw, type=EndpointSlice))
    return services, slices

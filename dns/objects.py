"""Services and EndpointSlices trimmed to the fields cluster DNS serves (msgspec skips the rest
while decoding, so a whole object is never materialized)."""
from __future__ import annotations

from sys import intern
from typing import Any, Self, TypeVar

import msgspec

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# The table compact() shares equal immutable parts through (port lists, endpoint conditions): the
# index owns one. Bounded: past this many distinct values it starts over instead of growing.
Shared = dict[Any, Any]
SHARED_MAX = 4096
_V = TypeVar("_V")


def share(table: Shared, value: _V) -> _V:
    """The table's instance equal to value (value itself the first time)."""
    found: _V | None = table.get(value)
    if found is not None:
        return found
    if len(table) >= SHARED_MAX:
        table.clear()
    table[value] = value
    return value


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


class ServicePort(msgspec.Struct, rename="camel", frozen=True, gc=False):
    name: str = ""
    port: int = 0
    protocol: str = "TCP"


class ServiceSpec(msgspec.Struct, rename="camel", gc=False):
    type: str = "ClusterIP"
    # "IP" is upper case on the wire, which rename="camel" would not produce.
    cluster_ip: str = msgspec.field(default="", name="clusterIP")
    cluster_ips: tuple[str, ...] = msgspec.field(default=(), name="clusterIPs")
    # Tuples of frozen ports: hashable, so Services with the same ports share one (compact()).
    ports: tuple[ServicePort, ...] | None = None
    external_name: str = ""
    publish_not_ready_addresses: bool = False


class Service(msgspec.Struct, gc=False):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: ServiceSpec = msgspec.field(default_factory=ServiceSpec)

    def compact(self, shared: Shared) -> Self:
        """The object as the index keeps it: what repeats across Services shared, what it never
        reads dropped (the decoder makes a fresh copy of every string and list; at 10,000 Services
        that is about 4 MiB of the process's 60). clusterIPs equal to [clusterIP] become empty,
        which every reader takes as [clusterIP]."""
        self.metadata.compact()
        spec = self.spec
        spec.type = intern(spec.type)
        if tuple(spec.cluster_ips) == (spec.cluster_ip,):
            spec.cluster_ips = ()
        if spec.ports:
            spec.ports = share(shared, tuple(spec.ports))
        return self

    @property
    def key(self) -> tuple[str, str]:
        return (self.metadata.namespace, self.metadata.name)

    @property
    def headless(self) -> bool:
        return self.spec.cluster_ip == "None" or (not self.spec.cluster_ip and not self.spec.cluster_ips
                                                  and self.spec.type != "ExternalName")


class EndpointConditions(msgspec.Struct, frozen=True, gc=False):
    ready: bool | None = None  # nil means ready (discovery.k8s.io/v1)


class Endpoint(msgspec.Struct, gc=False):
    addresses: list[str] = []
    conditions: EndpointConditions = msgspec.field(default_factory=EndpointConditions)
    hostname: str | None = None


class EndpointPort(msgspec.Struct, frozen=True, gc=False):
    name: str | None = None
    port: int | None = None
    protocol: str | None = "TCP"


class EndpointSlice(msgspec.Struct, rename="camel", gc=False):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    address_type: str = "IPv4"
    endpoints: list[Endpoint] | None = None
    ports: tuple[EndpointPort, ...] | None = None

    def compact(self, shared: Shared) -> Self:
        """As Service.compact."""
        self.metadata.compact()
        self.address_type = intern(self.address_type)
        if self.ports:
            self.ports = share(shared, tuple(self.ports))
        for ep in self.endpoints or ():
            ep.conditions = share(shared, ep.conditions)
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

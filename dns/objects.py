"""Services and EndpointSlices trimmed to the fields cluster DNS serves (msgspec skips the rest
while decoding, so a whole object is never materialized)."""
from __future__ import annotations

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

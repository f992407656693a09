from kproxy.model import Endpoint, ServicePort

LARGE_CLUSTER_ENDPOINTS: int
R_FILTER: int
R_DISPATCH: int
R_CHAINS: int
R_RULES: int
R_CHAIN_NAMES: int
R_HAS_ENDPOINTS: int

def port_proto_hash(service_port_name: str, protocol: str) -> str: ...
def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str: ...
def probability(n: int) -> str: ...
def render_service_port(
    svc: ServicePort,
    endpoints: tuple[Endpoint, ...],
    masquerade_all: bool,
    cluster_cidr: str,
    large_cluster: bool,
    node_ips: tuple[str, ...],
    node_zone: str = "",
) -> tuple[str, str, str, str, list[str], bool]: ...

"""Parsers for every API field that reaches a kernel interface (iptables-restore input, IPVS
netlink, the relay's sockets): each returns the typed, canonical value or raises InvalidField.

kproxy runs as root and writes what it reads into the node's firewall; the API server may be
another implementation, or its store may have been written around its validation. So every value
is parsed here when the record is built (kproxy/kube/ingest.py), never trusted because an API
server "should have" rejected it. The grammars are kube-apiserver's (apimachinery's
IsDNS1123Label / IsDNS1035Label, Service port and IP rules); IP text is re-rendered from the parsed
address, so nothing but the canonical form of a real address can reach a rule.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from typing import Literal

from kproxy.model import CIDR, IP, Port, Protocol

# The `reason` label of kproxy_invalid_objects_total: a closed set, so a hostile object cannot
# grow the metric's label space.
Reason = Literal["name", "ip", "cidr", "port", "protocol", "type", "timeout", "decode"]

DNS_LABEL_MAX = 63
_DNS1123_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?")
# Longest textual IPv6 address with an embedded IPv4 part is 45 characters; anything longer is
# refused before the parser sees it (and before it can be copied into a log line whole).
_IP_TEXT_MAX = 45
_CIDR_TEXT_MAX = 49
PROTOCOLS: dict[str, Protocol] = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP"}
# Upstream's MaxClientIPServiceAffinitySeconds (one day).
MAX_AFFINITY_SECONDS = 86400


class InvalidField(ValueError):
    """One field failed its grammar: `reason` is the metric label, str() the one log line."""

    def __init__(self, reason: Reason, field: str, value: object, why: str) -> None:
        self.reason: Reason = reason
        self.field = field
        super().__init__(f"{field}: {why}: {show(value)}")


def show(value: object) -> str:
    # repr() escapes newlines and quotes: a hostile value stays on its one log line.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def dns1123_label(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > DNS_LABEL_MAX or not _DNS1123_LABEL.fullmatch(value):
        raise InvalidField("name", field, value, "not a DNS-1123 label")
    return value


def dns1035_label(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > DNS_LABEL_MAX or not _DNS1035_LABEL.fullmatch(value):
        raise InvalidField("name", field, value, "not a DNS-1035 label")
    return value


def port_name(value: object, field: str) -> str:
    """A Service or EndpointSlice port name: empty (a single unnamed port) or a DNS-1123 label."""
    if value == "" or value is None:
        return ""
    return dns1123_label(value, field)


def port(value: object, field: str) -> Port:
    # bool is an int subclass: `true` is not a port.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidField("port", field, value, "not a port number in 1-65535")
    return Port(value)


def optional_port(value: object, field: str) -> Port:
    """nodePort / healthCheckNodePort: 0 (unset) or a port."""
    if value == 0 and not isinstance(value, bool):
        return Port(0)
    return port(value, field)


def protocol(value: object, field: str) -> Protocol:
    # An absent protocol defaults to TCP, as the API server's defaulting does.
    if value is None or value == "":
        return "TCP"
    proto = PROTOCOLS.get(value) if isinstance(value, str) else None
    if proto is None:
        raise InvalidField("protocol", field, value, "not one of TCP, UDP, SCTP")
    return proto


def ip(value: object, field: str) -> IP:
    """An IPv4 or IPv6 address in canonical text (IPv4-mapped IPv6 and zones refused, as Go's
    netip-based validation does; leading zeros refused by Python's parser)."""
    if not isinstance(value, str) or not value or len(value) > _IP_TEXT_MAX:
        raise InvalidField("ip", field, value, "not an IP address")
    if ":" not in value:
        # IPv4, the common case (100,000 endpoints at 10,000 Services): glibc's inet_pton takes
        # exactly four decimal octets without leading zeros, so text it accepts is already
        # canonical; 20x cheaper than ipaddress.
        try:
            socket.inet_pton(socket.AF_INET, value)
        except (OSError, ValueError):
            raise InvalidField("ip", field, value, "not an IP address") from None
        return IP(value)
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidField("ip", field, value, "not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and (addr.scope_id is not None or addr.ipv4_mapped is not None):
        raise InvalidField("ip", field, value, "not an IP address")
    return IP(str(addr))


def cidr(value: object, field: str) -> CIDR:
    """A CIDR in canonical text; host bits are cleared (kube-proxy parses source ranges
    sloppily, ParseCIDRSloppy, and uses the network)."""
    if not isinstance(value, str):
        raise InvalidField("cidr", field, value, "not a CIDR")
    text = value.strip()
    if not text or len(text) > _CIDR_TEXT_MAX or "/" not in text:
        raise InvalidField("cidr", field, value, "not a CIDR")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise InvalidField("cidr", field, value, "not a CIDR") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.scope_id is not None:
        raise InvalidField("cidr", field, value, "not a CIDR")
    return CIDR(str(net))


def affinity_timeout(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_AFFINITY_SECONDS:
        raise InvalidField("timeout", field, value, f"not a timeout in 1-{MAX_AFFINITY_SECONDS} seconds")
    return value

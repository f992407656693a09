"""The hostile store of tests/iptables/test_iptables_hostile.py (tests/helpers/hostile_store.py: the
same objects, the same counters and log lines, the same change while the API server is down) served
to the real `kproxy --proxy-mode nftables` in a node namespace this test creates.

What nftables mode programmed is read from the kernel (`nft -j list ruleset` in the namespace):
the ClusterIP of each Service in the service-ips map and the cluster-ips set, its endpoints in the
endpoint map block its service- chain DNATs through, its NodePort in service-nodeports. kproxy must
program exactly the 100 valid Services and the two partly-bad ones (without their bad entry), with
their valid endpoints only; every string in its tables must be one kproxy's validated records can
render (a name, a fixed keyword, a canonical address: `nft_problems`); and connections from the node
reach exactly the valid endpoints (helpers.hostile_store.assert_traffic).
"""
from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.hostile_store import (
    BAD_SERVICES,
    FIRST,
    PARTIAL,
    SECOND,
    EndpointServer,
    assert_counted_and_logged,
    assert_no_rejected_values,
    assert_traffic,
    assert_watch_resumed,
    bad_cluster_ip,
    bad_endpoint,
    good_endpoints,
    hostile_apiserver,
    hostile_node,
    kproxy_args,
    ns_output,
    restart_with_changes,
    service_addresses,
    wait_programmed,
)
from helpers.kproxy_e2e import start_kproxy, stop_and_clean
from nft_state import SKIP_REASON, table_exists

testing = pytest.importorskip("controlplane_stub.apiserver.testing")

pytestmark = pytest.mark.e2e

_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS1035 = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"
# A per-ServicePort chain: kind-HASH-namespace/name/protocol/port (an endpoint- chain adds __ip/port).
_SERVICE_CHAIN = re.compile(
    rf"(?P<kind>service|local|external|firewall|endpoint)-[A-Z0-9]{{8}}-(?P<ns>{_LABEL})/(?P<name>{_DNS1035})"
    rf"/(?:tcp|udp|sctp)/(?:{_LABEL})?(?:__(?P<ip>[0-9a-f.:]+)/[0-9]{{1,5}})?")
_FIXED_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")  # the table's own chains, sets and maps
_COMMENT = re.compile(r"[A-Za-z0-9 ,.:;/_>()-]{0,128}")
_ADDRESS_LIKE = re.compile(r"[0-9a-fA-F.:]*[.:][0-9a-fA-F.:]*")
_TOKEN = re.compile(r"[A-Za-z0-9_.:!=<>@ -]{0,64}")


def _chain_name_ok(value: str) -> bool:
    m = _SERVICE_CHAIN.fullmatch(value)
    if m is None:
        return bool(_FIXED_NAME.fullmatch(value))
    if m["ip"] is not None:
        try:
            return str(ipaddress.ip_address(m["ip"])) == m["ip"]
        except ValueError:
            return False
    return True


def nft_problems(doc: list[dict[str, Any]]) -> list[str]:
    """Strings in kproxy's tables (`ip`/`ip6 kube-proxy`) of an `nft -j list ruleset` document that
    are not something kproxy's validated records can render: a chain, set or map name (a fixed name
    or kind-HASH-ns/name/proto/port), a comment of plain words, a canonical address, a keyword. The
    kernel holds addresses and ports as numbers, so a hostile value could only show up here."""
    problems: list[str] = []

    def check(value: object, key: str, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                check(v, k, where)
        elif isinstance(value, list):
            for v in value:
                check(v, key, where)
        elif isinstance(value, str):
            if key == "comment":
                ok = bool(_COMMENT.fullmatch(value))
            elif key in ("chain", "name", "target") or value.startswith("@"):
                ok = _chain_name_ok(value.removeprefix("@"))
            elif _ADDRESS_LIKE.fullmatch(value):
                try:
                    ok = str(ipaddress.ip_address(value)) == value
                except ValueError:
                    ok = False
            else:
                ok = bool(_TOKEN.fullmatch(value))
            if not ok:
                problems.append(f"{where}: {key}={value!r}")

    for item in doc:
        for kind, obj in item.items():
            if kind == "metainfo" or not isinstance(obj, dict):
                continue
            if obj.get("table", obj.get("name")) != "kube-proxy":
                continue
            check(obj, kind, f"{kind} {obj.get('family')} {obj.get('name', obj.get('chain'))}")
    return problems


def _ruleset(netns: str) -> list[dict[str, Any]]:
    out = ns_output(netns, "nft", "-j", "list", "ruleset")
    doc: list[dict[str, Any]] = json.loads(out)["nftables"] if out.strip() else []
    return doc


def _ip_table(doc: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """The sets, maps or chains (`kind`) of `ip kube-proxy`, by name."""
    return {o[kind]["name"]: o[kind] for o in doc
            if kind in o and o[kind].get("family") == "ip" and o[kind].get("table") == "kube-proxy"}


def _pairs(elems: list[Any]) -> Iterator[tuple[Any, Any]]:
    """A map's elements as (key, value); an element with a comment or timeout is {"elem": {"val": KEY, ...}}."""
    for e in elems:
        key, value = e
        if isinstance(key, dict) and "elem" in key:
            key = key["elem"]["val"]
        yield key, value


def _verdict_target(value: Any) -> str:
    for verdict in ("goto", "jump"):
        if isinstance(value, dict) and verdict in value:
            return str(value[verdict]["target"])
    return ""


def _cluster_ips(doc: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Service name (namespace default) -> the addresses service-ips sends to its service- (or
    local-) chain: its ClusterIPs."""
    out: dict[str, set[str]] = {}
    smap = _ip_table(doc, "map").get("service-ips", {})
    for key, value in _pairs(smap.get("elem", [])):
        m = _SERVICE_CHAIN.fullmatch(_verdict_target(value))
        if m and m["kind"] in ("service", "local") and m["ns"] == "default":
            out.setdefault(m["name"], set()).add(key["concat"][0])
    return out


def _endpoints(doc: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Service name (namespace default) -> "ip:port" of the endpoint map block its service- chain
    DNATs through (`dnat ip to numgen random mod N offset O map @endpoints-...`)."""
    maps = _ip_table(doc, "map")
    out: dict[str, set[str]] = {}
    for o in doc:
        rule = o.get("rule")
        if not rule or rule.get("family") != "ip" or rule.get("table") != "kube-proxy":
            continue
        m = _SERVICE_CHAIN.fullmatch(rule["chain"])
        if not m or m["kind"] != "service" or m["ns"] != "default":
            continue
        for expr in rule["expr"]:
            lookup = expr.get("dnat", {}).get("addr", {}).get("map") if isinstance(expr, dict) else None
            if not lookup:
                continue
            gen = lookup["key"]["numgen"]
            first, count = gen.get("offset", 0), gen["mod"]
            block = maps[lookup["data"].removeprefix("@")]
            for key, value in _pairs(block.get("elem", [])):
                if first <= key < first + count:
                    ip, port = value["concat"]
                    out.setdefault(m["name"], set()).add(f"{ip}:{port}")
    return out


def _node_ports(doc: list[dict[str, Any]]) -> dict[int, str]:
    """NodePort -> the Service name service-nodeports sends it to."""
    out: dict[int, str] = {}
    nmap = _ip_table(doc, "map").get("service-nodeports", {})
    for key, value in _pairs(nmap.get("elem", [])):
        m = _SERVICE_CHAIN.fullmatch(_verdict_target(value))
        out[int(key["concat"][1])] = m["name"] if m else _verdict_target(value)
    return out


def _wait_for(netns: str, want: frozenset[str], proc: subprocess.Popen[bytes], log: Path) -> list[dict[str, Any]]:
    def read() -> tuple[set[str], str]:
        doc = _ruleset(netns)
        return set(_cluster_ips(doc)), json.dumps(doc)

    doc: list[dict[str, Any]] = json.loads(wait_programmed(read, want, proc, log))
    return doc


def _assert_programmed(doc: list[dict[str, Any]], names: frozenset[str]) -> None:
    """Each of `names` has its ClusterIP and exactly its valid endpoints; nothing else is there."""
    addresses = service_addresses()
    vips, endpoints = _cluster_ips(doc), _endpoints(doc)
    for name in names:
        vip, valid = addresses[name]
        assert vips.get(name) == {vip}, (name, vips.get(name))
        assert endpoints.get(name) == {f"{ip}:8080" for ip in valid}, (name, endpoints.get(name))
    dispatched = set(endpoints) - {"kubernetes"}
    assert dispatched == names, sorted(dispatched ^ names)


@pytest.fixture
def node() -> Iterator[str]:
    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    with hostile_node("kpnfth") as netns:
        yield netns


@pytest.mark.timeout(300)
def test_bad_objects_in_the_store_are_skipped_and_never_reach_the_ruleset(node: str, tmp_path: Path) -> None:
    log_path = tmp_path / "kproxy.log"
    with hostile_apiserver(node) as (api, data_dir), EndpointServer(node):
        proc = start_kproxy(node, kproxy_args(api, "nftables"), log_path)
        try:
            doc = _wait_for(node, FIRST, proc, log_path)
            assert nft_problems(doc) == [], nft_problems(doc)[:5]
            text = ns_output(node, "nft", "list", "ruleset")
            assert "table ip kube-proxy" in text
            assert_no_rejected_values(text)
            assert_no_rejected_values(json.dumps(doc))
            _assert_programmed(doc, FIRST)
            cluster_ips = {e for e in _ip_table(doc, "set")["cluster-ips"].get("elem", [])}
            for j, name in enumerate(BAD_SERVICES):  # addresses as the store gives them
                assert (bad_cluster_ip(j) in cluster_ips) == (name in PARTIAL), (name, bad_cluster_ip(j))
                assert (f'"{bad_endpoint(j)}", 8080' in json.dumps(doc)) == (name in PARTIAL), name
            # The valid slices of svc-0/1/2 still apply beside their bad ones (_assert_programmed: exactly).
            assert all(f'"{good_endpoints(i)[1]}", 8080' in json.dumps(doc) for i in range(3))
            # bad-lb-ingress keeps its NodePort; bad-node-port's and bad-source-range's are nowhere.
            assert _node_ports(doc) == {30001: "bad-lb-ingress"}
            assert_traffic(node, FIRST)
            assert_counted_and_logged(node, log_path)

            # Changes while the API server is down arrive through the resumed watch.
            restart_with_changes(api, data_dir)
            doc = _wait_for(node, SECOND, proc, log_path)
            assert nft_problems(doc) == []
            _assert_programmed(doc, SECOND)
            assert_traffic(node, SECOND)
            assert_watch_resumed(proc, log_path)
        finally:
            cleaned = stop_and_clean(proc, node, "--proxy-mode", "nftables")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not table_exists(node, "ip", "kube-proxy") and not table_exists(node, "ip6", "kube-proxy")

# cython: wraparound=True, boundscheck=True, cdivision=False
# (setup.py compiles this file with Cython; these directives keep Python's semantics, which
# setup.py's global ones would change.)
"""The nftables proxier's retained map and set elements, kept compact (issue 15: RSS at 10,000
Services x 10 endpoints is ~220,000 elements; as (set, key, value) tuples of strings they took
~40 MiB with their reference counts).

- Each ServicePort keeps its elements packed in one string (pack/unpack): a partial sync only
  asks "did they change" (string equality) and "which to delete and add" (the difference of two
  small sets, one ServicePort's).
- Only the elements several ServicePorts can want at once are reference-counted (SharedRefs):
  a ClusterIP in cluster-ips (every port of the Service), an endpoint pair in hairpin-ips (a pod
  behind several Services), a no-endpoint verdict (drop or reject: the same for any
  ServicePort). Every other element is one ServicePort's alone: its value names that
  ServicePort's own chain (service-ips, service-nodeports, firewall-ips), or its key is a slot
  of that ServicePort's block in an endpoint map (kproxy.proxiers.nftables.Slots).

A full sync runs pack_counting over 10,000 ServicePorts' 220,000 elements: setup.py compiles this
file with Cython, and kproxy.proxiers.nftables loads it as Python with KPROXY_PURE=1
(kproxy.fastpath.pure_twin); tests/nftables/test_nftables_elements.py runs both.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import TypeVar

Element = tuple[str, str, str]  # (map or set, key, value)

HAIRPIN = "hairpin-ips"
CLUSTER_IPS = "cluster-ips"
_NO_ENDPOINT = ("no-endpoint-services", "no-endpoint-nodeports")


def is_shared(set_name: str) -> bool:
    return set_name in (HAIRPIN, CLUSTER_IPS) or set_name in _NO_ENDPOINT


# The group of hairpin-ips elements "A . A" (a pod reaching itself: all of them), kept as A alone:
# a tenth of the packed text at 10 endpoints a Service. No set name begins with "=".
_DOUBLED = "=" + HAIRPIN


def hairpin_of(e: Element) -> str:
    """A of a hairpin-ips element "A . A", else "" (pack keeps such an element as A alone, and
    SharedRefs counts it by A)."""
    set_name, key, value = e
    if set_name != HAIRPIN or value:
        return ""
    a, sep, b = key.partition(" . ")
    return a if sep and a == b else ""


def pack(elements: Iterable[Element]) -> str:
    """The elements as one string, grouped by set in their first order, duplicates dropped:
    "SET\tKEY\tVALUE\tKEY\tVALUE...\nSET...", and hairpin-ips' "A . A" as "=hairpin-ips\tA\tA2...".
    Keys and values are rendered from validated addresses, ports, protocols and Kubernetes
    names, which have no tab or newline; one that had would be refused here (ValueError)
    rather than stored wrongly."""
    groups: dict[str, dict[tuple[str, str], None]] = {}
    doubled: dict[str, None] = {}
    for e in elements:
        if a := hairpin_of(e):
            doubled[a] = None
            continue
        set_name, key, value = e
        groups.setdefault(set_name, {})[(key, value)] = None
    return _joined(groups, doubled)


def pack_counting(elements: Iterable[Element], blocks: Iterable[tuple[str, int, Iterable[str]]],
                  refs: SharedRefs, canon: dict[str, str], own: list[Element]) -> str:
    """pack() of a ServicePort's elements followed by its endpoint-map blocks' ((map, first slot,
    targets): the elements (map, slot_key(first + k), target)), in one pass (a full sync's, for
    each of 10,000 ServicePorts) that also does what the full sync does with each element once
    deduplicated: a shared one is counted in refs (an address by canon's string of it, as
    SharedRefs.add), any other but the endpoint maps' is appended to own."""
    groups: dict[str, dict[tuple[str, str], None]] = {}
    doubled: dict[str, None] = {}
    # Each count is one more (SharedRefs.add(e, 1) without its calls: 230,000 times a full sync).
    hairpin, cluster_ips, other = refs.hairpin, refs.cluster_ips, refs.other
    for e in elements:
        set_name, key, value = e
        if set_name == HAIRPIN and not value:
            a, sep, b = key.partition(" . ")
            if a and sep and a == b:  # hairpin_of(e)
                if a not in doubled:
                    doubled[a] = None
                    a = canon.get(a, a)
                    hairpin[a] = hairpin.get(a, 0) + 1
                continue
        group = groups.get(set_name)
        if group is None:
            group = groups[set_name] = {}
        elif (key, value) in group:
            continue
        group[(key, value)] = None
        if set_name == CLUSTER_IPS and not value:
            key = canon.get(key, key)
            cluster_ips[key] = cluster_ips.get(key, 0) + 1
        elif is_shared(set_name):
            other[e] = other.get(e, 0) + 1
        else:
            own.append(e)
    keys, n_keys = _SLOT_KEYS, len(_SLOT_KEYS)
    for emap, first, targets in blocks:
        if targets:
            group = groups.setdefault(emap, {})
            for k, target in enumerate(targets, first):
                group[(keys[k] if k < n_keys else f"0x{k:x}", target)] = None  # slot_key(k)
    return _joined(groups, doubled)


def _joined(groups: dict[str, dict[tuple[str, str], None]], doubled: dict[str, None]) -> str:
    parts = [set_name + "\t" + "\t".join(chain.from_iterable(kv)) for set_name, kv in groups.items()]
    if doubled:
        parts.append(_DOUBLED + "\t" + "\t".join(doubled))
    packed = "\n".join(parts)
    # A group has 2 tabs per element (1 in the doubled group); groups are parted by one newline.
    if (packed.count("\t") != 2 * sum(map(len, groups.values())) + len(doubled)
            or packed.count("\n") != max(0, len(parts) - 1)):
        raise ValueError("nftables element text with a tab or newline")
    return packed


# The slot keys of the endpoint maps: the same few hundred in every map (each holds ~200 slots at
# 10,000 Services), shared instead of 100,000 strings made per sync and kept per element.
_SLOT_KEYS = tuple(f"0x{i:x}" for i in range(4096))


def slot_key(slot: int) -> str:
    """The key of an endpoint map's slot (numgen's value): "0x1f"."""
    return _SLOT_KEYS[slot] if slot < len(_SLOT_KEYS) else f"0x{slot:x}"


def _group_elements(group: str) -> Iterator[Element]:
    fields = group.split("\t")
    set_name = fields[0]
    if set_name == _DOUBLED:
        for a in fields[1:]:
            yield HAIRPIN, f"{a} . {a}", ""
        return
    for i in range(1, len(fields), 2):
        yield set_name, fields[i], fields[i + 1]


def unpack(packed: str) -> Iterator[Element]:
    for group in packed.split("\n") if packed else ():
        yield from _group_elements(group)


def unpack_set(packed: str, wanted: str) -> Iterator[Element]:
    """The elements of one set (an endpoint map: a full sync writes each map's elements together)."""
    prefix = wanted + "\t"
    for group in packed.split("\n") if packed else ():
        if group.startswith(prefix) or (wanted == HAIRPIN and group.startswith(_DOUBLED + "\t")):
            yield from _group_elements(group)


class SharedRefs:
    """Reference counts of the shared elements (is_shared): per set, a Counter keyed as small as
    the element allows. hairpin-ips' key is "A . A": counted by A; cluster-ips' by the address.
    The caller may pass the model's own address string (canon) so the Counter keeps no copy."""

    def __init__(self) -> None:
        self.hairpin: Counter[str] = Counter()
        self.cluster_ips: Counter[str] = Counter()
        self.other: Counter[Element] = Counter()

    def __len__(self) -> int:
        return len(self.hairpin) + len(self.cluster_ips) + len(self.other)

    def count(self, e: Element) -> int:
        if a := hairpin_of(e):
            return self.hairpin.get(a, 0)
        if e[0] == CLUSTER_IPS and not e[2]:
            return self.cluster_ips.get(e[1], 0)
        return self.other.get(e, 0)

    def add(self, e: Element, d: int = 1, canon: dict[str, str] | None = None) -> None:
        """Adds d (negative: removes) references; an element at zero references is forgotten."""
        if a := hairpin_of(e):
            _bump(self.hairpin, canon.get(a, a) if canon else a, d)
        elif e[0] == CLUSTER_IPS and not e[2]:
            _bump(self.cluster_ips, canon.get(e[1], e[1]) if canon else e[1], d)
        else:
            _bump(self.other, e, d)

    def elements(self) -> Iterator[Element]:
        """Every element with a reference, grouped by set."""
        for ip in self.cluster_ips:
            yield CLUSTER_IPS, ip, ""
        for ip in self.hairpin:
            yield HAIRPIN, f"{ip} . {ip}", ""
        yield from self.other


K = TypeVar("K")


def _bump(counter: Counter[K], key: K, d: int) -> None:
    left = counter.get(key, 0) + d
    if left > 0:
        counter[key] = left
    else:
        counter.pop(key, None)

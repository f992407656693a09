"""Request bodies: bytes from a client -> a JSON-shaped value the registry may keep, or a 4xx Status.

Everything a client sends is untrusted. Whatever the content type, a decoded body is:
- at most MAX_REQUEST_BYTES when encoded as JSON (kube-apiserver's request-size limit); a YAML body
  whose aliases would expand past it is refused before it is built (a 320-byte "billion laughs"
  body otherwise becomes tens of MB in memory and in the store);
- at most MAX_DEPTH levels deep (deeper input gets 400, never a RecursionError deeper in the server);
- made of dicts with string keys, lists, strings without lone surrogates, bools, None, integers
  that fit int64 and finite floats (what Go's decoder and the store's JSON encoder accept);
- with its duplicate keys reported (as dotted paths) for fieldValidation: Strict rejects them.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import msgspec
import yaml

from .errors import StatusError, bad_request, invalid

# kube-apiserver's MaxRequestBodyBytes (3 MiB): the most a request body, and so an object decoded
# from it, may hold.
MAX_REQUEST_BYTES = 3 * 1024 * 1024
# Deepest nesting accepted. The deepest Kubernetes objects (pod templates with affinity terms, their
# managedFields) stay under 20; the rest of the server recurses over objects, so this bounds it.
MAX_DEPTH = 100
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

JSON_TYPES = ("application/json", "", "application/octet-stream", "text/plain")
YAML_TYPES = ("application/yaml", "application/x-yaml")
PROTOBUF_TYPE = "application/vnd.kubernetes.protobuf"


@dataclass(slots=True)
class Decoded:
    obj: Any
    duplicates: list[str] = field(default_factory=list)  # dotted paths of keys given more than once


def too_large(size: int) -> StatusError:
    return StatusError(413, "RequestEntityTooLarge",
                       f"Request entity too large: limit is {MAX_REQUEST_BYTES}, got at least {size}")


def decode_request(raw: bytes, content_type: str) -> Decoded:
    """A create/update body by its Content-Type (JSON, YAML or Kubernetes protobuf)."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise too_large(len(raw))
    if content_type in YAML_TYPES:
        return decode_yaml(raw)
    if content_type == PROTOBUF_TYPE:
        from .protobuf import decode_object

        try:
            obj = decode_object(raw)
        except StatusError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed message of any shape is the client's error
            raise bad_request(f"the body of the request was in an unknown format: protobuf: {e}") from None
        return Decoded(check_value(obj, "the body of the request"))
    if content_type not in JSON_TYPES:
        raise StatusError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                          "accepted media types include: application/json, application/yaml, "
                          "application/vnd.kubernetes.protobuf")
    return decode_json(raw, "the body of the request was in an unknown format")


def check_object_size(obj: Any) -> None:
    """An object about to be stored is at most MAX_REQUEST_BYTES as JSON (a patch or an update can
    grow an object past what one request may carry; kube-apiserver's store refuses those too)."""
    try:
        size = len(msgspec.json.encode(obj))
    except (TypeError, ValueError, OverflowError) as e:
        raise bad_request(f"the object cannot be encoded as JSON: {e}") from None
    if size > MAX_REQUEST_BYTES:
        raise too_large(size)


def warning_header(text: str) -> str:
    """A `Warning: 299 - "text"` value. The text may quote a client's field names: control
    characters are escaped (a newline would otherwise end the header, and aiohttp refuses to send
    it), as are the quoted-string's own specials."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if not escaped.isprintable():
        escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
    return f'299 - "{escaped}"'


_PROPAGATION = ("Background", "Foreground", "Orphan")


def check_delete_options(options: Any) -> dict[str, Any]:
    """DeleteOptions from a body and the query: the decoder's type checks (400) and upstream's
    ValidateDeleteOptions (422), so that the registry only sees well-typed values."""
    if not isinstance(options, dict):
        raise bad_request("DeleteOptions must be a JSON object")
    types: dict[str, tuple[type, ...]] = {"preconditions": (dict,), "orphanDependents": (bool,),
                                          "propagationPolicy": (str,), "dryRun": (list,),
                                          "gracePeriodSeconds": (int, str)}
    for key, allowed in types.items():
        value = options.get(key)
        if value is not None and (not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed):
            raise bad_request(f"error decoding DeleteOptions: {key}: unexpected value {_short(value)}")
    pre = options.get("preconditions") or {}
    if any(v is not None and not isinstance(v, str) for v in pre.values()):
        raise bad_request("error decoding DeleteOptions: preconditions: uid and resourceVersion are strings")
    causes: list[dict[str, str]] = []
    policy = options.get("propagationPolicy")
    if policy is not None and policy not in _PROPAGATION:
        causes.append({"reason": "FieldValueNotSupported", "field": "propagationPolicy",
                       "message": f'Unsupported value: "{policy}": supported values: "Foreground", "Background", '
                                  f'"Orphan"'})
    if policy is not None and options.get("orphanDependents") is not None:
        causes.append({"reason": "FieldValueInvalid", "field": "propagationPolicy",
                       "message": "Invalid value: orphanDependents and deletionPropagation cannot be both set"})
    for i, value in enumerate(options.get("dryRun") or []):
        if value != "All":
            causes.append({"reason": "FieldValueNotSupported", "field": f"dryRun[{i}]",
                           "message": f'Unsupported value: {_short(value)}: supported values: "All"'})
    if causes:
        raise invalid("DeleteOptions", "", causes, "meta.k8s.io")
    return options


# --- JSON ----------------------------------------------------------------------------------------

def _parse_constant(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


class _Duplicates(threading.local):
    """Which objects of the body being decoded (on this thread) had a key twice: id -> keys."""

    def __init__(self) -> None:
        self.found: dict[int, list[str]] = {}


_duplicates = _Duplicates()


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """object_pairs_hook that remembers which objects had a key twice (the last value wins, as in Go)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        again = [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        _duplicates.found[id(out)] = sorted(set(again))
    return out


# One decoder for every body: json.loads with a hook builds a new decoder and scanner per call,
# two thirds of a small body's decoding (~6 us of a ConfigMap create's ~9).
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_parse_constant)


def _loads(raw: bytes | str) -> Any:
    """json.loads(raw) through _DECODER: the same encoding detection and BOM rule."""
    if isinstance(raw, str):
        if raw.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", raw, 0)
        return _DECODER.decode(raw)
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


_FAST_DECODE_BYTES = 64 * 1024


def decode_json(raw: bytes | str, what: str) -> Decoded:
    """JSON text -> Decoded; `what` starts the 400 message ("error decoding patch", ...)."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise too_large(len(raw))
    if isinstance(raw, bytes) and len(raw) <= _FAST_DECODE_BYTES:
        # msgspec's decoder first: UTF-8 JSON without a key given twice (almost every body) decodes to
        # the value the standard decoder below builds, faster (a ConfigMap create's body: 4.4 us
        # instead of 12 on the bench machine). msgspec keeps the last of two equal keys silently:
        # the body's members, counted in its text, tell. Anything msgspec refuses (not UTF-8, a BOM,
        # a lone surrogate, a number out of range, malformed text) or a duplicate goes the standard
        # way, which words the error or finds the duplicates. Larger bodies gain nothing (the count
        # and the walk weigh as much as the hook): they go the standard way at once.
        try:
            obj = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError, ValueError):  # too deep for msgspec: RecursionError
            pass
        else:
            if _check(obj, what) == _members_in_text(raw):
                return Decoded(obj)
    found = _duplicates.found = {}
    try:
        # Numbers are range-checked by check_value's walk; NaN and Infinity are not JSON.
        obj = _loads(raw)
    except RecursionError:
        raise bad_request(f"{what}: nesting deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"{what}: {e}") from None
    finally:
        _duplicates.found = {}
    check_value(obj, what)
    return Decoded(obj, _duplicate_paths(obj, found) if found else [])


def _members_in_text(raw: bytes) -> int:
    """The object members written in valid JSON text: its colons outside strings. In valid JSON a
    backslash only starts an escape inside a string: with the escaped backslashes taken out first,
    then the escaped quotes, every quote left opens or closes a string (bytes methods only: linear,
    a few ms for a 3 MiB body, whatever it holds)."""
    outside = raw.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2]
    return b"".join(outside).count(b":")


def _duplicate_paths(obj: Any, dups: dict[int, list[str]]) -> list[str]:
    """Dotted paths (the strict decoder's notation) of the keys the hook saw twice."""
    out: list[str] = []
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key in dups.get(id(value), ()):
                out.append(f"{path}.{key}" if path else key)
            stack.extend((v, f"{path}.{k}" if path else k) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
    return sorted(out)


# --- the shape every decoded body must have ------------------------------------------------------

def check_value(obj: Any, what: str) -> Any:
    """Raise 400 unless obj is a JSON value the server can hold (see the module doc); returns obj."""
    _check(obj, what)
    return obj


def _check(obj: Any, what: str) -> int:
    """check_value's walk; returns how many object members obj holds (decode_json compares it with
    the body's text)."""
    members = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                _check_text(value, what)
        elif isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise bad_request(f"{what}: nesting deeper than {MAX_DEPTH} levels")
            members += len(value)
            for k, v in value.items():
                if not isinstance(k, str):
                    raise bad_request(f"{what}: object keys must be strings, not {type(k).__name__}")
                if not k.isascii():
                    _check_text(k, what)
                if isinstance(v, (dict, list, str)) or not _scalar_ok(v):
                    stack.append((v, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise bad_request(f"{what}: nesting deeper than {MAX_DEPTH} levels")
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list, str)) or not _scalar_ok(v))
        elif not _scalar_ok(value):
            raise bad_request(f"{what}: unsupported value {_short(value)}")
    return members


def _scalar_ok(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return _INT64_MIN <= value <= _INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{what}: invalid UTF-8 (a lone surrogate) in {_short(text)}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- YAML ----------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader without the timestamp type: dates stay strings, as they do in sigs.k8s.io/yaml
    (a datetime would not encode as JSON)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _expanded_size(root: yaml.Node) -> int:
    """What the document would weigh once every alias is expanded, without expanding anything:
    each node's size is computed once (aliases share node objects), so this is linear in the text.
    Raises 400 at the first node past MAX_REQUEST_BYTES and on a recursive alias."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = len(node.value) + 2
            continue
        children: list[yaml.Node] = (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else list(node.value))
        if children_done:
            open_nodes.discard(key)
            total = 2 + sum(sizes[id(c)] + 1 for c in children)
            if total > MAX_REQUEST_BYTES:
                raise bad_request(f"error decoding YAML: aliases expand the document past the request size limit "
                                  f"of {MAX_REQUEST_BYTES} bytes")
            sizes[key] = total
            continue
        if key in open_nodes:
            raise bad_request("error decoding YAML: a recursive alias")
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise bad_request("error decoding YAML: a recursive alias")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _string_keys(obj: Any) -> Any:
    """sigs.k8s.io/yaml turns non-string map keys into their text (on: -> "true"); tuples (!!omap
    pairs) become lists. Done on a fresh copy (see decode_yaml), so shared alias targets are not an
    issue. Recursive, but only after the depth check."""
    if isinstance(obj, dict):
        return {_key_text(k): _string_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_string_keys(v) for v in obj]
    return obj


def _key_text(key: Any) -> Any:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, (int, float)):
        return str(key)
    return key  # left for check_value to refuse


def decode_yaml(raw: bytes | str, what: str = "error decoding YAML") -> Decoded:
    """One YAML document -> Decoded. Duplicate keys are reported like JSON's."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise too_large(len(raw))
    try:
        loader = _Loader(raw)  # reads the encoding (a BOM) and the first bytes: may fail already
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise bad_request(f"{what}: {e}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return Decoded(None)
        _expanded_size(node)
        dups = _yaml_duplicates(node)
        obj = loader.construct_document(node)
    except RecursionError:
        raise bad_request(f"{what}: nesting deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as e:
        raise bad_request(f"{what}: {e}") from None
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as e:  # e.g. an unhashable key
        raise bad_request(f"{what}: {e}") from None
    finally:
        loader.dispose()
    check_depth_only(obj, what)
    obj = _string_keys(obj)
    check_value(obj, what)
    return Decoded(obj, dups)


def check_depth_only(obj: Any, what: str) -> None:
    stack: list[tuple[Any, int]] = [(obj, 1)]
    seen: set[int] = set()
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_DEPTH:
                raise bad_request(f"{what}: nesting deeper than {MAX_DEPTH} levels")
            if id(value) in seen:
                continue  # an alias: its subtree was measured where first seen, at the same or lower depth
            seen.add(id(value))
            children = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in children)


def _yaml_duplicates(root: yaml.Node) -> list[str]:
    out: list[str] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for k, v in node.value:
                name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
                here = f"{path}.{name}" if path else name
                if name in keys and k.tag != "tag:yaml.org,2002:merge":
                    out.append(here)
                keys.add(name)
                stack.append((v, here))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node.value))
    return sorted(set(out))

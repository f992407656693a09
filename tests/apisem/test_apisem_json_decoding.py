"""bodies.decode_json's two decoders agree: a body of bytes goes through msgspec first and counts its
members in the text to catch a key given twice; a str body (and whatever msgspec refuses) goes
through the standard decoder with its duplicate-finding hook. Same value, same duplicates, same 400
for every body, whichever way it went."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane_stub.apiserver import bodies
from controlplane_stub.apiserver.errors import StatusError

_KEYS = st.sampled_from(["a", "b", "name", 'q"uote', "co:lon", "back\\slash", "é", "\u2028", ""])
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
            | st.sampled_from(['":', "\\", '\\":', "{", "}", "\ud800"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.lists(st.tuples(_KEYS, inner), max_size=4), max_leaves=20)


def _text(value: Any, rnd: st.DataObject) -> str:
    """JSON text of value; a list of (key, value) pairs is an object written pair by pair, so the same
    key may appear twice; whitespace and escaping vary."""
    sep = rnd.draw(st.sampled_from(["", " ", "\n\t "]))
    ascii_only = rnd.draw(st.booleans())
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        members = [f"{json.dumps(k, ensure_ascii=ascii_only)}{sep}:{sep}{_text(v, rnd)}" for k, v in value]
        return "{" + f",{sep}".join(members) + "}"
    if isinstance(value, list):
        return "[" + f",{sep}".join(_text(v, rnd) for v in value) + "]"
    if isinstance(value, tuple):
        return _text([value], rnd)
    return json.dumps(value, ensure_ascii=ascii_only)


def _outcome(raw: bytes | str) -> tuple[str, Any, list[str]]:
    try:
        d = bodies.decode_json(raw, "the body")
    except StatusError as e:
        return "error", e.code, [e.message]
    return "ok", d.obj, d.duplicates


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to itself (json.dumps writes NaN; both decoders must refuse it anyway)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=400, deadline=None)
@given(value=_VALUES, data=st.data())
def test_both_decoders_agree(value: Any, data: st.DataObject) -> None:
    text = _text(value, data)
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate written raw: not UTF-8 at all; the escaped form is tested
        raw = text.encode("utf-8", "surrogatepass")
    fast, slow = _outcome(raw), _outcome(text if "\ud800" not in text else raw.decode("utf-8", "surrogatepass"))
    assert fast[0] == slow[0], (text, fast, slow)
    assert _same(fast[1], slow[1]) and fast[2] == slow[2], (text, fast, slow)


@pytest.mark.parametrize("raw,duplicates", [
    (b'{"a": 1, "a": 2}', ["a"]),
    (b'{"a": {"b": 1, "b": 2}, "c": [{"d": 1, "d": 1}]}', ["a.b", "c[0].d"]),
    (b'{"a": "x\\":", "a\\"": 1}', []),  # a colon and an escaped quote inside strings are not members
    (b'{"k": "v:w", "l": ":"}', []),
])
def test_duplicates_are_found_in_bytes(raw: bytes, duplicates: list[str]) -> None:
    assert bodies.decode_json(raw, "the body").duplicates == duplicates


@pytest.mark.parametrize("raw,message", [
    (b'{"a": 1e400}', "unsupported value"),  # msgspec refuses it; the standard decoder makes inf, refused
    (b'{"a": 9223372036854775808}', "unsupported value"),  # past int64, from both decoders
    (b'{"a": "\\ud800"}', "the body"),  # a lone surrogate: refused by the text check
    (b'{"a": NaN}', "the body"),
    (b'{"a": 1} x', "Extra data"),
    (b'{"a": "\xff"}', "the body"),
    (b'[' * 5000 + b']' * 5000, "nesting deeper than 100 levels"),  # msgspec: RecursionError
])
def test_refused_bodies_keep_the_standard_message(raw: bytes, message: str) -> None:
    with pytest.raises(StatusError) as e:
        bodies.decode_json(raw, "the body")
    assert e.value.code == 400 and message in e.value.message, e.value.message


def test_a_utf8_bom_is_still_read_by_the_standard_decoder() -> None:
    # msgspec refuses it; json.detect_encoding reads bytes with a BOM as utf-8-sig (unchanged behaviour)
    assert bodies.decode_json(b'\xef\xbb\xbf{"a": 1}', "the body").obj == {"a": 1}

"""JSON from people we do not control (a demo's requests, a photos folder's metadata.jsonl), checked before decoding.

Python's decoder recurses once per nested array or object, so a few thousand `[` raise RecursionError (a traceback,
or a server error) instead of a message. `json_depth` counts the nesting without decoding, so that a reader can
refuse a text nested deeper than anything it expects before handing it to `json.loads`.
"""

from __future__ import annotations

import re

_STRING = {bytes: re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL), str: re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)}
_BRACKET = {bytes: re.compile(rb"[\[\]{}]"), str: re.compile(r"[\[\]{}]")}
_OPENING = (b"[", b"{", "[", "{")


def json_depth(text: str | bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a number or string, 1 for a flat object),
    counted without decoding it; brackets inside strings do not count."""
    kind = bytes if isinstance(text, bytes) else str
    empty = b'""' if kind is bytes else '""'
    depth = deepest = 0
    for match in _BRACKET[kind].finditer(_STRING[kind].sub(empty, text)):
        depth += 1 if match.group() in _OPENING else -1
        deepest = max(deepest, depth)
    return deepest

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


MAX_FILE_JSON_BYTES = 1 << 20  # model_index.json, config.json, training_summary.json, LoRA metadata: kilobytes
MAX_FILE_JSON_DEPTH = 16


def load_json_bounded(text: str | bytes, what: str, *, max_bytes: int = MAX_FILE_JSON_BYTES,
                      max_depth: int = MAX_FILE_JSON_DEPTH):
    """Decode JSON from a file we did not write (a model folder, a run's summary, a LoRA file's metadata), refusing
    (ValueError naming `what`) a text larger or deeper than such files ever are, before decoding it."""
    import json

    if len(text) > max_bytes:
        raise ValueError(f"{what} is {len(text):,} bytes, more than {max_bytes:,}: not a file this program wrote")
    if json_depth(text) > max_depth:
        raise ValueError(f"{what} nests deeper than {max_depth} levels: not a file this program wrote")
    return json.loads(text)


def read_json_file(path, what: str | None = None):
    """`load_json_bounded` of a file, reading no more than the limit (a 400 MB model_index.json is refused unread)."""
    from pathlib import Path

    path = Path(path)
    with open(path, "rb") as file:
        data = file.read(MAX_FILE_JSON_BYTES + 1)
    return load_json_bounded(data, what or str(path))

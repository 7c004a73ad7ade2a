"""Ingest's readers as they were before they streamed (selfalign/readers.py at b6ab84d): whole files in memory.
Kept verbatim as the reference the streaming readers must match unit for unit (tests/test_stream_ingest.py).
(The clean stage's in-memory reference is gone: tests/fixtures/clean/stream_golden.json holds digests of what it
wrote, which tests/test_stream_clean.py checks.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from selfalign import io

# ---------------------------------------------------------------- selfalign/readers.py at b6ab84d


def json_units(path: str) -> Iterator[tuple[int, Any, str]]:
    """JSON Lines, or one JSON array (KoChatGPT's `.jsonl` files are arrays); sniffed from the first character.

    A bad line yields an io.JsonlLineError in place of the object. In an array, items are
    decoded one by one so each keeps the line it starts on; a syntax error stops the array and
    the rest of the file becomes that one error.
    """
    if not io.starts_json_array(path):
        for n, obj in io.read_jsonl(path):
            raw = obj.raw if isinstance(obj, io.JsonlLineError) else None
            yield n, obj, raw
        return
    with io.open_text(path) as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip()) + 1
    ws = re.compile(r"\s*")
    expect_item = True
    while True:
        pos = ws.match(text, pos).end()
        line = text.count("\n", 0, pos) + 1
        if text.startswith("]", pos):
            return
        if not expect_item:
            if not text.startswith(",", pos):
                rest = io.printable(text[pos:])
                yield line, io.JsonlLineError(path, line, "invalid JSON array: expected ',' or ']'", rest), rest
                return
            pos = ws.match(text, pos + 1).end()
            line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            # the rest of the file is this one error; bytes that are not UTF-8 in it are the likelier cause
            bad = io.not_utf8(path, line, text[pos:])
            if bad is None:
                detail = (
                    f"invalid JSON: {e.msg} at column {e.colno}"
                    if isinstance(e, json.JSONDecodeError)
                    else "invalid JSON: nested too deeply"
                )
                bad = io.JsonlLineError(path, getattr(e, "lineno", line), detail, text[pos:])
            yield bad.line, bad, bad.raw
            return
        raw = text[pos:end]
        bad = io.not_utf8(path, line, raw)
        if bad is not None:  # inside a string: the item is rejected, the array goes on
            yield line, bad, bad.raw
        elif isinstance(obj, dict):
            yield line, obj, raw
        else:
            yield line, io.JsonlLineError(path, line, f"expected a JSON object, got {type(obj).__name__}", raw), raw
        pos, expect_item = end, False


def text_documents(path: str, documents: str = "auto") -> Iterator[tuple[int, Any, str]]:
    """(first line, {"text"} or an io.JsonlLineError for bytes that are not UTF-8, raw) per document: one per
    line, or blocks separated by blank lines.

    `auto` means blocks when the file has a blank line between two non-blank ones, else lines.
    Lines are split on "\\n" only (Leipzig's French has Unicode line separators inside sentences).
    """
    if documents not in ("auto", "line", "blank"):
        raise ValueError(f"text documents: {documents!r} is not auto|line|blank")
    with io.open_text(path) as f:
        lines = f.read().split("\n")
    if documents == "auto":
        documents = "blank" if re.search(r"\S\n[ \t]*\n+[ \t]*\S", "\n".join(lines)) else "line"
    if documents == "line":
        for n, text in enumerate(lines, 1):
            if text.strip():
                bad = io.not_utf8(path, n, text)
                yield (n, {"text": text}, text) if bad is None else (n, bad, bad.raw)
        return
    block: list[str] = []
    start = 0
    for n, text in enumerate(lines + [""], 1):
        if text.strip():
            if not block:
                start = n
            block.append(text)
        elif block:
            doc = "\n".join(block)
            bad = io.not_utf8(path, start, doc)
            yield (start, {"text": doc}, doc) if bad is None else (start, bad, bad.raw)
            block = []

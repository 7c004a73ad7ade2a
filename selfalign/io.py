"""JSON Lines and JSON reading and writing, with atomic whole-file writes.

A stage rewrites its outputs whole (STYLE principle 10): writers go to a temporary file beside
the target and rename it into place, so a killed stage never leaves a half-written output that
DVC or the next stage could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class JsonlLineError(ValueError):
    """A line that is not one JSON object (`code` invalid_json) or not UTF-8 (`code` invalid_utf8).
    Carries file and line for the rejected record."""

    def __init__(self, path: str, line: int, reason: str, raw: str, code: str = "invalid_json"):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason, self.raw, self.code = path, line, reason, raw, code


# Bytes that are not UTF-8 decode (errors="surrogateescape") to lone surrogates U+DC80-U+DCFF, which
# valid UTF-8 never yields: so one bad line is found and reported while the rest of the file is read.
_UNDECODED = re.compile("[\udc80-\udcff]")


def open_text(path: str | os.PathLike):
    """Open an input file for reading as UTF-8: a leading BOM is skipped, and undecodable bytes come
    through as lone surrogates for `not_utf8` to find instead of raising mid-file."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def not_utf8(path: str, line: int, text: str) -> JsonlLineError | None:
    """The error for `text`, read by `open_text` from `line` on, if it holds bytes that are not UTF-8, else None.
    The error names the line and column of the first such byte."""
    m = _UNDECODED.search(text)
    if m is None:
        return None
    line += text.count("\n", 0, m.start())
    column = m.start() - text.rfind("\n", 0, m.start())
    return JsonlLineError(
        path,
        line,
        f"not valid UTF-8: byte 0x{ord(m.group()) - 0xDC00:02x} at column {column}",
        printable(text).rstrip("\n"),
        code="invalid_utf8",
    )


def printable(text: str) -> str:
    """`text` read by `open_text`, with any bytes that were not UTF-8 shown as \\xNN, so it can be written out."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def starts_json_array(path: str | os.PathLike) -> bool:
    """Whether the file's first non-blank character is '[' (one JSON array, not JSON Lines)."""
    with open_text(path) as f:
        while chunk := f.read(4096):
            if chunk.strip():
                return chunk.lstrip().startswith("[")
    return False


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | JsonlLineError]]:
    """Yield (1-based line number, object) per non-blank line; a bad line yields an error, not a raise."""
    path = str(path)
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            bad = not_utf8(path, n, line)
            if bad is not None:
                yield n, bad
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, JsonlLineError(path, n, f"invalid JSON: {e.msg} at column {e.colno}", line.rstrip("\n"))
                continue
            except RecursionError:
                yield n, JsonlLineError(path, n, "invalid JSON: nested too deeply", line.rstrip("\n"))
                continue
            if not isinstance(obj, dict):
                yield n, JsonlLineError(path, n, f"expected a JSON object, got {type(obj).__name__}", line.rstrip("\n"))
                continue
            yield n, obj


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a file this pipeline wrote; any bad line is a hard error naming file and line."""
    out = []
    for _, obj in read_jsonl(path):
        if isinstance(obj, JsonlLineError):
            raise obj
        out.append(obj)
    return out


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def jsonl_writer(path: str | os.PathLike):
    """Context manager giving a `write(record)` function; the file appears whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:

        def write(record: dict) -> None:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

        yield write


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with jsonl_writer(path) as write:
        for r in records:
            write(r)
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """The hex SHA-256 of JSON values (keys sorted, non-JSON values as str): a content key for configs and inputs."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def text_digest(text: str, n: int = 12) -> str:
    """A short hex SHA-256 of a text: the id of a prompt template in cache keys."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]

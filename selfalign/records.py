"""The one record schema that flows between stages (STYLE principle 6).

Every stage reads and writes JSON Lines of one of these kinds:

    chat        {"id", "kind": "chat", "messages": [{"role", "content"}, ...], "system"?, "lang", "source", "meta"}
    preference  {"id", "kind": "preference", "prompt", "chosen", "rejected", "system"?, "lang", "source", "meta"}
    prompt      {"id", "kind": "prompt", "prompt", "system"?, "lang", "source", "meta"}
    web         {"id", "kind": "web", "text", "lang", "source", "meta"}

and a rejected record is the offending record (or raw line) plus `reason`, `stage`, and where
known `file`/`line`. Ids are derived from content, so the same example read twice, from two
files or in two runs, gets the same id; a translation keeps the id of its original.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

KINDS = ("chat", "preference", "prompt", "web")
ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that breaks the schema; the message names the field."""


def content_of(record: dict) -> Any:
    """The part of a record its id is derived from: the text, never the metadata."""
    kind = record.get("kind")
    if kind == "chat":
        return [record.get("system") or "", [[m["role"], m["content"]] for m in record["messages"]]]
    if kind == "preference":
        return [record.get("system") or "", record["prompt"], record["chosen"], record["rejected"]]
    if kind == "prompt":
        return [record.get("system") or "", record["prompt"]]
    if kind == "web":
        return record["text"]
    raise RecordError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def record_id(record: dict) -> str:
    blob = json.dumps([record["kind"], content_of(record)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def key(record: dict) -> tuple[str, str]:
    """(id, lang): a record's identity across stages. A translation shares its original's id, so the id alone
    would call it a duplicate (reward once dropped every translated pair that way)."""
    return record["id"], record["lang"]


def make(kind: str, *, lang: str, source: str, meta: dict | None = None, system: str | None = None, **fields) -> dict:
    """Build a record of `kind` with its id; `fields` are the kind's content fields."""
    record: dict[str, Any] = {"id": "", "kind": kind, **fields}
    if system:
        record["system"] = system
    record.update(lang=lang, source=source, meta=meta or {})
    record["id"] = record_id(record)
    validate(record)
    return record


def chat(messages: list[dict], **kw) -> dict:
    return make("chat", messages=[{"role": m["role"], "content": m["content"]} for m in messages], **kw)


def validate(record: dict) -> None:
    """Raise RecordError naming the first field that is wrong."""
    kind = record.get("kind")
    if kind not in KINDS:
        raise RecordError(f"field 'kind': {kind!r} is not one of {', '.join(KINDS)}")
    for field in ("id", "lang", "source"):
        if not isinstance(record.get(field), str):
            raise RecordError(f"field {field!r}: expected a string")
    if "system" in record and not isinstance(record["system"], str):
        raise RecordError("field 'system': expected a string")
    if kind == "chat":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RecordError("field 'messages': expected a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES[1:] or not isinstance(m.get("content"), str):
                raise RecordError(f"field 'messages[{i}]': expected {{role: user|assistant, content: str}}")
    elif kind == "preference":
        for field in ("prompt", "chosen", "rejected"):
            if not isinstance(record.get(field), str):
                raise RecordError(f"field {field!r}: expected a string")
    elif kind == "prompt":
        if not isinstance(record.get("prompt"), str):
            raise RecordError("field 'prompt': expected a string")
    elif kind == "web":
        if not isinstance(record.get("text"), str):
            raise RecordError("field 'text': expected a string")


def texts(record: dict) -> list[str]:
    """Every human-readable string of a record, for rules that look at all of them."""
    kind = record["kind"]
    sys = [record["system"]] if record.get("system") else []
    if kind == "chat":
        return sys + [m["content"] for m in record["messages"]]
    if kind == "preference":
        return sys + [record["prompt"], record["chosen"], record["rejected"]]
    if kind == "prompt":
        return sys + [record["prompt"]]
    return [record["text"]]


def rejected(
    record: dict | None,
    reason: str,
    stage: str,
    *,
    detail: str = "",
    file: str | None = None,
    line: int | None = None,
    raw: str | None = None,
) -> dict:
    """A rejected record: what was dropped, by which stage, and why."""
    out: dict[str, Any] = {"reason": reason, "stage": stage}
    if detail:
        out["detail"] = detail
    if file is not None:
        out["file"] = file
    if line is not None:
        out["line"] = line
    if record is not None:
        out["record"] = record
        if "id" in record:
            out["id"] = record["id"]
    if raw is not None:
        out["raw"] = raw
    return out


def with_system(system: str | None, messages: list[dict]) -> list[dict]:
    """`messages` with a system message first when `system` is set: the one place that shape is built."""
    return ([{"role": "system", "content": system}] if system else []) + list(messages)


def to_messages(record: dict, system: str | None = None) -> list[dict]:
    """A chat record as the message list a chat template takes (system message first if any)."""
    sys = system if system is not None else record.get("system")
    return with_system(sys, [{"role": m["role"], "content": m["content"]} for m in record["messages"]])


def stream(path, stage: str, kind: str | None = None) -> Iterator[tuple[dict, int] | dict]:
    """Every line of an upstream file accounted for, one at a time: (record, line) for each valid one (of `kind`,
    if given), a rejected record naming file, line and field for each other (invalid_json, invalid_utf8,
    invalid_record). A file that is one JSON array is one `json_array` reject: stages read JSON Lines, and ingest
    is what converts an array. Memory holds one line."""
    from selfalign import io

    if io.starts_json_array(path):
        detail = (
            f"{path} is one JSON array, not JSON Lines (one object per line); convert it with "
            f"stages/ingest.py --input {path} --format canonical --role ROLE --output OUT.jsonl"
        )
        yield rejected(None, "json_array", stage, detail=detail, file=str(path), line=1)
        return
    for line, obj in io.read_jsonl(path):
        where = {"file": str(path), "line": line}
        if isinstance(obj, io.JsonlLineError):
            yield rejected(None, obj.code, stage, detail=obj.reason, raw=obj.raw, **where)
            continue
        try:
            if kind is not None and obj.get("kind") != kind:
                raise RecordError(f"field 'kind': expected {kind!r}, got {obj.get('kind')!r}")
            validate(obj)
        except RecordError as e:
            yield rejected(obj, "invalid_record", stage, detail=str(e), **where)
            continue
        yield obj, line


def read(path, stage: str, kind: str | None = None) -> tuple[list[tuple[dict, int]], list[dict], int]:
    """`stream` as lists: ((record, line) of each valid one, rejected records, lines read)."""
    good, bad, n = [], [], 0
    for item in stream(path, stage, kind):
        n += 1
        (bad if isinstance(item, dict) else good).append(item)
    return good, bad, n


def load(path: str, kind: str | None = None) -> list[dict]:
    """Records (of one kind, if given) from an upstream file that must be whole: the first bad line raises
    RecordError naming file, line and field (`read` finds it)."""
    good, bad, _ = read(path, "load", kind)
    if bad:
        raise RecordError(f"{bad[0]['file']}:{bad[0]['line']}: {bad[0]['detail']}")
    return [rec for rec, _ in good]


def load_or_exit(path: str, kind: str) -> list[dict]:
    """`load` for a stage script (reward, ppo, dpo): a bad line is a one-line usage error naming file, line and
    field, not a traceback."""
    import click

    try:
        return load(path, kind)
    except RecordError as e:
        raise click.ClickException(str(e)) from None


def success_floor(metrics: dict, passed: int, total: int, floor: float, what: str) -> str | None:
    """A stage that produced (almost) nothing must not exit 0: DVC would record it as a success.

    Records the share of `total` that came through against the stage's `min_success` param in
    metrics["success"]; returns the message to fail with when the share is below the floor (the
    stage fails only after writing its outputs, rejects and metrics, so the cause can be read).
    Nothing asked (total 0) is not a failure.
    """
    rate = passed / total if total else None
    metrics["success"] = {
        "what": what,
        "passed": passed,
        "of": total,
        "rate": round(rate, 4) if rate is not None else None,
        "min_success": floor,
    }
    if rate is not None and rate < floor:
        return (
            f"{what}: {passed} of {total} ({rate:.0%}) came through, below min_success {floor}; outputs, "
            f"rejects and metrics are written: see the rejected records' reasons"
        )
    return None

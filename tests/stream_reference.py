"""The clean stage's and ingest's readers as they were before they streamed (stages/clean.py and selfalign/readers.py
at b6ab84d): whole files in memory, two passes. Kept verbatim as the reference the streaming code must match byte
for byte (tests/test_stream_clean.py, tests/test_stream_ingest.py); they call the same pure rules."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selfalign import clean, dedup, io, records

STAGE = "clean"


def run(pairs: list[tuple[Path, Path]], cfg: dict) -> tuple[dict[Path, list[dict]], list[dict], dict]:
    """Clean the files of `pairs` together: (kept records per output path, rejected, metrics)."""
    rules_cfg = {
        **cfg["rules"],
        "length": {**cfg["rules"]["length"], "min_chars": cfg["min_chars"], "max_chars": cfg["max_chars"]},
    }
    lang_cfg = {k: v for k, v in cfg["langs"].items() if k != "enabled"}
    counts: dict[str, Counter] = defaultdict(Counter)
    files: dict[str, Counter] = {}
    rejected: list[dict] = []
    todo: list[tuple[Path, dict, str, int]] = []  # (output path, record, input file, line)
    for src, dst in pairs:
        good, bad, n = records.read(src, STAGE)
        files[str(src)] = Counter(records_in=n, rejected=len(bad))
        for r in bad:
            counts[r["reason"]]["dropped"] += 1
        rejected += bad
        todo += [(dst, record, str(src), line) for record, line in good]
    results = clean.clean_records(
        [t[1] for t in todo], rules_cfg, lang_cfg if cfg["langs"]["enabled"] else None, cfg["workers"]
    )
    survivors: list[tuple[Path, dict, str, int]] = []
    # The gate's verdicts per declared language: how many French or Malay translations it let through (ok and
    # undetermined pass, mismatch is dropped); records minus the verdicts were dropped by a rule first.
    gate_by_lang: dict[str, Counter] = defaultdict(Counter)
    gate_by_detector: dict[str, Counter] = defaultdict(Counter)  # which detector decided (selfalign.langid.Verdict)
    for (dst, record, src, line), (out, fixed, reason, detail, verdict) in zip(todo, results, strict=True):
        for name in fixed:
            counts[name]["fixed"] += 1
        gate_by_lang[record["lang"]]["records"] += 1
        if verdict:
            verdict, detector = verdict.split("/")
            counts["lang"][verdict] += 1
            gate_by_lang[record["lang"]][verdict] += 1
            gate_by_detector[detector][verdict] += 1
        if out is None:
            counts[reason]["dropped"] += 1
            files[src]["rejected"] += 1
            rejected.append(records.rejected(record, reason, STAGE, detail=detail, file=src, line=line))
            continue
        if fixed:
            out = {**out, "meta": {**out.get("meta", {}), "clean_fixed": fixed}}
        survivors.append((dst, out, src, line))

    gone: dict[int, tuple[str, str]] = {}
    keys = [dedup.key_text(r) for _, r, _, _ in survivors]
    if cfg["exact_dup"]:
        for i, j in dedup.exact_duplicates(keys):
            gone[i] = ("duplicate", f"same text as {survivors[j][1]['id']} ({survivors[j][2]}:{survivors[j][3]})")
    nd = cfg["near_dup"]
    if nd["enabled"]:
        for i, j, sim in dedup.near_duplicates(
            keys,
            threshold=nd["threshold"],
            num_perm=nd["num_perm"],
            shingle=nd["shingle"],
            seed=nd["seed"],
            skip=set(gone),
        ):
            gone[i] = (
                "near_duplicate",
                f"Jaccard ~{sim:.2f} with {survivors[j][1]['id']} ({survivors[j][2]}:{survivors[j][3]})",
            )
    kept: dict[Path, list[dict]] = {dst: [] for _, dst in pairs}
    for i, (dst, record, src, line) in enumerate(survivors):
        if i in gone:
            reason, detail = gone[i]
            counts[reason]["dropped"] += 1
            files[src]["rejected"] += 1
            rejected.append(records.rejected(record, reason, STAGE, detail=detail, file=src, line=line))
        else:
            kept[dst].append(record)
            files[src]["kept"] += 1

    n_in = sum(f["records_in"] for f in files.values())
    n_kept = sum(len(v) for v in kept.values())
    if n_in != n_kept + len(rejected):  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"records_in {n_in} != kept {n_kept} + rejected {len(rejected)}")
    metrics = {
        "records_in": n_in,
        "kept": n_kept,
        "rejected": len(rejected),
        "rules": {
            name: dict(counts[name])
            for name in [
                *clean.RULES,
                "invalid_json",
                "invalid_utf8",
                "json_array",
                "invalid_record",
                "lang",
                "duplicate",
                "near_duplicate",
            ]
            if counts[name]
        },
        "gate_by_lang": {
            lang: {k: c[k] for k in ("records", "ok", "undetermined", "mismatch")}
            for lang, c in sorted(gate_by_lang.items())
        }
        if cfg["langs"]["enabled"]
        else {},
        "gate_by_detector": {
            det: {k: c[k] for k in ("ok", "undetermined", "mismatch")} for det, c in sorted(gate_by_detector.items())
        },
        "files": {
            name: {"records_in": c["records_in"], "kept": c["kept"], "rejected": c["rejected"]}
            for name, c in files.items()
        },
    }
    return kept, rejected, metrics


def write(pairs, cfg, rejected_path) -> dict:
    """What the old main() wrote: every output whole, then the rejects."""
    kept, rejected, metrics = run(pairs, cfg)
    for dst, recs in kept.items():
        io.write_jsonl(dst, recs)
    io.write_jsonl(rejected_path, rejected)
    return metrics


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

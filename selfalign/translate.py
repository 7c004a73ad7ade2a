"""Translation of records as pure functions: protect spans, build prompts, parse replies, assemble records.

A text is sent with its untouchable spans (code blocks, inline code, URLs, e-mail addresses,
numbers, placeholders such as {name}, <noinput>, %s, %(x)d, ${X}) replaced by sentinels [[0]],
[[1]], ... and the spans are put back into the reply. A reply that lost, duplicated or invented
a sentinel is a failed field with that reason, never a silently damaged record. Text in the
source that already looks like a sentinel is itself protected, so restoring is unambiguous.

A source of one line gets a reply cut at its first line break, a source without a blank line at its
first blank line (small models ramble on after the translation: another "English:" line, a
note), and a reply that still hits its token budget (32 + tokens_per_char per character) fails
as truncated.

The unit of work is a field (one message's content, a system prompt, a preference side); a
record is translated only when all its selected fields are, otherwise it fails with the first
field's reason. A translated record keeps its original's id, takes the target `lang` and
records `meta.translated_from`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selfalign import io, llm, records, shard
from selfalign.config import Config, ParamsError, opt

log = logging.getLogger("translate")

LANG_NAMES = {
    "en": "English",
    "fr": "French",
    "ms": "Malay",
    "ko": "Korean",
    "de": "German",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "id": "Indonesian",
    "zh": "Chinese",
    "ja": "Japanese",
    "ar": "Arabic",
    "ru": "Russian",
    "vi": "Vietnamese",
    "th": "Thai",
    "tr": "Turkish",
    "sw": "Swahili",
    "hi": "Hindi",
    "bn": "Bengali",
    "uk": "Ukrainian",
    "pl": "Polish",
}

# The first alternative that matches at a position wins, so code blocks swallow what is inside them.
_PROTECT = re.compile(
    "|".join(
        [
            r"```.*?(?:```|\Z)",  # fenced code (an unclosed fence runs to the end)
            r"~~~.*?(?:~~~|\Z)",
            r"`[^`\n]+`",  # inline code
            r"\[\[?\s*\d+\s*\]\]?",  # text that already looks like a sentinel, [3] included
            r"(?:https?|ftp)://[^\s<>\"'`]+",  # URLs (trailing punctuation trimmed below)
            r"\bwww\.[^\s<>\"'`]+",
            r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+",  # e-mail addresses
            r"\{\{[^{}\n]*\}\}",  # {{ jinja }}
            r"\{[A-Za-z_0-9.]*\}",  # {name}, {0}, {}
            r"\$\{\w+\}",  # ${VAR}
            r"</?[A-Za-z_][\w-]*/?>",  # <noinput>, <br/>, </s>
            r"%\(\w+\)[sdifr]|%[sdifr]",  # printf placeholders
            r"(?<![\w.])\d+(?:[.,:/-]\d+)*(?![\w])",  # numbers: 42, 3.14, 1,000, 12:30, 2023-04-01
        ]
    ),
    re.DOTALL,
)
_TRAILING = ".,;:!?)]}'\""
# Lenient when reading replies: spaces, and one bracket for two. The 135M model copies "[[0]]" as "[0]" about as
# often as not; a source's own "[3]" is protected above, so a bracketed number in a reply is always ours.
SENTINEL_RE = re.compile(r"\[\[?\s*(\d+)\s*\]\]?")
_LETTER = re.compile(r"[^\W\d_]")


def sentinel(i: int) -> str:
    return f"[[{i}]]"


def protect(text: str) -> tuple[str, list[str]]:
    """(text with sentinels, the spans they stand for, in order)."""
    spans: list[str] = []
    out: list[str] = []
    pos = 0
    for m in _PROTECT.finditer(text):
        start, end = m.span()
        if start < pos:
            continue
        span = m.group(0)
        if "://" in span[:8] or span.startswith("www."):
            # a URL ends before trailing punctuation, except a ")" that closes a "(" inside it
            while span and span[-1] in _TRAILING and not (span[-1] == ")" and span.count("(") >= span.count(")")):
                span = span[:-1]
            end = start + len(span)
        out.append(text[pos:start])
        out.append(sentinel(len(spans)))
        spans.append(span)
        pos = end
    out.append(text[pos:])
    return "".join(out), spans


class RestoreError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def restore(reply: str, spans: list[str]) -> str:
    """Put the spans back; raise RestoreError(lost_sentinel | duplicated_sentinel | unknown_sentinel)."""
    found = [int(m.group(1)) for m in SENTINEL_RE.finditer(reply)]
    unknown = sorted({i for i in found if i >= len(spans)})
    if unknown:
        raise RestoreError("unknown_sentinel", ", ".join(sentinel(i) for i in unknown))
    lost = [i for i in range(len(spans)) if i not in found]
    if lost:
        raise RestoreError("lost_sentinel", ", ".join(f"{sentinel(i)}={spans[i][:40]!r}" for i in lost))
    dup = sorted({i for i in found if found.count(i) > 1})
    if dup:
        raise RestoreError("duplicated_sentinel", ", ".join(sentinel(i) for i in dup))
    return SENTINEL_RE.sub(lambda m: spans[int(m.group(1))], reply)


def needs_translation(protected: str) -> bool:
    """False when nothing but sentinels, digits, punctuation and spaces is left to translate."""
    return bool(_LETTER.search(SENTINEL_RE.sub("", protected)))


def lang_name(code: str) -> str:
    return LANG_NAMES.get(code, code)


def build_prompt(template: str, text: str, source: str, target: str) -> str:
    """Fill {source_lang}, {target_lang} and {text}; plain replacement, so braces in the text are safe."""
    for key in ("{source_lang}", "{target_lang}", "{text}"):
        if key not in template:
            raise ValueError(f"the translate prompt template has no {key} placeholder")
    filled = template.replace("{source_lang}", lang_name(source)).replace("{target_lang}", lang_name(target))
    return filled.replace("{text}", text)


def parse_reply(reply: str, source_text: str, target: str) -> str:
    """The translation in a model's reply: stripped of a leading 'Translation:'/'French:' label (any language's
    name: a few-shot prompt's small model may echo another line's label, 'Malay:' before French) and of quotes
    the source did not have."""
    text = reply.strip()
    names = "|".join(
        re.escape(x) for x in sorted({*LANG_NAMES.values(), lang_name(target), target}, key=len, reverse=True)
    )
    label = re.match(rf"^(?:translation|{names})\s*(?:\([^)]*\))?\s*:\s*", text, re.IGNORECASE)
    src = source_text.strip()
    if label and not src.lower().startswith(label.group(0).split(":")[0].strip().lower() + ":"):
        text = text[label.end() :].strip()
    for q1, q2 in (('"', '"'), ("\u201c", "\u201d"), ("\u00ab", "\u00bb"), ("'", "'")):
        if len(text) >= 2 and text[0] == q1 and text[-1] == q2 and not (src[:1] == q1 and src[-1:] == q2):
            text = text[1:-1].strip()
            break
    return text


# ------------------------------------------------------------------------------------------ records

TRANSLATABLE = ("chat", "preference", "prompt")
_LANG_CODE = re.compile(r"^[a-z]{2,3}$")


@dataclasses.dataclass
class TranslateConfig(Config):
    """params.yaml `translate:` (the comments there say what each value does)."""

    langs: list[str] = opt(["fr", "ms"], min_items=1)  # target languages, ISO 639 codes
    mode: Literal["add", "replace"] = "add"
    kinds: list[str] = opt(["chat", "prompt"])  # of TRANSLATABLE
    roles: list[str] = opt(["system", "user", "assistant"])  # of records.ROLES
    max_records: int = opt(6, lo=0)  # per input file; 0 = all
    max_chars: int = opt(160, lo=0)  # per field; 0 = any length
    max_spans: int = opt(0, lo=-1)  # protected spans per field; -1 = any
    max_new_tokens: int = opt(192, lo=1)  # cap on one field's reply
    tokens_per_char: float = opt(0.5, lo=0, lo_open=True)  # a field's budget: 32 + this x its characters
    temperature: float = opt(0.7, lo=0)
    top_p: float = opt(0.9, lo=0, hi=1, lo_open=True)
    seed: int = 0
    engine: llm.EngineSpec = opt(llm.EngineSpec(batch_size=8, dtype="bf16"))  # model "" = the stage's --model
    min_success: float = opt(0.5, lo=0, hi=1)  # share of asked translations that must come through

    def check(self, where: str) -> None:
        bad = [x for x in self.langs if not _LANG_CODE.match(x)]
        if bad:
            raise ParamsError(f"{where}.langs: {bad[0]!r} is not a language code (2-3 lower-case letters: fr, ms)")
        bad = sorted(set(self.kinds) - set(TRANSLATABLE))
        if bad:
            raise ParamsError(
                f"{where}.kinds: {bad[0]!r} cannot be translated (choose from "
                f"{', '.join(TRANSLATABLE)}; web segments always pass through)"
            )
        bad = sorted(set(self.roles) - set(records.ROLES))
        if bad:
            raise ParamsError(f"{where}.roles: {bad[0]!r} is not one of {', '.join(records.ROLES)}")

    def gen(self) -> dict:
        """The generation settings plan_field reads."""
        return {k: getattr(self, k) for k in GEN_KEYS}


GEN_KEYS = ("max_new_tokens", "tokens_per_char", "temperature", "top_p", "seed")


def fields(record: dict, roles: list[str]) -> list[tuple[tuple, str]]:
    """(path, text) of each field to translate. Roles: system (the system prompt), user (chat user
    turns, a preference's or prompt record's prompt), assistant (chat assistant turns, chosen, rejected)."""
    out: list[tuple[tuple, str]] = []
    if "system" in roles and record.get("system"):
        out.append((("system",), record["system"]))
    kind = record["kind"]
    if kind == "chat":
        for i, m in enumerate(record["messages"]):
            if m["role"] in roles:
                out.append((("messages", i, "content"), m["content"]))
    elif kind == "preference":
        if "user" in roles:
            out.append((("prompt",), record["prompt"]))
        if "assistant" in roles:
            out += [(("chosen",), record["chosen"]), (("rejected",), record["rejected"])]
    elif kind == "prompt":
        if "user" in roles:
            out.append((("prompt",), record["prompt"]))
    return out


def select(
    recs: list[dict], kinds: list[str], roles: list[str], max_chars: int, max_records: int, max_spans: int = -1
) -> tuple[list[int], dict[str, int]]:
    """(indices of the records to translate, counts of the others by reason): the first `max_records` (0 = all)
    records of `kinds` whose every field is at most `max_chars` characters (0 = any length) and has at most
    `max_spans` protected spans (-1 = any). A small model translates a short field within budget and rambles
    or stops halfway through a long one, and drops or mangles the sentinels of numbers and code (measured
    on the 135M default: 3 of 4 records with spans failed, lost_sentinel), so the bounds pick what it can
    do rather than cutting what it cannot."""
    chosen: list[int] = []
    skipped = {"other_kind": 0, "too_long": 0, "has_spans": 0, "no_fields": 0, "over_max_records": 0}
    for i, r in enumerate(recs):
        if r["kind"] not in kinds:
            skipped["other_kind"] += 1
            continue
        texts = [t for _, t in fields(r, roles)]
        if not texts:
            skipped["no_fields"] += 1
        elif max_chars and max(len(t.strip()) for t in texts) > max_chars:
            skipped["too_long"] += 1
        elif max_spans >= 0 and max(len(protect(t)[1]) for t in texts) > max_spans:
            skipped["has_spans"] += 1
        elif max_records and len(chosen) >= max_records:
            skipped["over_max_records"] += 1
        else:
            chosen.append(i)
    return chosen, skipped


@dataclass
class Field:
    """One field of one record on its way to one target language."""

    path: tuple
    source: str
    protected: str
    spans: list[str]
    target: str
    request: llm.Request | None  # None: nothing to translate (empty, or only code/numbers/URLs)


def plan_field(path: tuple, text: str, source_lang: str, target: str, template: str, gen: dict) -> Field:
    protected, spans = protect(text)
    if not needs_translation(protected):
        return Field(path, text, protected, spans, target, None)
    sent = protected.strip()
    # 32 tokens of headroom: "hello!" gets a reply of its own phrasing, not 19 tokens (measured: truncated)
    budget = min(int(gen["max_new_tokens"]), 32 + math.ceil(gen["tokens_per_char"] * len(sent)))
    req = llm.Request(
        messages=[{"role": "user", "content": build_prompt(template, sent, source_lang, target)}],
        max_tokens=budget,
        temperature=gen["temperature"],
        top_p=gen["top_p"],
        seed=gen["seed"],
        # small models ramble on after the translation: one line (paragraph) in, one out
        stop=["\n"] if "\n" not in sent else None if "\n\n" in sent else ["\n\n"],
    )
    return Field(path, text, protected, spans, target, req)


def finish_field(f: Field, result: llm.Result | None) -> str:
    """The translated text of a field, or RestoreError(reason, detail)."""
    if f.request is None:
        return f.source
    if result is None or not result.ok:
        raise RestoreError("llm_error", (result.error if result else "no result") or "unknown error")
    if result.finish_reason == "length":
        raise RestoreError("truncated", f"the reply hit max_tokens={f.request.max_tokens}")
    text = parse_reply(result.text or "", f.protected, f.target)
    if not text:
        raise RestoreError("empty_reply", "the reply had no text")
    text = restore(text, f.spans)
    lead = f.source[: len(f.source) - len(f.source.lstrip())]
    trail = f.source[len(f.source.rstrip()) :]
    return lead + text + trail


def assemble(record: dict, target: str, translated: dict[tuple, str]) -> dict:
    """The record in `target`: same id, new lang, meta.translated_from = the source lang."""
    out = copy.deepcopy(record)
    for path, text in translated.items():
        node = out
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = text
    out["lang"] = target
    out["meta"] = {**(record.get("meta") or {}), "translated_from": record["lang"]}
    return out


# ------------------------------------------------------------------------------------------ files


@dataclass
class FilesPlan:
    """What plan_files read and what the teacher is to be asked: files (src, dst, [(record, line)]), jobs (file index,
    record index, target, [Field]), per-file counters, the rejects of unreadable lines, the requests and their shard
    keys. write_files turns it and the answers into the outputs."""

    files: list[tuple[Path, Path, list[tuple[dict, int]]]]
    jobs: list[tuple[int, int, str, list[Field]]]
    per_file: dict[str, Counter]
    failed: list[dict]
    requests: list[llm.Request]
    keys: list[str]


def plan_files(pairs: list[tuple[Path, Path]], cfg: TranslateConfig, template: str) -> FilesPlan:
    """Read every input and plan every field of every selected record into every target language."""
    gen = cfg.gen()
    files, jobs, failed = [], [], []
    per_file: dict[str, Counter] = {}
    for src, dst in pairs:
        c = per_file.setdefault(dst.stem, Counter())
        recs, bad, c["lines_in"] = records.read(src, "translate") if src.exists() else ([], [], 0)
        failed += bad
        c["invalid"] = c["lines_in"] - len(recs)
        if not src.exists():
            log.warning("%s does not exist: writing an empty %s", src, dst)
        chosen, skipped = select(
            [r for r, _ in recs], cfg.kinds, cfg.roles, cfg.max_chars, cfg.max_records, cfg.max_spans
        )
        c["selected"] = len(chosen)
        c.update({f"skipped_{k}": v for k, v in skipped.items()})
        for i in chosen:
            r = recs[i][0]
            for target in cfg.langs:
                if target == r["lang"]:
                    c["already_in_target"] += 1
                    continue
                planned = [plan_field(p, t, r["lang"], target, template, gen) for p, t in fields(r, cfg.roles)]
                jobs.append((len(files), i, target, planned))
        files.append((src, dst, recs))
    reqs = [f.request for *_, planned in jobs for f in planned if f.request is not None]
    keys = [
        shard.record_key(files[fi][2][ri][0]) for fi, ri, _, planned in jobs for f in planned if f.request is not None
    ]
    log.info(
        "%d records selected in %d files; %d translations to make (%d fields, %d needing the model); "
        "targets %s, mode %s",
        sum(c["selected"] for c in per_file.values()),
        len(files),
        len(jobs),
        sum(len(j[3]) for j in jobs),
        len(reqs),
        ",".join(cfg.langs),
        cfg.mode,
    )
    return FilesPlan(files, jobs, per_file, failed, reqs, keys)


def write_files(plan: FilesPlan, results: list[llm.Result], cfg: TranslateConfig) -> dict:
    """Finish every field from its result, write every output (translations after or instead of their originals)
    and add the failed translations to plan.failed; returns the metrics."""
    results = iter(results)
    files, per_file, failed = plan.files, plan.per_file, plan.failed
    done: dict[tuple[int, int], list[dict]] = {}
    reasons: Counter = Counter()
    by_lang = {t: {"asked": 0, "translated": 0, "failed": 0, "failed_by_reason": Counter()} for t in cfg.langs}
    for fi, ri, target, planned in plan.jobs:
        c = per_file[files[fi][1].stem]
        got, error = {}, None
        for f in planned:  # consume every result of the record, even after a failure
            res = next(results) if f.request is not None else None
            try:
                got[f.path] = finish_field(f, res)
            except RestoreError as e:
                error = error or (e, f)
        record, line = files[fi][2][ri]
        by_lang[target]["asked"] += 1
        if error:
            e, f = error
            rej = records.rejected(
                record,
                e.reason,
                "translate",
                detail=f"{'.'.join(map(str, f.path))}: {e.detail}",
                file=str(files[fi][0]),
                line=line,
            )
            failed.append({**rej, "target_lang": target})
            reasons[e.reason] += 1
            by_lang[target]["failed_by_reason"][e.reason] += 1
            by_lang[target]["failed"] += 1
            c["failed"] += 1
        else:
            done.setdefault((fi, ri), []).append(assemble(record, target, got))
            by_lang[target]["translated"] += 1
            c["translated"] += 1

    for fi, (_, dst, recs) in enumerate(files):
        c = per_file[dst.stem]
        with io.jsonl_writer(dst) as write:
            for ri, (record, _) in enumerate(recs):
                translations = done.get((fi, ri), [])
                if cfg.mode == "add" or not translations:
                    write(record)
                    c["originals_out"] += 1
                for t in translations:
                    write(t)
                c["records_out"] += len(translations)
        c["records_out"] += c["originals_out"]
    total = Counter()
    for c in per_file.values():
        total.update(c)
    for v in by_lang.values():
        v["failed_by_reason"] = dict(sorted(v["failed_by_reason"].items()))
    unreadable = Counter(r["reason"] for r in failed if "target_lang" not in r)
    return {
        "records_in": total["lines_in"],
        # every readable record is carried: as itself, or (mode replace) as its translations
        "kept": total["lines_in"] - total["invalid"],
        "rejected": total["invalid"],
        "rejected_by_reason": dict(sorted(unreadable.items())),
        "invalid": total["invalid"],
        "selected": total["selected"],
        "skipped": {k.removeprefix("skipped_"): total[k] for k in sorted(total) if k.startswith("skipped_")},
        "translations_asked": len(plan.jobs),
        "translated": total["translated"],
        "failed": total["failed"],
        "failed_by_reason": dict(sorted(reasons.items())),
        "by_lang": by_lang,
        "already_in_target": total["already_in_target"],
        "records_out": total["records_out"],
        "fields": sum(len(j[3]) for j in plan.jobs),
        "fields_sent": len(plan.requests),
        "by_file": {k: dict(v) for k, v in per_file.items()},
    }

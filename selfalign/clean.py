"""Named cleaning rules: each a pure function that keeps, fixes, or drops a record with a reason.

The rule set starts from the defects AlpacaDataCleaned lists for the original Alpaca data (empty
and "N/A" outputs, the many spellings of "no input", stray control and escape characters,
instructions about a URL, attachment or image the model cannot see, requests for non-text
output, merged and nonsensical instructions, wrong arithmetic) and adds mojibake repair,
refusal boilerplate and length bounds. The language gate lives in `selfalign.langid` and
near-duplicate removal in `selfalign.dedup`; `stages/clean.py` runs all three.

A rule is `fn(record, cfg) -> Outcome`, where cfg is the rule's own settings (its `Rules` field below,
params clean.rules.<name>). It never mutates its input: a fix returns a new record. Rules run in
`RULES` order (the order they are defined in this file, whatever the order in params.yaml), fixes first,
so the drop rules see repaired text ("No input" already gone, mojibake already decoded).

`CleanConfig` is the stage's settings (params.yaml `clean:`), `run` the stage: the rules, the gate and
dedup over every input file as a stream (selfalign.executor).

Pattern rules (refusal, placeholder, no input) know English, French and Malay/Indonesian
spellings; the ones that read the meaning of an instruction (unseen_reference, non_text_output,
missing_input) know English only, since every seed this pipeline ships starts in English.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
import operator
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selfalign import langid, progress
from selfalign.config import Config, ParamsError, opt
from selfalign.dedup import NearDup

# ---------------------------------------------------------------- the rule protocol


@dataclass(frozen=True)
class Outcome:
    record: dict | None  # None: dropped
    detail: str = ""
    fixed: bool = False


def keep(record: dict) -> Outcome:
    return Outcome(record)


def drop(detail: str) -> Outcome:
    return Outcome(None, detail)


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable[[dict, Any], Outcome]
    kinds: tuple[str, ...]
    doc: str


RULES: dict[str, Rule] = {}


def rule(name: str, kinds: tuple[str, ...]):
    def register(fn):
        RULES[name] = Rule(name, fn, kinds, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


def apply_rules(record: dict, rules: Mapping[str, Any]) -> tuple[dict | None, list[str], str, str]:
    """Run every enabled rule on one record: (record or None, rules that fixed it, drop reason, detail).
    `rules`: each rule's settings by name (CleanConfig.rule_settings())."""
    fixed: list[str] = []
    for name, r in RULES.items():
        cfg = rules[name]
        if not cfg.enabled or record["kind"] not in r.kinds:
            continue
        out = r.fn(record, cfg)
        if out.record is None:
            return None, fixed, name, out.detail
        if out.fixed:
            fixed.append(name)
            record = out.record
    return record, fixed, "", ""


def clean_record(
    record: dict, rules: Mapping[str, Any], gate: langid.LangGate | None
) -> tuple[dict | None, list[str], str, str, str]:
    """The rules, then (if `gate`) the language gate: (record or None, fixed by, reason, detail, gate verdict as
    "<verdict>/<detector>", e.g. "ok/ngram"; "" when the gate did not run)."""
    out, fixed, reason, detail = apply_rules(record, rules)
    if out is None or gate is None:
        return out, fixed, reason, detail, ""
    verdict, _, lang_detail, detector = langid.judge(out, gate)
    if verdict == "mismatch":
        return None, fixed, "lang", f"declared {out['lang']}: {lang_detail} [{detector}]", f"{verdict}/{detector}"
    return out, fixed, "", "", f"{verdict}/{detector}"


_WORKER_CFG: tuple = ({}, None)


def _init_worker(rules: Mapping[str, Any], gate: langid.LangGate | None) -> None:
    global _WORKER_CFG
    _WORKER_CFG = (rules, gate)


def _clean_in_worker(record: dict):
    return clean_record(record, *_WORKER_CFG)


def clean_records(
    recs: list[dict],
    rules: Mapping[str, Any],
    gate: langid.LangGate | None,
    workers: int = 1,
    min_parallel: int = 2000,
):
    """clean_record over `recs`, in order, on `workers` processes (results are the same for any count)."""
    if workers <= 1 or len(recs) < min_parallel:  # below this, starting processes costs more than it saves
        return [clean_record(r, rules, gate) for r in recs]
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(rules, gate)) as pool:
        return list(pool.imap(_clean_in_worker, recs, chunksize=256))


# ---------------------------------------------------------------- record helpers

ALL = ("chat", "preference", "prompt", "web")
INSTRUCTED = ("chat", "preference", "prompt")


def prompt_texts(record: dict) -> list[str]:
    """What the user asked: user turns, or the prompt of a preference/prompt record."""
    if record["kind"] == "chat":
        return [m["content"] for m in record["messages"] if m["role"] == "user"]
    return [record["prompt"]] if record["kind"] in ("preference", "prompt") else []


def answer_texts(record: dict) -> list[str]:
    """What the model is taught to say: assistant turns, or `chosen` (a bad `rejected` is the point of a pair)."""
    if record["kind"] == "chat":
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record["chosen"]] if record["kind"] == "preference" else []


def map_texts(record: dict, fn: Callable[[str], str]) -> tuple[dict, bool]:
    """Apply fn to every text field (and meta.instruction/meta.input); a copy only if something changed."""
    out = record
    changed = False

    def own() -> dict:
        nonlocal out
        if out is record:
            out = copy.deepcopy(record)
        return out

    kind = record["kind"]
    fields = {"chat": (), "preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",), "web": ("text",)}[
        kind
    ] + (("system",) if "system" in record else ())
    for f in fields:
        new = fn(record[f])
        if new != record[f]:
            own()[f] = new
            changed = True
    if kind == "chat":
        for i, m in enumerate(record["messages"]):
            new = fn(m["content"])
            if new != m["content"]:
                own()["messages"][i]["content"] = new
                changed = True
    meta = record.get("meta") or {}
    for f in ("instruction", "input", "output"):
        if isinstance(meta.get(f), str):
            new = fn(meta[f])
            if new != meta[f]:
                own()["meta"][f] = new
                changed = True
    return out, changed


def _fix(record: dict, fn: Callable[[str], str], detail: str) -> Outcome:
    out, changed = map_texts(record, fn)
    return Outcome(out, detail, fixed=True) if changed else keep(record)


# ---------------------------------------------------------------- fixes

_MOJIBAKE_HINT = re.compile(
    "[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014"
    "\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)


def fix_mojibake(text: str) -> str:
    """UTF-8 read as Latin-1/cp1252 ("cafÃ©", "donâ€™t") decoded back, via ftfy; clean text is untouched."""
    if text.isascii() or not _MOJIBAKE_HINT.search(text):  # ftfy costs ~35 us a text; these tests ~1 us
        return text
    import ftfy

    return ftfy.fix_encoding(text)


@rule("mojibake", ALL)
def mojibake(record: dict, cfg: Any) -> Outcome:
    """Repair text that was decoded with the wrong codec."""
    return _fix(record, fix_mojibake, "re-decoded mojibake")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\ufffe]")
_LITERAL_ESCAPE = re.compile(r"\\(?:[ntr\"']|u[0-9a-fA-F]{4})")
_CODE_HINT = re.compile(
    r"```|\bdef |\bprint\(|printf|console\.|#include|\breturn\b|[{};]\s*$|\bregex\b|"
    r"\bre\.\w+\(|\\\\|[\"'][^\"'\n]*\\[ntr][^\"'\n]*[\"']"
    r"|\\[(\[]|\$[^$\n]+\$|\\(?:frac|sqrt|times|text|theta|tau|tan|neq|nu|nabla|right|rho|"
    r"rangle|left|cdot|sum|int|infty|to|top|tilde)\b",
    re.M,
)  # code and LaTeX keep backslashes
_SUSPECT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\ufffe\\\\]")  # what fix_control acts on
_ESCAPES = {"n": "\n", "t": "\t", "r": "", '"': '"', "'": "'"}


def fix_control(text: str) -> str:
    """Drop control characters (keeping tab and newline), ANSI colour codes, zero-width spaces and BOMs;
    turn literal escape sequences (a backslash and `n` typed into prose) into what they stand for.
    Code keeps its escapes: in `print("a\\nb")` the backslash is meant."""
    if not _SUSPECT.search(text):
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _ANSI.sub("", text))
    if "\\" in text and not _CODE_HINT.search(text):
        text = _LITERAL_ESCAPE.sub(
            lambda m: chr(int(m.group(0)[2:], 16)) if m.group(0)[1] == "u" else _ESCAPES[m.group(0)[1]], text
        )
    return text


@rule("control_chars", ALL)
def control_chars(record: dict, cfg: Any) -> Outcome:
    """Remove control and stray escape characters."""
    return _fix(record, fix_control, "removed control/escape characters")


# "No input" in the spellings the Alpaca data uses, plus French and Malay ones; the issue asks
# for one spelling, and the one this pipeline uses is no input at all.
_NO_INPUT = re.compile(
    r"""^\s*["'“”]?\s*[<\[(]?\s*(?:
        no\s*-?\s*input(?:\s+(?:is\s+)?(?:required|needed|necessary|provided|given))?
      | noinput | none | n/?a | null | nil | empty | not\s+applicable | \(none\) | -+
      | tiada\s+input(?:\s+(?:yang\s+)?diperlukan)? | tidak\s+ada\s+input | tanpa\s+input | tiada | nomak
      | pas\s+d['’]entr[ée]e | aucune\s+entr[ée]e | sans\s+entr[ée]e
    )\s*[>\])]?\s*\.?\s*["'“”]?\s*$""",
    re.I | re.X,
)


# Every spelling above is shorter than this; a longer text is never a placeholder, and the patterns' runs of
# optional white space are only ever tried on short, stripped text (they backtrack on a long run of spaces).
_MAX_PLACEHOLDER = 80


def is_no_input(text: str) -> bool:
    text = text.strip()
    return len(text) <= _MAX_PLACEHOLDER and bool(_NO_INPUT.match(text))


def strip_no_input(text: str) -> str:
    """'Instruction\\n\\n<noinput>' -> 'Instruction' (ingest renders Alpaca's input as a last paragraph)."""
    head, sep, tail = text.rpartition("\n\n")
    if sep and head.strip():
        tail_value = re.sub(r"^\s*(?:input|masukan|entr[ée]e)\s*:\s*", "", tail, flags=re.I)
        if is_no_input(tail_value):
            return head.rstrip()
    return text


@rule("no_input", INSTRUCTED)
def no_input(record: dict, cfg: Any) -> Outcome:
    """Normalise the many spellings of "no input" to no input at all (in the message and in meta.input)."""
    prompts = prompt_texts(record)
    if prompts and all(is_no_input(p) for p in prompts[:1]):
        return drop("the prompt is only a 'no input' placeholder")
    out = record
    if record["kind"] == "chat":
        i = next(i for i, m in enumerate(record["messages"]) if m["role"] == "user") if prompts else None
        if i is not None:
            new = strip_no_input(record["messages"][i]["content"])
            if new != record["messages"][i]["content"]:
                out = copy.deepcopy(record)
                out["messages"][i]["content"] = new
    elif record["kind"] in ("preference", "prompt"):
        new = strip_no_input(record["prompt"])
        if new != record["prompt"]:
            out = {**record, "prompt": new}
    meta = out.get("meta") or {}
    if isinstance(meta.get("input"), str) and meta["input"] and is_no_input(meta["input"]):
        out = {**out, "meta": {**meta, "input": ""}}
    return Outcome(out, "normalised 'no input'", fixed=True) if out is not record else keep(record)


# ---------------------------------------------------------------- drops


@rule("empty", ALL)
def empty(record: dict, cfg: Any) -> Outcome:
    """Drop records with an empty turn, prompt, response or text."""
    kind = record["kind"]
    if kind == "chat":
        for i, m in enumerate(record["messages"]):
            if not m["content"].strip():
                return drop(f"messages[{i}] ({m['role']}) is empty")
        if record["messages"][-1]["role"] != "assistant":
            return drop("the conversation does not end with an assistant turn")
        return keep(record)
    fields = {"preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",), "web": ("text",)}[kind]
    for f in fields:
        if not record[f].strip():
            return drop(f"{f} is empty")
    if kind == "preference" and record["chosen"].strip() == record["rejected"].strip():
        return drop("chosen and rejected are the same text")
    return keep(record)


_PLACEHOLDER = re.compile(
    r"""^\s*["'“]?\s*[<\[(]?\s*(?:
        n\s*/?\s*a | none | null | nil | -+ | \.+ | \?+ | tbd | todo | empty | output | not\s+applicable
      | no\s*-?\s*(?:output|input)(?:\s+(?:is\s+)?(?:required|needed|necessary|provided|given))? | no\s+answer | no\s+response | nothing
      | tiada(?:\s+output)? | t\s*/\s*a | tidak\s+berkenaan | tidak\s+ada
      | aucune?\s+(?:sortie|réponse) | pas\s+de\s+(?:sortie|réponse) | sans\s+objet | s\s*/\s*o
    )\s*[>\])]?\s*[.!]?\s*["'”]?\s*$""",
    re.I | re.X,
)
_PLACEHOLDER_PREFIX = re.compile(r"^\s*<\s*no\s*-?\s*output\s*>", re.I)


@rule("placeholder", ("chat", "preference"))
def placeholder(record: dict, cfg: Any) -> Outcome:
    """Drop "N/A"-style and <nooutput> placeholder answers."""
    for text in answer_texts(record):
        short = text.strip()
        if (len(short) <= _MAX_PLACEHOLDER and _PLACEHOLDER.match(short)) or _PLACEHOLDER_PREFIX.match(text):
            return drop(f"placeholder answer {text.strip()[:40]!r}")
    return keep(record)


_URL = re.compile(r"(?:https?://|www\.)[^\s<>()\[\]\"'“”]+", re.I)
_URL_TASK = re.compile(
    r"\b(?:url|urls|link|links|domain|protocol|parse|extract|regex|regular expression|valid|"
    r"shorten|encode|decode|format)\b",
    re.I,
)
_ATTACHED = re.compile(
    r"\b(?:attached|attachment|enclosed)\b"
    r"|[<\[(][^\]\n>)]{0,25}\b(?:image|photo|picture|link|video|audio|file|attachment|recording|screenshot)s?\b"
    r"[^\]\n>)]{0,80}[\])>]"
    r"|!\[[^\]]*\]\(",
    re.I,
)
_MEDIA = (
    r"(?:photo|photograph|image|picture|pic|painting|drawing|illustration|video|clip|recording|audio|"
    r"screenshot|chart|graph|diagram|map|figure|scan|x-ray)s?"
)
_DEICTIC_MEDIA = re.compile(
    r"\b(?:this|these|the\s+following|the\s+given|the\s+provided|the\s+attached|the\s+above|the\s+below|"
    r"(?:in|from|on|of)\s+the)[ \t]+(?:[\w-]+[ \t]+){0,2}?" + _MEDIA + r"\b",
    re.I,
)
_PERCEIVE = re.compile(
    r"\b(?:transcribe|listen\s+to|watch|look\s+at|crop|resize|enhance|retouch|colou?rize)\s+"
    r"(?:the|this|that|these|my|our)[ \t]+(?:[\w-]+[ \t]+){0,2}?" + _MEDIA + r"\b",
    re.I,
)


def _nothing_follows(rest: str, max_words: int) -> bool:
    """True when what follows a reference ('the following photo') cannot be the thing referred to."""
    if re.search(r"[\"“‘:]|\n\s*\S", rest):
        return False
    return len(re.findall(r"\w+", rest)) <= max_words


@rule("unseen_reference", INSTRUCTED)
def unseen_reference(record: dict, cfg: Any) -> Outcome:
    """Drop instructions about a URL, attachment, image or recording the model cannot see."""
    for text in prompt_texts(record):
        # A URL is the thing to work on when little else is there ("Summarize this article: <url>");
        # a long message that quotes a URL as its source carries its own content.
        short = len(_URL.sub(" ", text).strip()) <= cfg.max_chars_around_url
        for m in _URL.finditer(text) if short else ():
            url = m.group(0).rstrip(".,;:!?")
            has_path = "/" in url.split("//", 1)[-1].rstrip("/")
            if has_path and not _URL_TASK.search(text[: m.start()]):
                return drop(f"refers to the content of a URL: {url[:80]}")
        if m := _ATTACHED.search(text):
            return drop(f"refers to an attachment: {m.group(0)[:60]!r}")
        if m := _PERCEIVE.search(text):
            return drop(f"asks to perceive media: {m.group(0)[:60]!r}")
        for m in _DEICTIC_MEDIA.finditer(text):
            if _nothing_follows(text[m.end() :], cfg.max_trailing_words):
                return drop(f"refers to media that is not there: {m.group(0)[:60]!r}")
    return keep(record)


_NON_TEXT = re.compile(
    r"(?:^|[.!?]\s|\n)[ \t]*(?:please\s+|can\s+you\s+|could\s+you\s+)?"
    r"(?:create|generate|draw|design|render|paint|sketch|produce|make|record|film|take|crop|edit|resize|animate|"
    r"photograph|illustrate)\s+(?:(?:a|an|the|me|us|this|that|some|my|\d+)[ \t]+)?(?:[\w-]+[ \t]+){0,2}?"
    r"(?:image|picture|photo|photograph|illustration|drawing|painting|logo|sketch|3d\s+model|animation|video|gif|"
    r"icon|cartoon|sound\s+effect|audio|recording|voice-?over|infographic|poster|portrait|selfie)s?\b",
    re.I,
)


@rule("non_text_output", INSTRUCTED)
def non_text_output(record: dict, cfg: Any) -> Outcome:
    """Drop requests for images, audio or other output a text model cannot give."""
    for text in prompt_texts(record):
        if m := _NON_TEXT.search(text):
            return drop(f"asks for non-text output: {m.group(0).strip()[:60]!r}")
    return keep(record)


_TEXT_OBJECT = (
    r"(?:text|sentences?|article|passage|paragraph|list|data|dataset|table|poem|story|code|program|"
    r"snippet|email|letter|essay|statement|words?|phrases?|numbers?|input|document|conversation|"
    r"dialogue|tweet|review|question|equation|expression|product|recipe|speech|report|excerpt|quote|"
    r"song|lyrics|headline|argument|description|sequence|array|string|function|query|file)"
)
_DEICTIC_TEXT = re.compile(
    r"\b(?:this|these|the\s+following|the\s+given|the\s+provided|the\s+above|the\s+below|"
    r"below)[ \t]+(?:[\w-]+[ \t]+){0,2}?" + _TEXT_OBJECT + r"\b",
    re.I,
)


_SENTENCE_END = re.compile(r"[.!?][\"”’')\]]*(?=\s)|\n")
_GIVEN_BEFORE = re.compile(r":([^\n]*)|[\"“]([^\"“”\n]+)[\"”]")


def _given_before(before: str, min_words: int) -> bool:
    """True when the sentences before an instruction hold its input: a colon or a quotation followed by at least
    min_words words ("Here is some data about a restaurant: name = Giraffe, ... Write a sentence about the
    following data"). A bare label ("Task: rewrite the following sentence") is in the instruction's own sentence."""
    for m in _GIVEN_BEFORE.finditer(before):
        if len(_WORDS.findall(m.group(1) or m.group(2))) >= min_words:
            return True
    return False


@rule("missing_input", INSTRUCTED)
def missing_input(record: dict, cfg: Any) -> Outcome:
    """Drop instructions about "the following text" when no text follows (an Alpaca input that was lost)."""
    meta_input = (record.get("meta") or {}).get("input")
    if isinstance(meta_input, str) and meta_input.strip():
        return keep(record)
    prompts = prompt_texts(record)
    if not prompts or "\n\n" in prompts[0].strip():  # a second paragraph is the input
        return keep(record)
    text = prompts[0]
    for m in _DEICTIC_TEXT.finditer(text):
        if _nothing_follows(text[m.end() :], cfg.max_trailing_words):
            sentence_start = max((e.end() for e in _SENTENCE_END.finditer(text, 0, m.start())), default=0)
            if _given_before(text[:sentence_start], cfg.min_words_before):
                return keep(record)
            return drop(f"refers to {m.group(0)!r} but nothing follows")
    return keep(record)


# [ \t]* after ^: a line's indent, so a run of blank lines is not read again from each of its lines
_MERGED_ANY = re.compile(
    r"^[ \t]*\d+\s*[.)]\s*(?:instruction|input|output|arahan|masukan|keluaran|consigne|"
    r"entr[ée]e|sortie)\s*:",
    re.I | re.M,
)
_MERGED_ANSWER = re.compile(r"^[ \t]*(?:#+\s*)?(?:instruction|arahan|consigne)\s*:", re.I | re.M)


@rule("merged_instruction", INSTRUCTED)
def merged_instruction(record: dict, cfg: Any) -> Outcome:
    """Drop records where a generator ran on into the next task ("6. Instruction: ...")."""
    for text in prompt_texts(record) + answer_texts(record):
        if m := _MERGED_ANY.search(text):
            return drop(f"contains another task: {m.group(0).strip()!r}")
    for text in answer_texts(record):
        if m := _MERGED_ANSWER.search(text):
            return drop(f"answer contains another task: {m.group(0).strip()!r}")
    return keep(record)


_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


@rule("nonsense", INSTRUCTED)
def nonsense(record: dict, cfg: Any) -> Outcome:
    """Drop prompts with no words at all and texts stuck in a repetition loop."""
    for text in prompt_texts(record):
        if not _LETTER_OR_DIGIT.search(text):
            return drop(f"prompt has no letters or digits: {text.strip()[:40]!r}")
    n = cfg.max_repeats
    for text in prompt_texts(record) + answer_texts(record):
        if phrase := repetition_loop(text, n):
            return drop(f"repetition loop: {phrase[:50]!r} repeated {n}+ times")
    return keep(record)


_WORDS = re.compile(r"\w+")
# A loop repeats words: "2 x 2 x 3 x 3 x 7" (a product), "1 2 1 2" (counting) repeat numbers and
# operators, and multiple-choice options are full of them.
_WORD_OF_LETTERS = re.compile(r"[^\W\d_]{2}")


def repetition_loop(text: str, n: int, max_len: int = 10) -> str | None:
    """A phrase of 2..max_len words, one of them of 2+ letters, repeated n times in a row ("What is the answer to
    the question:" x5), or None.

    Such a loop repeats its first word pair n times at a fixed period d; only word pairs seen n
    times are followed up, so ordinary text costs one pass of counting.
    """
    ws = _WORDS.findall(text.lower())
    if len(ws) < 2 * n:
        return None
    pairs = list(zip(ws, ws[1:], strict=False))
    frequent = {p for p, c in Counter(pairs).items() if c >= n}  # Counter counts in C: the cheap common path
    if not frequent:
        return None
    positions: dict[tuple[str, str], list[int]] = {}
    for i, pair in enumerate(pairs):
        if pair in frequent:
            positions.setdefault(pair, []).append(i)
    for pos in positions.values():
        for a, b in zip(pos, pos[1:], strict=False):
            d = b - a
            if (
                2 <= d <= max_len
                and a + n * d <= len(ws)
                and all(ws[a + j] == ws[a + j + d] for j in range((n - 1) * d))
                and any(_WORD_OF_LETTERS.search(w) for w in ws[a : a + d])
            ):
                return " ".join(ws[a : a + d])
    return None


_REFUSAL = re.compile(
    r"\bas\s+an?\s+(?:ai|artificial\s+intelligence)\s+(?:language\s+)?model\b"
    r"|\bas\s+a\s+(?:large\s+)?language\s+model\b"
    r"|\bas\s+an?\s+ai(?:\s+assistant)?,\s+i\s+(?:cannot|can't|don't|do\s+not|am\s+not|have\s+no)\b"
    r"|\bi(?:'m|\s+am)\s+(?:sorry|afraid),?\s+but\s+(?:as\s+an\s+ai|i\s+(?:cannot|can't|am\s+unable))"
    r"|\bi\s+cannot\s+fulfill?\s+(?:this|that|your)\s+request\b"
    r"|\bopenai's\s+(?:content|use[-\s]case)\s+polic"
    r"|\bsebagai\s+(?:sebuah\s+)?(?:program\s+)?model\s+bahasa\b"
    r"|\bsebagai\s+(?:sebuah\s+)?(?:ai|kecerdasan\s+buatan|pembantu\s+ai|asisten\s+ai),\s+saya\s+tidak\b"
    r"|\bsaya\s+(?:adalah\s+|ialah\s+)?(?:sebuah\s+|seorang\s+)?model\s+bahasa\b"
    r"|\ben\s+tant\s+qu[e']\s*(?:mod[èe]le\s+de\s+langage|ia\b|intelligence\s+artificielle|assistant\s+(?:ia|virtuel))"
    r"|\bje\s+suis\s+(?:une?\s+)?(?:mod[èe]le\s+de\s+langage|ia\b|intelligence\s+artificielle)",
    re.I,
)


_REFUSAL_KEYS = (
    "model",
    "modèle",
    "sorry",
    "afraid",
    "fulfil",
    "openai",
    " ai",
    " ia",
    "qu'ia",
    "kecerdasan",
    "intelligence",
)


@rule("refusal", ("chat", "preference"))
def refusal(record: dict, cfg: Any) -> Outcome:
    """Drop answers with refusal boilerplate ("As an AI language model, I ...")."""
    for text in answer_texts(record):
        low = text.lower()
        if not any(k in low for k in _REFUSAL_KEYS):  # ~20x cheaper than the pattern
            continue
        if m := _REFUSAL.search(text):
            return drop(f"refusal boilerplate: {m.group(0)[:60]!r}")
    return keep(record)


# ---- arithmetic that can be checked

_NUM = r"-?\$?\d+(?:,\d{3})*(?:\.\d+)?"
_OP = r"(?:[-+*/×÷^x]|\\times|\\div)"
# One side of an equation: a number or an expression, read whole (a number never stops before a digit, so
# "21336 * (5000 + 12)" is not "2133"; "1,5" is not 1 and 5).
_WHOLE_NUM = rf"{_NUM}(?!\d|[.,]\d)"
_OPERAND = rf"(?:\(\s*)*{_WHOLE_NUM}(?:\s*\))*"  # white space only inside brackets: no run of it is tried twice
_SIDE = rf"{_OPERAND}(?:\s*{_OP}\s*{_OPERAND})*"
# `a = b = c ...`, where the last side is not followed by a letter or an operator (units after a space are fine).
_CHAIN = re.compile(rf"(?<![\w.,^/\\{{]){_SIDE}(?:\s*=\s*{_SIDE})+(?![\w.]*[a-zA-Z(^]|\.\d|\s*{_OP})")
_BARE_SIDE = re.compile(rf"\(?\s*({_NUM})(?:\s*\))?")  # fullmatch on a stripped side
_PROMPT_EXPR = re.compile(rf"(?<![\w./\\-])({_OPERAND}(?:\s*{_OP}\s*{_OPERAND})+)(?![\w.]*[a-zA-Z(]|\s*=)")
_COMPUTE = re.compile(
    r"\b(?:calculate|compute|evaluate|solve|simplify|what\s+is|how\s+much|sum|add|multiply|"
    r"subtract|divide|result|hitung(?:kan)?|kira(?:kan)?|berapa|calcule[rz]?|combien|[ée]value[rz]?)\b",
    re.I,
)
# Sums that are right in another number system or another algebra ("11 + 1 = 100" in binary).
_OTHER_ARITHMETIC = re.compile(
    r"\b(?:binary|base[- ]?\d+|hex(?:adecimal)?|octal|modul[oa]r?|mod|boolean|binaire|"
    r"binari|perduaan|peano|clock|matri(?:x|ces))\b",
    re.I,
)
_BARE_NUMBER = re.compile(rf"^\s*({_NUM})\s*(?:\.\s*)?$")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def evaluate(expr: str) -> float | None:
    """The value of a plain arithmetic expression (+ - * / ^ x × ÷, parentheses), or None if it is not one."""
    py = (
        expr.replace("$", "")
        .replace(",", "")
        .replace("\\times", "*")
        .replace("\\div", "/")
        .replace("×", "*")
        .replace("x", "*")
        .replace("÷", "/")
        .replace("^", "**")
        .strip()
    )
    if py.count("(") != py.count(")"):
        return None
    try:
        tree = ast.parse(py, mode="eval")
    except (SyntaxError, RecursionError):  # a sum of thousands of terms nests too deep: not checked
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("exponent too large to check")
            return _BINOPS[type(node.op)](left, right)
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    return float(value) if math.isfinite(value) else None


def _number(text: str) -> tuple[float, int] | None:
    """A stated answer as (value, decimals shown); fractions like 3/4 as their value with 6 decimals."""
    text = text.replace("$", "").replace(",", "").replace(" ", "")
    if "/" in text:
        num, den = text.split("/", 1)
        return (float(num) / float(den), 6) if float(den) else None
    decimals = len(text.split(".")[1]) if "." in text else 0
    return float(text), decimals


def arithmetic_ok(value: float, stated: tuple[float, int], exact_int: bool) -> bool:
    """Is `stated` a right answer for `value`? Integers must match; decimals may be rounded or truncated."""
    answer, decimals = stated
    if exact_int and decimals == 0:
        return answer == value
    return abs(answer - value) < 10**-decimals + 1e-9 * abs(value)


def _exact_int(expr: str, value: float) -> bool:
    return "/" not in expr and "÷" not in expr and "\\div" not in expr and "." not in expr and value.is_integer()


# Two expressions on either side of "=" are steps of one computation; when either holds a decimal or a
# division its numbers may be rounded ("1/3 * 3 = 0.333 * 3"), so only a gap wider than this is wrong.
_STEP_TOLERANCE = 0.01


def _first_number(side: str) -> float | None:
    m = re.search(_NUM, side)
    return _number(m.group(0))[0] if m else None


def wrong_chain(sides: list[str]) -> str | None:
    """Detail of the first wrong link of `a = b = c ...` (each side checked against the last one with a value), or None.

    A number is checked against the expression before or after it at the precision it is written
    with; two expressions must agree (exactly for whole-number arithmetic); two numbers are not
    compared (they are not a computation).
    """
    prev: tuple[str, float, tuple[float, int] | None] | None = None  # (side, value, as stated if a number)
    for side in (s.strip() for s in sides):
        if bare := _BARE_SIDE.fullmatch(side):
            stated = _number(bare.group(1))
            if prev and prev[2] is None and not arithmetic_ok(prev[1], stated, _exact_int(prev[0], prev[1])):
                return f"{prev[0]} = {side} (is {prev[1]:g})"
            prev = (side, stated[0], stated)
            continue
        value = evaluate(side)
        if value is None:
            continue
        if prev and prev[2] is None and _first_number(side) == prev[1]:
            pass  # a running total ("12 x 3 = 36 + 4 = 40"): "=" misused, the arithmetic right
        elif prev and prev[2] is None:
            exact = _exact_int(prev[0], prev[1]) and _exact_int(side, value)
            if (value != prev[1]) if exact else abs(value - prev[1]) > _STEP_TOLERANCE * max(abs(value), abs(prev[1])):
                return f"{prev[0]} = {side} ({prev[1]:g} vs {value:g})"
        elif prev and not arithmetic_ok(value, prev[2], _exact_int(side, value)):
            return f"{prev[0]} = {side} (is {value:g})"
        prev = (side, value, None)
    return None


def wrong_arithmetic(prompt: str, answer: str) -> str | None:
    """Detail of the first checkable piece of arithmetic that is wrong, or None.

    Checked: every chain `a op b ... = c op d ... = e` in the answer; and a bare-number answer to a prompt that asks
    for a computation and holds exactly one arithmetic expression ("Evaluate (6+2)*(2-2)." -> "8"). Anything else (units,
    algebra, rounding words, percentages) is left alone: only what is certainly wrong is dropped.
    """
    bare = _BARE_NUMBER.match(answer)
    if ("=" not in answer and not bare) or _OTHER_ARITHMETIC.search(prompt) or _OTHER_ARITHMETIC.search(answer):
        return None
    for m in _CHAIN.finditer(answer) if "=" in answer else ():
        if "%" in answer[m.start() : m.end() + 1] or answer[max(0, m.start() - 80) : m.start()].rstrip()[-1:] in set(
            "+-*/×÷^("
        ):
            continue  # a percentage; or the left side goes on to the left ("2x + 3 = 9"): algebra, not a sum
        if detail := wrong_chain(m.group(0).split("=")):
            return detail
    if bare:
        exprs = [m.group(1) for m in _PROMPT_EXPR.finditer(prompt)]
        if len(exprs) == 1 and "%" not in prompt and _COMPUTE.search(prompt):
            value, stated = evaluate(exprs[0]), _number(bare.group(1))
            if (
                value is not None
                and stated is not None
                and not arithmetic_ok(value, stated, _exact_int(exprs[0], value))
            ):
                return f"{exprs[0].strip()} -> {bare.group(1)} (is {value:g})"
    return None


_DIGIT = re.compile(r"\d")


@rule("wrong_arithmetic", ("chat", "preference"))
def wrong_arithmetic_rule(record: dict, cfg: Any) -> Outcome:
    """Drop answers whose checkable arithmetic is wrong (a right `1 + 1 + 1 = 3` stays)."""
    prompt = "\n".join(prompt_texts(record))
    for answer in answer_texts(record):
        if _DIGIT.search(answer) and (detail := wrong_arithmetic(prompt, answer)):
            return drop(detail)
    return keep(record)


@rule("length", ALL)
def length(record: dict, cfg: Any) -> Outcome:
    """Drop records whose text is shorter than min_chars or longer than max_chars (per kind)."""
    from selfalign.records import texts

    n = sum(len(t) for t in texts(record))
    lo, hi = getattr(cfg.min_chars, record["kind"]), getattr(cfg.max_chars, record["kind"])
    if n < lo:
        return drop(f"{n} chars < min_chars {lo}")
    if n > hi:
        return drop(f"{n} chars > max_chars {hi}")
    return keep(record)


# ---------------------------------------------------------------- the stage's settings (params.yaml `clean:`)


@dataclasses.dataclass
class RuleSwitch(Config):
    """A rule with no settings of its own."""

    enabled: bool = True


@dataclasses.dataclass
class UnseenReferenceRule(RuleSwitch):
    max_trailing_words: int = opt(8, lo=0)  # words after "this photo" that still leave the photo missing
    max_chars_around_url: int = opt(300, lo=0)  # a URL is the thing to work on only in a prompt this short


@dataclasses.dataclass
class MissingInputRule(RuleSwitch):
    max_trailing_words: int = opt(4, lo=0)  # words after "the following text" before it counts as given
    min_words_before: int = opt(3, lo=0)  # a colon or quotation this long in an earlier sentence is the input


@dataclasses.dataclass
class NonsenseRule(RuleSwitch):
    max_repeats: int = opt(4, lo=2)  # a phrase repeated this many times in a row is a loop


@dataclasses.dataclass
class Rules(Config):
    """One field per rule in RULES (the fields' order is not the run order: RULES' is)."""

    mojibake: RuleSwitch = opt(RuleSwitch())
    control_chars: RuleSwitch = opt(RuleSwitch())
    no_input: RuleSwitch = opt(RuleSwitch())
    empty: RuleSwitch = opt(RuleSwitch())
    placeholder: RuleSwitch = opt(RuleSwitch())
    unseen_reference: UnseenReferenceRule = opt(UnseenReferenceRule())
    non_text_output: RuleSwitch = opt(RuleSwitch())
    missing_input: MissingInputRule = opt(MissingInputRule())
    merged_instruction: RuleSwitch = opt(RuleSwitch())
    nonsense: NonsenseRule = opt(NonsenseRule())
    refusal: RuleSwitch = opt(RuleSwitch())
    wrong_arithmetic: RuleSwitch = opt(RuleSwitch())
    length: RuleSwitch = opt(RuleSwitch())  # its bounds: CleanConfig.min_chars, max_chars


@dataclasses.dataclass
class KindChars(Config):
    """A character count per record kind (all of a record's text)."""

    chat: int = opt(0, lo=0)
    preference: int = opt(0, lo=0)
    prompt: int = opt(0, lo=0)
    web: int = opt(0, lo=0)


@dataclass(frozen=True)
class LengthBounds:
    """The length rule's settings at run time: its switch and the per-kind bounds."""

    enabled: bool
    min_chars: KindChars
    max_chars: KindChars


@dataclasses.dataclass
class Slurm(Config):
    """datatrove's SlurmPipelineExecutor settings (executor slurm only)."""

    partition: str = ""
    time: str = "01:00:00"
    cpus_per_task: int = opt(1, lo=1)
    mem_per_cpu_gb: int = opt(2, lo=1)
    venv_path: str = ""


@dataclasses.dataclass
class CleanConfig(Config):
    """The clean stage's settings (params.yaml `clean:`, whose comments say what each does and why)."""

    rules: Rules = opt(Rules())
    min_chars: KindChars = opt(KindChars(chat=10, preference=10, prompt=5, web=100))
    max_chars: KindChars = opt(KindChars(chat=20000, preference=20000, prompt=4000, web=5000))
    langs: langid.LangGate = opt(langid.LangGate())  # the language gate
    exact_dup: bool = True  # drop later copies with the same normalised text
    near_dup: NearDup = opt(NearDup())  # MinHash LSH near-duplicates
    workers: int = opt(2, lo=1)  # processes or datatrove tasks (the output is the same for any number)
    executor: Literal["local", "datatrove", "slurm", "ray"] = "local"  # who runs the per-record work
    slurm: Slurm = opt(Slurm())
    min_success: float = opt(0.5, lo=0, hi=1)  # the stage fails when fewer than this share of records is kept

    def check(self, where: str) -> None:
        if self.executor == "slurm" and not self.slurm.partition:
            raise ParamsError(f"{where}.slurm.partition: '' but executor slurm needs a partition")
        for f in dataclasses.fields(KindChars):
            lo, hi = getattr(self.min_chars, f.name), getattr(self.max_chars, f.name)
            if lo > hi:
                raise ParamsError(f"{where}.min_chars.{f.name}: {lo} > max_chars.{f.name} {hi}")

    def rule_settings(self) -> dict[str, Any]:
        """Each rule's settings by name, for apply_rules (the length rule gets the per-kind bounds)."""
        out: dict[str, Any] = {name: getattr(self.rules, name) for name in RULES}
        out["length"] = LengthBounds(self.rules.length.enabled, self.min_chars, self.max_chars)
        return out

    def gate(self) -> langid.LangGate | None:
        """The language gate's settings, or None when it is off."""
        return self.langs if self.langs.enabled else None


def run(
    pairs: list[tuple[Path, Path]],
    cfg: CleanConfig,
    rejected_path: Path,
    workers: int | None = None,
    engine: dict | None = None,
) -> dict:
    """The stage: clean the files of `pairs` together (input -> output, in dedup priority order: the first copy
    wins), writing each output and `rejected_path`; return the metrics, with its time and rate.
    `workers`, `engine`: as selfalign.executor.run (default: cfg's)."""
    from selfalign import executor  # it runs this module's rules, so it imports this module

    t0 = time.perf_counter()
    metrics = executor.run(pairs, cfg, rejected_path, workers=workers, engine=engine)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics.update(progress.rates(metrics["records_in"], metrics["seconds"]))
    return metrics

"""Teacher distillation (Vigogne): regenerate weak responses, and answer under Orca-style system messages.

Vigogne found that a teacher asked for an instruction *and* its response writes short responses,
while the same teacher given the instruction alone answers at length; and that Orca-style system
messages ("think step by step and justify your answer") give responses that carry the teacher's
reasoning. So:

- regenerate: a seed response shorter than `min_chars`, or a curated candidate whose score is
  below `below_score`, gets a new response from the teacher, from its instruction alone;
- orca: a seeded sample of instructions is answered under a system message from
  prompts/orca_systems.txt, and the record keeps that message in `system`.

Pure functions; the stage script (stages/distill.py) reads, runs the teacher, writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from selfalign import records
from selfalign.config import Config, opt
from selfalign.llm import EngineSpec

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclasses.dataclass
class RegenerateConfig(Config):
    """Which responses the teacher rewrites from their instruction alone (`regenerate`)."""

    min_chars: int = opt(200, lo=0)  # a seed response shorter than this (kept only if the new one is longer)
    below_score: float = opt(3.0, lo=0)  # a curated candidate scored below this
    max: int = opt(8, lo=0)  # at most this many regenerations


@dataclasses.dataclass
class OrcaConfig(Config):
    n: int = opt(8, lo=0)  # instructions answered under an Orca-style system message


@dataclasses.dataclass
class DistillConfig(Config):
    """params.yaml `distill:`."""

    seed: int = 0  # seeded choice of targets and of each Orca answer's system message
    regenerate: RegenerateConfig = opt(RegenerateConfig())
    orca: OrcaConfig = opt(OrcaConfig())
    max_new_tokens: int = opt(192, lo=1)  # the teacher's reply cap
    temperature: float = opt(0.0, lo=0)  # 0 = greedy
    top_p: float = opt(1.0, lo=0, lo_open=True, hi=1)
    min_response_words: int = opt(5, lo=0)
    trim_truncated: bool = True  # an answer that hit max_new_tokens is cut back to its last full sentence...
    reject_truncated: bool = True  # ...and rejected if it has none
    # auto (bf16 on an AMX CPU or a bf16 GPU): ~1.5x faster than fp32 on the default run (BENCHMARKS.md, params).
    # fp32 makes batched greedy answers equal one-at-a-time ones (bench/augment.py), so a resumed run writes exactly
    # what a fresh one writes; with bf16 the answers asked after a resume can differ.
    engine: EngineSpec = opt(EngineSpec(dtype="auto"))  # the teacher; model "" = --teacher
    min_success: float = opt(0.5, lo=0, hi=1)  # the stage fails below this share of teacher answers kept


def load_systems(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    systems = [ln for ln in lines if ln and not ln.startswith("#")]
    if not systems:
        raise ValueError(f"{path}: no system messages (one per line; # starts a comment)")
    return systems


def single_turn(record: dict) -> tuple[str, str] | None:
    """(instruction, response) of a chat record that is one user turn then one assistant turn."""
    msgs = record.get("messages") or []
    if record.get("kind") != "chat" or len(msgs) != 2 or [m["role"] for m in msgs] != ["user", "assistant"]:
        return None
    return msgs[0]["content"], msgs[1]["content"]


def rank(seed: int, record_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{record_id}".encode()).hexdigest()


def regenerate_targets(
    seed_records: list[dict], scored: list[dict], *, min_chars: int, below_score: float, limit: int, seed: int
) -> list[tuple[dict, str]]:
    """(record, why) for records whose response the teacher should rewrite; why is "short" or "low_score".

    One target per instruction text; at most `limit`, chosen by seeded hash among all eligible.
    """
    eligible: dict[str, tuple[dict, str]] = {}
    for r in seed_records:
        pair = single_turn(r)
        if pair and len(pair[1].strip()) < min_chars:
            eligible.setdefault(pair[0].strip(), (r, "short"))
    for r in scored:
        pair = single_turn(r)
        if pair and float((r.get("meta") or {}).get("score", 5.0)) < below_score:
            eligible.setdefault(pair[0].strip(), (r, "low_score"))
    chosen = sorted(eligible.values(), key=lambda t: rank(seed, t[0]["id"]))
    return chosen[: max(limit, 0)]


def orca_targets(
    pool: list[dict], exclude: set[tuple[str, str]], *, n: int, seed: int, n_systems: int
) -> list[tuple[dict, int]]:
    """(record, system index) for a seeded sample of `n` single-turn instructions not in `exclude` (records.key:
    (id, lang), since a translation keeps its original's id)."""
    seen, eligible = set(), []
    for r in pool:
        pair = single_turn(r)
        if pair and records.key(r) not in exclude and pair[0].strip() not in seen:
            seen.add(pair[0].strip())
            eligible.append(r)
    chosen = sorted(eligible, key=lambda r: rank(seed + 1, f"{r['id']}/{r.get('lang')}"))[: max(n, 0)]
    return [(r, int(rank(seed + 2, f"{r['id']}/{r.get('lang')}"), 16) % n_systems) for r in chosen]


_LIST_MARKER = re.compile(r"^\s*\d+[.)]\s*$")  # "5." opening a list item is not the end of a sentence
_SENTENCE_END = re.compile(r"[.!?\u3002](?=[\s\"')\]]|$)|\n\s*\n")


def trim_to_sentence(text: str) -> str | None:
    """A response cut off by max_new_tokens, back to the end of its last complete sentence or paragraph.

    A cut never leaves a code block open; None when no such sentence end exists.
    """
    for end in reversed([m.end() for m in _SENTENCE_END.finditer(text)]):
        kept = text[:end].rstrip()
        if kept and kept.count("```") % 2 == 0 and not _LIST_MARKER.match(kept.rsplit("\n", 1)[-1]):
            return kept
    return None


def settle_truncation(text: str, finish_reason: str | None, *, trim: bool, reject: bool) -> tuple[str | None, bool]:
    """(text to keep, or None to reject; whether it was trimmed) for a response.

    A response that hit max_new_tokens would teach the student to stop mid-sentence: with `trim`
    it is cut back to its last complete sentence; one that cannot be trimmed is rejected when
    `reject`, kept whole otherwise.
    """
    if finish_reason != "length":
        return text, False
    kept = trim_to_sentence(text) if trim else None
    if kept is not None:
        return kept, True
    return (None, False) if reject else (text, False)


def response_reason(text: str | None, *, min_words: int, original: str | None = None) -> tuple[str, str] | None:
    """(reason, detail) when a teacher response is unusable, else None."""
    words = _WORD.findall((text or "").lower())
    if not (text or "").strip():
        return "empty_response", "the teacher returned no text"
    if len(words) < min_words:
        return "response_too_short", f"{len(words)} words < {min_words}"
    if len(words) >= 24:
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        distinct = len(set(trigrams)) / len(trigrams)
        if distinct < 0.5:
            return "repetitive", f"{distinct:.2f} of its word trigrams are distinct"
    if original is not None and len(text.strip()) <= len(original.strip()):
        return "not_longer", f"{len(text.strip())} chars <= the original's {len(original.strip())}"
    return None


def distilled(
    origin: dict, instruction: str, response: str, *, how: str, teacher: str, system: str | None = None, **meta
) -> dict:
    """A chat record from the teacher, linked to the record it came from."""
    keep = {k: v for k, v in (origin.get("meta") or {}).items() if k == "segment_id"}
    return records.chat(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
        system=system,
        lang=origin["lang"],
        source="distill",
        meta={
            **keep,
            "distill": how,
            "teacher": teacher,
            "origin_id": origin["id"],
            "origin_source": origin.get("source"),
            **meta,
        },
    )

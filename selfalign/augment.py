"""Self-augmentation (Humpback step 2): the backward model writes an instruction for each web segment.

The backward model Myx was fine-tuned on reversed seed pairs: the user turn holds a response, the
assistant turn the instruction that asked for it. So the prompt here is that same user turn,
built from the same wording (prompts/backward.txt, a template with a `{response}` placeholder,
when the sft stage provides one; the bare segment otherwise), and the reply is read back as an
instruction. A reply that is empty, cut off, looping, or a copy of the segment is not an
instruction: it is rejected with that reason rather than passed on to curation.

Pure functions; the stage script (stages/augment.py) does the I/O and runs the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from selfalign import records
from selfalign.config import Config, ParamsError, opt
from selfalign.llm import EngineSpec


@dataclasses.dataclass
class AugmentConfig(Config):
    """params.yaml `augment:` (the comments there say what each value was measured against)."""

    max_segments: int = opt(64, lo=0)  # seeded sample of web segments sent to the backward model
    seed: int = 0  # sample ranking and sampling seed
    min_chars: int = opt(80, lo=0)  # segments outside [min_chars, max_chars] are rejected
    max_chars: int = opt(2000, lo=1)
    max_new_tokens: int = opt(64, lo=1)  # the instruction's reply cap
    temperature: float = opt(0.7, lo=0)  # 0 = greedy
    top_p: float = opt(0.9, lo=0, lo_open=True, hi=1)
    min_instruction_words: int = opt(3, lo=0)
    reject_truncated: bool = True  # reject replies that hit max_new_tokens
    # auto (bf16 on an AMX CPU or a bf16 GPU): ~1.5x faster generation than fp32 on the default run (BENCHMARKS.md,
    # params). fp32 makes batched greedy outputs equal one-at-a-time ones (16/16 in bench/augment.py; bf16 8/16), so
    # a resumed run writes exactly what an uninterrupted one would; with bf16 the replies asked after a resume can differ.
    engine: EngineSpec = opt(EngineSpec(dtype="auto"))  # model "" = --model
    min_success: float = opt(0.5, lo=0, hi=1)  # the stage fails below this share of sampled segments kept

    def check(self, where: str) -> None:
        if self.min_chars > self.max_chars:
            raise ParamsError(f"{where}.min_chars: {self.min_chars} is above max_chars {self.max_chars}")


PLACEHOLDER = "{response}"
# Labels a model tends to put before the instruction it writes ("Instruction: ...", "Here is the instruction:",
# what SmolLM2 base and a lightly trained backward model open with), never a user's own words.
_LABEL = re.compile(
    r"^\s*(?:#+\s*)?(?:(?:here(?:'|\u2019)s|here\s+is)\s+(?:the|an|a|your)\s+|the\s+)?"
    r"(?:instruction|question|prompt|request|task|user)(?:\s+(?:would\s+be|is))?\s*:\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u00ab": "\u00bb"}
_WORD = re.compile(r"\w+", re.UNICODE)
# How an assistant opens a reply, never how a user opens a request: the backward model answered
# the segment instead of writing the instruction for it.
_ASSISTANT_VOICE = re.compile(
    r"^(?:sure\b|certainly\b|of course\b|absolutely\b|"
    r"i(?:'d| would) be (?:happy|glad)\b|i'm (?:ready|here to|happy|glad)\b|"
    r"as an ai\b|thank you for\b)",
    re.IGNORECASE,
)


def load_template(path: str | Path | None) -> str | None:
    """The backward prompt wording; None means the user turn is the segment alone."""
    if path is None:
        return None
    text = Path(path).read_text(encoding="utf-8")
    if text.count(PLACEHOLDER) != 1:
        raise ValueError(f"{path}: the backward prompt must contain the placeholder {PLACEHOLDER} exactly once")
    return text.strip()


def user_turn(template: str | None, segment: str) -> str:
    return segment if template is None else template.replace(PLACEHOLDER, segment)


def sample_key(seed: int, record_id: str) -> str:
    """A record's rank in a seeded sample: stable when other records come or go."""
    return hashlib.sha256(f"{seed}\0{record_id}".encode()).hexdigest()


def sample(segments: list[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(chosen, left out): the `n` segments with the smallest seeded hash, in input order."""
    if n < 0 or n >= len(segments):
        return list(segments), []
    chosen = {r["id"] for r in sorted(segments, key=lambda r: sample_key(seed, r["id"]))[:n]}
    return [r for r in segments if r["id"] in chosen], [r for r in segments if r["id"] not in chosen]


def parse_instruction(text: str | None) -> str:
    """The instruction in a generated reply: label and wrapping quotes removed, whitespace trimmed."""
    s = (text or "").strip()
    s = _LABEL.sub("", s, count=1).strip()
    close = _QUOTES.get(s[:1])
    if close and len(s) >= 2 and s.endswith(close) and close not in s[1:-1]:
        s = s[1:-1].strip()
    return s


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def degenerate_reason(
    instruction: str, segment: str, finish_reason: str | None, *, min_words: int = 3, reject_truncated: bool = True
) -> tuple[str, str] | None:
    """(reason, detail) when a generated instruction is unusable, else None."""
    words = _WORD.findall(instruction.lower())
    if not instruction:
        return "empty_generation", "the reply is empty after removing labels and quotes"
    if len(words) < min_words:
        return "instruction_too_short", f"{len(words)} words < {min_words}"
    if _ASSISTANT_VOICE.match(instruction.replace("\u2019", "'")):
        return "assistant_voice", "it opens like an assistant's reply, not a user's request"
    if reject_truncated and finish_reason == "length":
        return "truncated", "the reply hit max_new_tokens before the end-of-turn token"
    if len(words) >= 12:
        trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        distinct = len(set(trigrams)) / len(trigrams)
        if distinct < 0.5:
            return "repetitive", f"{distinct:.2f} of its word trigrams are distinct"
    inst, seg = _norm(instruction), _norm(segment)
    if len(inst) >= 40 and inst in seg:
        return "copies_segment", "the instruction is a verbatim span of the segment"
    if seg and seg in inst:
        return "copies_segment", "the instruction contains the whole segment"
    return None


def candidate(instruction: str, web: dict, *, model: str, finish_reason: str | None) -> dict:
    """A chat record: user = the generated instruction, assistant = the segment verbatim, linked by id."""
    meta = {
        "segment_id": web["id"],
        "web_source": web.get("source"),
        "backward_model": model,
        "finish_reason": finish_reason,
    }
    return records.chat(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": web["text"]}],
        lang=web["lang"],
        source="augment",
        meta=meta,
    )

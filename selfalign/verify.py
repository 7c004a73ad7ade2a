"""A teacher's correctness check of chat records, as pure functions: build the prompt, parse the verdict.

The teacher reads the conversation up to its last answer (the instruction and its input) and that
answer, and replies with a verdict, a short reason and a confidence. The rubric and the reply format
live in the prompt file (prompts/verify.txt, a DVC dependency); this module only fills it and reads
the reply. A reply is read as a JSON object {"verdict": "correct"|"incorrect", "reason": ..., "confidence":
0..1} (inside a code fence or after some chatter too) or, for small models and scripted teachers, as
"verdict <v> ... confidence <c> ... reason <text>" with the keys spelled out. Anything else is an
UnparsableVerdict: the stage rejects that record (reason unparsable_verdict), it never passes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass

from selfalign import llm
from selfalign.config import Config, ParamsError, opt

VERDICTS = ("correct", "incorrect")
_LANG_CODE = re.compile(r"^[a-z]{2,3}$")


@dataclasses.dataclass
class VerifyConfig(Config):
    """params.yaml `verify:` (the comments there say what each value does)."""

    # name: the file one verify@<name> checks (dvc.yaml's foreach reads this mapping)
    inputs: dict[str, str] = opt({"seed": "data/localise/seed.jsonl"})
    langs: list[str] = opt(["ms"])  # languages judged ([] = all); the others pass unjudged
    max_records: int = opt(12, lo=0)  # judged at most per input (0 = all); the rest pass unjudged
    min_confidence: float = opt(0.0, lo=0, hi=1)  # a `correct` verdict below this is rejected (low_confidence)
    max_new_tokens: int = opt(96, lo=1)  # room for the JSON verdict
    temperature: float = opt(0.0, lo=0)
    top_p: float = opt(1.0, lo=0, hi=1, lo_open=True)
    seed: int = 0
    engine: llm.EngineSpec = opt(llm.EngineSpec())  # the teacher; model "" = the stage's --model

    def check(self, where: str) -> None:
        for name, path in self.inputs.items():
            if not path.strip():
                raise ParamsError(f"{where}.inputs.{name}: {path!r} is not a file (one verify@{name} reads it)")
        bad = [x for x in self.langs if not _LANG_CODE.match(x)]
        if bad:
            raise ParamsError(f"{where}.langs: {bad[0]!r} is not a language code (2-3 lower-case letters: ms)")


_OBJECT = re.compile(r"\{.*\}", re.S)
_KEYED = {
    "verdict": re.compile(r"\bverdict\b\s*[:=\-]?\s*\**\s*(correct|incorrect)\b", re.I),
    "confidence": re.compile(r"\bconfidence\b\s*[:=\-]?\s*(\d+(?:\.\d+)?)\s*(%?)", re.I),
    "reason": re.compile(r"\breason\b\s*[:=\-]?\s*(.+?)\s*(?:$|\n|;|\bverdict\b|\bconfidence\b)", re.I | re.S),
}


class UnparsableVerdict(ValueError):
    pass


@dataclass(frozen=True)
class Verdict:
    verdict: str  # correct | incorrect
    reason: str
    confidence: float  # 0..1


def conversation(record: dict) -> tuple[str, str]:
    """(the instruction: system prompt and every turn before the last answer, the last answer)."""
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    head = [f"[system]\n{record['system']}"] if record.get("system") else []
    if last == 1 and msgs[0]["role"] == "user" and not head:
        return msgs[0]["content"], msgs[last]["content"]
    head += [f"[{m['role']}]\n{m['content']}" for m in msgs[:last]]
    return "\n\n".join(head), msgs[last]["content"]


def build_prompt(template: str, record: dict) -> str:
    """Fill {instruction}, {output} and {lang}; plain replacement, so braces in the record are safe."""
    for key in ("{instruction}", "{output}"):
        if key not in template:
            raise ValueError(f"the verify prompt template has no {key} placeholder")
    instruction, output = conversation(record)
    return (
        template.replace("{lang}", record.get("lang", ""))
        .replace("{instruction}", instruction)
        .replace("{output}", output)
    )


def _confidence(value, where: str) -> float:
    try:
        c = float(value)
    except (TypeError, ValueError) as e:
        raise UnparsableVerdict(f"{where}: confidence {value!r} is not a number") from e
    if 1 < c <= 100:  # "85" or "85%": a percentage
        c /= 100
    if not 0 <= c <= 1:
        raise UnparsableVerdict(f"{where}: confidence {value!r} is outside 0..1")
    return c


def parse_verdict(reply: str) -> Verdict:
    """The teacher's Verdict, or UnparsableVerdict naming what is missing."""
    text = (reply or "").strip()
    if not text:
        raise UnparsableVerdict("empty reply")
    m = _OBJECT.search(text)
    if m:
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "verdict" in obj:
            v = str(obj.get("verdict", "")).strip().lower()
            if v not in VERDICTS:
                raise UnparsableVerdict(f"JSON verdict {obj.get('verdict')!r} is not correct or incorrect")
            if "confidence" not in obj:
                raise UnparsableVerdict("JSON reply has no confidence")
            reason = str(obj.get("reason") or "").strip()
            if not reason:
                raise UnparsableVerdict("JSON reply has no reason")
            return Verdict(v, reason, _confidence(obj["confidence"], "JSON"))
    found = {k: rx.search(text) for k, rx in _KEYED.items()}
    missing = [k for k, f in found.items() if f is None]
    if missing:
        raise UnparsableVerdict(
            f"no {', '.join(missing)} in the reply (expected JSON or 'verdict ... confidence ... reason ...')"
        )
    value, percent = found["confidence"].groups()
    conf = _confidence(float(value) / 100 if percent else value, "reply")
    reason = found["reason"].group(1).strip(" .,:;")
    if not reason:
        raise UnparsableVerdict("empty reason")
    return Verdict(found["verdict"].group(1).lower(), reason, conf)


def decide(verdict: Verdict, min_confidence: float) -> tuple[bool, str, str]:
    """(keep, reject reason, detail): incorrect is rejected with the teacher's reason; a correct verdict below
    min_confidence is rejected as low_confidence."""
    if verdict.verdict == "incorrect":
        return False, "incorrect", f"{verdict.reason} (confidence {verdict.confidence:.2f})"
    if verdict.confidence < min_confidence:
        return False, "low_confidence", f"correct at {verdict.confidence:.2f} < {min_confidence}: {verdict.reason}"
    return True, "", ""


def choose(recs: list[dict], langs: list[str], max_records: int) -> tuple[list[int], Counter]:
    """(indices of the records to judge, counts of the unjudged ones by why): records in `langs` ([] = every
    language), the first `max_records` of them (0 = all)."""
    chosen, unjudged = [], Counter()
    for i, r in enumerate(recs):
        if langs and r["lang"] not in langs:
            unjudged["other_lang"] += 1
        elif max_records and len(chosen) >= max_records:
            unjudged["over_max_records"] += 1
        else:
            chosen.append(i)
    return chosen, unjudged


def judge(reply: llm.Result, min_confidence: float) -> tuple[Verdict | None, str, str]:
    """(the verdict or None, reject reason or "", detail) of one teacher reply: a failed call is teacher_failed, an
    unreadable reply unparsable_verdict; a verdict is decided by `decide`."""
    if not reply.ok:
        return None, "teacher_failed", reply.error or "unknown error"
    try:
        v = parse_verdict(reply.text)
    except UnparsableVerdict as e:
        return None, "unparsable_verdict", f"{e}; reply {reply.text!r}"[:500]
    _, reason, detail = decide(v, min_confidence)
    return v, reason, detail

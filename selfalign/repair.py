"""Indonesian repair: a record declared Malay that the language gate found Indonesian is rewritten into Malay by a
teacher and judged again by the same gate.

Where it sits: a stage of its own, `repair`, reading clean's rejected.jsonl, rather than a branch inside clean.
clean stays a fast, model-free pass (its rules and gate take seconds and rerun whole), the teacher's calls get
their own cache, params and metrics, and DVC reruns only the repair when its teacher or prompt changes. The gate
is the same function with the same settings: `gate` below calls selfalign.langid.identify on
selfalign.langid.gate_text(record) with params clean.langs, exactly as selfalign.clean.clean_record does.
A repaired record skipped clean's deduplication (it was rejected before it), not its rules: the gate runs after
every rule, so a record rejected by it had passed them all.

The rewrite is field by field through selfalign.translate's machinery (spans such as code, numbers and URLs
protected by sentinels and restored; one line in, one line out; a cut-off reply fails), with the repair prompt
(prompts/repair.txt: Indonesian -> Malay). The record keeps its id and `lang`; meta.repair holds both verdicts.
"""

from __future__ import annotations

import copy

from selfalign import langid
from selfalign import translate as tr

# the gate's verdict on a declared-Malay record that is really Indonesian
SOURCE, TARGET = "id", "ms"


def gate(record: dict, lang_cfg: dict) -> langid.Verdict:
    """The language gate's verdict on `record` (clean's gate: langid.identify over langid.gate_text)."""
    return langid.identify(langid.gate_text(record), record["lang"], **lang_cfg)


def describe(v: langid.Verdict) -> str:
    return f"{v.verdict}: {v.detail} [{v.detector}]"


def is_candidate(rejected: dict) -> str:
    """'' when a clean rejected record is a declared-Malay chat record dropped by the language gate, else why not
    (not_lang_gate, other_lang, other_kind). Whether it is Indonesian is the gate's call (see `gate`)."""
    if rejected.get("reason") != "lang" or not isinstance(rejected.get("record"), dict):
        return "not_lang_gate"
    rec = rejected["record"]
    if rec.get("lang") != TARGET:
        return "other_lang"
    if rec.get("kind") != "chat":
        return "other_kind"
    return ""


def plan(record: dict, template: str, gen: dict) -> list[tr.Field]:
    """One field per system prompt and turn, each asking the teacher to rewrite it from Indonesian into Malay."""
    return [
        tr.plan_field(path, text, SOURCE, TARGET, template, gen)
        for path, text in tr.fields(record, ["system", "user", "assistant"])
    ]


def assemble(
    record: dict, rewritten: dict[tuple, str], before: langid.Verdict, after: langid.Verdict, teacher: str
) -> dict:
    """The rewritten record: same id and lang, meta.repair = both verdicts and the teacher."""
    out = copy.deepcopy(record)
    for path, text in rewritten.items():
        node = out
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = text
    out["meta"] = {
        **(record.get("meta") or {}),
        "repair": {"before": describe(before), "after": describe(after), "teacher": teacher},
    }
    return out

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
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Literal

from selfalign import langid, llm, params, records
from selfalign import translate as tr
from selfalign.config import Config, opt

# the gate's verdict on a declared-Malay record that is really Indonesian
SOURCE, TARGET = "id", "ms"
STAGE = "repair"


@dataclasses.dataclass
class RepairConfig(Config):
    """params.yaml `repair:` (the comments there say what each value does)."""

    mode: Literal["rewrite", "drop"] = "rewrite"  # drop: no teacher, every candidate stays rejected
    max_records: int = opt(12, lo=0)  # rewritten at most; the rest rejected as over_max_records (0 = all)
    max_new_tokens: int = opt(192, lo=1)  # cap on one field's rewrite
    tokens_per_char: float = opt(0.5, lo=0, lo_open=True)  # a field's budget: 32 + this x its characters
    temperature: float = opt(0.7, lo=0)
    top_p: float = opt(0.9, lo=0, hi=1, lo_open=True)
    seed: int = 0
    engine: llm.EngineSpec = opt(llm.EngineSpec())  # the teacher; model "" = the stage's --model

    def gen(self) -> dict:
        """The generation settings translate.plan_field reads."""
        return {k: getattr(self, k) for k in tr.GEN_KEYS}


def lang_gate(params_file: str | Path | None) -> langid.LangGate:
    """clean's gate settings (params clean.langs, checked as clean checks them): repair judges with clean's gate."""
    return params.resolve(langid.LangGate, params_file, "clean.langs")


def gate(record: dict, lang_gate: langid.LangGate) -> langid.Verdict:
    """The language gate's verdict on `record` (clean's gate: langid.judge, whatever clean.langs.enabled says)."""
    return langid.judge(record, lang_gate)


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


# ------------------------------------------------------------------------------------------ the stage's work


def find_candidates(
    entries: list[tuple[int, dict]], lang_gate: langid.LangGate
) -> tuple[list[tuple[dict, langid.Verdict, int]], Counter]:
    """((record, the gate's verdict now, line) of each entry of clean's rejected file that is repair's to judge,
    counts of the others by why not): a declared-ms chat record dropped by the gate that the gate, run again,
    calls Indonesian."""
    skipped, candidates = Counter(), []
    for line, entry in entries:
        why = is_candidate(entry)
        if why:
            skipped[why] += 1
            continue
        rec = entry["record"]
        before = gate(rec, lang_gate)
        if before.verdict != "mismatch" or before.detected != SOURCE:
            skipped[f"gate_now_{before.verdict}_{before.detected or 'none'}"] += 1
            continue
        candidates.append((rec, before, line))
    return candidates, skipped


def reject(
    rec: dict,
    reason: str,
    detail: str,
    before: langid.Verdict,
    file: str,
    line: int | None,
    after: langid.Verdict | None = None,
) -> dict:
    """A rejected candidate with the gate's verdicts before (and after) the rewrite."""
    out = records.rejected(rec, reason, STAGE, detail=detail, file=file, line=line)
    out["gate_before"] = describe(before)
    if after is not None:
        out["gate_after"] = describe(after)
    return out


def triage(
    candidates: list[tuple[dict, langid.Verdict, int]], cfg: RepairConfig, file: str
) -> tuple[list[tuple[dict, langid.Verdict, int]], list[dict]]:
    """(the candidates to rewrite, the rejected others): drop mode rewrites none (reason indonesian); at most
    cfg.max_records are rewritten (the rest: over_max_records)."""
    todo = candidates if cfg.mode == "rewrite" else []
    failed = []
    if cfg.max_records and len(todo) > cfg.max_records:
        for rec, before, line in todo[cfg.max_records :]:
            failed.append(reject(rec, "over_max_records", f"repair.max_records {cfg.max_records}", before, file, line))
        todo = todo[: cfg.max_records]
    for rec, before, line in candidates if cfg.mode == "drop" else []:
        failed.append(reject(rec, "indonesian", "repair.mode drop", before, file, line))
    return todo, failed


def judge_rewrites(
    jobs: list[tuple[dict, langid.Verdict, int, list[tr.Field]]],
    results: list[llm.Result],
    lang_gate: langid.LangGate,
    teacher: str,
    file: str,
) -> tuple[list[dict], list[dict], Counter]:
    """(repaired records, rejected ones, the gate's verdicts after the rewrite): each job's fields are finished
    from the teacher's `results` (in the order of their requests) and the rewritten record goes back through the
    gate; a field that failed rejects the record (rewrite_failed), a verdict still a mismatch rejects it as
    still_<detected>, with both verdicts."""
    results = iter(results)
    repaired, failed, after_verdicts = [], [], Counter()
    for rec, before, line, planned in jobs:
        got, error = {}, None
        for f in planned:  # consume every result of the record, even after a failure
            res = next(results) if f.request is not None else None
            try:
                got[f.path] = tr.finish_field(f, res)
            except tr.RestoreError as e:
                error = error or f"{'.'.join(map(str, f.path))}: {e.reason}: {e.detail}"
        if error:
            failed.append(reject(rec, "rewrite_failed", error, before, file, line))
            continue
        draft = assemble(rec, got, before, before, teacher)
        after = gate(draft, lang_gate)
        after_verdicts[f"{after.verdict}/{after.detected or 'none'}"] += 1
        done = assemble(rec, got, before, after, teacher)
        if after.verdict == "mismatch":
            detail = f"after the rewrite the gate says {describe(after)}"
            failed.append(reject(done, f"still_{after.detected}", detail, before, file, line, after))
        else:
            repaired.append(done)
    return repaired, failed, after_verdicts

"""Repair declared-Malay records that clean's language gate found Indonesian: a teacher rewrites them into Malay and
the same gate judges them again.

    python stages/repair.py --params params.yaml --rejected data/clean/rejected.jsonl --model models/base \
        --prompt prompts/repair.txt --output data/repair/seed.jsonl --failed data/repair/rejected.jsonl \
        --cache cache/repair --metrics metrics/repair.json

Reads clean's rejected records and takes the declared-`ms` chat records rejected by the gate (reason lang) that
the gate, run again with params clean.langs, calls Indonesian; everything else there is not repair's to judge
(counted in metrics.skipped). repair.mode rewrite: each goes field by field to the teacher (prompts/repair.txt,
through selfalign.llm and its cache, so a killed run resumes) and back through the gate; what passes (ok or
undetermined, as in clean) is written to --output with meta.repair {before, after}, what still fails is rejected
(still_<detected>, e.g. still_id) with both verdicts, as is a rewrite that failed (rewrite_failed). repair.mode
drop: no teacher, every candidate is rejected (indonesian), as clean alone would. At most repair.max_records are
rewritten; the rest are rejected (over_max_records). candidates == repaired + rejected in the metrics. Why a stage
and not a branch of clean: selfalign/repair.py.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import io, llm, params, records
from selfalign import repair as rp
from selfalign import translate as tr

log = logging.getLogger("repair")
STAGE = "repair"
DEFAULTS = {
    "mode": "rewrite",
    "max_records": 12,
    "max_tokens": 192,
    "tokens_per_char": 0.5,
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 0,
    "engine": {},
}
ENGINE_DEFAULTS = {"kind": "local", "batch_size": 8, "dtype": "float32"}
# clean's gate settings when no params file says otherwise (stages/clean.py's defaults)
GATE_DEFAULTS = {
    "min_letters": 40,
    "min_confidence": 0.5,
    "margin": 2.0,
    "ngram_margin": 8.0,
    "ms_id_fallback": "lingua",
    "ms_id_ngram_margin": 64.0,
    "max_chars": 300,
}


def gate_cfg(params_file: str | None) -> dict:
    """clean.langs from the params file (the gate repair must share with clean), less its on/off switch."""
    langs = params.section(params_file, "clean").get("langs", {}) if params_file else {}
    unknown = sorted(set(langs) - set(GATE_DEFAULTS) - {"enabled"})
    if unknown:
        raise params.ParamsError(f"{params_file}: clean.langs has unknown key(s) {', '.join(unknown)}")
    return {**GATE_DEFAULTS, **{k: v for k, v in langs.items() if k != "enabled"}}


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--rejected",
    "rejected_in",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="clean's rejected.jsonl.",
)
@click.option(
    "--model", "model_dir", default=None, help="Teacher model directory (local engine); engine.model otherwise."
)
@click.option(
    "--prompt",
    "prompt_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Template with {source_lang}, {target_lang}, {text}; its hash is part of every cache key.",
)
@click.option("--output", type=click.Path(dir_okay=False), required=True, help="Repaired chat records.")
@click.option(
    "--failed",
    "failed_file",
    type=click.Path(dir_okay=False),
    required=True,
    help="Candidates not repaired, each with its reason and both verdicts.",
)
@click.option("--cache", type=click.Path(file_okay=False), required=True)
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
def main(params_file, overrides, rejected_in, model_dir, prompt_file, output, failed_file, cache, metrics):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = params.resolve(DEFAULTS, params_file, STAGE, overrides)
    if cfg["mode"] not in ("rewrite", "drop"):
        raise params.ParamsError(f"repair.mode: {cfg['mode']!r} is not rewrite or drop")
    lang_cfg = gate_cfg(params_file)
    template = Path(prompt_file).read_text(encoding="utf-8")
    spec = {**ENGINE_DEFAULTS, "model": model_dir or llm.SPEC_DEFAULTS["model"], **cfg["engine"]}

    skipped, candidates, failed = Counter(), [], []
    for line_no, entry in io.read_jsonl(rejected_in):
        if isinstance(entry, io.JsonlLineError):  # clean wrote this file: a bad line is a broken upstream, not data
            raise click.ClickException(str(entry))
        why = rp.is_candidate(entry)
        if why:
            skipped[why] += 1
            continue
        rec = entry["record"]
        before = rp.gate(rec, lang_cfg)
        if before.verdict != "mismatch" or before.detected != rp.SOURCE:
            skipped[f"gate_now_{before.verdict}_{before.detected or 'none'}"] += 1
            continue
        candidates.append((rec, before, line_no))
    log.info(
        "%s: %d declared-ms chat records the gate calls Indonesian; skipped %s; mode %s, teacher %s on %s",
        rejected_in,
        len(candidates),
        dict(skipped),
        cfg["mode"],
        spec["kind"],
        spec["model"],
    )

    def reject(rec, reason, detail, before, after=None, line=None):
        out = records.rejected(rec, reason, STAGE, detail=detail, file=rejected_in, line=line)
        out["gate_before"] = rp.describe(before)
        if after is not None:
            out["gate_after"] = rp.describe(after)
        failed.append(out)

    todo = candidates if cfg["mode"] == "rewrite" else []
    if cfg["max_records"] and len(todo) > cfg["max_records"]:
        for rec, before, line in todo[cfg["max_records"] :]:
            reject(rec, "over_max_records", f"repair.max_records {cfg['max_records']}", before, line=line)
        todo = todo[: cfg["max_records"]]
    for rec, before, line in candidates if cfg["mode"] == "drop" else []:
        reject(rec, "indonesian", "repair.mode drop", before, line=line)

    gen = {k: cfg[k] for k in ("max_tokens", "tokens_per_char", "temperature", "top_p", "seed")}
    try:
        jobs = [(rec, before, line, rp.plan(rec, template, gen)) for rec, before, line in todo]
    except ValueError as e:
        raise click.ClickException(f"{prompt_file}: {e}") from e
    reqs = [f.request for *_, fields in jobs for f in fields if f.request is not None]
    results = iter([])
    Path(cache).mkdir(parents=True, exist_ok=True)  # a DVC output even when nobody was asked
    if reqs:
        try:
            engine = llm.make_engine(spec, cache_dir=cache)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
        try:
            results = iter(
                engine.complete(
                    reqs, template_id="repair:" + hashlib.sha256(template.encode()).hexdigest()[:12], progress=True
                )
            )
        finally:
            engine.close()
    stats = engine.stats if reqs else {}

    repaired, after_verdicts = [], Counter()
    for rec, before, line, fields in jobs:
        got, error = {}, None
        for f in fields:  # consume every result of the record, even after a failure
            res = next(results) if f.request is not None else None
            try:
                got[f.path] = tr.finish_field(f, res)
            except tr.RestoreError as e:
                error = error or f"{'.'.join(map(str, f.path))}: {e.reason}: {e.detail}"
        if error:
            reject(rec, "rewrite_failed", error, before, line=line)
            continue
        draft = rp.assemble(rec, got, before, before, spec["model"])
        after = rp.gate(draft, lang_cfg)
        after_verdicts[f"{after.verdict}/{after.detected or 'none'}"] += 1
        done = rp.assemble(rec, got, before, after, spec["model"])
        if after.verdict == "mismatch":
            reject(
                done,
                f"still_{after.detected}",
                f"after the rewrite the gate says {rp.describe(after)}",
                before,
                after,
                line,
            )
        else:
            repaired.append(done)
    if len(candidates) != len(repaired) + len(failed):  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"candidates {len(candidates)} != repaired {len(repaired)} + rejected {len(failed)}")
    io.write_jsonl(output, repaired)
    io.write_jsonl(failed_file, failed)
    m = {
        "records_in": len(candidates),
        "repaired": len(repaired),
        "rejected": len(failed),
        "mode": cfg["mode"],
        "rewritten": len(jobs),
        "gate_after": dict(sorted(after_verdicts.items())),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in failed).items())),
        "skipped": dict(sorted(skipped.items())),
        "llm": stats,
        "engine": spec["kind"],
        "model": spec["model"],
    }
    io.write_json(metrics, m)
    log.info(
        "%d candidates: %d repaired, %d rejected %s; gate after the rewrite %s; llm %s",
        len(candidates),
        len(repaired),
        len(failed),
        m["rejected_by_reason"],
        m["gate_after"],
        stats,
    )


if __name__ == "__main__":
    main()

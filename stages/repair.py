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
rewritten; the rest are rejected (over_max_records). records_in (the candidates) == kept (repaired) + rejected in
the metrics. Why a stage and not a branch of clean: selfalign/repair.py, which does the work.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, io, params, teacher
from selfalign import repair as rp

log = logging.getLogger("repair")
STAGE = "repair"


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
    cfg = params.resolve(rp.RepairConfig, params_file, STAGE, overrides)
    gate = rp.lang_gate(params_file)
    cli.setup_logging()
    template = Path(prompt_file).read_text(encoding="utf-8")
    spec = cfg.engine.with_model(model_dir)

    entries = []
    for line_no, entry in io.read_jsonl(rejected_in):
        if isinstance(entry, io.JsonlLineError):  # clean wrote this file: a bad line is a broken upstream, not data
            raise click.ClickException(str(entry))
        entries.append((line_no, entry))
    candidates, skipped = rp.find_candidates(entries, gate)
    log.info(
        "%s: %d declared-ms chat records the gate calls Indonesian; skipped %s; mode %s, teacher %s on %s",
        rejected_in,
        len(candidates),
        dict(skipped),
        cfg.mode,
        spec.kind,
        spec.model,
    )
    todo, failed = rp.triage(candidates, cfg, rejected_in)
    try:
        jobs = [(rec, before, line, rp.plan(rec, template, cfg.gen())) for rec, before, line in todo]
    except ValueError as e:
        raise click.ClickException(f"{prompt_file}: {e}") from e
    reqs = [f.request for *_, fields in jobs for f in fields if f.request is not None]
    Path(cache).mkdir(parents=True, exist_ok=True)  # a DVC output even when nobody was asked
    results, stats = teacher.ask(spec, cache, STAGE, template, reqs) if reqs else ([], {})
    repaired, still, after_verdicts = rp.judge_rewrites(jobs, results, gate, spec.model, rejected_in)
    failed += still
    if len(candidates) != len(repaired) + len(failed):  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"candidates {len(candidates)} != repaired {len(repaired)} + rejected {len(failed)}")
    io.write_jsonl(output, repaired)
    io.write_jsonl(failed_file, failed)
    m = {
        "records_in": len(candidates),
        "kept": len(repaired),
        "rejected": len(failed),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in failed).items())),
        "repaired": len(repaired),
        "mode": cfg.mode,
        "rewritten": len(jobs),
        "gate_after": dict(sorted(after_verdicts.items())),
        "skipped": dict(sorted(skipped.items())),
        "llm": stats,
        "engine": spec.kind,
        "model": spec.model,
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

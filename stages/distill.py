"""Teacher distillation (Vigogne): regenerate short or low-scoring responses; answer under Orca system messages.

    python stages/distill.py --params params.yaml --seed-file data/clean/seed.jsonl \
        --scored data/curate --teacher models/base --systems prompts/orca_systems.txt \
        --output-dir data/distill --cache cache/distill --metrics metrics/distill.json

The teacher is any selfalign.llm engine: in-process transformers on --teacher by default, or an
OpenAI-compatible endpoint (`distill.engine` in params.yaml), cached, so a rerun resumes. Writes
distilled.jsonl (chat records, `system` set for the Orca ones, meta.distill = regenerate | orca,
meta.teacher, meta.origin_id) and rejected.jsonl (invalid inputs and unusable teacher answers,
each with its reason); records_in == kept (the distilled) + rejected in the metrics, with the engine's
calls, cache hits, tokens and cost.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, curate, distill, io, params, records, shard
from selfalign.distill import DistillConfig

log = logging.getLogger("distill")
STAGE = "distill"


def read_chat(path: Path, rejected: list[dict]) -> tuple[list[dict], int]:
    """Valid chat records of `path`; bad lines go to `rejected` with file, line and field."""
    good, bad, n = records.read(path, STAGE, "chat")
    rejected += bad
    return [r for r, _ in good], n


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--seed-file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Seed chat records: short responses are regenerated, instructions feed the Orca sample.",
)
@click.option(
    "--scored",
    "scored_file",
    type=click.Path(exists=True),
    default=None,
    help="Curated candidates with meta.score (low scorers are regenerated): a scored.jsonl, or data/curate "
    "for the last round of curate.iterations.",
)
@click.option("--teacher", required=True, help="Teacher model directory (local engine) or endpoint model name.")
@click.option(
    "--systems",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Orca-style system messages, one per line.",
)
@click.option("--output-dir", type=click.Path(file_okay=False), required=True)
@click.option("--cache", type=click.Path(file_okay=False), required=True)
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
@shard.options
@click.option("--dry-run", is_flag=True, help="Print the memory plan of the models this stage runs; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    params_file,
    overrides,
    seed_file,
    scored_file,
    teacher,
    systems,
    output_dir,
    cache,
    metrics,
    shard_spec,
    merge_shards,
    shard_dir,
    dry_run,
    gpu_gib,
):
    cfg = params.resolve(DistillConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    sh = shard.Sharding(STAGE, shard_spec, merge_shards, shard_dir, output_dir)
    from selfalign import llm

    spec = cfg.engine.with_model(teacher)
    if dry_run:
        from selfalign import memory

        plans = memory.stage_inference_plans(STAGE, cfg, teacher, params_file, spec=spec, gpu_gib=gpu_gib)
        click.echo(memory.dry_run_plans(plans))
        return
    try:  # a bad system-message file or engine spec fails here, in a second, naming what is wrong
        system_msgs = distill.load_systems(systems)
        engine = llm.make_engine(spec, cache_dir=cache)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    rejected: list[dict] = []
    seeds, n_seed = read_chat(Path(seed_file), rejected)
    if scored_file:
        scored_file = curate.round_file(scored_file, params_file, "scored.jsonl")
        log.info("curated candidates: %s", scored_file)
    scored, n_scored = read_chat(Path(scored_file), rejected) if scored_file else ([], 0)
    invalid = len(rejected)
    regen = distill.regenerate_targets(
        seeds,
        scored,
        min_chars=cfg.regenerate.min_chars,
        below_score=cfg.regenerate.below_score,
        limit=cfg.regenerate.max,
        seed=cfg.seed,
    )
    orca = distill.orca_targets(
        seeds + scored,
        {records.key(r) for r, _ in regen},
        n=cfg.orca.n,
        seed=cfg.seed,
        n_systems=len(system_msgs),
    )
    log.info(
        "%d seed + %d scored records (%d invalid): %d to regenerate (%s), %d Orca answers over %d system "
        "messages; teacher %s on %s",
        n_seed,
        n_scored,
        invalid,
        len(regen),
        dict(Counter(w for _, w in regen)),
        len(orca),
        len(system_msgs),
        spec.kind,
        spec.model,
    )

    def request(messages):
        return llm.Request(
            messages=messages,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
        )

    jobs = [(r, "regenerate", None, {"why": why}) for r, why in regen]
    jobs += [(r, "orca", system_msgs[k], {"system_index": k}) for r, k in orca]
    reqs = []
    for r, _, system, _ in jobs:
        reqs.append(request(records.with_system(system, [{"role": "user", "content": distill.single_turn(r)[0]}])))
    results = sh.complete(engine, reqs, [shard.record_key(r) for r, *_ in jobs], "distill-v1") if reqs else []
    if sh.is_shard:
        sh.finish(metrics)
        engine.close()
        return

    out_records = []
    for (origin, how, system, extra), res in zip(jobs, results, strict=True):
        instruction, original = distill.single_turn(origin)
        if not res.ok:
            rejected.append(records.rejected(origin, "teacher_failed", STAGE, detail=f"{how}: {res.error}"))
            continue
        text, trimmed = distill.settle_truncation(
            res.text, res.finish_reason, trim=cfg.trim_truncated, reject=cfg.reject_truncated
        )
        if text is None:
            rejected.append(
                records.rejected(
                    origin,
                    "truncated",
                    STAGE,
                    detail=f"{how}: hit max_new_tokens {cfg.max_new_tokens} with no sentence end; reply {res.text!r}"[
                        :500
                    ],
                )
            )
            continue
        bad = distill.response_reason(
            text, min_words=cfg.min_response_words, original=original if extra.get("why") == "short" else None
        )
        if bad:
            rejected.append(
                records.rejected(origin, bad[0], STAGE, detail=f"{how}: {bad[1]}; reply {res.text!r}"[:500])
            )
            continue
        out_records.append(
            distill.distilled(
                origin,
                instruction,
                text.strip(),
                how=how,
                teacher=spec.model,
                system=system,
                finish_reason=res.finish_reason,
                trimmed=trimmed,
                **extra,
            )
        )

    out = Path(output_dir)
    io.write_jsonl(out / "distilled.jsonl", out_records)
    io.write_jsonl(out / "rejected.jsonl", rejected)
    m = {
        "records_in": invalid + len(jobs),
        "teacher_requests": len(jobs),
        "invalid_inputs": invalid,
        "distilled": len(out_records),
        "kept": len(out_records),
        "rejected": len(rejected),
        "distilled_by_kind": dict(Counter(r["meta"]["distill"] for r in out_records)),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "regenerate_by_why": dict(Counter(w for _, w in regen)),
        "trimmed": sum(r["meta"]["trimmed"] for r in out_records),
        "response_chars_mean": round(sum(len(r["messages"][1]["content"]) for r in out_records) / len(out_records), 1)
        if out_records
        else None,
        "engine": {"kind": spec.kind, "model": spec.model, **engine.stats},
        **sh.throughput(len(jobs)),
    }
    assert m["records_in"] == m["kept"] + m["rejected"], "distill lost records"
    failed = records.success_floor(m, len(out_records), len(jobs), cfg.min_success, "distill teacher answers kept")
    io.write_json(metrics, m)
    engine.close()
    log.info(
        "%d distilled %s, %d rejected %s; %d engine calls, %d cache hits, cost $%.4f",
        len(out_records),
        m["distilled_by_kind"],
        len(rejected),
        m["rejected_by_reason"],
        m["engine"]["calls"],
        m["engine"]["cache_hits"],
        m["engine"]["cost_usd"],
    )
    if failed:
        raise click.ClickException(failed)


if __name__ == "__main__":
    main()

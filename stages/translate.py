"""Translate chat, prompt (and, if asked, preference) records into the target languages.

    python stages/translate.py --params params.yaml --input-dir data/ingest --output-dir data/translate \
        --model models/base --prompt prompts/translate.txt --cache cache/translate --metrics metrics/translate.json

writes data/translate/{seed,web,preference,prompts}.jsonl and data/translate/failed.jsonl. By hand, on one file:

    python stages/translate.py --input data/ingest/seed.jsonl --output fr.jsonl --model models/base \
        --prompt prompts/translate.txt --cache cache/t --metrics m.json

Web segments pass through unchanged. In `add` mode translations follow their originals; in
`replace` mode they take their place (an original whose every translation failed is kept, so
nothing is lost). Every field goes through selfalign.llm and its cache: a killed run resumes
without asking again what it already has. The default engine is the 135M base model, which
translates badly: this stage is plumbing until a real translator (an OpenAI-compatible
endpoint: engine.kind openai) is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from selfalign import cli, io, params, records, shard, teacher
from selfalign import translate as tr

STAGE = "translate"
FILES = ("seed", "web", "preference", "prompts")

log = logging.getLogger(STAGE)


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--input-dir", type=click.Path(exists=True, file_okay=False), help="Reads {seed,web,preference,prompts}.jsonl."
)
@click.option("--output-dir", type=click.Path(file_okay=False), help="Writes the same four files and failed.jsonl.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False), help="One file, by hand.")
@click.option("--output", "output_file", type=click.Path(dir_okay=False), help="With --input.")
@click.option(
    "--failed",
    "failed_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Failed translations (default: failed.jsonl in the output dir, or OUTPUT's stem + .failed.jsonl).",
)
@click.option("--model", "model_dir", default=None, help="Model directory for the local/vllm engine (engine.model).")
@click.option(
    "--prompt",
    "prompt_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Prompt template with {source_lang}, {target_lang}, {text}; its hash is part of every cache key.",
)
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="llm cache: what makes a rerun resume.")
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
@shard.options
@click.option("--dry-run", is_flag=True, help="Print the memory plan of the models this stage runs; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    params_file,
    overrides,
    input_dir,
    output_dir,
    input_file,
    output_file,
    failed_file,
    model_dir,
    prompt_file,
    cache,
    metrics,
    shard_spec,
    merge_shards,
    shard_dir,
    dry_run,
    gpu_gib,
):
    cfg = params.resolve(tr.TranslateConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    sh = shard.Sharding(STAGE, shard_spec, merge_shards, shard_dir, output_dir or output_file)
    if (
        bool(input_dir) == bool(input_file)
        or bool(input_dir) != bool(output_dir)
        or bool(input_file) != bool(output_file)
    ):
        raise click.UsageError("give --input-dir with --output-dir, or --input with --output")
    if input_dir:
        pairs = [(Path(input_dir) / f"{n}.jsonl", Path(output_dir) / f"{n}.jsonl") for n in FILES]
        if not any(src.exists() for src, _ in pairs):
            raise click.UsageError(f"{input_dir}: none of {', '.join(n + '.jsonl' for n in FILES)} exists")
        failed_path = Path(failed_file or Path(output_dir) / "failed.jsonl")
    else:
        pairs = [(Path(input_file), Path(output_file))]
        failed_path = Path(failed_file or Path(output_file).with_suffix(".failed.jsonl"))
    template = Path(prompt_file).read_text(encoding="utf-8")
    if cfg.engine.kind == "openai" and model_dir:
        log.info("--model %s is unused: engine.kind is openai (model %s)", model_dir, cfg.engine.model)
    spec = cfg.engine.with_model(model_dir if cfg.engine.kind != "openai" else None)
    if dry_run:
        from selfalign import memory

        click.echo(
            memory.dry_run_plans(
                memory.stage_inference_plans(
                    STAGE, cfg.to_dict(), spec.model, params_file, spec=spec.to_dict(), gpu_gib=gpu_gib
                )
            )
        )
        return
    log.info(
        "engine %s on %s; max_records %s per file, fields of at most %s characters; kinds %s; roles %s",
        spec.kind,
        spec.model,
        cfg.max_records,
        cfg.max_chars or "any",
        ",".join(cfg.kinds),
        ",".join(cfg.roles),
    )

    plan = tr.plan_files(pairs, cfg, template)
    results, stats = teacher.ask(
        spec,
        cache,
        STAGE,
        template,
        plan.requests,
        complete=lambda engine, reqs, tid: sh.complete(engine, reqs, plan.keys, tid) if reqs else [],
    )
    if sh.is_shard:  # a shard run: its answers, not the outputs
        sh.finish(metrics)
        return
    m = tr.write_files(plan, results, cfg)
    failed = plan.failed
    io.write_jsonl(failed_path, failed)
    m.update(
        llm=stats,
        engine=spec.kind,
        model=spec.model,
        langs=cfg.langs,
        mode=cfg.mode,
        failed_file_records=len(failed),
        **sh.throughput(m["translations_asked"]),
    )
    below = records.success_floor(m, m["translated"], m["translations_asked"], cfg.min_success, "translate translated")
    io.write_json(metrics, m)
    log.info(
        "%d records in (%d invalid): %d translated, %d failed %s, %d out; llm %s",
        m["records_in"],
        m["invalid"],
        m["translated"],
        m["failed"],
        m["failed_by_reason"],
        m["records_out"],
        m["llm"],
    )
    if below:
        raise click.ClickException(below)


if __name__ == "__main__":
    main()

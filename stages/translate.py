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

import hashlib
import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import io, llm, params, records, shard
from selfalign import translate as tr

STAGE = "translate"
FILES = ("seed", "web", "preference", "prompts")
DEFAULTS = {
    "langs": ["fr", "ms"],
    "mode": "add",
    "kinds": ["chat", "prompt"],
    "roles": ["system", "user", "assistant"],
    "max_records": 12,
    "max_chars": 160,
    "max_spans": -1,
    "max_tokens": 512,
    "tokens_per_char": 0.75,
    "temperature": 0.0,
    "top_p": 1.0,
    "seed": 0,
    "engine": {**llm.SPEC_DEFAULTS, "dtype": "bfloat16"},  # every key, so a typo in params.yaml fails at once
    "min_success": 0.5,
}

log = logging.getLogger(STAGE)


def check(cfg: dict) -> None:
    if cfg["mode"] not in ("add", "replace"):
        raise params.ParamsError(f"translate.mode: {cfg['mode']!r} is not add or replace")
    bad = sorted(set(cfg["kinds"]) - set(tr.TRANSLATABLE))
    if bad:
        raise params.ParamsError(
            f"translate.kinds: {bad[0]!r} cannot be translated (choose from "
            f"{', '.join(tr.TRANSLATABLE)}; web segments always pass through)"
        )
    bad = sorted(set(cfg["roles"]) - set(records.ROLES))
    if bad:
        raise params.ParamsError(f"translate.roles: {bad[0]!r} is not one of {', '.join(records.ROLES)}")
    if not cfg["langs"] or not all(isinstance(x, str) and x for x in cfg["langs"]):
        raise params.ParamsError("translate.langs: expected a non-empty list of language codes")


def translate_files(
    pairs: list[tuple[Path, Path]], cfg: dict, engine, template: str, failed: list[dict], sh: shard.Sharding
) -> dict | None:
    """Read every input, ask the engine for every field at once, write every output; returns metrics."""
    gen = {k: cfg[k] for k in ("max_tokens", "tokens_per_char", "temperature", "top_p", "seed")}
    template_id = "translate:" + hashlib.sha256(template.encode()).hexdigest()[:12]
    files, jobs = [], []  # jobs: (file index, record index, target, [Field])
    per_file: dict[str, Counter] = {}
    for src, dst in pairs:
        c = per_file.setdefault(dst.stem, Counter())
        recs, bad, c["lines_in"] = records.read(src, STAGE) if src.exists() else ([], [], 0)
        failed += bad
        c["invalid"] = c["lines_in"] - len(recs)
        if not src.exists():
            log.warning("%s does not exist: writing an empty %s", src, dst)
        chosen, skipped = tr.select(
            [r for r, _ in recs], cfg["kinds"], cfg["roles"], cfg["max_chars"], cfg["max_records"], cfg["max_spans"]
        )
        c["selected"] = len(chosen)
        c.update({f"skipped_{k}": v for k, v in skipped.items()})
        for i in chosen:
            r = recs[i][0]
            for target in cfg["langs"]:
                if target == r["lang"]:
                    c["already_in_target"] += 1
                    continue
                fields = [tr.plan_field(p, t, r["lang"], target, template, gen) for p, t in tr.fields(r, cfg["roles"])]
                jobs.append((len(files), i, target, fields))
        files.append((src, dst, recs))
    reqs = [f.request for *_, fields in jobs for f in fields if f.request is not None]
    keys = [
        shard.record_key(files[fi][2][ri][0]) for fi, ri, _, fields in jobs for f in fields if f.request is not None
    ]
    log.info(
        "%d records selected in %d files; %d translations to make (%d fields, %d needing the model); "
        "targets %s, mode %s",
        sum(c["selected"] for c in per_file.values()),
        len(files),
        len(jobs),
        sum(len(j[3]) for j in jobs),
        len(reqs),
        ",".join(cfg["langs"]),
        cfg["mode"],
    )
    results = iter(sh.complete(engine, reqs, keys, template_id) if reqs else [])
    if sh.is_shard:
        return None

    done: dict[tuple[int, int], list[dict]] = {}
    reasons: Counter = Counter()
    by_lang = {t: {"asked": 0, "translated": 0, "failed": 0, "failed_by_reason": Counter()} for t in cfg["langs"]}
    for fi, ri, target, fields in jobs:
        c = per_file[files[fi][1].stem]
        got, error = {}, None
        for f in fields:  # consume every result of the record, even after a failure
            res = next(results) if f.request is not None else None
            try:
                got[f.path] = tr.finish_field(f, res)
            except tr.RestoreError as e:
                error = error or (e, f)
        record, line = files[fi][2][ri]
        by_lang[target]["asked"] += 1
        if error:
            e, f = error
            rej = records.rejected(
                record,
                e.reason,
                STAGE,
                detail=f"{'.'.join(map(str, f.path))}: {e.detail}",
                file=str(files[fi][0]),
                line=line,
            )
            failed.append({**rej, "target_lang": target})
            reasons[e.reason] += 1
            by_lang[target]["failed_by_reason"][e.reason] += 1
            by_lang[target]["failed"] += 1
            c["failed"] += 1
        else:
            done.setdefault((fi, ri), []).append(tr.assemble(record, target, got))
            by_lang[target]["translated"] += 1
            c["translated"] += 1

    for fi, (_, dst, recs) in enumerate(files):
        c = per_file[dst.stem]
        with io.jsonl_writer(dst) as write:
            for ri, (record, _) in enumerate(recs):
                translations = done.get((fi, ri), [])
                if cfg["mode"] == "add" or not translations:
                    write(record)
                    c["originals_out"] += 1
                for t in translations:
                    write(t)
                c["records_out"] += len(translations)
        c["records_out"] += c["originals_out"]
    total = Counter()
    for c in per_file.values():
        total.update(c)
    for v in by_lang.values():
        v["failed_by_reason"] = dict(sorted(v["failed_by_reason"].items()))
    return {
        "records_in": total["lines_in"],
        "invalid": total["invalid"],
        "selected": total["selected"],
        "skipped": {k.removeprefix("skipped_"): total[k] for k in sorted(total) if k.startswith("skipped_")},
        "translations_asked": len(jobs),
        "translated": total["translated"],
        "failed": total["failed"],
        "failed_by_reason": dict(sorted(reasons.items())),
        "by_lang": by_lang,
        "already_in_target": total["already_in_target"],
        "records_out": total["records_out"],
        "fields": sum(len(j[3]) for j in jobs),
        "fields_sent": len(reqs),
        "by_file": {k: dict(v) for k, v in per_file.items()},
    }


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
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sh = shard.Sharding(STAGE, shard_spec, merge_shards, shard_dir, output_dir or output_file)
    cfg = params.resolve(DEFAULTS, params_file, STAGE, overrides)
    check(cfg)
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
    spec = dict(cfg["engine"])
    if spec["kind"] in ("local", "vllm"):
        spec["model"] = model_dir or spec["model"]
    elif model_dir:
        log.info("--model %s is unused: engine.kind is %s (model %s)", model_dir, spec["kind"], spec["model"])
    if dry_run:
        from selfalign import memory

        click.echo(
            memory.dry_run_plans(
                memory.stage_inference_plans(STAGE, cfg, spec["model"], params_file, spec=spec, gpu_gib=gpu_gib)
            )
        )
        return
    log.info(
        "engine %s on %s; max_records %s per file, fields of at most %s characters; kinds %s; roles %s",
        spec["kind"],
        spec["model"],
        cfg["max_records"],
        cfg["max_chars"] or "any",
        ",".join(cfg["kinds"]),
        ",".join(cfg["roles"]),
    )

    engine = llm.make_engine(spec, cache_dir=cache)
    failed: list[dict] = []
    try:
        m = translate_files(pairs, cfg, engine, template, failed, sh)
    finally:
        engine.close()
    if m is None:  # a shard run: its answers, not the outputs
        sh.finish(metrics)
        return
    io.write_jsonl(failed_path, failed)
    m.update(
        llm=engine.stats,
        engine=spec["kind"],
        model=spec["model"],
        langs=cfg["langs"],
        mode=cfg["mode"],
        failed_file_records=len(failed),
        **sh.throughput(m["translations_asked"]),
    )
    below = records.success_floor(
        m, m["translated"], m["translations_asked"], cfg["min_success"], "translate translated"
    )
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

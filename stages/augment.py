"""Self-augmentation (Humpback): the backward model writes an instruction for each web segment.

    python stages/augment.py --params params.yaml --web data/clean/web.jsonl --model models/backward \
        --prompt prompts/backward.txt --output-dir data/augment --cache cache/augment --metrics metrics/augment.json

A seeded sample of at most `max_segments` segments goes to a selfalign.llm engine (in-process
transformers by default, batched and left-padded; or any OpenAI-compatible endpoint; or vLLM on a
GPU). Every answer is cached, so a killed run resumes where it stopped. Writes
candidates.jsonl (chat records: user = generated instruction, assistant = the segment verbatim,
meta.segment_id = the web record's id) and rejected.jsonl (invalid or out-of-bounds segments,
failed or degenerate generations, each with its reason). Metrics hold
records_in == kept (the candidates) + rejected + unsampled: a segment left out of the sample is neither.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import augment, cli, io, models, params, records, shard
from selfalign.augment import AugmentConfig

log = logging.getLogger("augment")
STAGE = "augment"


def read_web(path: Path, min_chars: int, max_chars: int) -> tuple[list[dict], list[dict], int]:
    """(usable segments, rejected, lines read)."""
    pairs, bad, n = records.read(path, STAGE, "web")
    good = []
    for obj, line in pairs:
        where = {"file": str(path), "line": line}
        size = len(obj["text"].strip())
        if size < min_chars:
            bad.append(records.rejected(obj, "segment_too_short", STAGE, detail=f"{size} < {min_chars} chars", **where))
        elif size > max_chars:
            bad.append(records.rejected(obj, "segment_too_long", STAGE, detail=f"{size} > {max_chars} chars", **where))
        else:
            good.append(obj)
    return good, bad, n


@click.command()
@params.params_option
@params.set_option
@click.option("--web", type=click.Path(exists=True, dir_okay=False), required=True, help="Web segments (JSONL).")
@click.option("--model", "model_dir", required=True, help="The backward model directory (local/vllm engines).")
@click.option(
    "--prompt",
    "prompt_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Backward prompt template with {response}; without it the user turn is the segment alone.",
)
@click.option("--output-dir", type=click.Path(file_okay=False), required=True)
@click.option("--cache", type=click.Path(file_okay=False), required=True, help="llm cache: what makes a rerun resume.")
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
@shard.options
@click.option("--dry-run", is_flag=True, help="Print the memory plan of the models this stage runs; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    params_file,
    overrides,
    web,
    model_dir,
    prompt_file,
    output_dir,
    cache,
    metrics,
    shard_spec,
    merge_shards,
    shard_dir,
    dry_run,
    gpu_gib,
):
    cfg = params.resolve(AugmentConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    sh = shard.Sharding(STAGE, shard_spec, merge_shards, shard_dir, output_dir)
    from selfalign import llm

    spec = cfg.engine.with_model(model_dir)
    if dry_run:
        from selfalign import memory

        plans = memory.stage_inference_plans(STAGE, cfg, model_dir, params_file, spec=spec, gpu_gib=gpu_gib)
        click.echo(memory.dry_run_plans(plans))
        return
    try:  # a bad prompt file or engine spec fails here, in a second, naming what is wrong
        template = augment.load_template(prompt_file)
        engine = llm.make_engine(spec, cache_dir=cache)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    segments, rejected, n_in = read_web(Path(web), cfg.min_chars, cfg.max_chars)
    chosen, unsampled = augment.sample(segments, cfg.max_segments, cfg.seed)
    system = models.read_info(model_dir).get("system")  # the system prompt Myx was trained with, if any
    log.info(
        "%d web records: %d usable, %d rejected, %d sampled (max_segments %d); engine %s on %s (system prompt "
        "%r), max_new_tokens %d, temperature %s",
        n_in,
        len(segments),
        len(rejected),
        len(chosen),
        cfg.max_segments,
        spec.kind,
        spec.model,
        system,
        cfg.max_new_tokens,
        cfg.temperature,
    )

    reqs = [
        llm.Request(
            messages=records.with_system(system, [{"role": "user", "content": augment.user_turn(template, w["text"])}]),
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed,
        )
        for w in chosen
    ]
    results = sh.complete(engine, reqs, [shard.record_key(w) for w in chosen], "augment-v1") if reqs else []
    if sh.is_shard:
        sh.finish(metrics)
        engine.close()
        return

    candidates = []
    for w, res in zip(chosen, results, strict=True):
        if not res.ok:
            rejected.append(records.rejected(w, "generation_failed", STAGE, detail=str(res.error)))
            continue
        instruction = augment.parse_instruction(res.text)
        bad = augment.degenerate_reason(
            instruction,
            w["text"],
            res.finish_reason,
            min_words=cfg.min_instruction_words,
            reject_truncated=cfg.reject_truncated,
        )
        if bad:
            rejected.append(records.rejected(w, bad[0], STAGE, detail=f"{bad[1]}; reply {res.text!r}"[:500]))
            continue
        candidates.append(augment.candidate(instruction, w, model=spec.model, finish_reason=res.finish_reason))

    out = Path(output_dir)
    io.write_jsonl(out / "candidates.jsonl", candidates)
    io.write_jsonl(out / "rejected.jsonl", rejected)
    lengths = [len(c["messages"][0]["content"].split()) for c in candidates]
    m = {
        "records_in": n_in,
        "sampled": len(chosen),
        "unsampled": len(unsampled),
        "candidates": len(candidates),
        "kept": len(candidates),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "yield": round(len(candidates) / len(chosen), 4) if chosen else None,
        "instruction_words_mean": round(sum(lengths) / len(lengths), 2) if lengths else None,
        "engine": {"kind": spec.kind, "model": spec.model, **engine.stats},
        **sh.throughput(len(chosen)),
    }
    assert n_in == m["candidates"] + m["rejected"] + m["unsampled"], "augment lost records"
    below = records.success_floor(m, len(candidates), len(chosen), cfg.min_success, "augment candidates")
    io.write_json(metrics, m)
    engine.close()
    log.info(
        "%d candidates, %d rejected %s; %d engine calls, %d cache hits",
        len(candidates),
        len(rejected),
        m["rejected_by_reason"],
        m["engine"]["calls"],
        m["engine"]["cache_hits"],
    )
    if below:
        raise click.ClickException(below)


if __name__ == "__main__":
    main()

"""Self-curation (Humpback): the current model rates every augmented candidate 1-5; keep the best.

    python stages/curate.py --params params.yaml --iteration iter1 --candidates data/augment/candidates.jsonl \
        --model models/m0 --rubric prompts/curate.txt --output-dir data/curate/iter1 \
        --cache cache/curate/iter1 --metrics metrics/curate/iter1.json

mode=logprobs (default) scores each candidate by one batched forward pass: the expected value of
the model's probabilities over "1".."5" after the rubric and "Score: ", so every candidate gets a
score. mode=generate asks any engine of selfalign.llm for a "Score: N" reply and parses it
strictly, counting what does not parse. Writes scored.jsonl (every scored candidate, score in
meta.score), kept.jsonl (the candidates curate.select keeps: a score threshold, a top fraction or a
top k) and rejected.jsonl (invalid, unparsed, failed or below the cut-off, each with its reason).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, curate, device, io, models, params, records, shard
from selfalign.curate import CurateConfig

log = logging.getLogger("curate")
STAGE = "curate"


def read_candidates(path: Path) -> tuple[list[tuple[dict, tuple[str, str]]], list[dict], int]:
    """(valid candidates with their (instruction, response), rejected in line order, lines read)."""
    pairs, bad, n = records.read(path, STAGE, "chat")
    good = []
    for obj, line in pairs:
        try:
            good.append((obj, curate.pair_of(obj)))
        except curate.CandidateError as e:
            bad.append(records.rejected(obj, "invalid_record", STAGE, detail=str(e), file=str(path), line=line))
    return good, sorted(bad, key=lambda r: r.get("line", 0)), n


def score_logprobs(
    cfg: CurateConfig, torch_dtype: str, model_dir: str, rubric: str, pairs: list[tuple[str, str]], system: str | None
) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from selfalign import chat

    tok = chat.load_tokenizer(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, torch_dtype))
    model.to(device.resolve_device("auto"))  # the process's accelerator, else the CPU (selfalign/device.py)
    prompts, clipped = [], []
    for instruction, response in pairs:
        response, cut = curate.clip_tokens(tok, response, cfg.max_response_len)
        prompts.append(curate.scoring_prompt(tok, rubric, instruction, response, cfg.score_prefix, system))
        clipped.append(cut)
    results = curate.expected_scores(model, tok, prompts, batch_size=cfg.engine.batch_size, progress=True)
    return [{**r, "ok": True, "response_clipped": c} for r, c in zip(results, clipped, strict=True)]


def score_generate(
    cfg: CurateConfig,
    torch_dtype: str,
    model_dir: str,
    rubric: str,
    pairs: list[tuple[str, str]],
    system: str | None,
    cache: str | None,
    template_id: str,
    sh: shard.Sharding,
    keys: list[str],
) -> tuple[list[dict], dict]:
    from selfalign import llm

    spec = cfg.engine.with_model(model_dir).replace(dtype=device.PRECISION_OF.get(torch_dtype, torch_dtype))
    try:  # the engine answers in the dtype the stage resolved and logged (auto by the precision rule)
        engine = llm.make_engine(spec, cache_dir=cache)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    reqs = [
        llm.Request(
            messages=curate.rubric_messages(rubric, i, r, system),
            max_tokens=cfg.max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=0,
        )
        for i, r in pairs
    ]
    out = []
    for res in sh.complete(engine, reqs, keys, template_id):
        if res is None:  # another shard's candidate
            continue
        score = curate.parse_score(res.text) if res.ok else None
        out.append({"ok": res.ok, "score": score, "text": res.text, "error": res.error})
    return out, engine.stats


@click.command()
@params.params_option
@params.set_option
@click.option("--iteration", required=True, help="Name of this curation round (iter1, iter2, ...), stored in meta.")
@click.option("--candidates", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--model", "model_dir", required=True, help="Scorer: a model directory (or the endpoint's model name).")
@click.option("--rubric", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--output-dir", type=click.Path(file_okay=False), required=True)
@click.option("--cache", type=click.Path(file_okay=False), default=None, help="llm cache (generate mode).")
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
@shard.options
@click.option("--dry-run", is_flag=True, help="Print the memory plan of the models this stage runs; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    params_file,
    overrides,
    iteration,
    candidates,
    model_dir,
    rubric,
    output_dir,
    cache,
    metrics,
    shard_spec,
    merge_shards,
    shard_dir,
    dry_run,
    gpu_gib,
):
    cfg = params.resolve(CurateConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    sh = shard.Sharding(STAGE, shard_spec, merge_shards, shard_dir, output_dir)
    sel = cfg.select
    if dry_run:
        from selfalign import memory

        plans = memory.stage_inference_plans(STAGE, cfg, model_dir, params_file, gpu_gib=gpu_gib)
        click.echo(memory.dry_run_plans(plans))
        return
    try:
        rubric_text = curate.load_rubric(rubric)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    try:  # one rule for where and in what dtype the scorer runs (selfalign/device.py); params say why fp32
        asked = device.DTYPE_OF.get(cfg.engine.dtype, cfg.engine.dtype)
        dtype, placed = device.resolve_dtype(asked, device.resolve_device("auto"), model_dir, "curate.engine.dtype")
    except device.DeviceError as e:
        raise click.UsageError(str(e)) from e
    log.info("%s: scorer on %s in %s (%s)", iteration, placed.device, dtype, placed.reason)
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)  # a declared output even when logprobs mode needs no cache
    good, rejected, n_in = read_candidates(Path(candidates))
    system = models.read_info(model_dir).get("system")  # the scorer is prompted as it is served
    log.info(
        "%s: %d candidates (%d invalid), scorer %s (system prompt %r), mode %s, select %s",
        iteration,
        n_in,
        len(rejected),
        model_dir,
        system,
        cfg.mode,
        sel.to_dict(),
    )

    pairs, keys = [p for _, p in good], [shard.record_key(r) for r, _ in good]
    engine_stats = None
    if not pairs:
        results = []
    elif cfg.mode == "logprobs":
        results = sh.map(
            f"curate-{iteration}",
            keys,
            lambda idx: score_logprobs(cfg, dtype, model_dir, rubric_text, [pairs[j] for j in idx], system),
        )
    else:
        results, engine_stats = score_generate(
            cfg, dtype, model_dir, rubric_text, pairs, system, cache, f"curate-{iteration}", sh, keys
        )
    if sh.is_shard:
        sh.finish(metrics)
        return

    scored, detail_base = [], {"iteration": iteration, "scorer": model_dir, "mode": cfg.mode, "system": system}
    for (record, _), res in zip(good, results, strict=True):
        if not res["ok"]:
            rejected.append(records.rejected(record, "generation_failed", STAGE, detail=str(res["error"])))
        elif res["score"] is None:
            rejected.append(records.rejected(record, "unparsed_score", STAGE, detail=repr(res["text"])[:300]))
        elif cfg.mode == "logprobs":
            scored.append(
                curate.annotate(
                    record,
                    res["score"],
                    **detail_base,
                    probs=res["probs"],
                    digit_mass=round(res["digit_mass"], 6),
                    response_clipped=res["response_clipped"],
                )
            )
        else:
            scored.append(curate.annotate(record, res["score"], **detail_base, reply=res["text"]))
    kept, below, cutoff = curate.select(scored, sel.mode, sel.threshold, sel.fraction, sel.k)
    reason = "below_threshold" if sel.mode == "threshold" else "below_cutoff"
    rejected += [
        records.rejected(
            r,
            reason,
            STAGE,
            detail=f"score {r['meta']['score']:.3f}" + (f" < cut-off {cutoff:.3f}" if cutoff is not None else ""),
        )
        for r in below
    ]

    out = Path(output_dir)
    io.write_jsonl(out / "scored.jsonl", scored)
    io.write_jsonl(out / "kept.jsonl", kept)
    io.write_jsonl(out / "rejected.jsonl", rejected)

    scores = [r["meta"]["score"] for r in scored]
    attempted = len(good)
    m = {
        "iteration": iteration,
        "scorer": model_dir,
        "mode": cfg.mode,
        "select": sel.mode,
        "select_param": {"threshold": sel.threshold, "top_fraction": sel.fraction, "top_k": sel.k}[sel.mode],
        "cutoff_score": round(cutoff, 4) if cutoff is not None else None,
        "records_in": n_in,
        "scored": len(scored),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "parse_rate": round(len(scored) / attempted, 4) if attempted else None,
        "unparsed": sum(r["reason"] == "unparsed_score" for r in rejected),
        "yield": round(len(kept) / len(scored), 4) if scored else None,
        "kept_fraction_of_valid": round(len(kept) / attempted, 4) if attempted else None,
        "yield_by_threshold": {f"{t:.1f}": sum(s >= t for s in scores) for t in (2.5, 3.0, 3.5, 4.0, 4.5)},
        "score_mean": round(sum(scores) / len(scores), 4) if scores else None,
        "score_histogram": curate.histogram(scores),
    }
    if cfg.mode == "logprobs" and scored:
        mass = [r["meta"]["curate"]["digit_mass"] for r in scored]
        m["digit_mass_mean"], m["digit_mass_min"] = round(sum(mass) / len(mass), 4), round(min(mass), 4)
        m["responses_clipped"] = sum(r["meta"]["curate"]["response_clipped"] for r in scored)
    if engine_stats is not None:
        m["engine"] = engine_stats
    m.update(sh.throughput(attempted))
    m.update(placed.metrics())
    assert m["records_in"] == m["kept"] + m["rejected"], "curate lost records"
    failed = records.success_floor(m, len(scored), attempted, cfg.min_success, f"curate {iteration} scored")
    if not failed and scored and not kept:
        failed = f"curate {iteration}: {len(scored)} candidates scored but none kept by {sel.to_dict()}"
    io.write_json(metrics, m)
    log.info(
        "%s: scored %d/%d, kept %d (yield %s, %s cut-off score %s), mean score %s",
        iteration,
        len(scored),
        attempted,
        len(kept),
        m["yield"],
        sel.mode,
        m["cutoff_score"],
        m["score_mean"],
    )
    if failed:
        raise click.ClickException(failed)


if __name__ == "__main__":
    main()

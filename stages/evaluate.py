"""Evaluate the base model, M0, the final SFT model and the PPO and/or DPO model on a fixed prompt set, with a report.

    python stages/evaluate.py --params params.yaml --model base=models/base --model m0=models/m0 \
        --model final=models/final --model ppo=models/ppo --model dpo=models/dpo --reward-model models/reward \
        --prompts data/eval/prompts.jsonl --heldout data/clean/seed.jsonl --eval-fraction 0.1 \
        --judge-prompt prompts/evaluate.txt --lock dvc.lock --cache cache/evaluate --output-dir reports/evaluate \
        --metrics metrics/evaluate.json

For every model in `evaluate.models` (the base first, so every trained model is compared with where
it started; `preferred` stands for what params.yaml's top-level `prefer` names: ppo, dpo or both):
greedy answers to the first `prompts_per_category` prompts of each category and language (through
`evaluate.engine`, llm.py's local engine or vLLM, and its cache, so a killed run resumes), how often an
answer stops at the end-of-turn token rather than the cap, answer-key matches, ROUGE-L against the
reference answers, perplexity of the seed responses sft held out (`--eval-fraction`: dvc.yaml passes
sft.train.eval_fraction) and of the reference answers, reward-model scores, length and refusals.
Every later model is judged against every earlier one, in both orders, by the reference judge
(default), the reward model PPO optimised, or an LLM. Every number carries a bootstrap 95% interval.
dvc.lock, when given, is read (not a dep) to say whether distill's teacher is the student's base.
The measures are selfalign/evaluate.py's; selfalign/report.py renders report.md and the plots.
Outputs: metrics/evaluate.json, reports/evaluate/{report.md,answers.jsonl,judgments.jsonl,*.png}.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import click

from selfalign import chat, cli, device, dpo, io, llm, models, params, records, report, shard
from selfalign import evaluate as ev
from selfalign import export as ex
from selfalign import reward as rm
from selfalign.sft import TrainConfig

log = logging.getLogger("evaluate")


def parse_models(pairs: tuple[str, ...], wanted: list[str]) -> dict[str, str]:
    """`--model name=dir` options, in the order of params `models`; a listed name without a dir is an error."""
    given = {}
    for p in pairs:
        name, sep, path = p.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{p!r}: expected NAME=DIR", param_hint="--model")
        given[name] = path
    missing = [m for m in wanted if m not in given]
    if missing:
        raise click.UsageError(
            f"evaluate.models lists {', '.join(missing)} but no --model NAME=DIR gives its directory"
        )
    if len(set(wanted)) != len(wanted) or not wanted:  # `preferred` can expand to a model listed by name too
        raise click.UsageError(f"evaluate.models must name distinct models, got {wanted}")
    for m in wanted:
        if not Path(given[m], "config.json").is_file():
            raise click.UsageError(f"--model {m}={given[m]}: not a model directory (no config.json)")
    return {m: given[m] for m in wanted}


def generate(
    name: str, model_dir: str, prompts: list[dict], cfg: ev.EvaluateConfig, cache: str, sh: shard.Sharding
) -> list[dict]:
    system = models.read_info(model_dir).get("system")
    engine = llm.make_engine(cfg.answer_spec(model_dir), cache)
    reqs = [
        llm.Request(messages=ev.prompt_messages(p, system), max_tokens=cfg.max_new_tokens, temperature=0.0)
        for p in prompts
    ]
    results = sh.complete(engine, reqs, [shard.record_key(p) for p in prompts], "evaluate", call=f"evaluate:{name}")
    if sh.is_shard:  # this shard's answers go to its shard file; the merge run builds the rows
        engine.close()
        return []
    log.info(
        "%s: %d answers (%d from cache, %d failed)",
        name,
        len(results),
        sum(r.cached for r in results),
        sum(not r.ok for r in results),
    )
    engine.close()
    # the engine counts the end-of-turn token it stopped at as a completion token; the length is the answer's
    return [
        ev.answer_row(p, name, r, r.usage["completion_tokens"] - (r.finish_reason == "stop") if r.ok else None)
        | {"system": system}
        for p, r in zip(prompts, results, strict=True)
    ]


def held_out_perplexity(
    model_dir: str, seed: list[dict], references: list[dict], cfg: ev.EvaluateConfig, eval_fraction: float
) -> dict:
    """Perplexity of the held-out seed responses and of the eval prompts' reference answers; parameter count."""
    system = models.read_info(model_dir).get("system")
    convs = ev.heldout_conversations(seed, eval_fraction, cfg.heldout_max, system)
    # every model of the run in the same dtype, on the process's device (selfalign/device.py)
    dtype, placed = device.resolve_dtype(cfg.ppl_dtype, device.resolve_device("auto"), model_dir, "evaluate.ppl_dtype")
    model, tok = models.load_model(model_dir, dtype).to(placed.device), chat.load_tokenizer(model_dir)
    boot = (cfg.bootstrap_resamples, cfg.seed)
    out = ev.perplexity(model, tok, convs, cfg.ppl_batch_size, cfg.ppl_max_len, *boot)
    ref = ev.perplexity(
        model, tok, ev.reference_conversations(references, system), cfg.ppl_batch_size, cfg.ppl_max_len, *boot
    )
    out["dtype"] = ref["dtype"] = placed.precision
    return {"perplexity": out, "reference_perplexity": ref, "params": sum(p.numel() for p in model.parameters())}


@click.command()
@params.params_option
@params.set_option
@click.option("--model", "model_opts", multiple=True, metavar="NAME=DIR", help="A model to evaluate; repeatable.")
@click.option("--reward-model", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--heldout", required=True, type=click.Path(exists=True, dir_okay=False), help="Seed chat records.")
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0, 1),
    default=TrainConfig().eval_fraction,
    show_default=True,
    help="The share of the seed sft held out of training (dvc.yaml passes sft.train.eval_fraction); "
    "perplexity is measured on those records.",
)
@click.option("--judge-prompt", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--lock",
    "lock_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="dvc.lock, read (not a dep) to say whether distill's teacher is the student's own base.",
)
@click.option("--cache", required=True, type=click.Path(file_okay=False), help="llm.py cache (resumable generation).")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
@shard.options
@click.option("--dry-run", is_flag=True, help="Print the memory plan of the models this stage runs; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    params_file,
    overrides,
    model_opts,
    reward_model,
    prompts,
    heldout,
    eval_fraction,
    judge_prompt,
    lock_path,
    cache,
    output_dir,
    metrics_path,
    shard_spec,
    merge_shards,
    shard_dir,
    dry_run,
    gpu_gib,
):
    cfg = params.resolve(ev.EvaluateConfig, params_file, "evaluate", overrides)
    prefer = dpo.read_prefer(params_file)  # the top-level key, checked against ppo | dpo | both where it is read
    cli.setup_logging()
    sh = shard.Sharding("evaluate", shard_spec, merge_shards, shard_dir, output_dir)
    dirs = parse_models(model_opts, dpo.expand_preferred(cfg.models, prefer))
    if dry_run:  # every evaluated model has the base's architecture: the first stands for all
        from selfalign import memory

        first = next(iter(dirs.values()))
        plans = memory.stage_inference_plans(
            "evaluate", cfg, first, params_file, spec=cfg.answer_spec(first), reward_model=reward_model, gpu_gib=gpu_gib
        )
        click.echo(memory.dry_run_plans(plans))
        return
    if cfg.engine.threads:
        import torch

        torch.set_num_threads(cfg.engine.threads)  # generation, perplexity and reward scoring alike
    try:
        all_prompts = ev.load_prompts(prompts)
    except ev.EvalSetError as e:
        raise click.ClickException(str(e)) from None
    chosen = ev.select_prompts(all_prompts, cfg.prompts_per_category, cfg.languages)
    if not chosen:
        raise click.UsageError(f"{prompts}: no prompt in languages {cfg.languages}")
    try:
        seed = records.load(heldout)  # any kind: only the chat records sft held out are scored
    except records.RecordError as e:
        raise click.ClickException(str(e)) from None
    log.info(
        "%d of %d prompts (%d per category and language, %s); %d answers of up to %d tokens per model; models %s",
        len(chosen),
        len(all_prompts),
        cfg.prompts_per_category,
        "/".join(cfg.languages),
        len(chosen),
        cfg.max_new_tokens,
        ", ".join(f"{m}={d}" for m, d in dirs.items()),
    )

    # the answered prompts' references: as many forward passes as answers (all 60 shipped ones cost ~40% more)
    references = [p for p in chosen if p["meta"].get("reference")]
    teacher = ex.distill_teacher(ex.read_lock(lock_path)) if lock_path else None
    boot = (cfg.bootstrap_resamples, cfg.seed)

    rows, per_model = [], {}
    for name, model_dir in dirs.items():
        answered = generate(name, model_dir, chosen, cfg, cache, sh)
        if sh.is_shard:  # only the answering is sharded: perplexity, reward and judging run in the merge
            continue
        rows += answered
        per_model[name] = held_out_perplexity(model_dir, seed, references, cfg, eval_fraction)
        ok = [r for r in answered if r["ok"]]
        log.info(
            "%s: %d of %d answers stopped at end-of-turn (cap %d); perplexity held-out %s (%d tokens), "
            "references %s (%d tokens)",
            name,
            sum(r["stopped"] for r in ok),
            len(ok),
            cfg.max_new_tokens,
            per_model[name]["perplexity"]["perplexity"],
            per_model[name]["perplexity"]["tokens"],
            per_model[name]["reference_perplexity"]["perplexity"],
            per_model[name]["reference_perplexity"]["tokens"],
        )
        gc.collect()

    if sh.is_shard:
        sh.finish(metrics_path)
        return
    rmodel, rtok = rm.load_reward_model(reward_model)
    scored = [r for r in rows if r["ok"]]
    convs = [
        ev.prompt_messages({"prompt": r["prompt"]}, r["system"]) + [{"role": "assistant", "content": r["response"]}]
        for r in scored
    ]
    for r, s in zip(scored, rm.score(rmodel, rtok, convs, cfg.reward_batch_size), strict=True):
        r["reward"] = round(s, 4)
    del rmodel

    judge_log: list = []
    judge, judge_name = ev.make_judge(cfg, rows, chosen, judge_prompt, cache, judge_log)
    judged = [p for p in chosen if cfg.judge != "reference" or p["meta"].get("reference")]
    judgments = ev.judge_pairs(judge, list(dirs), judged, rows)

    metrics = {
        "prompts": {
            "in_file": len(all_prompts),
            "evaluated": len(chosen),
            "not_selected": len(all_prompts) - len(chosen),
            "judged": len(judged),
            "with_reference": len(references),
        },
        "heldout": {
            "seed_records": len(seed),
            "scored": max(p["perplexity"]["conversations"] for p in per_model.values()),
        },
        "judge": cfg.judge,
        "distill_teacher": teacher,
        "device": device.resolve_device("auto"),
        "precision": {
            "answers": cfg.engine.dtype,
            "perplexity": " | ".join(sorted({p["perplexity"]["dtype"] for p in per_model.values()})),
            "reward": "fp32",
        },
        "models": {},
        "win_rate": ev.win_rates(judgments, *boot),
        **sh.throughput(len(rows)),
    }
    for name in dirs:
        metrics["models"][name] = {
            **per_model[name],
            **ev.model_metrics([r for r in rows if r["model"] == name], *boot),
        }
    with models.atomic_dir(output_dir) as out:  # the report directory is replaced whole
        io.write_jsonl(out / "answers.jsonl", rows)
        io.write_jsonl(out / "judgments.jsonl", [j | {"pair": p} for p, js in judgments.items() for j in js])
        if judge_log:
            io.write_jsonl(out / "judge_replies.jsonl", judge_log)
        plots = report.write_plots(out, metrics, list(dirs))
        setup = report.setup(
            cfg,
            dirs,
            reward_model=reward_model,
            prompts_path=prompts,
            n_prompts=len(all_prompts),
            n_chosen=len(chosen),
            n_judged=len(judged),
            judge_name=judge_name,
            heldout_path=heldout,
            eval_fraction=eval_fraction,
            n_references=len(references),
            teacher=ex.teacher_sentence(teacher) if teacher else None,
        )
        (out / "report.md").write_text(report.render_report(metrics, rows, list(dirs), plots, setup), encoding="utf-8")
    io.write_json(metrics_path, metrics)
    log.info("wrote %s/report.md and %s", output_dir, metrics_path)


if __name__ == "__main__":
    main()

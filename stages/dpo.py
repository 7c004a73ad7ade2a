"""DPO on the final SFT model with TRL's DPOTrainer: LoRA, the reference = the adapter switched off.

    python stages/dpo.py --params params.yaml --policy models/final --preference data/clean/preference.jsonl \
        --scored data/curate --output models/dpo --checkpoints cache/dpo --rejected data/dpo/rejected.jsonl \
        --plots plots/dpo --metrics metrics/dpo.json

Pairs: the clean preference records (each (id, lang) once, as the reward stage takes them) and,
with `self_rewarding`, best-vs-worst pairs of the last curation round's scored answers
(selfalign.dpo.self_reward_pairs). The held-out split is the reward stage's (whole ids, same
hash), so the DPO model's implicit-reward accuracy and the reward model's accuracy are measured
on the same pairs. Every record is used, held out, capped or rejected with a reason.
A checkpoint every `checkpoint_every` steps in cache/dpo lets a killed run resume, only when the
checkpoint was made from the same params, pairs and policy weights (sft.prepare_checkpoints).
Output: models/dpo, the LoRA merged into a plain model directory that evaluate, export and serve load.
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, curate, io, models, params, records, sft
from selfalign import dpo as D
from selfalign import reward as rm

log = logging.getLogger("dpo")


def select_pairs(prefs: list[dict], sources) -> tuple[list[dict], list[dict]]:
    """reward.select_pairs' rule (listed source, a real preference, each (id, lang) once), with the
    dropped records written out rather than only counted."""
    kept, rejected, seen = [], [], set()
    for r in prefs:
        if not rm.source_listed(r.get("source", ""), sources):
            rejected.append(records.rejected(r, "source_not_listed", "dpo"))
        elif r["prompt"] == "" or r["chosen"] == r["rejected"]:
            rejected.append(records.rejected(r, "no_preference", "dpo"))
        elif (r["id"], r["lang"]) in seen:
            rejected.append(records.rejected(r, "duplicate", "dpo"))
        else:
            seen.add((r["id"], r["lang"]))
            kept.append(r)
    return kept, rejected


def write_plots(plots_dir: str, history: list[dict]) -> None:
    """One CSV per curve (step, value): loss, implicit reward margin and accuracy, chosen/rejected rewards."""
    Path(plots_dir).mkdir(parents=True, exist_ok=True)
    for name, points in D.curves(history).items():
        with io.atomic_path(Path(plots_dir) / f"{name}.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", name])
            w.writerows([s, round(v, 6)] for s, v in points)


@click.command()
@click.option(
    "--policy",
    "policy_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="The SFT model to improve (the reference is its weights with the adapter off).",
)
@click.option(
    "--preference",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Preference records (prompt/chosen/rejected) from clean.",
)
@click.option(
    "--scored",
    type=click.Path(),
    default=None,
    help="Curation-scored chat records (a scored.jsonl, or data/curate for the last round of "
    "curate.iterations); read only when self_rewarding is on.",
)
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option(
    "--checkpoints",
    required=True,
    type=click.Path(file_okay=False),
    help="Checkpoint directory; a killed run resumes from it.",
)
@click.option("--rejected", "rejected_path", required=True, type=click.Path(dir_okay=False))
@click.option("--plots", "plots_dir", required=True, type=click.Path(file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
@params.params_option
@params.set_option
def main(
    policy_dir, preference, scored, output, checkpoints, rejected_path, plots_dir, metrics_path, params_file, overrides
):
    cfg = params.resolve(D.DPOConfig, params_file, "dpo", overrides)
    cli.setup_logging()
    cfg = cfg.replace(precision=sft.resolve_precision(cfg.precision))
    t0 = time.time()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from selfalign import chat
    from selfalign.llm import model_fingerprint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    prefs = records.load_or_exit(preference, "preference")
    pairs, rejected = select_pairs(prefs, cfg.sources)
    self_counts: Counter = Counter()
    n_scored = n_self = 0
    if cfg.self_rewarding:
        scored = scored and str(curate.round_file(scored, params_file, "scored.jsonl"))
        if not scored or not Path(scored).exists():
            raise click.ClickException(f"self_rewarding is on but --scored {scored!r} does not exist")
        scored_recs = records.load_or_exit(scored, "chat")
        n_scored = len(scored_recs)
        extra, self_counts = D.self_reward_pairs(scored_recs, cfg.self_reward_min_gap)
        n_self = len(extra)
        known = {(p["id"], p["lang"]) for p in pairs}
        rejected += [records.rejected(p, "duplicate", "dpo") for p in extra if (p["id"], p["lang"]) in known]
        pairs += [p for p in extra if (p["id"], p["lang"]) not in known]
    train_pairs, held_pairs = rm.split_heldout(pairs, cfg.heldout_pairs)  # the reward stage's split
    capped = max(0, len(train_pairs) - cfg.max_pairs)
    train_pairs = random.Random(cfg.seed).sample(train_pairs, min(len(train_pairs), cfg.max_pairs))

    info = models.read_info(policy_dir)
    tok = chat.load_tokenizer(policy_dir)
    train_rows, bad = D.encode_pairs(tok, train_pairs, info.get("system"), cfg)
    held_rows, bad_held = D.encode_pairs(tok, held_pairs, info.get("system"), cfg)
    rejected += bad + bad_held
    if not train_rows or not held_rows:
        raise click.ClickException(
            f"{len(train_rows)} training and {len(held_rows)} held-out pairs: need at least "
            "one of each (more preference records, self_rewarding, or another heldout_pairs)"
        )
    steps = D.total_steps(len(train_rows), cfg)
    by_source = Counter(r["source"] for r in train_rows)
    log.info(
        "%d preference records + %d self-rewarding pairs (from %d scored answers: %s) -> train %d (by source "
        "%s), held out %d, capped %d, rejected %d; %d steps x %d pairs, beta %s, system %r",
        len(prefs),
        n_self,
        n_scored,
        dict(self_counts),
        len(train_rows),
        dict(by_source),
        len(held_rows),
        capped,
        len(rejected),
        steps,
        cfg.batch_size * cfg.grad_accum,
        cfg.beta,
        info.get("system"),
    )

    ckpt_dir = Path(checkpoints)
    fp = io.digest(
        {
            "cfg": {k: v for k, v in cfg.to_dict().items() if k not in ("checkpoint_every", "threads")},
            "rows": [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in train_rows],
            "policy": model_fingerprint(policy_dir),
        }
    )
    resume = sft.prepare_checkpoints(ckpt_dir, fp)
    if resume is not None:
        log.info("resuming from %s", resume)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    peft_config = models.lora_config(cfg.lora, task_type="CAUSAL_LM")
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    progress = sft.make_callback([])
    trainer = D.trainer_class()(
        model=model,
        ref_model=None,
        args=D.dpo_config(cfg, ckpt_dir, steps),
        train_dataset=Dataset.from_list([{k: r[k] for k in columns} for r in train_rows]),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[progress],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    history = trainer.state.log_history
    write_plots(plots_dir, history)

    policy = trainer.model
    rewards = D.implicit_rewards(policy, held_rows, cfg.beta, tok.pad_token_id, cfg.eval_batch_size)
    held = rm.pairwise_metrics([r["chosen"] for r in rewards], [r["rejected"] for r in rewards])  # margin > 0
    length = rm.length_baseline([p for p in held_pairs if p["id"] in {r["id"] for r in held_rows}])
    log.info(
        "held-out implicit-reward accuracy %.3f (95%% Wilson interval %.3f-%.3f), mean margin %.4f over %d "
        "pairs; the longer answer wins %.3f of them",
        held["accuracy"],
        *held["ci95"],
        held["margin"],
        held["pairs"],
        length["accuracy"],
    )
    merged = policy.merge_and_unload()
    models.save_model_dir(
        merged,
        tok,
        output,
        info={**info, "dpo": {"steps": trainer.state.global_step, "beta": cfg.beta, "pairs": len(train_rows)}},
    )
    io.write_jsonl(rejected_path, rejected)

    loss = D.curves(history)["loss"]
    rows_all = train_rows + held_rows
    io.write_json(
        metrics_path,
        {
            "heldout_accuracy": held["accuracy"],  # implicit reward margin > 0 (beta * log-ratio, chosen - rejected)
            "heldout_ci95": held["ci95"],  # Wilson score interval of the accuracy
            "heldout_margin": held["margin"],
            "heldout_length_baseline": length["accuracy"],  # "the longer answer wins" on the same pairs
            **rm.selection_metrics(len(prefs) + n_self, len(rows_all), capped, Counter(r["reason"] for r in rejected)),
            "pairs_in": len(prefs) + n_self,  # = train + heldout + capped + rejected
            "pairs_train": len(train_rows),
            "pairs_heldout": len(held_rows),
            "pairs_capped": capped,
            "pairs_rejected": dict(Counter(r["reason"] for r in rejected)),
            "pairs_by_source": {
                "preference": sum(r["source"] != D.SELF_REWARD_SOURCE for r in rows_all),
                "self_rewarding": sum(r["source"] == D.SELF_REWARD_SOURCE for r in rows_all),
            },
            "train_by_source": dict(by_source),
            "self_rewarding": {"enabled": cfg.self_rewarding, "scored_answers": n_scored, **self_counts},
            "prompts_cut": sum(r["prompt_cut"] for r in rows_all),
            "answers_cut": sum(r["answer_cut"] for r in rows_all),
            "steps": trainer.state.global_step,
            "resumed_from_step": progress.start_step,
            "train_loss_first": loss[0][1] if loss else None,
            "train_loss_last": loss[-1][1] if loss else None,
            "train_loss_mean": sum(v for _, v in loss) / len(loss) if loss else None,
            "beta": cfg.beta,
            "seconds": round(time.time() - t0, 1),
        },
    )
    sft.clear_checkpoints(ckpt_dir)


if __name__ == "__main__":
    main()

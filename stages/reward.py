"""Train the reward model on preference pairs (MYChatGPT's stage 2) and report held-out accuracy.

    python stages/reward.py --params params.yaml --preference data/clean/preference.jsonl \
        --scored data/curate --model models/base --output models/reward \
        --metrics metrics/reward.json

dvc.yaml passes `--model models/${reward.init}`, so `reward.init` picks base or final SFT weights.
`reward.backbone` frozen fits only the score head on the network's last-token states (forward
passes only, so ~120 pairs fit the CPU budget); tuned trains LoRA or all weights with TRL.
Held-out accuracy comes with its 95% Wilson interval and the accuracy of "the longer answer
wins" on the same pairs. The output is a plain AutoModelForSequenceClassification directory
(LoRA merged, score head kept, pad_token_id in its config) with the tokenizer and chat template;
selfalign.reward.score reads it for evaluate and ppo.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, curate, device, io, launch, memory, models, params, records
from selfalign import reward as rm

log = logging.getLogger("reward")


def split_and_cap(pairs: list[dict], cfg: rm.RewardConfig) -> tuple[list[dict], list[dict], int]:
    """(train, heldout, capped): held out by id (selfalign.reward.split_heldout), train capped by a seeded sample."""
    train, heldout = rm.split_heldout(pairs, cfg.heldout_pairs)
    capped = max(0, len(train) - cfg.max_pairs)
    train = random.Random(cfg.seed).sample(train, min(len(train), cfg.max_pairs))
    return train, heldout, capped


def evaluate(model, tok, pairs: list[dict], cfg: rm.RewardConfig) -> dict:
    convs = [rm.pair_messages(p) for p in pairs]
    kw = {"batch_size": cfg.score_batch_size, "max_length": cfg.max_len}
    chosen = rm.score(model, tok, [c for c, _ in convs], **kw)
    rejected = rm.score(model, tok, [r for _, r in convs], **kw)
    return {**rm.pairwise_metrics(chosen, rejected), "length_baseline": rm.length_baseline(pairs)}


@click.command()
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
    "curate.iterations); read only when curation_pairs is on.",
)
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Model directory that initialises the reward model.",
)
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Reward model directory to write.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
@params.params_option
@params.set_option
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and its peak GPU memory estimate; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(preference, scored, model_dir, output, metrics_path, params_file, overrides, dry_run, gpu_gib):
    cfg = params.resolve(rm.RewardConfig, params_file, "reward", overrides)
    cli.setup_logging()
    if dry_run:  # pairs: chosen and rejected both go through the model
        plan = memory.stage_plan(
            "reward", cfg.to_dict(), model_dir, params_file, gpu_gib=gpu_gib, head="score", pairs=True
        )
        click.echo(memory.dry_run(plan, params=cfg.to_dict()))
        return
    try:  # one rule (selfalign/device.py); a frozen backbone's features stay fp32: the fitted head must not
        # depend on which precision this machine measures faster. Before the launch: its ranks read the cache
        frozen = cfg.backbone == "frozen"
        placed = device.placement("auto", "fp32" if frozen else cfg.precision, model_dir, "reward.precision")
    except device.DeviceError as e:
        raise click.UsageError(str(e)) from e
    if frozen:
        placed.reason = "backbone frozen: last-token features in fp32"
    cfg = cfg.replace(precision=placed.precision)
    # The launcher (torchrun, accelerate launch, srun ...) comes from the machine, not params (selfalign/launch.py).
    launcher = launch.relaunch("reward")
    t0 = time.time()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)

    prefs = records.load_or_exit(preference, "preference")
    pairs, dropped = rm.select_pairs(prefs, cfg.sources)
    curation: Counter = Counter()
    if cfg.curation_pairs:
        scored = scored and str(curate.round_file(scored, params_file, "scored.jsonl"))
        if not scored or not Path(scored).exists():
            raise click.ClickException(f"curation_pairs is on but --scored {scored!r} does not exist")
        extra, curation = rm.curation_pairs(records.load_or_exit(scored, "chat"), cfg.curation_margin)
        known = {(p["id"], p["lang"]) for p in pairs}
        dropped["duplicate_curation"] += sum((p["id"], p["lang"]) in known for p in extra)
        pairs += [p for p in extra if (p["id"], p["lang"]) not in known]
    train, heldout, capped = split_and_cap(pairs, cfg)
    if not train or not heldout:
        raise click.ClickException(
            f"{len(train)} training and {len(heldout)} held-out pairs: need at least one "
            "of each (more preference records, or another heldout_pairs)"
        )
    by_source = Counter(p["source"] for p in train)
    log.info(
        "init %s (%s): %d preference records -> %d pairs (%d from curation scores); train %d, held out %d, "
        "capped %d, dropped %s; train pairs by source %s",
        cfg.init,
        model_dir,
        len(prefs),
        len(pairs),
        sum(p["source"] == "curation-scores" for p in pairs),
        len(train),
        len(heldout),
        capped,
        dict(dropped),
        dict(by_source),
    )

    with tempfile.TemporaryDirectory() as work:
        model, tok, info = rm.train(model_dir, train, cfg, work)
    if not launch.is_main():  # backbone tuned: every rank trained its shard of each batch; rank 0 evaluates and writes
        log.info("rank %d of %d: trained; rank 0 evaluates and writes the outputs", launch.rank(), launch.world_size())
        return
    held = evaluate(model, tok, heldout, cfg)
    log.info(
        "held-out pairwise accuracy %.3f (95%% Wilson interval %.3f-%.3f), margin %.3f over %d pairs; "
        "the longer answer wins %.3f of them",
        held["accuracy"],
        *held["ci95"],
        held["margin"],
        held["pairs"],
        held["length_baseline"]["accuracy"],
    )
    models.save_model_dir(model, tok, output, info={"kind": "reward", "init": cfg.init})

    losses = [h["loss"] for h in info["log"]]
    n_curation = sum(p["source"] == "curation-scores" for p in pairs)
    pairs_in = len(prefs) + n_curation + dropped["duplicate_curation"]
    io.write_json(
        metrics_path,
        {
            "init": cfg.init,
            "backbone": cfg.backbone,  # frozen: train_loss_* are the head's loss at w = 0 and fitted
            "heldout_accuracy": held["accuracy"],
            "heldout_ci95": held["ci95"],  # Wilson score interval of the accuracy
            "heldout_margin": held["margin"],
            "heldout_length_baseline": held["length_baseline"]["accuracy"],  # "the longer answer wins", same pairs
            "heldout_length_baseline_ci95": held["length_baseline"]["ci95"],
            **rm.selection_metrics(pairs_in, len(train) + len(heldout), capped, dropped),
            "pairs_in": pairs_in,
            "pairs_train": len(train),
            "pairs_heldout": len(heldout),
            "pairs_capped": capped,
            "pairs_dropped": dict(dropped),
            "pairs_from_curation": n_curation,
            "train_by_source": dict(by_source),
            "curation_candidates": dict(curation),
            "truncated_train_pairs": info["truncated_pairs"],
            "train_steps": len(losses),
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "seconds": round(time.time() - t0, 1),
            # frozen: the head is fitted on the same features in every process, so no batch is split
            **launch.summary(launcher, cfg.batch_size if cfg.backbone == "tuned" else None),
            **placed.metrics(),
        },
    )


if __name__ == "__main__":
    main()

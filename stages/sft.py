"""Supervised fine-tuning of one run (backward, m0, each round's model, final): curriculum phases, LoRA/QLoRA/full, resumable.

    python stages/sft.py --params params.yaml --run m0 --input models/base --input data/clean/seed.jsonl \
        --output models/m0 --checkpoints cache/sft/m0 --rejected data/sft/m0/rejected.jsonl \
        --metrics metrics/sft/m0.json --plots plots/sft/m0

dvc.yaml runs it once per run (sft@backward, sft@m0, sft@final) and once per Humpback round
(sft-iter@<round>: run `iteration`). The run's base model and data come from params (sft.runs.<run>);
every path they name must also be passed as --input (or --curated, what a source path "{curated}"
means), i.e. declared in dvc.yaml, so a run never reads a file its stage does not depend on. The output is a plain model
directory (LoRA merged into the weights; the adapter kept in adapter/) with the base's tokenizer and
chat template and a selfalign.json naming the system prompt to use at inference.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

import click

from selfalign import backward, chat, cli, curate, device, io, launch, memory, models, params, sft
from selfalign.sft import CURATED, RunConfig, SFTConfig

log = logging.getLogger("sft")


def fill_curated(run_cfg: RunConfig, curated: str | None, params_file, run: str) -> RunConfig:
    """A source path "{curated}" becomes --curated: a kept.jsonl, or for a directory (data/curate) the last
    round's kept.jsonl in params' curate.iterations; so adding a round never edits sft@final."""
    wanted = [s for ph in run_cfg.phases for s in ph.sources if s.path == CURATED]
    if not wanted:
        return run_cfg
    if not curated:
        raise click.UsageError(f"sft.runs.{run} reads {CURATED} but no --curated is given")
    path = str(curate.round_file(curated, params_file, "kept.jsonl"))
    phases = [
        ph.replace(sources=[s.replace(path=path) if s.path == CURATED else s for s in ph.sources])
        for ph in run_cfg.phases
    ]
    return run_cfg.replace(phases=phases)


def save_output(trainer, run_cfg: RunConfig, tok, output: str, info: dict, keep_adapter: bool) -> None:
    """The output dir every later stage loads: merged weights in the base's dtype, tokenizer, template, info."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):  # LoRA/QLoRA: merge into a fresh full-precision copy of the base
        with tempfile.TemporaryDirectory() as adapter:
            models.save_adapter(model, adapter)
            merged = models.merge_adapter(run_cfg.base, adapter)
            models.save_model_dir(merged, tok, output, info)
            if keep_adapter:
                shutil.copytree(adapter, Path(output) / "adapter")
                (Path(output) / "adapter").chmod(0o755)  # TemporaryDirectory's 0700 would be copied along
    else:
        model = model.to(models._torch_dtype(models.load_config_dtype(run_cfg.base)))
        model.config.use_cache = True
        models.save_model_dir(model, tok, output, info)


@click.command()
@params.params_option
@params.set_option
@click.option("--run", required=True, help="Which sft.runs entry to train (backward, m0, m1, final).")
@click.option("--input", "inputs", multiple=True, help="A file or dir this run may read (as declared in dvc.yaml).")
@click.option(
    "--curated",
    default=None,
    help="What a source path {curated} reads: a curated kept.jsonl, or "
    "a dir of rounds (data/curate: the last round of curate.iterations).",
)
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option(
    "--checkpoints",
    required=True,
    type=click.Path(file_okay=False),
    help="Checkpoint dir; a killed run resumes from it if params, data and base are unchanged.",
)
@click.option("--rejected", "rejected_path", required=True, type=click.Path(dir_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--plots",
    "plots_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for train.csv / eval.csv loss curves.",
)
@click.option("--deepspeed-config", default=None, help="ZeRO config used when sft.train.deepspeed is true.")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and its peak GPU memory estimate; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    params_file,
    overrides,
    run,
    inputs,
    curated,
    output,
    checkpoints,
    rejected_path,
    metrics_path,
    plots_dir,
    deepspeed_config,
    dry_run,
    gpu_gib,
):
    cli.setup_logging()
    cfg = params.resolve(SFTConfig, params_file, "sft", overrides)  # every run checked, before any work
    t = cfg.train
    run_cfg = fill_curated(cfg.run(run), curated, params_file, run)
    declared = inputs + ((curated,) if curated else ())
    undeclared = [
        p for p in sft.run_inputs(run_cfg) if p not in declared and not any(Path(p).is_relative_to(d) for d in declared)
    ]
    if undeclared:
        raise click.UsageError(
            f"sft.runs.{run} reads {undeclared[0]} but it is not an --input (declare it in dvc.yaml)"
        )
    if dry_run:
        ds = deepspeed_config if t.deepspeed else None
        t = t.replace(precision="bf16" if t.precision == "auto" else t.precision)  # a GPU estimate: auto = bf16
        click.echo(
            memory.dry_run(
                memory.stage_plan("sft", t.to_dict(), run_cfg.base, params_file, gpu_gib=gpu_gib, deepspeed_config=ds),
                params=t.to_dict(),
            )
        )
        return
    try:  # one rule for device and precision (selfalign/device.py): auto = bf16 where it measures faster
        placed = device.placement("auto", t.precision, run_cfg.base, "sft.train.precision")
    except device.DeviceError as e:
        raise click.UsageError(str(e)) from e
    t = cfg.train = t.replace(precision=placed.precision)
    # The launcher (torchrun, accelerate launch, srun ...) comes from the machine, not params (selfalign/launch.py).
    launcher = launch.relaunch("sft")
    ds_config = sft.setup_deepspeed(t.deepspeed, deepspeed_config)
    import torch

    launch.set_cuda_device()  # before any load: QLoRA's 4-bit weights land on this rank's GPU
    world = launch.world_size()

    torch.manual_seed(t.seed)
    tok = chat.load_tokenizer(run_cfg.base)
    by_phase, eval_examples, rejected, sources = sft.read_phases(tok, cfg, run_cfg)
    rows, phase_info = sft.schedule(run_cfg.phases, by_phase, t, world)
    if not rows:
        raise click.ClickException(f"run {run}: no training examples left (see {rejected_path})")
    eval_rows = sft.pack(eval_examples, t.max_len, t.packing)
    per_step = t.batch_size * t.grad_accum * world  # rows per optimizer step across every rank
    total_steps = math.ceil(len(rows) / per_step)
    tokens = sum(len(r["input_ids"]) for r in rows)
    log.info(
        "run %s (%s, %s): %d rows in %d phases, %d steps of %d rows (%d processes), %.0f tokens/step "
        "(%.0f%% of row capacity), %d eval rows",
        run,
        t.method,
        t.precision,
        len(rows),
        len(phase_info),
        total_steps,
        per_step,
        world,
        tokens / total_steps,
        100 * tokens / (len(rows) * t.max_len),
        len(eval_rows),
    )
    for ph in phase_info:
        log.info("phase %s: %d examples x %d epochs -> %d rows", ph["name"], ph["examples"], ph["epochs"], ph["rows"])

    base_weights = Path(run_cfg.base) / models.WEIGHTS
    fp = io.digest(
        {
            "train": t.to_dict(),
            "run": run_cfg.to_dict(),
            "tags": cfg.system_tags,
            "world": world,
            "rows": sft.rows_fingerprint(rows + eval_rows),
            "base": io.sha256_file(base_weights) if base_weights.is_file() else None,
        }
    )
    ckpt_dir = Path(checkpoints)
    # TrainingArguments first: it joins this process to the launch's process group (gloo on CPU, nccl on GPUs).
    args = sft.training_args(t, ckpt_dir, total_steps, bool(eval_rows), ds_config)
    resume = sft.prepare_checkpoints_ranked(ckpt_dir, fp, args.process_index == 0)
    if resume is not None:
        log.info("resuming from %s", resume)

    try:
        model = models.load_for_training(run_cfg.base, t.method, t.lora, t.precision)
    except models.ModelError as e:
        raise click.ClickException(str(e)) from e
    progress = sft.make_callback(rows)
    trainer = sft.trainer_class()(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=eval_rows or None,
        data_collator=sft.PackedCollator(tok.pad_token_id),
        callbacks=[progress],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    step = trainer.state.global_step
    checkpointed = bool(getattr(trainer.model, "is_activation_checkpointing", False))
    trained_tokens = progress.tokens_trained(step, per_step)
    if args.process_index != 0:  # one process merges, evaluates and writes; the others are done
        log.info("rank %d: trained %d steps; rank 0 writes the outputs", args.process_index, step)
        return

    system = cfg.system_tags[run_cfg.inference_tag] if run_cfg.inference_tag else None
    info = {
        "run": run,
        "base": run_cfg.base,
        "method": t.method,
        "system": system,
        "inference_tag": run_cfg.inference_tag,
        "system_tags": cfg.system_tags,
        "global_step": step,
        "phases": [
            {"name": p.name, "sources": [s.to_dict() for s in p.sources], "epochs": p.epochs} for p in run_cfg.phases
        ],
    }
    save_output(trainer, run_cfg, tok, output, info, t.keep_adapter)

    heldout = {}
    if t.heldout_eval.max_examples and backward.reversed_sources(run_cfg):
        h, examples = backward.evaluate(run_cfg, output, t.eval_fraction, t.heldout_eval, system)
        heldout = {"heldout_instruction": h}
        log.info(
            "held-out instructions (%d pairs, ROUGE-L F1): %s %.3f %s, base %.3f %s, difference %.3f %s (%.0f s)",
            h["n"],
            run,
            h["backward"]["rougeL"] or 0,
            h["backward"]["ci95"],
            h["base"]["rougeL"] or 0,
            h["base"]["ci95"],
            h["difference"]["mean"] or 0,
            h["difference"]["ci95"],
            h["seconds"],
        )
        for ex in examples[: t.heldout_eval.examples_logged]:
            log.info(
                "held-out %s: true %r | %s %r | base %r",
                ex["id"],
                ex["true"][:200],
                run,
                ex["backward"][:200],
                ex["base"][:200],
            )

    train_curve, eval_curve = sft.loss_curves(trainer.state.log_history, rows, per_step)
    io.write_jsonl(rejected_path, rejected)
    Path(plots_dir).mkdir(parents=True, exist_ok=True)
    _csv(Path(plots_dir) / "train.csv", train_curve, ["step", "loss", "lr", "phase"])
    _csv(Path(plots_dir) / "eval.csv", eval_curve, ["step", "eval_loss"])
    records_in = sum(s["records_in"] for s in sources.values())
    kept_train = sum(s["train"] for s in sources.values())
    kept_eval = sum(s["eval"] for s in sources.values())
    io.write_json(
        metrics_path,
        {
            "run": run,
            "records_in": records_in,
            "train": kept_train,
            "eval": kept_eval,
            "kept": kept_train + kept_eval,
            "rejected": len(rejected),
            "rejected_by_reason": sft.count(r["reason"] for r in rejected),
            "sources": sources,
            "phases": phase_info,
            "rows": len(rows),
            "steps": step,
            "resumed_from_step": progress.start_step,
            "tokens": tokens,
            "tokens_trained_this_run": trained_tokens,
            "train_seconds": round(progress.seconds, 2),
            "tokens_per_second": round(trained_tokens / progress.seconds, 1) if progress.seconds else None,
            "final_train_loss": train_curve[-1]["loss"] if train_curve else None,
            "final_eval_loss": eval_curve[-1]["eval_loss"] if eval_curve else None,
            "method": t.method,
            "gradient_checkpointing": checkpointed,
            **placed.metrics(),
            "device": str(trainer.args.device),  # the precision rule's choice and the Trainer's device
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.is_deepspeed_enabled
            else None,
            **launch.summary(launcher, t.batch_size * t.grad_accum),
            **heldout,
        },
    )
    sft.clear_checkpoints(ckpt_dir)
    log.info(
        "run %s: %d steps, %.1f tokens/s, wrote %s",
        run,
        step,
        trained_tokens / progress.seconds if progress.seconds else 0.0,
        output,
    )


def _csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with io.atomic_path(path) as tmp:
        lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

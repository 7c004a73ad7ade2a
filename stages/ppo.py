"""PPO on the final SFT model against the reward model, with a KL penalty to the SFT model (MYChatGPT's stage 3).

    python stages/ppo.py --params params.yaml --policy models/final --reward-model models/reward \
        --prompts data/clean/prompts.jsonl --seed-file data/clean/seed.jsonl --eval-fraction 0.1 \
        --output models/ppo --checkpoints cache/ppo --plots plots/ppo --metrics metrics/ppo.json

Prompts (selfalign.ppo.gather_prompts): every prompt record, plus the instructions of the seed records
that sft held out of training (selfalign.sft.heldout at --eval-fraction: dvc.yaml passes
${sft.train.eval_fraction}, the split evaluate also uses). A record without its own system prompt gets
the policy's inference one (selfalign.json), as in evaluate. The loop is selfalign.ppo; a checkpoint
every `checkpoint_every` steps lets a killed run resume where it stopped, and only when the checkpoint
was made from the same inputs and params. Output: models/ppo, the LoRA merged into a plain model
directory that serve and evaluate load.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import logging
import resource
import time
from pathlib import Path

import click

from selfalign import cli, device, io, launch, memory, models, params, records
from selfalign import ppo as P

log = logging.getLogger("ppo")

PLOTTED = (
    "reward_mean",
    "score_mean",
    "kl",
    "kl_coef",
    "clip_frac",
    "entropy",
    "value_loss",
    "policy_loss",
    "approx_kl",
    "response_length",
    "eos_frac",
    "time_generate",
    "time_score",
    "time_logprobs",
    "time_optimise",
)


def load_reward_fn(spec: str) -> P.RewardFn:
    """`module:function` or `path/to/file.py:function`: a Python reward instead of the reward model."""
    target, _, name = spec.partition(":")
    if target.endswith(".py"):
        mod_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def fingerprint(cfg: P.PPOConfig, prompts: list[dict], model_dirs: list[str]) -> str:
    """What a checkpoint must share with this run to be resumed: params (except how long to run and how
    often to save), the prompts and the input models' files."""
    from selfalign.llm import model_fingerprint

    kept = {k: v for k, v in cfg.to_dict().items() if k not in ("steps", "checkpoint_every")}
    return io.digest(kept, [p["ids"] for p in prompts], [model_fingerprint(d) for d in model_dirs])[:24]


def write_plots(plots_dir: str, history: list[dict]) -> None:
    """One CSV per metric (step, value), so dvc plots draws each as its own curve."""
    Path(plots_dir).mkdir(parents=True, exist_ok=True)
    for key in PLOTTED:
        with io.atomic_path(Path(plots_dir) / f"{key}.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", key])
            w.writerows([row["step"], round(row[key], 6)] for row in history)


@click.command()
@click.option(
    "--policy",
    "policy_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="The SFT model to improve (the reference is its frozen weights).",
)
@click.option(
    "--reward-model",
    type=click.Path(file_okay=False),
    default=None,
    help="Reward model directory (not read when reward_fn is set).",
)
@click.option(
    "--prompts",
    "prompts_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Prompt records from PPO prompt files.",
)
@click.option(
    "--seed-file",
    "seed_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Seed chat records; the ones sft held out of training give prompts (use_seed_heldout).",
)
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="sft.train.eval_fraction, the share of seed records sft held out (dvc.yaml passes it); "
    "required with --seed-file when use_seed_heldout is on.",
)
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option(
    "--checkpoints",
    required=True,
    type=click.Path(file_okay=False),
    help="Checkpoint directory; a killed run resumes from it.",
)
@click.option("--plots", "plots_dir", required=True, type=click.Path(file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
@params.params_option
@params.set_option
@click.option("--dry-run", is_flag=True, help="Print the resolved plan and its peak GPU memory estimate; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(
    policy_dir,
    reward_model,
    prompts_path,
    seed_path,
    eval_fraction,
    output,
    checkpoints,
    plots_dir,
    metrics_path,
    params_file,
    overrides,
    dry_run,
    gpu_gib,
):
    cfg = params.resolve(P.PPOConfig, params_file, "ppo", overrides)
    cli.setup_logging()
    seed_prompts = cfg.use_seed_heldout and seed_path
    if seed_prompts and eval_fraction is None:
        raise click.UsageError(
            "--eval-fraction is required with --seed-file and ppo.use_seed_heldout: the held-out split must be "
            "sft's (dvc.yaml passes ${sft.train.eval_fraction})"
        )
    if dry_run:
        click.echo(memory.dry_run(memory.ppo_plan(cfg, policy_dir, params_file, gpu_gib=gpu_gib), params=cfg.to_dict()))
        return
    if not cfg.reward_fn and not reward_model:
        raise click.UsageError("--reward-model is required unless ppo.reward_fn is set")
    # auto: the one precision rule (selfalign/device.py); before the launch, so that its ranks read the probe's cache
    try:
        placed = device.placement("auto", cfg.precision, policy_dir, "ppo.precision")
    except device.DeviceError as e:
        raise click.UsageError(str(e)) from e
    cfg = cfg.replace(precision=placed.precision)
    # The launcher (torchrun, accelerate launch, srun ...) comes from the machine, not params (selfalign/launch.py).
    launcher = launch.relaunch("ppo")
    t0 = time.time()
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from selfalign import chat
    from selfalign import reward as rm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = models.read_info(policy_dir)
    tok = chat.load_tokenizer(policy_dir, padding_side="left")
    prompt_recs = records.load_or_exit(prompts_path, "prompt") if cfg.use_prompt_files and prompts_path else []
    seed_recs = records.load_or_exit(seed_path, "chat") if seed_prompts else []
    prompts, counts = P.gather_prompts(
        prompt_recs, seed_recs, eval_fraction or 0.0, info.get("system"), tok, cfg.max_prompt_len
    )
    if not prompts:
        raise click.ClickException(f"no PPO prompts: {counts}")

    # cpu=True without CUDA: only then does accelerate join a torchrun launch over gloo (MULTI_CPU); without it
    # every rank believed it was alone, and both wrote the same checkpoint and outputs
    mixed = "bf16" if cfg.precision == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    if accelerator.num_processes != launch.world_size():
        raise click.ClickException(
            f"launched as {launch.world_size()} processes ({launcher}) but accelerate sees {accelerator.num_processes}"
        )
    policy = P.PolicyWithValue(
        P.with_lora(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32), cfg.lora, seed=cfg.seed)
    )
    ref_model = None
    if cfg.reference == "copy":
        ref_model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    inputs = [policy_dir]
    if cfg.reward_fn:
        reward_fn = load_reward_fn(cfg.reward_fn)
    else:
        rmodel, rtok = rm.load_reward_model(reward_model, device=str(accelerator.device))
        reward_fn = P.reward_model_fn(rmodel, rtok, cfg.reward_batch_size, cfg.reward_max_len)
        inputs.append(reward_model)
    log.info(
        "%d prompts (%s); %d steps x %d prompts x %d processes, %d new tokens at most, reference=%s, "
        "value head on the policy's last hidden state, reward=%s",
        len(prompts),
        counts,
        cfg.steps,
        cfg.batch_size,
        accelerator.num_processes,
        cfg.max_new_tokens,
        cfg.reference,
        cfg.reward_fn or reward_model,
    )

    out = P.train(
        policy,
        ref_model,
        tok,
        prompts,
        reward_fn,
        cfg,
        accelerator=accelerator,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        fingerprint=fingerprint(cfg, prompts, inputs),
        on_step=lambda row, hist: write_plots(plots_dir, hist),
    )
    history = out["history"]
    if not accelerator.is_main_process:
        return
    write_plots(plots_dir, history)
    merged = out["policy"].lm.merge_and_unload()
    models.save_model_dir(
        merged,
        chat.load_tokenizer(policy_dir),
        output,
        info={**info, "ppo": {"steps": cfg.steps, "reward": cfg.reward_fn or "reward_model"}},
    )

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    ran = history[out["resumed_from"] :]
    times = {k: sum(r[f"time_{k}"] for r in ran) for k in ("generate", "score", "logprobs", "optimise")}
    total = sum(times.values()) or 1.0
    io.write_json(
        metrics_path,
        {
            "steps": len(history),
            "resumed_from": out["resumed_from"],
            "prompts": counts,
            **P.prompt_metrics(counts),
            "reward_first": mean("reward_mean", history[:3]),
            "reward_last": mean("reward_mean", history[-3:]),
            "kl_last": history[-1]["kl"] if history else None,
            "kl_coef_last": history[-1]["kl_coef"] if history else None,
            "entropy_last": history[-1]["entropy"] if history else None,
            "eos_frac_last": history[-1]["eos_frac"] if history else None,
            "seconds_per_step": total / len(ran) if ran else None,
            "time_share": {k: round(v / total, 3) for k, v in times.items()},
            "reference": cfg.reference,
            **placed.metrics(),
            "device": str(
                accelerator.device
            ),  # accelerate's: cuda:LOCAL_RANK when there is one, as device.resolve_device
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "seconds": round(time.time() - t0, 1),
            **launch.summary(launcher, cfg.batch_size),  # prompts per rollout: batch_size on each process
        },
    )


if __name__ == "__main__":
    main()

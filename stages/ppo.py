"""PPO on the final SFT model against the reward model, with a KL penalty to the SFT model (MYChatGPT's stage 3).

    python stages/ppo.py --params params.yaml --policy models/final --reward-model models/reward \
        --prompts data/clean/prompts.jsonl --seed-data data/clean/seed.jsonl --output models/ppo \
        --checkpoints checkpoints/ppo --plots plots/ppo --metrics metrics/ppo.json

Prompts: every prompt record, plus the instructions of the seed records that sft held out of
training (selfalign.sft.heldout with sft.train.eval_fraction, the split evaluate also uses).
A record without its own system prompt gets the policy's inference one (selfalign.json), as in
evaluate. The loop is selfalign.ppo; a checkpoint every `checkpoint_every` steps lets a killed run
resume where it stopped, and only when the checkpoint was made from the same inputs and params.
Output: models/ppo, the LoRA merged into a plain model directory that serve and evaluate load.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import resource
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from selfalign import device, io, launch, memory, models, params, records  # noqa: E402
from selfalign import ppo as P  # noqa: E402

log = logging.getLogger("ppo")

DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(P.PPOConfig)},
    "reference": "adapter",
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "seed_heldout_fraction": None,
    "use_prompt_files": True,
    "use_seed_heldout": True,
    "max_prompt_tokens": 128,
    "reward_fn": None,
    "reward_batch_size": 16,
    "reward_max_length": 512,
    "checkpoint_every": 4,
    "mixed_precision": "no",
    "threads": 0,
}
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


def read_records(path: str, kind: str) -> list[dict]:
    """Records of one kind from an upstream file; anything else is an error naming file, line and field."""
    try:
        return records.load(path, kind)
    except records.RecordError as e:
        raise click.ClickException(str(e)) from None


def gather_prompts(
    prompt_recs: list[dict], seed_recs: list[dict], fraction: float, system: str | None, tok, max_tokens: int
) -> tuple[list[dict], dict]:
    """PPO prompts as {messages, ids, id}; every input record is used or counted under a reason."""
    from selfalign import chat
    from selfalign.sft import heldout

    candidates, counts = (
        [],
        {
            "in": len(prompt_recs) + len(seed_recs),
            "used": 0,
            "seed_not_heldout": 0,
            "seed_without_user_turn": 0,
            "duplicate": 0,
            "too_long": 0,
        },
    )
    for r in prompt_recs:
        sys_prompt = r.get("system") or system
        head = [{"role": "system", "content": sys_prompt}] if sys_prompt else []
        candidates.append((r["id"], head + [{"role": "user", "content": r["prompt"]}]))
    for r in seed_recs:
        if not heldout(r["id"], fraction):
            counts["seed_not_heldout"] += 1
            continue
        msgs = records.to_messages(r, system=r.get("system") or system)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            counts["seed_without_user_turn"] += 1
            continue
        candidates.append((r["id"], msgs))
    out, seen = [], set()
    for rid, msgs in candidates:
        text = chat.render(tok, msgs, add_generation_prompt=True)
        if text in seen:
            counts["duplicate"] += 1
            continue
        seen.add(text)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            counts["too_long"] += 1
            continue
        out.append({"id": rid, "messages": msgs, "ids": ids})
    counts["used"] = len(out)
    return out, counts


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


def fingerprint(cfg: dict, prompts: list[dict], model_dirs: list[str]) -> str:
    """What a checkpoint must share with this run to be resumed: params (except how long to run and how
    often to save), the prompts and the input models' files."""
    from selfalign.llm import model_fingerprint

    h = hashlib.sha256()
    h.update(
        json.dumps(
            {k: v for k, v in cfg.items() if k not in ("steps", "checkpoint_every")}, sort_keys=True, default=str
        ).encode()
    )
    h.update(json.dumps([p["ids"] for p in prompts]).encode())
    for d in model_dirs:
        h.update(model_fingerprint(d).encode())
    return h.hexdigest()[:24]


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
    "--seed-data",
    "seed_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Seed chat records; the ones sft held out give prompts.",
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
    output,
    checkpoints,
    plots_dir,
    metrics_path,
    params_file,
    overrides,
    dry_run,
    gpu_gib,
):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = params.resolve(DEFAULTS, params_file, "ppo", overrides)
    if dry_run:
        click.echo(memory.dry_run(memory.ppo_plan(cfg, policy_dir, params_file, gpu_gib=gpu_gib), params=cfg))
        return
    # auto: the one precision rule (selfalign/device.py); before the launch, so that its ranks read the probe's cache
    asked = {"no": "fp32", "bf16": "bf16", "auto": "auto"}.get(cfg["mixed_precision"])
    if asked is None:
        raise click.UsageError(f"ppo.mixed_precision {cfg['mixed_precision']!r}: expected no, bf16 or auto")
    placed = device.placement("auto", asked, policy_dir, "ppo.mixed_precision")
    cfg = {**cfg, "mixed_precision": "bf16" if placed.precision == "bf16" else "no"}
    # The launcher (torchrun, accelerate launch, srun ...) comes from the machine, not params (selfalign/launch.py).
    launcher = launch.relaunch("ppo")
    t0 = time.time()
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from selfalign import chat
    from selfalign import reward as rm

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    fraction = cfg["seed_heldout_fraction"]
    if fraction is None and cfg["use_seed_heldout"]:
        if not params_file:
            raise click.UsageError("ppo.seed_heldout_fraction is null (= sft.train.eval_fraction) but no --params file")
        fraction = params.section(params_file, "sft.train").get("eval_fraction")
    info = models.read_info(policy_dir)
    tok = chat.load_tokenizer(policy_dir, padding_side="left")
    prompt_recs = read_records(prompts_path, "prompt") if cfg["use_prompt_files"] and prompts_path else []
    seed_recs = read_records(seed_path, "chat") if cfg["use_seed_heldout"] and seed_path else []
    prompts, counts = gather_prompts(
        prompt_recs, seed_recs, float(fraction or 0), info.get("system"), tok, cfg["max_prompt_tokens"]
    )
    if not prompts:
        raise click.ClickException(f"no PPO prompts: {counts}")

    # cpu=True without CUDA: only then does accelerate join a torchrun launch over gloo (MULTI_CPU); without it
    # every rank believed it was alone, and both wrote the same checkpoint and outputs
    accelerator = Accelerator(mixed_precision=cfg["mixed_precision"], cpu=not torch.cuda.is_available())
    if accelerator.num_processes != launch.world_size():
        raise click.ClickException(
            f"launched as {launch.world_size()} processes ({launcher}) but accelerate sees {accelerator.num_processes}"
        )
    policy = P.PolicyWithValue(
        P.with_lora(
            AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32), cfg["lora"], seed=cfg["seed"]
        )
    )
    ref_model = None
    if cfg["reference"] == "copy":
        ref_model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    elif cfg["reference"] != "adapter":
        raise click.UsageError(f"ppo.reference: {cfg['reference']!r} is not adapter | copy")
    inputs = [policy_dir]
    if cfg["reward_fn"]:
        reward_fn = load_reward_fn(cfg["reward_fn"])
    else:
        if not reward_model:
            raise click.UsageError("--reward-model is required unless ppo.reward_fn is set")
        rmodel, rtok = rm.load_reward_model(reward_model, device=str(accelerator.device))
        reward_fn = P.reward_model_fn(rmodel, rtok, cfg["reward_batch_size"], cfg["reward_max_length"])
        inputs.append(reward_model)
    ppo_cfg = P.PPOConfig.from_dict(cfg)
    log.info(
        "%d prompts (%s); %d steps x %d prompts x %d processes, %d new tokens at most, reference=%s, "
        "value head on the policy's last hidden state, reward=%s",
        len(prompts),
        counts,
        ppo_cfg.steps,
        ppo_cfg.batch_size,
        accelerator.num_processes,
        ppo_cfg.response_length,
        cfg["reference"],
        cfg["reward_fn"] or reward_model,
    )

    out = P.train(
        policy,
        ref_model,
        tok,
        prompts,
        reward_fn,
        ppo_cfg,
        accelerator=accelerator,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg["checkpoint_every"],
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
        info={**info, "ppo": {"steps": ppo_cfg.steps, "reward": cfg["reward_fn"] or "reward_model"}},
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
            "reward_first": mean("reward_mean", history[:3]),
            "reward_last": mean("reward_mean", history[-3:]),
            "kl_last": history[-1]["kl"] if history else None,
            "kl_coef_last": history[-1]["kl_coef"] if history else None,
            "entropy_last": history[-1]["entropy"] if history else None,
            "eos_frac_last": history[-1]["eos_frac"] if history else None,
            "seconds_per_step": total / len(ran) if ran else None,
            "time_share": {k: round(v / total, 3) for k, v in times.items()},
            "reference": cfg["reference"],
            **placed.metrics(),
            "device": str(
                accelerator.device
            ),  # accelerate's: cuda:LOCAL_RANK when there is one, as device.resolve_device
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "seconds": round(time.time() - t0, 1),
            **launch.summary(launcher, ppo_cfg.batch_size),  # prompts per rollout: batch_size on each process
        },
    )


if __name__ == "__main__":
    main()

"""PPO on SmolLM2-135M: seconds per step, where the time goes, and what the reference costs in memory.

    python bench/ppo.py [--steps 4] [--threads 1]

The policy is the 135M base model (models/base, or the GGUF converted into a temporary directory
when the base stage has not run), with the ppo section of params.yaml as it stands (the stage's
default). The reward model is the same weights with a fresh, seeded score head: a base-initialised
reward model, as the reward stage starts from. Prompts are data/sample's PPO prompt file.

Each reference variant runs in its own subprocess, one after the other, so peak RSS (ru_maxrss)
is that variant's alone:
    adapter   the reference is the policy with its LoRA switched off (one copy of the weights)
    copy      a separate frozen copy of the SFT weights
The first step is a warm-up and is left out of the per-step means. Published RLHF systems spend
most of a step generating (about 80% in the DeepSpeed-Chat and OpenRLHF reports); the share
measured here is printed beside that figure. Results go to bench/results/ppo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report  # bench/_report.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PUBLISHED_GENERATION_SHARE = 0.8


def model_dir(tmp: str) -> str:
    """models/base, or the packaged GGUF converted once into `tmp`."""
    if (ROOT / "models" / "base" / "config.json").is_file():
        return str(ROOT / "models" / "base")
    from selfalign import models

    out = Path(tmp) / "base"
    if not (out / "config.json").is_file():
        model, tok = models.load_source("gguf")
        models.save_model_dir(model, tok, out)
    return str(out)


def worker(policy_dir: str, reference: str, steps: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from selfalign import chat, params
    from selfalign import ppo as P

    cfg = params.resolve(P.PPOConfig, ROOT / "params.yaml", "ppo", [f"steps={steps}", f"reference={reference}"])
    if threads:
        torch.set_num_threads(threads)
    tok = chat.load_tokenizer(policy_dir, padding_side="left")
    texts = [r["prompt"] for r in json.loads((ROOT / "data" / "sample" / "oasst_ppo_prompts.json").read_text())]
    prompts = []
    for text in texts:
        msgs = [{"role": "user", "content": text}]
        ids = tok(chat.render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        if len(ids) <= cfg.max_prompt_len:
            prompts.append({"messages": msgs, "ids": ids})
    t = time.perf_counter()
    policy = P.PolicyWithValue(
        P.with_lora(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32), cfg.lora, seed=cfg.seed)
    )
    ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32) if reference == "copy" else None
    torch.manual_seed(0)
    rm_model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    rm_model.config.pad_token_id = tok.pad_token_id
    rm_tok = chat.load_tokenizer(policy_dir)
    load_s = time.perf_counter() - t
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reward_fn = P.reward_model_fn(rm_model.eval(), rm_tok, cfg.reward_batch_size, cfg.reward_max_len)
    hist = P.train(policy, ref, tok, prompts, reward_fn, cfg)["history"]
    timed = hist[1:] or hist
    keys = ("generate", "score", "logprobs", "optimise")
    return {
        "reference": reference,
        "steps": len(hist),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "ppo_epochs": cfg.ppo_epochs,
        "load_s": round(load_s, 1),
        "seconds_per_step": sum(sum(r[f"time_{k}"] for k in keys) for r in timed) / len(timed),
        "time": {k: sum(r[f"time_{k}"] for r in timed) / len(timed) for k in keys},
        "mean_response_length": sum(r["response_length"] for r in timed) / len(timed),
        "rss_after_load_mb": round(rss_loaded),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--worker", choices=["adapter", "copy"])
    ap.add_argument("--model")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0 = torch's default). 1 by default: on this shared CPU, 2 threads waiting "
        "on each other made generation with LoRA 12x slower than 1 thread",
    )
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.steps, args.threads)))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = model_dir(tmp)
        runs = {}
        for ref in ("adapter", "copy"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    ref,
                    "--model",
                    policy_dir,
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[ref] = json.loads(out.stdout.strip().splitlines()[-1])
    a, c = runs["adapter"], runs["copy"]
    total = a["seconds_per_step"]
    share = {k: v / total for k, v in a["time"].items()}
    print(
        f"PPO step on SmolLM2-135M ({a['batch_size']} prompts x {a['max_new_tokens']} tokens max, "
        f"{a['ppo_epochs']} epochs, {a['threads']} threads), mean of steps 2..{a['steps']}:"
    )
    for ref in ("adapter", "copy"):
        r = runs[ref]
        print(
            f"  reference={ref:<8} {r['seconds_per_step']:6.1f} s/step   peak RSS {r['peak_rss_mb']:6d} MB "
            f"(after loading {r['rss_after_load_mb']} MB)"
        )
    print("  time split (adapter): " + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
    print(
        f"  generation share: {share['generate']:.0%} here vs ~{PUBLISHED_GENERATION_SHARE:.0%} published "
        f"(ratio {share['generate'] / PUBLISHED_GENERATION_SHARE:.2f})"
    )
    print(
        f"  peak RSS copy / adapter: {c['peak_rss_mb'] / a['peak_rss_mb']:.2f}; "
        f"s/step copy / adapter: {c['seconds_per_step'] / a['seconds_per_step']:.2f}"
    )
    results = {
        "runs": runs,
        "share_adapter": share,
        "generation_share_vs_published": share["generate"] / PUBLISHED_GENERATION_SHARE,
        "peak_rss_ratio_copy_over_adapter": c["peak_rss_mb"] / a["peak_rss_mb"],
        "step_time_ratio_copy_over_adapter": c["seconds_per_step"] / a["seconds_per_step"],
    }
    _report.write("ppo", results)


if __name__ == "__main__":
    main()

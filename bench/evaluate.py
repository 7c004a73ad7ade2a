"""Evaluate-stage generation settings side by side: weights dtype and torch threads, on SmolLM2-135M.

    python bench/evaluate.py [--prompts 8] [--max-new-tokens 24] [--rounds 1]

The evaluate stage answers 36 prompts per model with the local engine (all 36 in one batch, greedy). This
runs the same engine on the first `--prompts` prompts of data/eval/prompts.jsonl (one per
category and language, in turn) under each setting, rounds interleaved so that a change in
machine load hits every setting alike, and reports wall time, CPU time and generated tokens per
second, each as a ratio to fp32 with torch's default threads, plus how many answers are
identical to fp32's. Writes bench/results/evaluate.json. models/base stands in for a policy.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import _report  # bench/_report.py, beside this script
import click

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SETTINGS = [("fp32", 0), ("bf16", 0), ("fp32", 1), ("bf16", 1)]  # (engine dtype, threads; 0 = default)


def interleaved(prompts: list[dict], n: int) -> list[dict]:
    """One prompt per (category, language) in turn, so a small n still spans every category."""
    groups: dict = {}
    for p in prompts:
        groups.setdefault((p["meta"]["category"], p["lang"]), []).append(p)
    out, i = [], 0
    while len(out) < n and any(i < len(g) for g in groups.values()):
        out += [g[i] for g in groups.values() if i < len(g)]
        i += 1
    return out[:n]


@click.command()
@click.option("--prompts", "n_prompts", default=8, show_default=True)
@click.option("--max-new-tokens", default=24, show_default=True)
@click.option("--rounds", default=1, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
def main(n_prompts, max_new_tokens, rounds, batch_size):
    import torch

    from selfalign import evaluate as ev
    from selfalign import llm

    default_threads = torch.get_num_threads()
    prompts = interleaved(ev.load_prompts(ROOT / "data" / "eval" / "prompts.jsonl"), n_prompts)
    reqs = [llm.Request(messages=ev.prompt_messages(p), max_tokens=max_new_tokens) for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _report.base_model_dir(tmp)
        # the evaluate stage's own engine spec (EvaluateConfig.engine) with each setting
        stage = ev.EvaluateConfig().engine
        engines = {
            s: llm.make_engine(stage.replace(model=model_dir, dtype=s[0], threads=s[1], batch_size=batch_size), None)
            for s in SETTINGS
        }
        for e in engines.values():
            _ = e.model  # load every model before timing anything
        runs: dict = {s: [] for s in SETTINGS}
        texts: dict = {}
        for _ in range(rounds):
            for s, e in engines.items():
                torch.set_num_threads(s[1] or default_threads)
                wall, cpu = time.perf_counter(), time.process_time()
                res = e.complete(reqs)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                tokens = sum(r.usage["completion_tokens"] for r in res)
                runs[s].append({"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": tokens})
                texts[s] = [r.text for r in res]
        torch.set_num_threads(default_threads)
    ref = SETTINGS[0]
    best = {s: min(r, key=lambda x: x["wall_s"]) for s, r in runs.items()}
    rows = []
    for s in SETTINGS:
        b, r0 = best[s], best[ref]
        rows.append(
            {
                "dtype": s[0],
                "threads": s[1] or default_threads,
                "wall_s": b["wall_s"],
                "cpu_s": b["cpu_s"],
                "tokens": b["tokens"],
                "tok_per_s": round(b["tokens"] / b["wall_s"], 1),
                "speedup_wall": round(r0["wall_s"] / b["wall_s"], 2),
                "speedup_tok_per_s": round((b["tokens"] / b["wall_s"]) / (r0["tokens"] / r0["wall_s"]), 2),
                "same_answers_as_fp32": sum(a == c for a, c in zip(texts[s], texts[ref], strict=True)),
                "runs": runs[s],
            }
        )
    load = os.getloadavg()[0]
    print(
        f"{len(reqs)} prompts x {max_new_tokens} new tokens, batch {batch_size}, best of {rounds}, "
        f"load average {load:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{'dtype':9} {'threads':>7} {'wall s':>7} {'cpu s':>7} {'tok/s':>6} {'x wall':>7} {'x tok/s':>8} {'same':>5}"
    )
    for r in rows:
        print(
            f"{r['dtype']:9} {r['threads']:>7} {r['wall_s']:>7} {r['cpu_s']:>7} {r['tok_per_s']:>6} "
            f"{r['speedup_wall']:>7} {r['speedup_tok_per_s']:>8} {r['same_answers_as_fp32']:>2}/{len(reqs)}"
        )
    _report.write(
        "evaluate",
        {
            "prompts": len(reqs),
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "rounds": rounds,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()

"""Evaluate-stage perplexity side by side in each weights dtype (evaluate.ppl_dtype), on SmolLM2-135M.

    python bench/perplexity.py [--rounds 2] [--heldout data/clean/seed.jsonl]

The evaluate stage scores every model's perplexity on the seed records sft held out and on the eval
prompts' reference answers. This runs selfalign.evaluate.perplexity on the same conversations (the
default run's prompt selection; the held-out records when --heldout exists) with the weights loaded in
fp32 and in bf16, rounds interleaved so that a change in machine load hits both alike, and reports wall
time, its ratio to fp32, and how far each perplexity lies from fp32's. Writes bench/results/perplexity.json.
models/base stands in for every evaluated model.
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

DTYPES = ("fp32", "bf16")


@click.command()
@click.option("--rounds", default=2, show_default=True)
@click.option("--heldout", default=str(ROOT / "data" / "clean" / "seed.jsonl"), show_default=True)
@click.option("--eval-fraction", default=0.1, show_default=True, help="sft.train.eval_fraction")
def main(rounds, heldout, eval_fraction):
    from selfalign import chat, device, models, records
    from selfalign import evaluate as ev

    cfg = ev.EvaluateConfig()
    prompts = ev.select_prompts(
        ev.load_prompts(ROOT / "data" / "eval" / "prompts.jsonl"), cfg.prompts_per_category, cfg.languages
    )
    sets = {"references": ev.reference_conversations([p for p in prompts if p["meta"].get("reference")])}
    if Path(heldout).is_file():
        sets["heldout"] = ev.heldout_conversations(records.load(heldout), eval_fraction, cfg.heldout_max)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _report.base_model_dir(tmp)
        tok = chat.load_tokenizer(model_dir)
        loaded = {d: models.load_model(model_dir, device.DTYPE_OF[d]) for d in DTYPES}
        runs: dict = {d: [] for d in DTYPES}
        ppl: dict = {}
        for _ in range(rounds):
            for d, model in loaded.items():
                wall, cpu = time.perf_counter(), time.process_time()
                ppl[d] = {
                    name: ev.perplexity(model, tok, convs, cfg.ppl_batch_size, cfg.ppl_max_len)["perplexity"]
                    for name, convs in sets.items()
                }
                runs[d].append(
                    {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
                )
    best = {d: min(r["wall_s"] for r in runs[d]) for d in DTYPES}
    rows = [
        {
            "dtype": d,
            "wall_s": best[d],
            "speedup_wall": round(best["fp32"] / best[d], 2),
            "perplexity": ppl[d],
            "rel_diff_vs_fp32": {k: round(ppl[d][k] / ppl["fp32"][k] - 1, 5) for k in ppl[d]},
            "runs": runs[d],
        }
        for d in DTYPES
    ]
    sizes = ", ".join(f"{len(c)} {k}" for k, c in sets.items())
    print(f"{sizes} conversations, best of {rounds}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'dtype':6} {'wall s':>7} {'x wall':>7}  perplexity (relative difference to fp32)")
    for r in rows:
        vals = "  ".join(f"{k} {v} ({r['rel_diff_vs_fp32'][k]:+.2%})" for k, v in r["perplexity"].items())
        print(f"{r['dtype']:6} {r['wall_s']:>7} {r['speedup_wall']:>7}  {vals}")
    _report.write(
        "perplexity", {"conversations": {k: len(c) for k, c in sets.items()}, "rounds": rounds, "results": rows}
    )


if __name__ == "__main__":
    main()

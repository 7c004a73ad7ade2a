"""sft@backward's held-out instruction eval side by side in each weights dtype (sft.train.heldout_eval.dtype).

    python bench/backward.py [--backward models/backward] [--base models/base] [--rounds 1]

The sft stage scores a trained backward model by the instructions it writes, greedy, for the seed
responses it held out (selfalign/backward.py), next to its base prompted the same way. This runs that
eval (backward.predict for both models, then ROUGE-L against the true instructions) with fp32 and with
bf16 weights, rounds interleaved so that a change in machine load hits both alike, and reports wall time,
its ratio to fp32, and both models' mean ROUGE-L under each dtype. Needs the sft@backward stage's output.
Writes bench/results/backward.json.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import _report  # bench/_report.py, beside this script
import click

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = ("fp32", "bf16")


@click.command()
@click.option("--backward", "backward_dir", default=str(ROOT / "models" / "backward"), show_default=True)
@click.option("--base", "base_dir", default=str(ROOT / "models" / "base"), show_default=True)
@click.option("--params", "params_file", default=str(ROOT / "params.yaml"), show_default=True)
@click.option("--rounds", default=1, show_default=True)
def main(backward_dir, base_dir, params_file, rounds):
    from selfalign import backward, params, sft

    if not (Path(backward_dir) / "config.json").is_file():
        print(f"skipped: {backward_dir} holds no model (`dvc repro sft@backward` makes one)")
        return
    cfg = params.resolve(sft.SFTConfig, params_file, "sft", ())
    h = cfg.train.heldout_eval
    os.chdir(ROOT)  # the run's source paths are relative to the repository
    pairs = backward.heldout_pairs(
        backward.reversed_sources(cfg.runs["backward"]), cfg.train.eval_fraction, h.max_examples
    )
    refs = [p["instruction"] for p in pairs]
    runs: dict = {d: [] for d in DTYPES}
    rouge: dict = {}
    for _ in range(rounds):
        for d in DTYPES:
            wall = time.perf_counter()
            got = {
                name: backward.predict(model_dir, pairs, h.max_new_tokens, h.batch_size, None, d)
                for name, model_dir in (("backward", backward_dir), ("base", base_dir))
            }
            runs[d].append(round(time.perf_counter() - wall, 2))
            rouge[d] = {
                name: round(statistics.fmean(backward.rouge_l(refs, [t for t, _ in out])), 4)
                for name, out in got.items()
            }
    best = {d: min(runs[d]) for d in DTYPES}
    rows = [
        {"dtype": d, "wall_s": best[d], "speedup_wall": round(best["fp32"] / best[d], 2), "rougeL": rouge[d]}
        for d in DTYPES
    ]
    print(f"{len(pairs)} held-out pairs, both models, best of {rounds}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':6} {'wall s':>7} {'x wall':>7}  ROUGE-L backward / base")
    for r in rows:
        print(
            f"{r['dtype']:6} {r['wall_s']:>7} {r['speedup_wall']:>7}  {r['rougeL']['backward']} / {r['rougeL']['base']}"
        )
    _report.write("backward", {"pairs": len(pairs), "rounds": rounds, "results": rows})


if __name__ == "__main__":
    main()

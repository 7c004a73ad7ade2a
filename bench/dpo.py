"""dpo's held-out log-probabilities side by side: the library's answer-positions-only pass vs a full softmax.

    python bench/dpo.py [--model models/final] [--pairs 32] [--rounds 2]

The dpo stage scores its held-out pairs by the summed log-probability of each answer under the policy and
the reference (selfalign.dpo.sequence_logps: left-padded batches, logits for the answer positions only).
This times that against the textbook computation (right-padded batches, the vocabulary-wide log-softmax
at every position, then the answer's tokens picked out), rounds interleaved, on the first `--pairs`
preference pairs of data/clean/preference.jsonl as the stage encodes them, and reports wall time, the
ratio, and the largest difference between the two sums. Writes bench/results/dpo.json.
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


def full_softmax_logps(model, rows: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, float]]:
    """The baseline: right-padded batches, log_softmax over the whole vocabulary at every position."""
    import torch

    seqs, spans = [], []
    for r in rows:
        for key in ("chosen_ids", "rejected_ids"):
            seqs.append(r["prompt_ids"] + r[key])
            spans.append((len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r[key])))
    out = [0.0] * len(seqs)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            idx = list(range(start, min(start + batch_size, len(seqs))))
            width = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
            for row, i in enumerate(idx):
                a, b = spans[i]
                out[i] = float(logp[row, a - 1 : b - 1].sum())
    return [(out[2 * k], out[2 * k + 1]) for k in range(len(rows))]


@click.command()
@click.option("--model", "model_dir", default=None, help="Default: models/final if built, else the base model.")
@click.option("--pairs", "n_pairs", default=32, show_default=True)
@click.option("--rounds", default=2, show_default=True)
def main(model_dir, n_pairs, rounds):
    from selfalign import chat, models, records
    from selfalign import dpo as D
    from selfalign import reward as rm

    cfg = D.DPOConfig()
    prefs = ROOT / "data" / "clean" / "preference.jsonl"
    if not prefs.is_file():
        print(f"skipped: no {prefs.relative_to(ROOT)} (`dvc repro clean` makes it)")
        return
    pairs, _ = rm.select_pairs(records.load(prefs), cfg.sources)
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            final = ROOT / "models" / "final"
            model_dir = str(final) if (final / "config.json").is_file() else _report.base_model_dir(tmp)
        tok = chat.load_tokenizer(model_dir)
        rows, _ = D.encode_pairs(tok, pairs[:n_pairs], None, cfg)
        model = models.load_model(model_dir, "float32")
        ways = {"full_softmax": full_softmax_logps, "answer_positions": D.sequence_logps}
        runs: dict = {w: [] for w in ways}
        sums: dict = {}
        for _ in range(rounds):
            for w, f in ways.items():
                wall = time.perf_counter()
                sums[w] = f(model, rows, tok.pad_token_id, cfg.eval_batch_size)
                runs[w].append(round(time.perf_counter() - wall, 2))
    best = {w: min(r) for w, r in runs.items()}
    flat = {w: [v for pair in s for v in pair] for w, s in sums.items()}
    diff = max(abs(a - b) for a, b in zip(flat["full_softmax"], flat["answer_positions"], strict=True))
    answer_share = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows) / sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )
    print(
        f"{len(rows)} pairs ({answer_share:.0%} of the tokens are answers), batches of {cfg.eval_batch_size}, "
        f"best of {rounds}, load average {os.getloadavg()[0]:.1f}"
    )
    for w in ways:
        print(f"{w:17} {best[w]:>7} s  x{best['full_softmax'] / best[w]:.2f}")
    print(f"largest difference between the two sums: {diff:.2e} nats")
    _report.write(
        "dpo",
        {
            "model": str(model_dir),
            "pairs": len(rows),
            "answer_token_share": round(answer_share, 3),
            "rounds": rounds,
            "wall_s": best,
            "runs": runs,
            "speedup": round(best["full_softmax"] / best["answer_positions"], 2),
            "max_abs_diff_nats": diff,
        },
    )


if __name__ == "__main__":
    main()

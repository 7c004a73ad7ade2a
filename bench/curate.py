"""Digit-probability scoring vs generate-then-parse, on SmolLM2-135M, side by side in one run.

    python bench/curate.py [--pairs 24] [--batch-size 8] [--dtype fp32]

The same candidates (real seed pairs from data/sample/oasst_seed.guanaco.jsonl, half of them with a
mismatched response) are scored four ways, with the rubric of prompts/curate.txt:

- digits:           the curate stage's default: one batched forward pass per candidate, expected score over 1..5,
                    the rubric's shared prefix computed once;
- digits_full:      the same without prefix sharing (every prompt run whole);
- gen_batched:      the stage's generate mode: selfalign.llm local engine, batch 8, 8 new tokens, strict "Score: N";
- gen_reasoning:    the paper's way, as public reimplementations run it: the rubric asks for a brief reasoning and
                    then "Score: N" on the last line; one candidate at a time, 128 new tokens, strict parse of the
                    last line.

Prints speed ratios and parse rates (strict, and lenient = any digit 1-5 in the reply); writes
bench/results/curate.json. models/base stands in for models/m0.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

import _report  # bench/_report.py, beside this script
import click

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
LENIENT = re.compile(r"\b([1-5])\b")
REASONING_LAST_LINE = (
    "First explain briefly how you rated the answer. Then write the score on the last line, in the form "
    '"Score: N", where N is 1, 2, 3, 4 or 5.'
)


def seed_pairs(n: int) -> tuple[list[tuple[str, str]], list[bool]]:
    """n (instruction, response) pairs: the first half real, the second half with another pair's response."""
    from selfalign import readers

    recs = [
        r
        for r in readers.read(
            "guanaco", str(ROOT / "data" / "sample" / "oasst_seed.guanaco.jsonl"), lang="en", source="oasst"
        )
        if not readers.is_rejected(r)
    ][:n]
    pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs]
    half = len(pairs) // 2
    mismatched = [(pairs[i][0], pairs[(i + 7) % len(pairs)][1]) for i in range(half, len(pairs))]
    return pairs[:half] + mismatched, [True] * half + [False] * (len(pairs) - half)


def last_line_score(text: str) -> int | None:
    from selfalign import curate

    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return curate.parse_score(lines[-1]) if lines else None


def mean(xs):
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else None


@click.command()
@click.option("--pairs", "n_pairs", default=24, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option(
    "--threads",
    default=0,
    show_default=True,
    help="torch threads (0: torch's default). On a shared, "
    "busy machine 1 thread avoids OpenMP oversubscription, which slowed generation ~10x here.",
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
def main(n_pairs, batch_size, threads, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    from selfalign import chat, curate, device, llm

    if threads:
        torch.set_num_threads(threads)

    rubric = curate.load_rubric(ROOT / "prompts" / "curate.txt")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _report.base_model_dir(tmp)
        pairs, matched = seed_pairs(n_pairs)
        tok = chat.load_tokenizer(model_dir, padding_side="left")
        pairs = [(i, curate.clip_tokens(tok, r, 384)[0]) for i, r in pairs]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, device.DTYPE_OF[dtype]))

        prompts = [curate.scoring_prompt(tok, rubric, i, r, "Score: ") for i, r in pairs]
        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out["prompt_tokens_mean"] = mean(len(e) for e in enc)
        out["shared_prefix_tokens"] = curate.common_prefix(enc)
        for name, share in (("digits", True), ("digits_full", False)):
            t = time.perf_counter()
            scores = curate.expected_scores(model, tok, prompts, batch_size=batch_size, share_prefix=share)
            wall = time.perf_counter() - t
            out[name] = {
                "wall_s": round(wall, 2),
                "scored": len(scores),
                "parse_rate": 1.0,
                "digit_mass_mean": mean(s["digit_mass"] for s in scores),
                "score_mean_matched": mean(s["score"] for s, m in zip(scores, matched, strict=True) if m),
                "score_mean_mismatched": mean(s["score"] for s, m in zip(scores, matched, strict=True) if not m),
            }
            print(f"{name:15s}: {wall:7.1f} s, parse rate 100% (digit mass {out[name]['digit_mass_mean']})", flush=True)
        del model

        reasoning = rubric.replace(rubric.strip().splitlines()[-1], REASONING_LAST_LINE)
        runs = (
            ("gen_batched", batch_size, 8, rubric, curate.parse_score),
            ("gen_reasoning", 1, 128, reasoning, last_line_score),
        )
        for name, bs, max_tokens, text, parse in runs:
            reqs = [llm.Request(messages=curate.rubric_messages(text, i, r), max_tokens=max_tokens) for i, r in pairs]
            engine = llm.make_engine(llm.EngineSpec(kind="local", model=model_dir, batch_size=bs, dtype=dtype))
            engine.model  # noqa: B018 - load outside the timed region
            t = time.perf_counter()
            results = engine.complete(reqs, template_id="bench")
            wall = time.perf_counter() - t
            texts = [r.text or "" for r in results]
            strict = [parse(x) for x in texts]
            lenient = [LENIENT.search(x) for x in texts]
            out[name] = {
                "batch_size": bs,
                "max_new_tokens": max_tokens,
                "wall_s": round(wall, 2),
                "parse_rate_strict": round(sum(s is not None for s in strict) / len(texts), 4),
                "parse_rate_lenient": round(sum(m is not None for m in lenient) / len(texts), 4),
                "unparsed_strict": sum(s is None for s in strict),
                "replies": texts[:4],
            }
            print(
                f"{name:15s}: {wall:7.1f} s, parse rate strict {out[name]['parse_rate_strict']:.0%}, "
                f"lenient {out[name]['parse_rate_lenient']:.0%}",
                flush=True,
            )

    for name in ("digits_full", "gen_batched", "gen_reasoning"):
        out[f"speedup_vs_{name}"] = round(out[name]["wall_s"] / out["digits"]["wall_s"], 2)
    print(
        f"speed-up of digits: {out['speedup_vs_gen_batched']:.2f}x vs the stage's generate mode (batch "
        f"{batch_size}, 8 tokens), {out['speedup_vs_gen_reasoning']:.2f}x vs reasoning-then-score one by one "
        f"(goal >= 10x); prefix sharing alone {out['speedup_vs_digits_full']:.2f}x"
    )
    print(
        f"mean expected score: matched pairs {out['digits']['score_mean_matched']}, "
        f"mismatched {out['digits']['score_mean_mismatched']}"
    )
    _report.write(
        "curate", {"model": model_dir, "pairs": len(pairs), "dtype": dtype, "threads": torch.get_num_threads(), **out}
    )


if __name__ == "__main__":
    main()

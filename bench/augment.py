"""Batched backtranslation vs one sequence at a time, on SmolLM2-135M, side by side in one run.

    python bench/augment.py [--segments 16] [--batch-size 8] [--max-new-tokens 48] [--dtypes bf16,fp32]

Both runs go through the augment stage's engine (selfalign.llm local engine, greedy, no cache) on
the same web segments from data/sample/c4_web.jsonl, with the stage's prompt (prompts/backward.txt
around the segment; models/base stands in for models/backward), once per dtype. Prints the
wall-time ratio and how many of the greedy outputs are identical; writes bench/results/augment.json.
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


def web_segments(n: int) -> list[dict]:
    from selfalign import readers

    segs = [
        r
        for r in readers.read("c4", str(ROOT / "data" / "sample" / "c4_web.jsonl"), lang="en", source="c4")
        if not readers.is_rejected(r)
    ]
    return segs[:n]


@click.command()
@click.option("--segments", default=16, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option(
    "--threads",
    default=0,
    show_default=True,
    help="torch threads (0: torch's default). On a shared, "
    "busy machine 1 thread avoids OpenMP oversubscription, which slowed generation ~10x here.",
)
@click.option(
    "--dtypes",
    default="bf16,fp32",
    show_default=True,
    help="Comma-separated; each is one side-by-side comparison.",
)
@click.option(
    "--max-chars",
    default=0,
    show_default=True,
    help="Cut each segment to this many characters (at a "
    "space; 0 = whole). Prefill is the same work batched or not, so the ratio grows as prompts shrink. "
    "Writes bench/results/augment_chars<N>.json.",
)
def main(segments, batch_size, max_new_tokens, threads, dtypes, max_chars):
    import torch

    from selfalign import augment, llm

    if threads:
        torch.set_num_threads(threads)
    prompt = ROOT / "prompts" / "backward.txt"
    template = augment.load_template(prompt) if prompt.is_file() else None
    result = {
        "segments": segments,
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        "prompt": str(prompt.relative_to(ROOT)) if template else "segment alone",
        "by_dtype": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = result["model"] = _report.base_model_dir(tmp)
        segs = web_segments(segments)
        if max_chars:
            segs = [{**s, "text": s["text"][:max_chars].rsplit(" ", 1)[0]} for s in segs]
        reqs = [
            llm.Request(
                messages=[{"role": "user", "content": augment.user_turn(template, s["text"])}],
                max_tokens=max_new_tokens,
            )
            for s in segs
        ]
        from selfalign import chat

        tok = chat.load_tokenizer(model_dir)
        prompt_tokens = [
            len(tok(chat.render(tok, r.messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
            for r in reqs
        ]
        result["max_chars"] = max_chars
        result["prompt_tokens_mean"] = round(sum(prompt_tokens) / len(prompt_tokens), 1)
        print(f"{len(reqs)} prompts of {result['prompt_tokens_mean']} tokens on average, up to {max_new_tokens} new")
        for dtype in dtypes.split(","):
            runs = {}
            for name, bs in (("batched", batch_size), ("sequential", 1)):
                engine = llm.make_engine(llm.EngineSpec(kind="local", model=model_dir, batch_size=bs, dtype=dtype))
                engine.model  # noqa: B018 - load outside the timed region
                t = time.perf_counter()
                results = engine.complete(reqs, template_id="bench")
                wall = time.perf_counter() - t
                tokens = sum(r.usage["completion_tokens"] for r in results)
                runs[name] = {
                    "batch_size": bs,
                    "wall_s": round(wall, 2),
                    "completion_tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1),
                    "texts": [r.text for r in results],
                    "hit_max_new_tokens": sum(r.finish_reason == "length" for r in results),
                }
                print(
                    f"{dtype:8s} {name:10s} batch {bs}: {wall:7.1f} s, {tokens} tokens, {tokens / wall:6.1f} tok/s",
                    flush=True,
                )
            same = sum(a == b for a, b in zip(runs["batched"]["texts"], runs["sequential"]["texts"], strict=True))
            speedup = runs["sequential"]["wall_s"] / runs["batched"]["wall_s"]
            print(
                f"{dtype:8s} speed-up batched/sequential: {speedup:.2f}x (goal >= 5x); identical greedy outputs: "
                f"{same}/{len(reqs)}",
                flush=True,
            )
            parsed = [augment.parse_instruction(t) for t in runs["batched"]["texts"]]
            result["by_dtype"][dtype] = {
                "speedup": round(speedup, 2),
                "identical_outputs": same,
                **{k: {f: v for f, v in r.items() if f != "texts"} for k, r in runs.items()},
                "examples": [
                    {"segment": s["text"][:160], "instruction": p} for s, p in zip(segs[:4], parsed[:4], strict=True)
                ],
            }
    _report.write(f"augment_chars{max_chars}" if max_chars else "augment", result)


if __name__ == "__main__":
    main()

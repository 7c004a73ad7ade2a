"""How often a model's greedy answers to evaluate's prompts end at end-of-turn, at several caps, in one run.

    python scripts/stop_rate.py models/base --cap 384 --decode '{}' --decode '{"repetition_penalty": 1.2}'

Selects the prompts as evaluate does (the first `--per-category` of each category and language), generates once
to `--cap` new tokens per decoding setting (bf16, batched, 1 thread) and prints, per cap up to it, how many
answers ended with the end-of-turn token by then, and per language how many ended at all. This is the
measurement behind evaluate.max_new_tokens (BENCHMARKS.md, params).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import click

from selfalign import chat, records


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", default="data/eval/prompts.jsonl", show_default=True)
@click.option("--langs", default="en,fr,ms", show_default=True)
@click.option("--per-category", default=2, show_default=True)
@click.option("--cap", default=384, show_default=True)
@click.option("--decode", multiple=True, default=["{}"], help="JSON of extra generate() arguments; repeatable.")
def main(model_dir, prompts, langs, per_category, cap, decode):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    seen, chosen = defaultdict(int), []
    for rec in records.load(prompts, "prompt"):
        key = (rec["meta"]["category"], rec["lang"])
        if rec["lang"] in langs.split(",") and seen[key] < per_category:
            seen[key] += 1
            chosen.append(rec)
    info = (
        json.loads((Path(model_dir) / "selfalign.json").read_text())
        if (Path(model_dir) / "selfalign.json").exists()
        else {}
    )
    tok = chat.load_tokenizer(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [
        chat.render(tok, records.with_system(info.get("system"), [{"role": "user", "content": r["prompt"]}]), True)
        for r in chosen
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tok.convert_tokens_to_ids(chat.end_of_turn(tok))
    for setting in decode:
        kw = json.loads(setting)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=cap, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id, **kw
            )
        ends = [g.index(eos) + 1 if eos in g else None for g in out[:, enc["input_ids"].shape[1] :].tolist()]
        caps = {c: sum(n is not None and n <= c for n in ends) for c in (64, 128, 192, 256, 384, 512, 768) if c <= cap}
        by_lang = defaultdict(lambda: [0, 0])
        for r, n in zip(chosen, ends, strict=True):
            by_lang[r["lang"]][0] += n is not None
            by_lang[r["lang"]][1] += 1
        click.echo(
            f"{model_dir} {kw} {time.perf_counter() - start:.0f} s: stopped by cap "
            + ", ".join(f"{c}: {k}/{len(chosen)}" for c, k in caps.items())
            + "; by language "
            + ", ".join(f"{lang} {a}/{b}" for lang, (a, b) in sorted(by_lang.items()))
        )


if __name__ == "__main__":
    main()

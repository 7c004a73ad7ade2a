"""SFT training speed: selfalign's loop against a plain HF Trainer loop, and model FLOP utilisation.

    python bench/sft.py [--model models/base] [--steps 5] [--precision auto] [--trl] [--other-precision]

Same model (SmolLM2-135M; converted from the packaged GGUF into a temp dir if models/base is
missing), same seed examples (data/sample's guanaco pairs), the default LoRA of stages/sft.py,
same precision (auto: what the stage would pick on this machine), same 4 rows per step, measured
side by side in one process:

- selfalign: stages/sft.py's path (packed rows of max_len with restarting position_ids, loss
  projected onto the vocabulary only at target tokens, frozen base in bf16 under bf16);
- plain: AutoModel in fp32 + the same LoRA + Trainer + DataCollatorForSeq2Seq padding each batch
  of 4 examples to its longest (the usual recipe);
- trl (--trl): TRL's SFTTrainer, prompt/completion loss, padding, no activation checkpointing;
- --other-precision adds selfalign's loop in the other precision (bf16 <-> fp32).

Tokens/s counts real (non-padding) tokens over steps 2..N (step 1 warms up). MFU = achieved model
FLOP/s over the matmul rate of the loop's compute dtype, measured here with a 2048^3 torch.matmul
(the bf16 rate is also reported, as asked). A LoRA step costs 4 * N FLOPs per token: forward 2N,
backward through the frozen weights 2N (no weight gradients for them); adapter and attention-score
FLOPs are left out (a few %); a full fine-tuning step would be 6 * N. N = 134.5M, the embedding
counted once, as the tied lm_head matmul. Results go to bench/results/sft.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selfalign import chat, io, models, readers, training  # noqa: E402

SYSTEM = "Answer in the style of an AI Assistant."


def matmul_rate(dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def base_dir(arg: str | None, tmp: Path) -> str:
    if arg and Path(arg, "config.json").is_file():
        return arg
    if Path(ROOT / "models/base/config.json").is_file():
        return str(ROOT / "models/base")
    print("models/base missing: converting the packaged GGUF into a temp dir", flush=True)
    model, tok = models.load_source("gguf")
    return str(models.save_model_dir(model, tok, tmp / "base"))


def seed_examples(tok, max_len: int, tmp: Path) -> tuple[list[dict], list[list[dict]]]:
    """(tokenized examples, their conversations) for data/sample's seed pairs under the seed tag."""
    recs = [r for r in readers.read("guanaco", str(ROOT / "data/sample/oasst_seed.guanaco.jsonl"), "en", "sample")
            if not readers.is_rejected(r)]
    io.write_jsonl(tmp / "seed.jsonl", recs)
    data = training.read_source(tok, str(tmp / "seed.jsonl"), SYSTEM, max_len, eval_fraction=0.0)
    convs = {r["id"]: training.conversation(r, SYSTEM) for r in recs}
    random.Random(0).shuffle(data.train)
    return data.train, [convs[e["id"]] for e in data.train]


class StepTimer:
    """Per-step wall times, from a TrainerCallback."""

    def __init__(self):
        from transformers import TrainerCallback

        times = self.times = []

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter() - self.t)

        self.callback = CB()


def run_trainer(model, rows, collator, steps: int, tmp: Path, cfg: dict, trainer_cls=None) -> list[float]:
    from transformers import Trainer

    trainer_cls = trainer_cls or Trainer
    args = training.training_args({**cfg, "save_steps": 10**6}, tmp / "ckpt", steps, False, None)
    args.save_strategy = "no"
    timer = StepTimer()
    trainer_cls(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[timer.callback]).train()
    return timer.times


def summarize(name: str, precision: str, times: list[float], real_tokens: list[int], padded_tokens: list[int] | None,
              flops_per_token: float, peaks: dict) -> dict:
    t = sum(times[1:])
    tok_s = sum(real_tokens[1: len(times)]) / t
    return {"loop": name, "precision": precision, "steps_timed": len(times) - 1, "seconds_per_step": round(t / (len(times) - 1), 3),
            "tokens_per_step": round(sum(real_tokens[1: len(times)]) / (len(times) - 1), 1),
            "padding_share": None if padded_tokens is None else
            round(1 - sum(real_tokens[1: len(times)]) / sum(padded_tokens[1: len(times)]), 3),
            "tokens_per_second": round(tok_s, 1), "model_tflops": round(tok_s * flops_per_token / 1e12, 4),
            "mfu": round(tok_s * flops_per_token / peaks[precision], 4),
            "mfu_vs_bf16_matmul": round(tok_s * flops_per_token / peaks["bf16"], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--trl", action="store_true", help="also time TRL's SFTTrainer")
    ap.add_argument("--other-precision", action="store_true", help="also time selfalign's loop in the other precision")
    ap.add_argument("--out", default=str(ROOT / "bench/results/sft.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    spec = importlib.util.spec_from_file_location("stage_sft", ROOT / "stages/sft.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    precision = training.resolve_precision(a.precision)
    lora = stage.DEFAULTS["train"]["lora"]
    cfg = {**stage.DEFAULTS["train"], "max_len": a.max_len, "batch_size": a.batch_size, "precision": precision,
           "warmup_ratio": 0.0, "logging_steps": 10**6}

    peaks = {"bf16": matmul_rate(torch.bfloat16), "fp32": matmul_rate(torch.float32)}
    print(f"matmul 2048^3: bf16 {peaks['bf16'] / 1e12:.3f} TFLOP/s, fp32 {peaks['fp32'] / 1e12:.3f} TFLOP/s, "
          f"{torch.get_num_threads()} threads, loops in {precision}, load {os.getloadavg()[0]:.1f}", flush=True)

    mdir = base_dir(a.model, tmp)
    tok = chat.load_tokenizer(mdir)
    examples, convs = seed_examples(tok, a.max_len, tmp)
    n_params = sum(p.numel() for p in models.load_model(mdir).parameters())
    fpt = 4 * n_params
    need = a.steps * a.batch_size
    results = []

    def report(name, prec, times, batches, padded=True):
        real = [sum(len(r["input_ids"]) for r in b) for b in batches]
        pad = [len(b) * max(len(r["input_ids"]) for r in b) for b in batches] if padded else None
        results.append(summarize(name, prec, times, real, pad, fpt, peaks))
        print(results[-1], flush=True)

    # selfalign: packed rows.
    rows = training.pack(examples, a.max_len)
    rows = (rows * (need // len(rows) + 1))[:need]
    batches = [rows[i * a.batch_size:(i + 1) * a.batch_size] for i in range(a.steps)]
    other = {"bf16": "fp32", "fp32": "bf16"}[precision]
    for prec in [precision] + ([other] if a.other_precision else []):
        model = models.load_for_training(mdir, "lora", lora, prec)
        times = run_trainer(model, rows, training.PackedCollator(tok.pad_token_id), a.steps, tmp / "ours",
                            {**cfg, "precision": prec}, training.trainer_class())
        report("selfalign" if prec == precision else f"selfalign_{prec}", prec, times, batches)
        del model

    # plain: one example per row, padded per batch, fp32 master weights (autocast under bf16).
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    exs = (examples * (need // len(examples) + 1))[:need]
    plain_rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in exs]
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=training.IGNORE)
    times = run_trainer(model, plain_rows, collator, a.steps, tmp / "plain", cfg)
    report("plain_hf_trainer", precision, times, [plain_rows[i * a.batch_size:(i + 1) * a.batch_size]
                                                  for i in range(a.steps)])
    del model

    if a.trl:
        times = run_trl(mdir, tok, (convs * (need // len(convs) + 1))[:need], lora, precision, a, tmp)
        mean = sum(len(e["input_ids"]) for e in exs) / len(exs)  # TRL samples at random: mean real tokens per row
        report("trl_sft_trainer", precision, times, [[{"input_ids": [0] * round(mean)}] * a.batch_size] * a.steps,
               padded=False)

    by = {r["loop"]: r for r in results}
    ours, plain = by["selfalign"], by["plain_hf_trainer"]
    out = {"model": mdir, "params": n_params, "flops_per_token": fpt, "flops_formula": "4 * N (LoRA)",
           "precision": precision, "lora": lora, "max_len": a.max_len, "batch_size": a.batch_size,
           "matmul_tflops": {k: round(v / 1e12, 4) for k, v in peaks.items()},
           "threads": torch.get_num_threads(), "loadavg_1min": round(os.getloadavg()[0], 2), "results": results,
           "ratio_tokens_per_second_selfalign_vs_plain": round(ours["tokens_per_second"] / plain["tokens_per_second"], 3)}
    if "trl_sft_trainer" in by:
        out["ratio_tokens_per_second_selfalign_vs_trl"] = round(
            ours["tokens_per_second"] / by["trl_sft_trainer"]["tokens_per_second"], 3)
    if f"selfalign_{other}" in by:
        out[f"ratio_tokens_per_second_{precision}_vs_{other}"] = round(
            ours["tokens_per_second"] / by[f"selfalign_{other}"]["tokens_per_second"], 3)
    print(f"\ntokens/s ({precision})  selfalign {ours['tokens_per_second']}  plain {plain['tokens_per_second']}  "
          f"ratio {out['ratio_tokens_per_second_selfalign_vs_plain']}x")
    print(f"MFU (4N/token vs {precision} matmul {peaks[precision] / 1e12:.3f} TFLOP/s)  selfalign {ours['mfu']:.1%}  "
          f"plain {plain['mfu']:.1%};  vs bf16 matmul: selfalign {ours['mfu_vs_bf16_matmul']:.1%}")
    io.write_json(a.out, out)


def run_trl(mdir, tok, convs, lora, precision, a, tmp) -> list[float]:
    """TRL renders the same conversations itself; prompt/completion form gives it completion-only loss
    (SmolLM2's template has no {% generation %} markers for assistant_only_loss)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    data = [{"prompt": c[:-1], "completion": c[-1:]} for c in convs]
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    cfg = SFTConfig(output_dir=str(tmp / "trl"), max_length=a.max_len, per_device_train_batch_size=a.batch_size,
                    max_steps=a.steps, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
                    packing=False, bf16=precision == "bf16", report_to=[], save_strategy="no", logging_steps=10**6)
    timer = StepTimer()
    SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
               peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                      target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
               callbacks=[timer.callback]).train()
    return timer.times


if __name__ == "__main__":
    main()

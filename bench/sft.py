"""SFT training speed: selfalign's step against a plain HF step, and model FLOP utilisation.

    python bench/sft.py [--model models/base] [--rounds 8] [--precision auto] [--other-precision] [--clock cpu] [--trl]

Same model (SmolLM2-135M; converted from the packaged GGUF into a temp dir if models/base is
missing), same seed examples (data/sample's guanaco pairs, seed system tag), the default LoRA and
row length of stages/sft.py, same AdamW, 4 rows per step, and both loops in the SAME precision, so the
ratio measures the loop, not the dtype: each in the precision `auto` picks on this machine
(selfalign/device.py's probe, figures in the output), and both in fp32 as well when auto picks bf16:

- selfalign: the stage's step: packed rows with restarting position_ids (PackedCollator), loss
  projected onto the vocabulary only at target tokens (sft.trainer_class), frozen base in
  bf16 when computing in bf16;
- plain: AutoModel in fp32 + the same LoRA, DataCollatorForSeq2Seq padding each batch of 4
  examples to its longest, `model(**batch).loss` (what Trainer does by default), under bf16
  autocast when the precision is bf16 (Trainer's bf16=True);
- --other-precision: both loops in bf16 too when auto picks fp32 (every pair then runs in both);
- --trl: afterwards, not interleaved (so noisier), TRL's SFTTrainer for the same number of steps.
- --clock cpu: every time is CPU time of one torch thread (time.thread_time), for a machine whose other jobs
  swamp wall time (at load 15-20 on 2 cores a step took ~3 minutes and bf16 vs fp32 read 0.93x; in CPU time
  1.57x, as the probe of selfalign/device.py measures). Tokens/s are then per core.

The machine is shared and its load moves by the minute, so the loops are interleaved: every round
measures the bf16 and fp32 matmul rates (2048^3 torch.matmul, best of 2) and then runs one step of
each loop, alternating their order. Round 1 warms up and is dropped. Tokens/s counts real
(non-padding) tokens. MFU per round = achieved model FLOP/s / that round's matmul rate, reported
against the loop's own compute dtype and against bf16 (as asked), median over rounds. A LoRA step
costs 4 * N FLOPs per token: forward 2N, backward through the frozen weights 2N (they get no weight
gradients); adapter and attention-score FLOPs are left out (a few %); full fine-tuning would be 6 * N.
N = 134.5M, the embedding counted once, as the tied lm_head matmul. Results: bench/results/sft.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selfalign import chat, device, io, models, readers, sft  # noqa: E402

SYSTEM = "Answer in the style of an AI Assistant."


CLOCK = time.perf_counter  # --clock cpu: time.thread_time with one torch thread (a machine shared with other jobs)


def matmul_rate(dtype, n: int = 2048, reps: int = 2) -> float:
    """Best-of FLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        torch.matmul(a, b)
        best = min(best, CLOCK() - t)
    return 2 * n**3 / best


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
    recs = [
        r
        for r in readers.read("guanaco", str(ROOT / "data/sample/oasst_seed.guanaco.jsonl"), "en", "sample")
        if not readers.is_rejected(r)
    ]
    io.write_jsonl(tmp / "seed.jsonl", recs)
    data = sft.read_source(tok, str(tmp / "seed.jsonl"), SYSTEM, max_len, eval_fraction=0.0)
    convs = {r["id"]: sft.conversation(r, SYSTEM) for r in recs}
    random.Random(0).shuffle(data.train)
    return data.train, [convs[e["id"]] for e in data.train]


class Loop:
    """One training step at a time: loss, backward, AdamW; batches cycled."""

    def __init__(self, name: str, precision: str, model, batches: list[dict], loss_fn):
        self.name, self.precision, self.model, self.batches, self.loss_fn = name, precision, model, batches, loss_fn
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.model.train()
        self.times: list[float] = []
        self.tokens: list[int] = []

    def step(self, i: int) -> None:
        batch = self.batches[i % len(self.batches)]
        t = CLOCK()
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(CLOCK() - t)
        self.tokens.append(batch["_real"])  # real tokens, padding excluded


def plain_loss(precision):
    def fn(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(**{k: v for k, v in batch.items() if not k.startswith("_")}).loss

    return fn


def selfalign_loss(trainer):
    def fn(model, batch):
        return trainer.compute_loss(model, {k: v for k, v in batch.items() if not k.startswith("_")})

    return fn


def per_round_median(a: Loop, b: Loop) -> float:
    """Median over rounds of a's tokens/s over b's, both measured in the same round (round 1 dropped)."""
    return round(
        statistics.median(
            (an / at) / (bn / bt)
            for an, at, bn, bt in zip(a.tokens[1:], a.times[1:], b.tokens[1:], b.times[1:], strict=True)
        ),
        3,
    )


def with_real(batch: dict, real: int) -> dict:
    return {**batch, "_real": real}


def summarize(loop: Loop, rates: list[dict], fpt: float) -> dict:
    times, tokens = loop.times[1:], loop.tokens[1:]
    tok_s = sum(tokens) / sum(times)
    mfu = [n * fpt / t / r[loop.precision] for n, t, r in zip(tokens, times, rates[1:], strict=True)]
    mfu_bf16 = [n * fpt / t / r["bf16"] for n, t, r in zip(tokens, times, rates[1:], strict=True)]
    return {
        "loop": loop.name,
        "precision": loop.precision,
        "steps_timed": len(times),
        "seconds_per_step": round(sum(times) / len(times), 3),
        "tokens_per_step": round(sum(tokens) / len(times), 1),
        "tokens_per_second": round(tok_s, 1),
        "model_tflops": round(tok_s * fpt / 1e12, 4),
        "mfu_median": round(statistics.median(mfu), 4),
        "mfu_vs_bf16_matmul_median": round(statistics.median(mfu_bf16), 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=None, help="default: sft.train's (selfalign.sft.TrainConfig)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: sft.train's (selfalign.sft.TrainConfig)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--other-precision", action="store_true", help="when auto picks fp32, also time both loops in bf16")
    ap.add_argument("--trl", action="store_true", help="afterwards, time TRL's SFTTrainer (not interleaved)")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: CPU time of one torch thread, for a machine whose load would swamp wall time",
    )
    ap.add_argument("--out", default=str(ROOT / "bench/results/sft.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.clock == "cpu":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)  # the work then runs on the calling thread, and thread_time sees all of it
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    defaults = sft.TrainConfig()  # = params.yaml's sft.train (tests/test_config.py keeps them equal)
    max_len, bs = a.max_len or defaults.max_len, a.batch_size or defaults.batch_size
    lora = defaults.lora
    mdir = base_dir(a.model, tmp)
    placed = device.placement("auto", a.precision, mdir, "bench precision")
    precision = placed.precision
    precisions = [precision] + [p for p in ("fp32", "bf16") if p != precision and (p == "fp32" or a.other_precision)]
    print(
        f"precision {precision} ({placed.reason}); CPU {device.cpu_model()}, flags {device.cpu_flags()}; "
        f"probe {placed.probe}",
        flush=True,
    )
    tok = chat.load_tokenizer(mdir)
    examples, convs = seed_examples(tok, max_len, tmp)
    n_params = sum(p.numel() for p in models.load_model(mdir).parameters())
    fpt = 4 * n_params

    rows = sft.pack(examples, max_len)
    packed = sft.PackedCollator(tok.pad_token_id)
    ours_batches = [
        with_real(packed(rows[i : i + bs]), sum(len(r["input_ids"]) for r in rows[i : i + bs]))
        for i in range(0, len(rows) - bs + 1, bs)
    ]
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    padder = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=sft.IGNORE)
    plain_batches = [
        with_real(
            padder([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[i : i + bs]]),
            sum(len(e["input_ids"]) for e in examples[i : i + bs]),
        )
        for i in range(0, len(examples) - bs + 1, bs)
    ]

    loops = []
    for prec in precisions:
        model = models.load_for_training(mdir, "lora", lora, prec)
        args = sft.training_args(defaults.replace(precision=prec), tmp / prec, 1, False, None)
        trainer = sft.trainer_class()(model=model, args=args, train_dataset=[], data_collator=packed)
        loops.append(Loop(f"selfalign_{prec}", prec, model, ours_batches, selfalign_loss(trainer)))
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
        model.config.use_cache = False
        model = get_peft_model(model, models.lora_config(lora))
        loops.append(Loop(f"plain_hf_{prec}", prec, model, plain_batches, plain_loss(prec)))

    rates = []
    print(
        f"{a.rounds} rounds of {', '.join(lp.name for lp in loops)}; auto = {precision}, rows of {max_len}, "
        f"{bs} per step, {torch.get_num_threads()} threads",
        flush=True,
    )
    for r in range(a.rounds):
        rates.append({"bf16": matmul_rate(torch.bfloat16), "fp32": matmul_rate(torch.float32)})
        for loop in loops if r % 2 == 0 else loops[::-1]:
            loop.step(r)
        print(
            f"round {r + 1}: matmul bf16 {rates[-1]['bf16'] / 1e12:.3f} fp32 {rates[-1]['fp32'] / 1e12:.3f} "
            "TFLOP/s; " + ", ".join(f"{lp.name} {lp.tokens[-1] / lp.times[-1]:.0f} tok/s" for lp in loops),
            flush=True,
        )

    results = [summarize(lp, rates, fpt) for lp in loops]
    by = {x["loop"]: x for x in results}
    loop_by = {lp.name: lp for lp in loops}
    out = {
        "model": mdir,
        "params": n_params,
        "flops_per_token": fpt,
        "flops_formula": "4 * N (LoRA)",
        "precision": precision,
        "precision_reason": placed.reason,
        "precision_probe": placed.probe,
        "cpu": device.cpu_model(),
        "cpu_flags": device.cpu_flags(),
        "torch": torch.__version__,
        "lora": lora.to_dict(),
        "max_len": max_len,
        "batch_size": bs,
        "rounds": a.rounds,
        "matmul_tflops_median": {
            k: round(statistics.median(x[k] for x in rates[1:]) / 1e12, 4) for k in ("bf16", "fp32")
        },
        "threads": torch.get_num_threads(),
        "clock": a.clock,
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "results": results,
        "ratios": {},
    }
    # Load moves within seconds; the ratio of two steps run back to back in a round is the robust figure.
    for prec in precisions:
        ours, plain = loop_by[f"selfalign_{prec}"], loop_by[f"plain_hf_{prec}"]
        out["ratios"][f"selfalign_vs_plain_{prec}"] = {
            "overall": round(by[ours.name]["tokens_per_second"] / by[plain.name]["tokens_per_second"], 3),
            "median_per_round": per_round_median(ours, plain),
        }
    for prec in precisions[1:]:
        ours, other = loop_by[f"selfalign_{precision}"], loop_by[f"selfalign_{prec}"]
        out["ratios"][f"selfalign_{precision}_vs_selfalign_{prec}"] = {
            "overall": round(by[ours.name]["tokens_per_second"] / by[other.name]["tokens_per_second"], 3),
            "median_per_round": per_round_median(ours, other),
        }
    del loops, model
    if a.trl:
        out["trl_not_interleaved"] = run_trl(
            mdir,
            tok,
            convs,
            lora,
            precision,
            a.rounds,
            max_len,
            bs,
            tmp,
            fpt,
            sum(len(e["input_ids"]) for e in examples) / len(examples),
        )
    for x in results:
        print(x)
    print()
    for name, r in out["ratios"].items():
        print(f"{name}: {r['overall']}x overall, {r['median_per_round']}x median per round")
    for x in results:
        print(
            f"{x['loop']}: {x['tokens_per_second']} tokens/s, MFU (4N/token, median over rounds) "
            f"{x['mfu_median']:.1%} of the {x['precision']} matmul rate, {x['mfu_vs_bf16_matmul_median']:.1%} of bf16"
        )
    io.write_json(a.out, out)


def run_trl(mdir, tok, convs, lora, precision, steps, max_len, bs, tmp, fpt, mean_tokens) -> dict:
    """TRL renders the same conversations itself; prompt/completion form gives it completion-only loss
    (SmolLM2's template has no {% generation %} markers for assistant_only_loss)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    cfg = SFTConfig(
        output_dir=str(tmp / "trl"),
        max_length=max_len,
        per_device_train_batch_size=bs,
        max_steps=steps,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        packing=False,
        bf16=precision == "bf16",
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
    )
    SFTTrainer(
        model=model,
        args=cfg,
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs]),
        peft_config=models.lora_config(lora),
        callbacks=[Timer()],
    ).train()
    tok_s = mean_tokens * bs * (len(times) - 1) / sum(times[1:])  # random sampler: mean real tokens per example
    return {
        "tokens_per_second": round(tok_s, 1),
        "seconds_per_step": round(sum(times[1:]) / (len(times) - 1), 3),
        "model_tflops": round(tok_s * fpt / 1e12, 4),
    }


if __name__ == "__main__":
    main()

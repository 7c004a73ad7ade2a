"""The GPU check: every model-running path of the pipeline on one GPU, measured, in one JSON file.

    scripts/gpu-check.sh                                            # on the GPU machine: wheels, then this
    python scripts/gpu_check.py --out reports/gpu-check.json        # models/base (SmolLM2-135M, `make setup`)
    python scripts/gpu_check.py --cpu-smoke --out /tmp/smoke.json   # the same code, a tiny random model, CPU

Checks, each through the library code the stages run (no copies of it):

    sft_lora_bf16   models.load_for_training(lora, bf16): frozen bf16 base, fp32 adapters, bf16 autocast
    sft_qlora       models.load_for_training(qlora): 4-bit NF4 base (bitsandbytes), LoRA adapters
    sft_zero2       transformers.Trainer with configs/deepspeed_zero2.json on one process (ZeRO-2)
    reward          a LoRA sequence-classification model, Bradley-Terry loss on chosen/rejected pairs
    ppo             selfalign.ppo.ppo_step: rollout, reward-model scores, KL, PPO update (accelerate)
    curate          selfalign.curate.expected_scores: the score-digit log-probs of candidate prompts
    evaluate        llm engine answers (vllm when installed, else local on the GPU), engine closed after
    serve           selfalign.serve app on a real socket answering one request through the openai client

For each: seconds, tokens/s, peak GPU memory (torch.cuda.max_memory_allocated, reset before the
check) next to selfalign.memory's estimate of the same setup, and MFU: model FLOPs per second
over a dense matmul's FLOPs per second measured at the start of the same run (bf16, on the GPU and
on the CPU smoke alike). Model FLOPs per token count the matmul weights N (every linear plus the
output head; embeddings are lookups): 2N forward; a LoRA step on a frozen base 4N (activation
gradients, no weight gradients for the base); attention's seq^2 term is left out (sequences here
are short), so MFU is slightly understated. A check that fails records its error and the others
still run; the exit status is 1 if any failed.

On the CPU smoke there is no GPU memory to measure: peak_gib is null and peak_rss_mb is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from selfalign import memory  # noqa: E402

GIB = 1024**3
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about rain.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for learning to cook.",
    "Translate 'good morning' into French and Malay.",
    "Summarise the plot of Hamlet in one paragraph.",
    "How does a bicycle stay upright?",
    "List four prime numbers greater than 50.",
]

# GPU run: sized to finish all checks in a few minutes on one 80 GB card with the 135M default model.
GPU_SIZES = {
    "steps": 10,
    "batch": 8,
    "seq": 1024,
    "ppo_steps": 3,
    "ppo_batch": 16,
    "response": 64,
    "gen_tokens": 128,
    "matmul": 8192,
}
SMOKE_SIZES = {
    "steps": 2,
    "batch": 2,
    "seq": 64,
    "ppo_steps": 1,
    "ppo_batch": 2,
    "response": 8,
    "gen_tokens": 8,
    "matmul": 512,
}


class Check:
    """Times a block and reads the GPU's peak allocation over it (reset at the start)."""

    def __init__(self, device: str):
        self.device, self.tokens, self.seconds = device, 0, 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def timed(self):
        """A sub-block whose seconds count (warm-up steps run outside it, their memory still counts)."""
        check = self

        class _T:
            def __enter__(self):
                _sync(check.device)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                _sync(check.device)
                check.seconds += time.perf_counter() - self.t

        return _T()

    def __exit__(self, *exc):
        _sync(self.device)
        self.peak = torch.cuda.max_memory_allocated() / GIB if self.device == "cuda" else None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: str, n: int) -> tuple[float, str]:
    """FLOP/s of an n x n bf16 matmul, best of 10 after warm-up: the MFU denominator, measured here.

    bf16 on the CPU too: every check runs in bf16, and an fp32 denominator let a bf16 check on an AMX CPU read
    MFU > 1 (curate, at load ~20)."""
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, str(dtype).removeprefix("torch.")


def matmul_params(arch: memory.Arch) -> int:
    p = arch.params()
    return p["linear"] + arch.vocab * arch.hidden  # the output head runs as a matmul even when tied


def result(check: Check, est: memory.Plan, flops_per_token: float, peak_flops: float, **extra) -> dict:
    tps = check.tokens / check.seconds if check.seconds else 0.0
    out = {
        "ok": True,
        "seconds": round(check.seconds, 4),
        "tokens": check.tokens,
        "tokens_per_s": round(tps, 2),
        "peak_gib": None if check.peak is None else round(check.peak, 3),
        "estimate_gib": round(memory.estimate(est)["total"] / GIB, 3),
        "mfu": round(flops_per_token * tps / peak_flops, 6),
        "flops_per_token": flops_per_token,
    }
    if check.peak is None:
        from selfalign import progress

        out["peak_rss_mb"] = progress.peak_rss_mb()  # this process's own peak (VmHWM), not a parent's
    return {**out, **extra}


def random_batch(tok, batch: int, seq: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, len(tok) - 1, (batch, seq), generator=g).to(device)


def train_steps(model, tok, s: dict, device: str, check: Check, autocast: bool) -> float:
    """1 warm-up step then s["steps"] timed AdamW steps of a causal-LM loss; returns the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = random_batch(tok, s["batch"], s["seq"], device)
    loss = None
    for i in range(s["steps"] + 1):
        ctx = check.timed() if i else _null()
        with ctx, torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if i:
            check.tokens += ids.numel()
    return float(loss)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------ checks


def check_sft(ctx: dict, method: str) -> dict:
    from selfalign import models

    device, s, arch = ctx["device"], ctx["sizes"], ctx["arch"]
    with Check(device) as c:
        model = models.load_for_training(ctx["model"], method, LORA, "bf16")
        if method == "lora":
            model.to(device)
        loss = train_steps(model, ctx["tok"], s, device, c, autocast=True)
        linear4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())  # bitsandbytes' NF4 layers
    plan = memory.Plan(
        stage="sft",
        model=ctx["model"],
        method=method,
        seq_len=s["seq"],
        micro_batch=s["batch"],
        lora_r=LORA["r"],
        lora_targets=tuple(LORA["target_modules"]),
        gradient_checkpointing=False,
        dtype="bf16",
        weight_dtype="fp32" if method == "qlora" else "",
        double_quant=False,
    )
    del model
    return result(c, plan, 4 * matmul_params(arch), ctx["peak_flops"], loss=round(loss, 4), linear4bit_layers=linear4)


def check_zero2(ctx: dict) -> dict:
    """One process under DeepSpeed ZeRO-2 through transformers.Trainer, as stages/sft.py runs it."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from selfalign import models

    device, s, arch = ctx["device"], ctx["sizes"], ctx["arch"]
    ids = random_batch(ctx["tok"], s["batch"] * (s["steps"] + 1), s["seq"], "cpu").tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    with Check(device) as c, tempfile.TemporaryDirectory() as tmp:
        model = models.load_for_training(ctx["model"], "lora", LORA, "bf16")
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=s["steps"] + 1,
            per_device_train_batch_size=s["batch"],
            learning_rate=1e-4,
            bf16=True,
            deepspeed=str(ROOT / "configs/deepspeed_zero2.json"),
            report_to=[],
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            use_cpu=device == "cpu",
            dataloader_num_workers=0,
        )

        class Clock(TrainerCallback):
            """Times steps 2.. only: DeepSpeed's engine set-up (and its JIT-built ops) and the first step are not
            throughput; their memory still counts in the peak."""

            def on_step_end(self, args, state, control, **kw):
                _sync(device)
                if state.global_step == 1:
                    self.t0 = time.perf_counter()
                elif state.global_step == s["steps"] + 1:
                    c.seconds += time.perf_counter() - self.t0

        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
        out = trainer.train()
        c.tokens = s["batch"] * s["seq"] * s["steps"]
        zero = (
            trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.accelerator.state.deepspeed_plugin else 0
        )
    plan = memory.Plan(
        stage="sft",
        model=ctx["model"],
        method="lora",
        seq_len=s["seq"],
        micro_batch=s["batch"],
        lora_r=LORA["r"],
        lora_targets=tuple(LORA["target_modules"]),
        gradient_checkpointing=False,
        dtype="bf16",
        zero_stage=2,
    )
    del trainer, model
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return result(
        c, plan, 4 * matmul_params(arch), ctx["peak_flops"], loss=round(out.training_loss, 4), zero_stage=zero
    )


def check_reward(ctx: dict) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    device, s, arch, tok = ctx["device"], ctx["sizes"], ctx["arch"], ctx["tok"]
    with Check(device) as c:
        model = AutoModelForSequenceClassification.from_pretrained(ctx["model"], num_labels=1, dtype=torch.bfloat16).to(
            device
        )
        model.config.pad_token_id = tok.pad_token_id
        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], task_type="SEQ_CLS", target_modules=LORA["target_modules"]
            ),
        )
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        chosen = random_batch(tok, s["batch"], s["seq"], device, seed=1)
        rejected = random_batch(tok, s["batch"], s["seq"], device, seed=2)
        for i in range(s["steps"] + 1):
            with c.timed() if i else _null(), torch.autocast(device, dtype=torch.bfloat16):
                scores = model(input_ids=torch.cat([chosen, rejected])).logits.squeeze(-1).float()
                loss = -torch.nn.functional.logsigmoid(scores[: s["batch"]] - scores[s["batch"] :]).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if i:
                c.tokens += 2 * chosen.numel()
    plan = memory.Plan(
        stage="reward",
        model=ctx["model"],
        method="lora",
        seq_len=s["seq"],
        micro_batch=2 * s["batch"],
        lora_r=LORA["r"],
        lora_targets=tuple(LORA["target_modules"]),
        gradient_checkpointing=False,
        dtype="bf16",
        head="score",
    )
    del model
    return result(c, plan, 4 * matmul_params(arch), ctx["peak_flops"], loss=round(float(loss), 4))


def check_ppo(ctx: dict) -> dict:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from selfalign import chat
    from selfalign import ppo as P

    device, s, arch, tok = ctx["device"], ctx["sizes"], ctx["arch"], ctx["tok"]
    cfg = P.PPOConfig(
        steps=s["ppo_steps"],
        batch_size=s["ppo_batch"],
        minibatch_size=max(1, s["ppo_batch"] // 2),
        max_new_tokens=s["response"],
        lr=1e-5,
    )
    prompts = []
    for i in range(cfg.batch_size):
        msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        prompts.append(
            {
                "id": str(i),
                "messages": msgs,
                "ids": tok(chat.render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"],
            }
        )
    with Check(device) as c:
        accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
        policy = P.PolicyWithValue(
            P.with_lora(
                AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=torch.float32),
                {**LORA, "target_modules": ["q_proj", "v_proj"]},
            )
        )
        rmodel = AutoModelForSequenceClassification.from_pretrained(ctx["model"], num_labels=1, dtype=torch.float32).to(
            accelerator.device
        )
        rmodel.config.pad_token_id = tok.pad_token_id
        rmodel.eval()
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
        policy, optimizer = accelerator.prepare(policy, optimizer)
        reward_fn = P.reward_model_fn(rmodel, tok, batch_size=cfg.batch_size, max_length=512)
        kl = P.kl_controller(cfg)
        stats = None
        for i in range(cfg.steps + 1):
            with c.timed() if i else _null():
                stats = P.ppo_step(policy, None, tok, prompts, reward_fn, cfg, kl, optimizer, accelerator)
            if i:  # each sequence: one rollout forward per new token + scoring and update passes over it all
                c.tokens += sum(len(p["ids"]) for p in prompts) + cfg.batch_size * cfg.max_new_tokens
    seq = max(len(p["ids"]) for p in prompts) + cfg.max_new_tokens
    plan = memory.Plan(
        stage="ppo",
        model=ctx["model"],
        method="lora",
        seq_len=seq,
        micro_batch=cfg.minibatch_size,
        lora_r=LORA["r"],
        lora_targets=("q_proj", "v_proj"),
        gradient_checkpointing=False,
        dtype="bf16",
        weight_dtype="fp32",
        frozen_copies=1,
    )
    del policy, rmodel
    # per token: rollout 2N, old/ref log-probs 2 x 2N, reward 2N, update epochs x (2N forward + 4N backward)
    flops = (2 + 4 + 2 + cfg.ppo_epochs * 6) * matmul_params(arch)
    keys = ("reward_mean", "kl", "kl_coef", "loss/policy")
    return result(
        c,
        plan,
        flops,
        ctx["peak_flops"],
        **{k.replace("/", "_"): round(float(stats[k]), 4) for k in keys if k in stats},
    )


def check_curate(ctx: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from selfalign import chat, curate

    device, s, arch = ctx["device"], ctx["sizes"], ctx["arch"]
    tok = chat.load_tokenizer(ctx["model"], padding_side="left")
    rubric = curate.load_rubric(ROOT / "prompts/curate.txt")
    prompts = [
        curate.scoring_prompt(tok, rubric, q, "A short and careful answer to: " + q, "Score: ")
        for q in PROMPTS * max(1, s["batch"] // 2)
    ]
    with Check(device) as c:
        model = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=torch.bfloat16).to(device).eval()
        curate.expected_scores(model, tok, prompts[:2], batch_size=2)  # warm-up
        with c.timed():
            scores = curate.expected_scores(model, tok, prompts, batch_size=s["batch"])
        c.tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    plan = memory.generation_plan(
        "curate",
        ctx["model"],
        engine={"kind": "local", "dtype": "bf16"},
        method="score",
        batch=s["batch"],
        prompt_tokens=longest,
        new_tokens=0,
    )
    del model
    return result(
        c,
        plan,
        2 * matmul_params(arch),
        ctx["peak_flops"],
        mean_score=round(sum(r["score"] for r in scores) / len(scores), 4),
    )


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def check_evaluate(ctx: dict) -> dict:
    from selfalign import llm

    device, s, arch = ctx["device"], ctx["sizes"], ctx["arch"]
    kind = "vllm" if device == "cuda" and vllm_available() else "local"
    spec = {"kind": kind, "model": str(ctx["model"]), "dtype": "bf16", "batch_size": len(PROMPTS)}
    if kind == "vllm":
        spec.update(gpu_memory_utilization=0.5, max_model_len=2048)
    reqs = [llm.Request(messages=[{"role": "user", "content": p}], max_tokens=s["gen_tokens"]) for p in PROMPTS]
    with Check(device) as c:
        engine = llm.make_engine(spec)
        engine.complete(reqs[:1])  # warm-up (loads the model)
        with c.timed():
            results = engine.complete(
                [llm.Request(messages=r.messages, max_tokens=r.max_tokens, seed=1, stop=["\n\n\n\n"]) for r in reqs]
            )
        c.tokens = sum(r.usage["prompt_tokens"] + r.usage["completion_tokens"] for r in results if r.ok)
        engine.close()
    after = torch.cuda.memory_allocated() / GIB if device == "cuda" else None
    plan = memory.generation_plan(
        "evaluate", ctx["model"], engine=spec, batch=len(PROMPTS), prompt_tokens=64, new_tokens=s["gen_tokens"]
    )
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} answers failed: {failed[0]}")
    out = result(
        c,
        plan,
        2 * matmul_params(arch),
        ctx["peak_flops"],
        engine=kind,
        completion_tokens=sum(r.usage["completion_tokens"] for r in results),
    )
    out["allocated_after_close_gib"] = None if after is None else round(after, 3)
    if kind == "vllm":  # vLLM allocates outside torch's caching allocator: max_memory_allocated misses it
        out["peak_note"] = "vllm: KV cache and weights are reserved by vLLM (gpu_memory_utilization 0.5 of the card)"
    return out


def check_serve(ctx: dict) -> dict:
    import openai

    from selfalign import serve

    device, s, arch = ctx["device"], ctx["sizes"], ctx["arch"]
    engine = "vllm" if device == "cuda" and vllm_available() else "local"
    with Check(device) as c:
        app = serve.create_app(
            ctx["model"], dtype="bf16", engine=engine, vllm={"gpu_memory_utilization": 0.5, "max_model_len": 2048}
        )
        running = serve.start_in_thread(app)
        try:
            client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=120)
            ask = {
                "model": app.state.names[0],
                "messages": [{"role": "user", "content": PROMPTS[0]}],
                "max_tokens": s["gen_tokens"],
                "temperature": 0,
            }
            client.chat.completions.create(**ask)  # warm-up
            with c.timed():
                reply = client.chat.completions.create(**ask)
            c.tokens = reply.usage.prompt_tokens + reply.usage.completion_tokens
        finally:
            running.stop()
            app.state.close()
    plan = memory.generation_plan(
        "serve",
        ctx["model"],
        engine={"kind": engine, "dtype": "bf16"},
        batch=1,
        prompt_tokens=reply.usage.prompt_tokens,
        new_tokens=s["gen_tokens"],
    )
    return result(
        c,
        plan,
        2 * matmul_params(arch),
        ctx["peak_flops"],
        engine=engine,
        completion_tokens=reply.usage.completion_tokens,
        finish_reason=reply.choices[0].finish_reason,
        reply_chars=len(reply.choices[0].message.content or ""),
    )


def launched(name: str):
    """A check run under `torchrun --nproc_per_node 1` (DeepSpeed wants the launcher's rendezvous and env, as
    stages/sft.py gets them); the worker measures itself and writes its result for this process to read."""

    def run(ctx: dict) -> dict:
        import subprocess

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "1",
                "--master_port",
                str(_free_port()),
                str(Path(__file__).resolve()),
                "--worker",
                name,
                "--model",
                ctx["model"],
                "--out",
                str(out),
            ] + (["--cpu-smoke"] if ctx["device"] == "cpu" else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode or not out.is_file():
                err = proc.stderr.split("torch.distributed.elastic")[0] if "Traceback" in proc.stderr else proc.stderr
                raise RuntimeError(f"{name} worker exited {proc.returncode}: {err[-1500:]}")
            return json.loads(out.read_text())

    return run


CHECKS = {
    "sft_lora_bf16": lambda ctx: check_sft(ctx, "lora"),
    "sft_qlora": lambda ctx: check_sft(ctx, "qlora"),
    "sft_zero2": launched("sft_zero2"),
    "reward": check_reward,
    "ppo": check_ppo,
    "curate": check_curate,
    "evaluate": check_evaluate,
    "serve": check_serve,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(out: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (tests/fixtures/tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/tokenizer")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="The results JSON file.")
    ap.add_argument("--model", default=None, help="A model directory (default: models/base; --cpu-smoke: a tiny one).")
    ap.add_argument("--cpu-smoke", action="store_true", help="Tiny random model, few steps, on the CPU.")
    ap.add_argument("--only", default="", help="Comma-separated check names (default: all).")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one check, under torchrun (launched)
    args = ap.parse_args(argv)
    only = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    if args.cpu_smoke:
        device, sizes = "cpu", SMOKE_SIZES
        workdir = tempfile.TemporaryDirectory()
        model = Path(args.model) if args.model else tiny_model(Path(workdir.name) / "model")
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA GPU visible; use --cpu-smoke to run the checks on the CPU")
        device, sizes, model = "cuda", GPU_SIZES, Path(args.model or ROOT / "models/base")
        if not (model / "config.json").is_file():
            ap.error(f"--model {model}: no config.json; run `make setup` (or `dvc repro base`) first")
    from selfalign import chat

    peak_flops, mm_dtype = matmul_flops(device, sizes["matmul"])
    if args.worker:  # the launched half of a check: the matmul rate is the parent's, passed in the result's MFU
        ctx = {
            "device": device,
            "sizes": sizes,
            "model": str(model),
            "arch": memory.load_arch(model),
            "tok": chat.load_tokenizer(model),
            "peak_flops": float(os.environ.get("GPU_CHECK_PEAK_FLOPS") or peak_flops),
        }
        Path(args.out).write_text(json.dumps(globals()[f"check_{args.worker.removeprefix('sft_')}"](ctx)))
        return 0
    os.environ["GPU_CHECK_PEAK_FLOPS"] = repr(peak_flops)
    ctx = {
        "device": device,
        "sizes": sizes,
        "model": str(model),
        "arch": memory.load_arch(model),
        "tok": chat.load_tokenizer(model),
        "peak_flops": peak_flops,
    }
    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or 'x86'})",
        "gpu_total_gib": round(torch.cuda.get_device_properties(0).total_memory / GIB, 2) if device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": str(model),
        "model_params": ctx["arch"].params()["total"],
        "sizes": sizes,
        "matmul": {"n": sizes["matmul"], "dtype": mm_dtype, "tflops": round(peak_flops / 1e12, 4)},
        "vllm": vllm_available(),
        "checks": {},
    }
    t_all = time.perf_counter()
    for name in only:
        t = time.perf_counter()
        try:
            report["checks"][name] = CHECKS[name](ctx)
        except Exception as e:  # noqa: BLE001 - one failed check is reported; the others still run
            traceback.print_exc()
            report["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        report["checks"][name]["wall_s"] = round(time.perf_counter() - t, 2)
        print(f"{name}: {json.dumps(report['checks'][name])}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - t_all, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = [n for n, r in report["checks"].items() if not r["ok"]]
    print(
        f"{args.out}: {len(report['checks']) - len(failed)} checks ok, {len(failed)} failed {failed}; "
        f"{report['wall_s']} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The peak GPU memory estimator: its counts against real models, its terms against each other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage_loader import load_stage

from selfalign import memory
from selfalign.memory import GIB, Plan

ROOT = Path(__file__).resolve().parent.parent


def test_param_count_matches_a_real_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    arch = memory.load_arch(tiny_model_dir)
    counts = arch.params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["head"] == 0  # the tiny model ties its embeddings


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_lora_count_matches_peft(tiny_model_dir, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    modules = list(targets) if isinstance(targets, tuple) else list(memory.LINEARS)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=modules, task_type="CAUSAL_LM"))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert memory.lora_params(memory.load_arch(tiny_model_dir), 4, targets) == trainable


@pytest.mark.parametrize(
    "name, billions",
    [
        ("Qwen/Qwen2.5-7B-Instruct", 7.62),
        ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
        ("meta-llama/Llama-2-7b-hf", 6.74),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 0.1345),
    ],
)
def test_published_sizes(name, billions):
    """The model cards' parameter counts, from the architecture numbers alone."""
    assert memory.load_arch(name).params()["total"] / 1e9 == pytest.approx(billions, rel=0.002)


def test_load_arch_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a known hub id"):
        memory.load_arch(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="vocab_size"):
        memory.load_arch(tmp_path)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        memory.lora_params(memory.load_arch("meta-llama/Llama-2-7b-hf"), 8, ["qkv"])


def _total(**kw) -> float:
    return memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", **kw))["total"]


def test_methods_order_qlora_lora_full():
    assert _total(method="qlora") < _total(method="lora") < _total(method="full")


def test_qlora_weights_are_about_a_quarter_of_bf16_for_the_linears():
    arch = memory.load_arch("meta-llama/Llama-3.1-8B-Instruct")
    q = memory.estimate(Plan(stage="sft", model="meta-llama/Llama-3.1-8B-Instruct", method="qlora"))["weights"]
    l16 = memory.estimate(Plan(stage="sft", model="meta-llama/Llama-3.1-8B-Instruct", method="lora"))["weights"]
    p = arch.params()
    unquantized = (p["embed"] + p["head"] + p["other"]) * 2
    assert (q - unquantized) / (l16 - unquantized) == pytest.approx(4.127 / 16, rel=0.01)


def test_gradient_checkpointing_cuts_activations():
    on = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", seq_len=2048))
    off = memory.estimate(
        Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", seq_len=2048, gradient_checkpointing=False)
    )
    assert on["activations"] * 5 < off["activations"]
    assert on["weights"] == off["weights"]


def test_activations_and_logits_scale_with_tokens():
    one = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", seq_len=1024))
    four = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", seq_len=1024, micro_batch=4))
    assert four["activations"] == pytest.approx(4 * one["activations"])
    assert four["logits"] == pytest.approx(4 * one["logits"])
    chunked = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", seq_len=1024, chunked_loss=8))
    assert chunked["logits"] < one["logits"] / 3


def test_zero2_shards_gradients_and_optimizer_of_a_full_finetune():
    one = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", method="full"))
    eight = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", method="full", gpus=8, zero_stage=2))
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8)
    assert eight["gradients"] == pytest.approx(one["gradients"] / 8)
    assert eight["weights"] == one["weights"]  # ZeRO-2 keeps a full copy of the weights on every GPU
    # 7.6B params x (4 master + 8 Adam) bytes: the classic 16 bytes/param of mixed-precision Adam.
    assert (one["weights"] + one["gradients"] + one["optimizer"]) / 7.6156e9 == pytest.approx(16, rel=0.01)


def test_score_head_has_no_logits_and_8bit_adam_is_smaller():
    rm = memory.estimate(Plan(stage="reward", model="Qwen/Qwen2.5-7B-Instruct", head="score"))
    assert rm["logits"] == 0
    adam8 = memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", optimizer="paged_adamw_8bit"))
    assert adam8["optimizer"] * 4 == pytest.approx(
        memory.estimate(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct"))["optimizer"]
    )


def test_published_qlora_figures_within_a_third():
    """LLaMA-Factory: 7B QLoRA 4-bit ~6 GB; torchtune: Llama-3.1-8B QLoRA ~7.4 GiB (bench/memory.py prints the ratios)."""
    lf = _total_for("meta-llama/Llama-2-7b-hf", seq_len=1024, lora_r=8)
    tt = _total_for(
        "meta-llama/Llama-3.1-8B-Instruct",
        seq_len=2048,
        lora_r=8,
        chunked_loss=8,
        lora_targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    assert 0.75 < lf / (6e9) < 1.33
    assert 0.75 < tt / (7.4 * GIB) < 1.33


def _total_for(model, **kw):
    return memory.estimate(Plan(stage="sft", model=model, method="qlora", micro_batch=1, **kw))["total"]


def test_dry_run_prints_the_plan_each_term_and_the_verdict():
    plan = Plan(
        stage="sft",
        model="Qwen/Qwen2.5-7B-Instruct",
        method="qlora",
        seq_len=2048,
        micro_batch=2,
        grad_accum=4,
        gpus=8,
        zero_stage=2,
        gpu_gib=24,
    )
    text = memory.dry_run(plan, params={"method": "qlora"})
    for word in (
        "weights",
        "adapters",
        "optimizer",
        "activations",
        "logits",
        "total",
        "7.62B",
        "ZeRO stage 2",
        "64 sequences per step",
        '"method": "qlora"',
    ):
        assert word in text
    assert "fits a 24 GiB GPU" in text
    small = memory.dry_run(Plan(stage="sft", model="Qwen/Qwen2.5-7B-Instruct", method="full", gpu_gib=24))
    assert "does NOT fit a 24 GiB GPU" in small


def test_generation_plan_counts_the_kv_cache():
    est = memory.estimate(
        Plan(stage="augment", model="Qwen/Qwen2.5-7B-Instruct", method="generate", seq_len=4096, micro_batch=16)
    )
    # 28 layers x 2 (k, v) x 512 (4 kv heads x 128) x 2 bytes per token
    assert est["kv_cache"] == 28 * 2 * 512 * 2 * 4096 * 16
    assert "optimizer" not in est


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_training_stages_dry_run_loads_nothing_and_writes_nothing(stage, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "out"
    common = ["--params", str(ROOT / "params.yaml"), "--output", str(out), "--dry-run", "--gpu-gib", "8"]
    if stage == "sft":
        args = [
            "--run",
            "m0",
            "--checkpoints",
            str(tmp_path / "ck"),
            "--rejected",
            str(tmp_path / "r.jsonl"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--plots",
            str(tmp_path / "p"),
            "--input",
            "models/base",
            "--input",
            "data/clean/seed.jsonl",
        ]
    elif stage == "reward":
        (tmp_path / "pref.jsonl").write_text("")
        args = [
            "--preference",
            str(tmp_path / "pref.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--metrics",
            str(tmp_path / "m.json"),
        ]
    else:
        args = [
            "--policy",
            str(tiny_model_dir),
            "--checkpoints",
            str(tmp_path / "ck"),
            "--plots",
            str(tmp_path / "p"),
            "--metrics",
            str(tmp_path / "m.json"),
        ]
    result = CliRunner().invoke(load_stage(stage).main, [*args, *common])
    assert result.exit_code == 0, result.output
    assert f"stage {stage}: dry run (no weights loaded)" in result.output
    for term in ("weights", "optimizer", "activations", "total"):
        assert term in result.output
    assert "a 8 GiB GPU" in result.output
    assert not out.exists() and not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------ stages that run models without training them


def _inference_args(stage: str, model: Path, tmp_path: Path) -> list[str]:
    """The stage's dvc.yaml command, pointed at `model` and at files under tmp_path."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name in ("seed.jsonl", "web.jsonl", "candidates.jsonl", "prompts.jsonl"):
        (data / name).write_text("")
    out, m = ["--output-dir", str(tmp_path / "out")], ["--metrics", str(tmp_path / "m.json")]
    prompts = ROOT / "prompts"
    return {
        "translate": [
            "--input-dir",
            str(data),
            *out,
            "--model",
            str(model),
            "--prompt",
            str(prompts / "translate.txt"),
            "--cache",
            str(tmp_path / "cache"),
            *m,
        ],
        "augment": [
            "--web",
            str(data / "web.jsonl"),
            "--model",
            str(model),
            "--prompt",
            str(prompts / "backward.txt"),
            *out,
            "--cache",
            str(tmp_path / "cache"),
            *m,
        ],
        "curate": [
            "--iteration",
            "iter1",
            "--candidates",
            str(data / "candidates.jsonl"),
            "--model",
            str(model),
            "--rubric",
            str(prompts / "curate.txt"),
            *out,
            "--cache",
            str(tmp_path / "cache"),
            *m,
        ],
        "distill": [
            "--seed-file",
            str(data / "seed.jsonl"),
            "--teacher",
            str(model),
            "--systems",
            str(prompts / "orca_systems.txt"),
            *out,
            "--cache",
            str(tmp_path / "cache"),
            *m,
        ],
        "evaluate": [
            "--model",
            f"base={model}",
            "--model",
            f"m0={model}",
            "--model",
            f"final={model}",
            "--model",
            f"ppo={model}",
            "--model",
            f"dpo={model}",
            "--reward-model",
            str(model),
            "--prompts",
            str(ROOT / "data/eval/prompts.jsonl"),
            "--heldout",
            str(data / "seed.jsonl"),
            "--judge-prompt",
            str(prompts / "evaluate.txt"),
            "--cache",
            str(tmp_path / "cache"),
            *out,
            *m,
        ],
        "export": [
            "--model",
            f"ppo={model}",
            "--model",
            f"dpo={model}",
            "--model",
            f"final={model}",
            "--model",
            f"m0={model}",
            "--output",
            str(tmp_path / "out"),
            *m,
        ],
    }[stage]


INFERENCE_STAGES = ["translate", "augment", "curate", "distill", "evaluate", "export"]


@pytest.mark.parametrize("stage", INFERENCE_STAGES)
def test_every_model_running_stage_dry_runs_with_its_batch_and_lengths(stage, tiny_model_dir, tmp_path):
    """Each prints its plan from its resolved params, loads and writes nothing; a generating stage's KV cache is
    2 (k, v) x layers x kv_dim x bytes x its batch x (prompt + new tokens)."""
    from click.testing import CliRunner

    from selfalign import config, params

    args = [
        *_inference_args(stage, tiny_model_dir, tmp_path),
        "--params",
        str(ROOT / "params.yaml"),
        "--dry-run",
        "--gpu-gib",
        "8",
    ]
    result = CliRunner().invoke(load_stage(stage).main, args)
    assert result.exit_code == 0, result.output
    assert f"stage {stage}: dry run (no weights loaded)" in result.output and "a 8 GiB GPU" in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
    assert not (tmp_path / "cache").exists()
    cfg = params.resolve(config.stage_class(stage), ROOT / "params.yaml", stage, ())
    arch = memory.load_arch(tiny_model_dir)
    kv_per_token = 2 * arch.layers * arch.kv_dim * 2  # bf16 or fp32 below
    if stage in ("translate", "augment", "distill"):
        line = next(ln for ln in result.output.splitlines() if ln.strip().startswith("batch"))
        batch, seq = int(line.split()[1]), int(line.split()[4])
        assert batch == cfg.engine.batch_size and seq > cfg.max_new_tokens
        width = memory.BYTES[memory._dtype_name(cfg.engine.dtype, tiny_model_dir)]
        kv = next(ln for ln in result.output.splitlines() if ln.strip().startswith("kv_cache"))
        assert float(kv.split()[1]) == pytest.approx(kv_per_token // 2 * width * batch * seq / GIB, abs=0.006)
    if stage == "evaluate":  # answers, then perplexity, then reward scores: three plans
        assert result.output.count("dry run (no weights loaded)") == 3 and "reward scores" in result.output
    if stage == "export":
        assert "merge, save, reload and compare" in result.output


def test_serve_dry_run_counts_the_kv_cache_of_its_batch(tiny_model_dir):
    from click.testing import CliRunner

    from selfalign import serve

    result = CliRunner().invoke(
        serve.main,
        [
            "--model",
            str(tiny_model_dir),
            "--dry-run",
            "--max-batch-size",
            "4",
            "--max-prompt-tokens",
            "300",
            "--max-tokens",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    arch = memory.load_arch(tiny_model_dir)
    assert "batch        4 sequences x 400 tokens" in result.output
    kv = next(ln for ln in result.output.splitlines() if ln.strip().startswith("kv_cache"))
    assert float(kv.split()[1]) == pytest.approx(2 * arch.layers * arch.kv_dim * 4 * 4 * 400 / GIB, abs=0.006)


def test_vllm_plan_says_how_much_of_the_batch_its_kv_cache_holds():
    arch = memory.load_arch("Qwen/Qwen2.5-7B-Instruct")
    spec = {"kind": "vllm", "dtype": "bf16", "gpu_memory_utilization": 0.9}
    small = memory.generation_plan(
        "augment", "Qwen/Qwen2.5-7B-Instruct", engine=spec, batch=256, prompt_tokens=512, new_tokens=3584, gpu_gib=24
    )
    est = memory.estimate(small)
    room = 0.9 * 24 * GIB - est["weights"] - est["activations"] - memory.CUDA_CONTEXT
    held = int(room / (2 * arch.layers * arch.kv_dim * 2) / 4096)
    assert 0 < held < 256 and f"fits: vLLM runs {held} of the batch of 256 at once" in memory.dry_run(small)
    assert small.prefill_tokens == memory.VLLM_BATCHED_TOKENS  # chunked prefill, not 256 x 1024 at once
    big = memory.generation_plan(
        "augment", "Qwen/Qwen2.5-7B-Instruct", engine=spec, batch=256, prompt_tokens=512, new_tokens=512, gpu_gib=80
    )
    assert "fits: vLLM runs 256 of the batch of 256 at once" in memory.dry_run(big)
    tiny = memory.generation_plan(
        "augment", "Qwen/Qwen2.5-7B-Instruct", engine=spec, batch=8, prompt_tokens=512, new_tokens=512, gpu_gib=16
    )
    assert "does NOT fit: the weights leave no room" in memory.dry_run(tiny)


def test_the_gpu_profile_runs_every_generating_stage_on_vllm_and_sets_each_value_once(tmp_path):
    """translate, augment, curate, distill and evaluate answer with vLLM; where a stage folds its own batch_size
    and dtype into its engine spec (curate, evaluate) the profile sets them there only, not twice."""
    import yaml

    from selfalign import config, params, profile

    prof = profile.load(ROOT / "profiles/qwen2.5-7b-qlora.yaml")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(profile.apply_text((ROOT / "params.yaml").read_text(), prof))
    for stage in ("translate", "augment", "curate", "distill", "evaluate"):
        cfg = params.resolve(config.stage_class(stage), params_file, stage, ())
        assert cfg.engine.kind == "vllm", stage
        # one engine spec per stage: batch_size and dtype live in `engine:` only, never beside it in the section
        assert not {"batch_size", "dtype"} & set(prof[stage]) - {"engine"}, f"{stage}: set beside its engine"
    # the 7B plans of the generating stages fit an 80 GiB card
    for stage in ("translate", "augment", "distill"):
        cfg = params.resolve(config.stage_class(stage), params_file, stage, ())
        spec = cfg.engine.with_model(cfg.engine.model or "Qwen/Qwen2.5-7B-Instruct")
        (plan,) = memory.stage_inference_plans(stage, cfg, "Qwen/Qwen2.5-7B-Instruct", spec=spec, gpu_gib=80)
        assert plan.notes["verdict"].startswith("fits"), (stage, plan.notes)
    assert yaml.safe_load(params_file.read_text())["base"]["hub_id"] == "Qwen/Qwen2.5-7B-Instruct"

"""Peak GPU memory of a training (or generation) step, estimated from a model's config.json.

A 7B run that dies of OOM after the model download and the data loading costs an hour; this
arithmetic costs nothing and runs on a laptop (`stages/<name>.py --dry-run`). It counts, per GPU:

    weights      every parameter at its storage width: NF4 is 4 bits + the block constants
                 (blocks of 64 with an fp32 absmax = 0.5 bit, or with double quantization
                 8 bits per 64 + fp32 per 256 blocks = 0.127 bit); embeddings, norms and the
                 output head stay in the compute dtype (bitsandbytes does not quantize them)
    adapters     LoRA A and B, r * (in + out) per adapted linear, kept in fp32 by peft
    gradients    one per trainable parameter, at its dtype; ZeRO-2 shards them over the GPUs
    optimizer    AdamW: two fp32 moments (8 bytes/param), 8-bit AdamW: 2 bytes/param, plus an
                 fp32 master copy when trainable weights are 16-bit; ZeRO-1/2 shard these
    activations  what autograd keeps per token per decoder layer, in the compute dtype, with a
                 fused attention kernel (no seq^2 scores): two RMSNorms computed in fp32
                 (~10 h bytes each), the attention input, q/k/v and output (6 h + 4 kv_dim), and
                 the SwiGLU MLP (2 h + 8 I). With gradient checkpointing only each layer's input
                 (2 h) is kept, plus one layer's full set while it is recomputed
    logits       bf16 logits, their fp32 upcast and the saved log-softmax: 10 bytes per vocab
                 entry per token (2 + 4 / chunks * 4 with a chunked loss)
    temporaries  the largest dequantized weight (QLoRA), and the CUDA context (~0.5 GiB, which
                 torch.cuda.max_memory_allocated does not show but the card does)

The numbers are an estimate: allocator fragmentation adds 5-15% on top, so `fits` asks for that
headroom. bench/memory.py compares the estimate with published measurements.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

GIB = 1024**3
CUDA_CONTEXT = 0.5 * GIB
HEADROOM = 0.90  # of the card's memory an estimate may use and still be called a fit
VLLM_BATCHED_TOKENS = 8192  # vLLM's max_num_batched_tokens: prefill is chunked to this many tokens per step
# the params precision/dtype vocabulary (and torch's names) -> a BYTES key of the compute dtype; "auto" is a GPU
# estimate: bf16 (selfalign/device.py picks bf16 on every bf16-capable GPU)
PRECISION = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "auto": "bf16"}


def _mapping(cfg) -> dict:
    """A stage's resolved params as a mapping: a Config (selfalign/config.py) or a dict."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})


# Published architectures (the numbers of each model's config.json), so a dry run of a hub
# profile needs neither the hub nor the weights.
KNOWN: dict[str, dict] = {
    "Qwen/Qwen2.5-7B-Instruct": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}
KNOWN["meta-llama/Meta-Llama-3.1-8B-Instruct"] = KNOWN["meta-llama/Llama-3.1-8B-Instruct"]

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Arch:
    """The numbers of a decoder-only (Llama/Qwen2/Mistral-style) config.json that set its size."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attn_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> Arch:
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        return cls(
            vocab=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            intermediate=cfg["intermediate_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            tied=bool(cfg.get("tie_word_embeddings", False)),
            attn_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def params(self) -> dict[str, int]:
        """Parameter counts: the decoder layers' linears, the embedding, the head, and the rest."""
        linear = sum(a * b for a, b in self.linear_shapes().values()) * self.layers
        bias = (self.heads * self.head_dim + 2 * self.kv_dim) * self.layers if self.attn_bias else 0
        norms = (2 * self.layers + 1) * self.hidden
        embed = self.vocab * self.hidden
        head = 0 if self.tied else embed
        return {
            "linear": linear,
            "embed": embed,
            "head": head,
            "other": bias + norms,
            "total": linear + embed + head + bias + norms,
        }


def load_arch(model: str | Path | dict) -> Arch:
    """An Arch from a config dict, a model directory, a config.json path, or a known hub id."""
    if isinstance(model, dict):
        return Arch.from_config(model)
    if str(model) in KNOWN:
        return Arch.from_config(KNOWN[str(model)])
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model}: no config.json there and not a known hub id ({', '.join(sorted(KNOWN))})")
    return Arch.from_config(json.loads(path.read_text(encoding="utf-8")))


def lora_params(arch: Arch, r: int, targets: list[str] | tuple[str, ...] | str = LINEARS) -> int:
    """r * (in + out) for each adapted linear of each layer; "all-linear" means every one."""
    if targets == "all-linear":
        targets = LINEARS
    shapes = arch.linear_shapes()
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; known: {', '.join(shapes)}")
    return sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) * arch.layers


@dataclasses.dataclass
class Plan:
    """One stage's training (or generation) setup, as the stage's resolved params give it."""

    stage: str
    model: str | Path | dict
    method: str = "qlora"  # qlora | lora | full | generate | score (one forward pass, no KV cache)
    seq_len: int = 1024
    micro_batch: int = 1  # sequences per GPU per forward (a preference pair counts 2)
    grad_accum: int = 1
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = LINEARS
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"  # adamw | adamw_8bit (paged or not)
    dtype: str = "bf16"  # compute dtype of activations and unquantized weights
    weight_dtype: str = ""  # storage of unquantized weights if not `dtype` (fp32 under autocast, or QLoRA's
    # embeddings/head/norms after prepare_model_for_kbit_training)
    double_quant: bool = True
    head: str = "lm"  # lm (vocab logits) | score (reward/value head: no logits)
    chunked_loss: int = 1  # cross-entropy in this many chunks (torchtune uses 8)
    gpus: int = 1  # data-parallel processes sharing the work
    zero_stage: int = 0
    frozen_copies: int = 0  # extra resident copies of the frozen base (reference/reward models)
    gpu_gib: float | None = None  # the card to check against
    prefill_tokens: int = 0  # generate/score: tokens one forward pass holds at once (0: micro_batch x seq_len)
    notes: dict = dataclasses.field(default_factory=dict)


def estimate(plan: Plan) -> dict[str, float]:
    """Bytes per GPU by component, with `total`; see the module docstring for each term."""
    if plan.method not in ("qlora", "lora", "full", "generate", "score"):
        raise ValueError(f"method {plan.method!r}: expected qlora, lora, full, generate or score")
    arch = load_arch(plan.model)
    p = arch.params()
    dt = BYTES[plan.dtype]
    wdt = BYTES[plan.weight_dtype or plan.dtype]
    shards = max(1, plan.gpus)
    tokens = plan.seq_len * plan.micro_batch
    head_params = p["head"] if plan.head == "lm" else arch.hidden  # a score head is hidden x 1
    unquantized = p["embed"] + head_params + p["other"]
    if plan.method == "qlora":
        bits = 4 + (32 / (64 * 256) + 8 / 64 if plan.double_quant else 32 / 64)
        weights = p["linear"] * bits / 8 + unquantized * wdt
    else:
        weights = (p["linear"] + unquantized) * wdt
    out = {"weights": weights * (1 + plan.frozen_copies)}

    if plan.method == "generate":
        # KV cache for the whole batch at full length; no gradients, no optimizer.
        out["kv_cache"] = 2 * arch.layers * arch.kv_dim * dt * tokens
        out["activations"] = 2 * (arch.hidden + arch.intermediate) * dt * (plan.prefill_tokens or tokens)
        out["logits"] = 4 * arch.vocab * plan.micro_batch
    elif plan.method == "score":
        # one forward pass under inference_mode: a layer's working set at a time, and the fp32 logits of every
        # position (perplexity and the score prompts' log-probs need all of them; a score head needs none)
        out["activations"] = 2 * (arch.hidden + arch.intermediate) * dt * tokens
        out["logits"] = (4 + dt) * arch.vocab * tokens if plan.head == "lm" else 0.0
    else:
        if plan.method == "full":
            trainable, train_bytes = p["total"] - p["head"] + head_params, wdt
            master = 4 if wdt < 4 else 0
        else:
            trainable, train_bytes, master = lora_params(arch, plan.lora_r, plan.lora_targets), 4, 0
            out["adapters"] = trainable * train_bytes
        state = 2 if "8bit" in plan.optimizer else 8
        opt_shards = shards if plan.zero_stage >= 1 else 1
        grad_shards = shards if plan.zero_stage >= 2 else 1
        out["gradients"] = trainable * train_bytes / grad_shards
        out["optimizer"] = trainable * (state + master) / opt_shards
        per_layer = 2 * arch.hidden * 10 + 6 * arch.hidden + 4 * arch.kv_dim + 2 * arch.hidden + 8 * arch.intermediate
        per_layer = per_layer * dt / 2  # the counts above are bf16 bytes
        if plan.gradient_checkpointing:
            act = (arch.layers * 2 * arch.hidden * dt + per_layer) * tokens
        else:
            act = arch.layers * per_layer * tokens
        out["activations"] = act
        if plan.head == "lm":
            out["logits"] = (2 + 8 / max(1, plan.chunked_loss)) * arch.vocab * tokens
        else:
            out["logits"] = 0.0
    if plan.method == "qlora":
        out["dequant_buffer"] = max(a * b for a, b in arch.linear_shapes().values()) * dt
    out["cuda_context"] = CUDA_CONTEXT
    out["total"] = sum(out.values())
    return out


def fits(total_bytes: float, gpu_gib: float) -> bool:
    return total_bytes <= gpu_gib * GIB * HEADROOM


def dry_run(plan: Plan, params: dict | None = None) -> str:
    """The resolved plan and its memory estimate, as a stage's --dry-run prints it."""
    arch = load_arch(plan.model)
    p = arch.params()
    est = estimate(plan)
    name = plan.model if isinstance(plan.model, (str, Path)) else plan.model.get("_name_or_path", "config")
    lines = [
        f"stage {plan.stage}: dry run (no weights loaded)",
        f"  model        {name}: {p['total'] / 1e9:.2f}B params, {arch.layers} layers, hidden {arch.hidden}, "
        f"vocab {arch.vocab}",
        f"  method       {plan.method}"
        + (
            f", LoRA r={plan.lora_r} on {_targets(plan.lora_targets)}"
            f" ({lora_params(arch, plan.lora_r, plan.lora_targets) / 1e6:.1f}M "
            "trainable)"
            if plan.method in ("qlora", "lora")
            else ""
        ),
        f"  batch        {plan.micro_batch} x {plan.seq_len} tokens per GPU, accumulation {plan.grad_accum}, "
        f"{plan.gpus} GPU(s) -> {plan.micro_batch * plan.grad_accum * plan.gpus} sequences per step",
        f"  runtime      {plan.dtype}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
        f"optimizer {plan.optimizer}, ZeRO stage {plan.zero_stage}",
    ]
    if plan.method in ("generate", "score"):  # no training: the batch is what runs at once, in one dtype
        lines[3:] = [
            f"  batch        {plan.micro_batch} sequences x {plan.seq_len} tokens"
            + (" (prompt + new tokens)" if plan.method == "generate" else ""),
            f"  runtime      {plan.dtype}, inference only",
        ]
    for key, value in plan.notes.items():
        if key != "verdict":
            lines.append(f"  {key:<12} {value}")
    if params:
        lines.append("  params       " + json.dumps(params, sort_keys=True, default=str))
    lines.append("  peak GPU memory estimate per GPU:")
    for key, value in est.items():
        if key != "total":
            lines.append(f"    {key:<15} {value / GIB:8.2f} GiB")
    lines.append(f"    {'total':<15} {est['total'] / GIB:8.2f} GiB")
    if plan.notes.get("verdict"):
        lines.append(f"  {plan.notes['verdict']} ({plan.gpu_gib:g} GiB GPU)")
    elif plan.gpu_gib:
        verdict = "fits" if fits(est["total"], plan.gpu_gib) else "does NOT fit"
        lines.append(f"  {verdict} a {plan.gpu_gib:g} GiB GPU (estimate must stay under {HEADROOM:.0%} of it)")
    return "\n".join(lines)


def _targets(targets) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def dry_run_model(model_dir: str | Path, params_file: str | Path | None) -> str | Path:
    """What to read the architecture from before any weights exist: the model directory if it has
    been made, else what params.yaml's base section will fetch (a known hub id or a local dir)."""
    if (Path(model_dir) / "config.json").is_file() or str(model_dir) in KNOWN:
        return model_dir
    base = {}
    if params_file:
        import yaml

        base = (yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}).get("base") or {}
    source = base.get("source", "gguf")
    if source == "hub" and base.get("hub_id") in KNOWN:
        return base["hub_id"]
    if source == "local" and (Path(base.get("local_dir", "")) / "config.json").is_file():
        return base["local_dir"]
    if source == "gguf":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    raise FileNotFoundError(
        f"{model_dir} does not exist yet and base ({source}: {base.get('hub_id', '')}) is not a "
        f"known architecture; run the base stage first or add it to selfalign.memory.KNOWN"
    )


def stage_plan(
    stage: str,
    train,
    model_dir: str | Path,
    params_file: str | Path | None = None,
    *,
    gpu_gib: float | None = 24,
    deepspeed_config: str | Path | None = None,
    head: str = "lm",
    pairs: bool = False,
) -> Plan:
    """A Plan from a training section shaped like sft.train or reward (a Config or a dict): method,
    lora {r, target_modules}, max_len, batch_size, grad_accum, precision. GPUs are the launcher's WORLD_SIZE, else
    the visible CUDA devices, else 1; the ZeRO stage is read from the DeepSpeed config when one is used."""
    import os

    train = _mapping(train)

    gpus = int(os.environ.get("WORLD_SIZE") or 0)
    if not gpus:
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:
            gpus = 0
    zero = 0
    if deepspeed_config and Path(deepspeed_config).is_file():
        zero = int(json.loads(Path(deepspeed_config).read_text()).get("zero_optimization", {}).get("stage", 0))
    lora = train.get("lora") or {}
    method = train.get("method", "lora")
    precision = PRECISION.get(str(train.get("precision", "fp32")), "fp32")
    seq = train.get("max_len") or 1024
    batch = int(train.get("batch_size", 1)) * (2 if pairs else 1)
    return Plan(
        stage=stage,
        model=dry_run_model(model_dir, params_file),
        method=method,
        seq_len=int(seq),
        micro_batch=batch,
        grad_accum=int(train.get("grad_accum", 1)),
        lora_r=int(lora.get("r", 8)),
        lora_targets=tuple(lora.get("target_modules") or ("q_proj", "v_proj")),
        gradient_checkpointing=bool(train.get("gradient_checkpointing", False)),
        dtype=precision,
        weight_dtype="fp32" if method == "qlora" else "",
        double_quant=False,
        head=head,
        gpus=max(1, gpus),
        zero_stage=zero,
        gpu_gib=gpu_gib,
        notes={
            "model dir": f"{model_dir}"
            + ("" if Path(model_dir, "config.json").is_file() else " (not made yet: architecture from params base)")
        },
    )


def ppo_plan(cfg, policy_dir: str | Path, params_file: str | Path | None = None, *, gpu_gib: float | None = 24) -> Plan:
    """stages/ppo.py's step: a LoRA policy trained on minibatches of prompt + response tokens, with the
    reward model (unless a reward function replaces it) and, for `reference: copy`, a second frozen
    policy resident beside it; the value head shares the policy's trunk."""
    cfg = _mapping(cfg)
    new_tokens = cfg["max_new_tokens"]
    train = {
        "method": "lora",
        "lora": cfg["lora"],
        "max_len": cfg["max_prompt_len"] + new_tokens,
        "batch_size": cfg["minibatch_size"],
        "precision": PRECISION.get(str(cfg["precision"]), "fp32"),
    }
    plan = stage_plan("ppo", train, policy_dir, params_file, gpu_gib=gpu_gib)
    plan.weight_dtype = "fp32"  # the policy is loaded in fp32 whatever the autocast
    plan.frozen_copies = int(cfg.get("reward_fn") is None) + int(cfg.get("reference") == "copy")
    plan.notes["rollout"] = (
        f"{cfg['batch_size']} prompts x {new_tokens} new tokens, "
        f"{cfg['ppo_epochs']} epochs of minibatches of {cfg['minibatch_size']}"
    )
    return plan


def _dtype_name(dtype: str, model) -> str:
    """A BYTES key for a stage's dtype setting; "auto" is the checkpoint's own torch_dtype."""
    if dtype == "auto":
        cfg = KNOWN.get(str(model)) or {}
        path = Path(str(model)) / "config.json"
        if not cfg and path.is_file():
            cfg = json.loads(path.read_text(encoding="utf-8"))
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if dtype not in BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(BYTES)} or auto")
    return dtype


def generation_plan(
    stage: str,
    model_dir: str | Path,
    params_file: str | Path | None = None,
    *,
    engine=None,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    dtype: str = "bf16",
    method: str = "generate",
    head: str = "lm",
    gpu_gib: float | None = 24,
    what: str = "",
) -> Plan:
    """A Plan for a stage that runs a model without training it: `generate` (weights + the KV cache of
    `batch` sequences of prompt_tokens + new_tokens) or `score` (one forward pass over `batch` sequences of
    prompt_tokens, with every position's logits). `engine` is the stage's resolved engine spec (an
    llm.EngineSpec or its mapping): with
    kind vllm the dtype is the engine's, and the notes say what vLLM reserves up front
    (gpu_memory_utilization of the card) and how many sequences of that length its KV cache then holds."""
    engine = _mapping(engine)
    kind = engine.get("kind", "local")
    if kind in ("local", "vllm") and engine.get("dtype"):
        dtype = engine["dtype"]
    model = dry_run_model(model_dir, params_file)
    seq = int(prompt_tokens) + int(new_tokens)
    # the largest forward: the whole batch's prompts at once in transformers, chunks of max_num_batched_tokens in vLLM
    prefill = min(int(batch) * seq, VLLM_BATCHED_TOKENS) if kind == "vllm" else int(batch) * int(prompt_tokens)
    plan = Plan(
        stage=stage,
        model=model,
        method=method,
        seq_len=seq,
        prefill_tokens=prefill,
        micro_batch=int(batch),
        dtype=_dtype_name(dtype, model),
        gradient_checkpointing=False,
        optimizer="none",
        head=head,
        gpu_gib=gpu_gib,
        notes={
            "model dir": f"{model_dir}"
            + ("" if Path(model_dir, "config.json").is_file() else " (not made yet: architecture from params base)")
        },
    )
    if what:
        plan.notes["work"] = what
    plan.notes["engine"] = (
        f"{kind}, batches of {batch}" if method == "generate" else f"in-process (transformers), batches of {batch}"
    )
    if kind == "openai":
        plan.notes["engine"] += " (an endpoint: nothing is loaded in this process)"
    if kind == "vllm" and gpu_gib:
        est = estimate(plan)
        arch = load_arch(model)
        util = float(engine.get("gpu_memory_utilization", 0.9))
        tp = int(engine.get("tensor_parallel_size", 1))
        per_token = 2 * arch.layers * arch.kv_dim * BYTES[plan.dtype] / tp
        room = util * gpu_gib * GIB - est["weights"] / tp - est["activations"] - CUDA_CONTEXT
        seqs = room / per_token / plan.seq_len if room > 0 else 0
        plan.notes["vllm"] = (
            f"reserves {util:g} x {gpu_gib:g} GiB = {util * gpu_gib:.1f} GiB per GPU "
            f"(tensor_parallel_size {tp}); its KV cache then holds {max(0, room) / GIB:.1f} GiB = "
            f"{int(seqs)} sequences of {plan.seq_len} tokens"
        )
        # vLLM takes its share up front and queues what its KV cache cannot hold: the question is whether one
        # sequence fits beside the weights, and how much of the batch runs at once
        plan.notes["verdict"] = (
            f"fits: vLLM runs {min(batch, int(seqs))} of the batch of {batch} at once"
            if seqs >= 1
            else "does NOT fit: the weights leave no room for one sequence's "
            "KV cache in vLLM's share; raise gpu_memory_utilization or tensor_parallel_size"
        )
    return plan


def dry_run_plans(plans: list[Plan], params: dict | None = None) -> str:
    """Several plans (a stage that loads more than one model, or runs one model two ways), then the params once."""
    text = "\n".join(
        dry_run(p)
        if not p.notes.get("engine", "").startswith("openai")
        else f"stage {p.stage}: dry run: {p.notes['engine']}"
        for p in plans
    )
    if params:
        text += "\n  params       " + json.dumps(params, sort_keys=True, default=str)
    return text


PROMPT_TOKENS = 512  # the prompt a dry run assumes where a stage's params do not bound it (system + instruction)


def stage_inference_plans(
    stage: str,
    cfg,
    model_dir: str | Path,
    params_file: str | Path | None = None,
    *,
    spec=None,
    reward_model: str | Path | None = None,
    gpu_gib: float | None = 24,
) -> list[Plan]:
    """The plans of a stage that runs models without training them, from its resolved params `cfg` and
    engine `spec` (Configs or their mappings): what it generates (weights + KV cache at its batch and lengths) and
    what it scores. A stage that folds its engine into its config (curate, evaluate) needs no `spec`."""
    cfg, spec = _mapping(cfg), _mapping(spec)
    gen = dict(params_file=params_file, gpu_gib=gpu_gib)
    if stage == "translate":
        chars = cfg["max_chars"] if cfg["max_chars"] and cfg["max_chars"] > 0 else 4 * PROMPT_TOKENS
        return [
            generation_plan(
                stage,
                spec["model"],
                engine=spec,
                batch=spec["batch_size"],
                prompt_tokens=PROMPT_TOKENS + int(chars * cfg["tokens_per_char"]),
                new_tokens=cfg["max_new_tokens"],
                what="one field per request",
                **gen,
            )
        ]
    if stage == "augment":  # a web segment of max_chars at ~4 characters per token, in the instruction prompt
        return [
            generation_plan(
                stage,
                model_dir,
                engine=spec,
                batch=spec["batch_size"],
                prompt_tokens=PROMPT_TOKENS // 4 + cfg["max_chars"] // 4,
                new_tokens=cfg["max_new_tokens"],
                what="an instruction per web segment",
                **gen,
            )
        ]
    if stage == "curate":  # the scorer is curate's engine, in both modes
        spec = cfg["engine"]
        if cfg["mode"] == "logprobs":
            return [
                generation_plan(
                    stage,
                    model_dir,
                    engine={"kind": "local", "dtype": spec["dtype"]},
                    batch=spec["batch_size"],
                    prompt_tokens=PROMPT_TOKENS + cfg["max_response_len"],
                    new_tokens=0,
                    method="score",
                    what="the score digits' log-probs",
                    **gen,
                )
            ]
        return [
            generation_plan(
                stage,
                model_dir,
                engine=spec,
                batch=spec["batch_size"],
                prompt_tokens=PROMPT_TOKENS + cfg["max_response_len"],
                new_tokens=cfg["max_new_tokens"],
                what="a 'Score: N' reply per candidate",
                **gen,
            )
        ]
    if stage == "distill":
        return [
            generation_plan(
                stage,
                model_dir,
                engine=spec,
                batch=spec["batch_size"],
                prompt_tokens=PROMPT_TOKENS,
                new_tokens=cfg["max_new_tokens"],
                what="the teacher's answers",
                **gen,
            )
        ]
    if stage == "evaluate":  # answers with `spec` (its engine with the model dir); scores in the engine's dtype
        dtype = cfg["engine"]["dtype"]
        plans = [
            generation_plan(
                stage,
                model_dir,
                engine=spec,
                batch=spec["batch_size"],
                prompt_tokens=PROMPT_TOKENS,
                new_tokens=cfg["max_new_tokens"],
                what="answers to the eval prompts",
                **gen,
            ),
            generation_plan(
                stage,
                model_dir,
                engine={"kind": "local", "dtype": dtype},
                method="score",
                batch=cfg["ppl_batch_size"],
                prompt_tokens=cfg["ppl_max_len"],
                new_tokens=0,
                what="perplexity (after the answering engine is closed)",
                **gen,
            ),
        ]
        if reward_model:
            plans.append(
                generation_plan(
                    stage,
                    reward_model,
                    engine={"kind": "local", "dtype": dtype},
                    method="score",
                    head="score",
                    batch=cfg["reward_batch_size"],
                    prompt_tokens=cfg["ppl_max_len"],
                    new_tokens=0,
                    what="reward scores of the answers",
                    **gen,
                )
            )
        return plans
    if stage == "export":  # the merged model and its reloaded copy, compared on one short prompt
        plan = generation_plan(
            stage,
            model_dir,
            engine={"kind": "local", "dtype": cfg["dtype"]},
            method="score",
            batch=1,
            prompt_tokens=64,
            new_tokens=0,
            what="merge, save, reload and compare",
            **gen,
        )
        plan.frozen_copies = 1
        return [plan]
    raise ValueError(f"stage {stage!r}: no inference plan (training stages use stage_plan / ppo_plan)")

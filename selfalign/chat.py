"""The chat template as the single source of prompts, for training, serving and scoring alike.

The most reported failure in this field is a model trained on one rendering of a conversation
and served with another. Every place that turns messages into text goes through `render` with
the model directory's own tokenizer and chat template, and training splits a rendered example
with `split_last_turn`, whose prompt part is by construction what `render(..., add_generation_prompt=True)`
gives the server.
"""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.chat_template is None:
        raise ValueError(
            f"{model_dir}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def render(tok, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_PROBE = "Probe answer 7."


def end_of_turn(tok) -> str:
    """The special token the chat template writes right after an assistant message's text.

    ChatML (SmolLM2, Qwen): <|im_end|>; Llama-3: <|eot_id|>, which is not the tokenizer's eos_token
    in Llama-3.0's own tokenizer_config (<|end_of_text|>). Read off a rendered probe conversation,
    so a training target ends where the template closes the turn and generation stops there; a
    template that closes a turn with no special token (or cannot render the probe) falls back to eos.
    """
    probe = [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": _PROBE}]
    try:
        full = render(tok, probe)
    except Exception:  # jinja raises what the template raises (e.g. a template that demands a system turn)
        return tok.eos_token
    after = full[full.rfind(_PROBE) + len(_PROBE) :].lstrip(" ")
    specials = set(tok.all_special_tokens) | {t for t, _ in tok.get_added_vocab().items()}
    found = [t for t in specials if t and after.startswith(t)]
    return max(found, key=len) if found else tok.eos_token


def split_last_turn(tok, messages: list[dict]) -> tuple[str, str]:
    """(prompt, target) for a conversation ending in an assistant turn.

    prompt is the server's prompt for messages[:-1]; target is the assistant's text up to and
    including the end-of-turn token, and nothing after it (ChatML's trailing newline belongs to
    the next turn's prompt, not to what the model must learn to emit).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    prompt = render(tok, messages[:-1], add_generation_prompt=True)
    full = render(tok, messages)
    if not full.startswith(prompt):
        raise ValueError("chat template does not render the prompt as a prefix of the conversation")
    rest = full[len(prompt) :]
    eot = end_of_turn(tok)
    cut = rest.rfind(eot)
    if cut < 0:
        raise ValueError(f"chat template does not close the assistant turn with {eot!r}")
    return prompt, rest[: cut + len(eot)]

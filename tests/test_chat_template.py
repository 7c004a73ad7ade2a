"""Training and serving render a conversation the same way (SmolLM2's real tokenizer and ChatML template).

The prompt part of a training example is, string for string and token for token, the prompt the
server builds; labels cover exactly the assistant tokens; each target ends with <|im_end|>.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selfalign import chat, sft

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    "system": [
        {"role": "system", "content": "Answer in the style of an AI Assistant."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue.\n\nOr red."},
    ],
    "multi": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return chat.load_tokenizer(tiny_model_dir)


def server_prompts(tok, messages):
    """Every prompt builder a server may use: selfalign.chat's, and selfalign.serve's when it exists."""
    out = {"chat.render": chat.render(tok, messages, add_generation_prompt=True)}
    if importlib.util.find_spec("selfalign.serve") is not None:
        from selfalign import serve

        out["serve.prompt_for"] = serve.prompt_for(tok, messages)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_training_prompt_is_the_serving_prompt(tok, name):
    msgs = CONVERSATIONS[name]
    pieces = sft.segments(tok, msgs)
    # Everything before the last target is the prompt for the last turn.
    prompt_text = "".join(text for text, _ in pieces[:-1])
    for builder, served in server_prompts(tok, msgs[:-1]).items():
        assert prompt_text == served, builder
    ids, labels = sft.encode(tok, msgs)
    served_ids = tok(server_prompts(tok, msgs[:-1])["chat.render"], add_special_tokens=False)["input_ids"]
    assert ids[: len(served_ids)] == served_ids
    # Inside the prompt only earlier assistant turns carry labels.
    earlier = "".join(m["content"] + "<|im_end|>" for m in msgs[:-1] if m["role"] == "assistant")
    assert tok.decode([x for x in labels[: len(served_ids)] if x != sft.IGNORE]) == earlier


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_cover_exactly_the_assistant_tokens(tok, name):
    msgs = CONVERSATIONS[name]
    ids, labels = sft.encode(tok, msgs)
    eot = tok.convert_tokens_to_ids(chat.end_of_turn(tok))
    # Contiguous labelled spans, one per assistant turn, each "content<|im_end|>".
    spans = assistant_spans(ids, labels)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(s) for s in spans] == [a + "<|im_end|>" for a in answers]
    assert all(s[-1] == eot for s in spans)
    # The training text is the full rendering up to the last <|im_end|>; the template's trailing newline
    # belongs to the next prompt and is not trained.
    full = chat.render(tok, msgs)
    assert tok.decode(ids) == full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    assert ids[-1] == eot and labels[-1] == eot


def test_system_tag_lands_in_the_prompt_not_in_the_labels(tok):
    record = {"messages": CONVERSATIONS["single"], "system": "own system"}
    tagged = sft.conversation(record, "Answer with knowledge from web search.")
    untagged = sft.conversation(record, None)
    assert tagged[0] == {"role": "system", "content": "Answer with knowledge from web search."}
    assert untagged[0] == {"role": "system", "content": "own system"}
    ids, labels = sft.encode(tok, tagged)
    prompt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == sft.IGNORE])
    assert "Answer with knowledge from web search." in prompt
    assert "web search" not in tok.decode([lab for lab in labels if lab != sft.IGNORE])


def test_keep_system_lets_a_records_own_system_message_win_over_the_tag():
    """Distilled Orca answers were written under their own system message; the tag fills in only where none is."""
    tag = "Answer in the style of an AI Assistant."
    orca = {"messages": CONVERSATIONS["single"], "system": "Explain step by step."}
    plain = {"messages": CONVERSATIONS["single"]}
    assert sft.conversation(orca, tag, keep_system=True)[0]["content"] == "Explain step by step."
    assert sft.conversation(plain, tag, keep_system=True)[0]["content"] == tag
    assert sft.conversation(orca, tag)[0]["content"] == tag


def test_keep_system_on_a_reversed_source_is_a_params_error():
    cfg = {
        "system_tags": {"seed": "s"},
        "runs": {"r": {"phases": [{"sources": [{"path": "x.jsonl", "reverse": True, "keep_system": True}]}]}},
    }
    with pytest.raises(sft.ParamsError, match=r"sources\[0\]\.keep_system"):
        sft.SFTConfig.from_dict(cfg, "sft")


# ---------------------------------------------------------------- every shipped chat template keeps its end-of-turn token

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
SEED = Path(__file__).resolve().parent / "fixtures" / "sft" / "seed.jsonl"
# name: (template file, special tokens the vocabulary must have, bos, eos, the token that must close a turn).
# Llama-3.0's own tokenizer_config names <|end_of_text|> as eos and the Qwen2.5 base models <|endoftext|>:
# in both the token that ends an assistant turn is another one, read off the template.
TEMPLATES = {
    "smollm2": ("chat_template.jinja", [], None, None, "<|im_end|>"),
    "llama3": (
        "llama3_chat_template.jinja",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
    ),
    "qwen2_5": ("qwen2_5_chat_template.jinja", [], None, "<|endoftext|>", "<|im_end|>"),
}
LONG = "Please read the following background before you answer, it matters a great deal. " * 40


def template_tok(name: str):
    """The fixture vocabulary (SmolLM2's) under another model family's chat template and special tokens."""
    from transformers import AutoTokenizer

    file, specials, bos, eos, _ = TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    tok.chat_template = (TOKENIZER / file).read_text()
    return tok


def assistant_spans(ids, labels):
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != sft.IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def header(tok, messages):
    """What the template writes before the first user message's text (system prompt and all)."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    text = chat.render(tok, head + [{"role": "user", "content": "MARKER"}])
    return text[: text.index("MARKER")]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_end_of_turn_is_read_off_the_template(name):
    tok = template_tok(name)
    assert chat.end_of_turn(tok) == TEMPLATES[name][4]
    msgs = CONVERSATIONS["multi"]
    prompt, target = chat.split_last_turn(tok, msgs)
    assert target == "Paris." + TEMPLATES[name][4]
    assert prompt == chat.render(tok, msgs[:-1], add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_example_keeps_its_end_of_turn_token_in_the_label_mask(name):
    """Short, multi-turn, over-long and reversed examples, and every line of the sft fixture at three
    max_len: each kept example ends with the end-of-turn token, labelled, and starts with the template's
    header; each assistant span closes with it; an example that cannot fit is rejected as too_long."""
    tok = template_tok(name)
    eot = tok.convert_tokens_to_ids(TEMPLATES[name][4])
    assert eot != tok.unk_token_id
    long_multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": "Fine, thanks. " * 40},
        {"role": "user", "content": LONG},
        {"role": "assistant", "content": "Blue."},
    ]
    convs = [*CONVERSATIONS.values(), long_multi, long_multi[:1] + long_multi[3:]]
    built = []
    for msgs in convs:
        for max_len in (10**6, 200, 60):
            try:
                ex = sft.build_example(tok, msgs, max_len)
            except sft.Reject as e:
                assert e.reason == "too_long" and max_len < 10**6
                continue
            built.append((ex, msgs, max_len))
    assert sum(ex["shortened"] for ex, _, _ in built) >= 4
    for ex, msgs, max_len in built:
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) <= max_len and ids[-1] == labels[-1] == eot
        spans = assistant_spans(ids, labels)
        assert all(s[-1] == eot for s in spans)
        assert tok.decode(spans[-1]) == msgs[-1]["content"] + TEMPLATES[name][4]
        assert tok.decode(ids).startswith(header(tok, msgs))
    wording = "Write the instruction for this answer.\n\n{response}"
    for line in SEED.read_text().splitlines():
        rec = json.loads(line)
        for max_len in (512, 256, 128):
            for reverse in (False, True):
                try:
                    if reverse:
                        ex = sft.build_reversed(tok, rec, None, wording, max_len)
                    else:
                        ex = sft.build_example(tok, sft.conversation(rec, "Be helpful."), max_len)
                except sft.Reject as e:
                    assert e.reason == "too_long"
                    continue
                ids, labels = ex["input_ids"], ex["labels"]
                assert len(ids) <= max_len and ids[-1] == labels[-1] == eot
                target = rec["messages"][0 if reverse else -1]["content"]
                assert tok.decode([x for x in labels if x != sft.IGNORE]) == target + TEMPLATES[name][4]

"""Training and serving render a conversation the same way (SmolLM2's real tokenizer and ChatML template).

The prompt part of a training example is, string for string and token for token, the prompt the
server builds; labels cover exactly the assistant tokens; each target ends with <|im_end|>.
"""

from __future__ import annotations

import importlib.util

import pytest

from selfalign import chat, training

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    "system": [{"role": "system", "content": "Answer in the style of an AI Assistant."},
               {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue.\n\nOr red."}],
    "multi": [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
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
    pieces = training.segments(tok, msgs)
    # Everything before the last target is the prompt for the last turn.
    prompt_text = "".join(text for text, _ in pieces[:-1])
    for builder, served in server_prompts(tok, msgs[:-1]).items():
        assert prompt_text == served, builder
    ids, labels = training.encode(tok, msgs)
    served_ids = tok(server_prompts(tok, msgs[:-1])["chat.render"], add_special_tokens=False)["input_ids"]
    assert ids[: len(served_ids)] == served_ids
    # Inside the prompt only earlier assistant turns carry labels.
    earlier = "".join(m["content"] + "<|im_end|>" for m in msgs[:-1] if m["role"] == "assistant")
    assert tok.decode([x for x in labels[: len(served_ids)] if x != training.IGNORE]) == earlier


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_cover_exactly_the_assistant_tokens(tok, name):
    msgs = CONVERSATIONS[name]
    ids, labels = training.encode(tok, msgs)
    eot = tok.convert_tokens_to_ids(chat.end_of_turn(tok))
    # Contiguous labelled spans, one per assistant turn, each "content<|im_end|>".
    spans, cur = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != training.IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
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
    tagged = training.conversation(record, "Answer with knowledge from web search.")
    untagged = training.conversation(record, None)
    assert tagged[0] == {"role": "system", "content": "Answer with knowledge from web search."}
    assert untagged[0] == {"role": "system", "content": "own system"}
    ids, labels = training.encode(tok, tagged)
    prompt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == training.IGNORE])
    assert "Answer with knowledge from web search." in prompt
    assert "web search" not in tok.decode([lab for lab in labels if lab != training.IGNORE])


def test_keep_system_lets_a_records_own_system_message_win_over_the_tag():
    """Distilled Orca answers were written under their own system message; the tag fills in only where none is."""
    tag = "Answer in the style of an AI Assistant."
    orca = {"messages": CONVERSATIONS["single"], "system": "Explain step by step."}
    plain = {"messages": CONVERSATIONS["single"]}
    assert training.conversation(orca, tag, keep_system=True)[0]["content"] == "Explain step by step."
    assert training.conversation(plain, tag, keep_system=True)[0]["content"] == tag
    assert training.conversation(orca, tag)[0]["content"] == tag


def test_keep_system_on_a_reversed_source_is_a_params_error():
    cfg = {"system_tags": {"seed": "s"}, "runs": {"r": {"phases": [{"sources": [
        {"path": "x.jsonl", "reverse": True, "keep_system": True}]}]}}}
    with pytest.raises(training.ParamsError, match=r"sources\[0\]\.keep_system"):
        training.check_run(cfg, "r", "sft")

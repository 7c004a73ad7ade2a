"""Unit tests for the shared schema, params resolution and atomic IO."""

import dataclasses
import json

import pytest

from selfalign import io, params, records
from selfalign.config import Config, opt


def test_record_id_is_content_derived_and_stable():
    a = records.chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], lang="en", source="x"
    )
    b = records.chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        lang="fr",
        source="y",
        meta={"k": 1},
    )
    c = records.chat(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}], lang="en", source="x"
    )
    assert a["id"] == b["id"] != c["id"]
    assert len(a["id"]) == 16


def test_validate_names_the_field():
    r = records.make("web", text="some text", lang="en", source="s")
    r["text"] = 3
    with pytest.raises(records.RecordError, match="'text'"):
        records.validate(r)
    with pytest.raises(records.RecordError, match="messages\\[0\\]"):
        records.chat([{"role": "bot", "content": "x"}], lang="en", source="s")


@dataclasses.dataclass
class Rules(Config):
    a: bool = False
    b: bool = True


@dataclasses.dataclass
class Section(Config):
    min_chars: int = 1
    max_chars: int = 100
    rules: Rules = opt(Rules())


def test_params_override_order_and_unknown_keys(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("clean:\n  min_chars: 5\n  rules: {a: true}\n")
    defaults = Section
    got = params.resolve(defaults, p, "clean", ["max_chars=7", "rules.b=false"])
    assert got.to_dict() == {"min_chars": 5, "max_chars": 7, "rules": {"a": True, "b": False}}
    p.write_text("clean:\n  min_chars: 5\n  mni_chars: 3\n")
    with pytest.raises(params.ParamsError, match="mni_chars"):
        params.resolve(defaults, p, "clean")
    with pytest.raises(params.ParamsError, match="nope"):
        params.resolve(defaults, None, "clean", ["nope=1"])


def test_read_jsonl_reports_bad_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{"a": \n[1]\n\n{"b": 2}\n')
    got = list(io.read_jsonl(f))
    assert [n for n, _ in got] == [1, 2, 3, 5]
    assert isinstance(got[1][1], io.JsonlLineError) and got[1][1].line == 2
    assert "expected a JSON object" in got[2][1].reason


def test_read_jsonl_reads_past_bad_bytes_a_bom_and_deep_nesting(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": "\xe9t\xe9"}\n' + b"[" * 100_000 + b'\n{"b": 2}\n')
    got = list(io.read_jsonl(f))
    assert got[0] == (1, {"a": 1}) and got[3] == (4, {"b": 2})
    assert (got[1][1].code, got[1][1].line, got[1][1].raw) == ("invalid_utf8", 2, '{"a": "\\xe9t\\xe9"}')
    assert "column 8" in got[1][1].reason
    assert got[2][1].code == "invalid_json" and "nested too deeply" in got[2][1].reason
    good, bad, n = records.read(f, "test")
    assert (good, n) == ([], 4) and [b["reason"] for b in bad] == [
        "invalid_record",
        "invalid_utf8",
        "invalid_json",
        "invalid_record",
    ]
    f.write_text('\n  [{"kind": "web"},\n {"kind": "web"}]\n')
    good, bad, n = records.read(f, "test")
    assert (good, n, [b["reason"] for b in bad]) == ([], 1, ["json_array"])


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError):
        with io.jsonl_writer(out) as write:
            write({"a": 1})
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    io.write_jsonl(out, [{"a": 1}])
    assert json.loads(out.read_text()) == {"a": 1}


def test_tiny_model_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_split_last_turn_prompt_is_the_serving_prompt(tiny_model_dir):
    from selfalign import chat

    tok = chat.load_tokenizer(tiny_model_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    prompt, target = chat.split_last_turn(tok, msgs)
    assert prompt == chat.render(tok, msgs[:-1], add_generation_prompt=True)
    assert target == "4<|im_end|>" and target.endswith(chat.end_of_turn(tok))

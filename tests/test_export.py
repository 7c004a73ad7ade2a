"""The export stage: lineage from dvc.lock, adapter merging, and a round trip through the OpenAI-compatible server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import chat, params
from selfalign import export as ex

ROOT = Path(__file__).resolve().parent.parent
REPLY = "Hi there!"


def _dep(path, md5):
    return {"path": path, "hash": "md5", "md5": md5, "size": 10}


def fake_lock() -> dict:
    """A dvc.lock shaped like the real one: a foreach stage, directory outs, params, metrics outs."""
    return {
        "schema": "2.0",
        "stages": {
            "base": {
                "cmd": "python stages/base.py --output models/base",
                "deps": [_dep("stages/base.py", "b1")],
                "params": {
                    "params.yaml": {
                        "base": {
                            "source": "gguf",
                            "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                        }
                    }
                },
                "outs": [_dep("models/base", "ba5e.dir")],
            },
            "ingest": {
                "cmd": "python stages/ingest.py --params params.yaml --output-dir data/ingest",
                "deps": [_dep("stages/ingest.py", "a1"), _dep("data/sample", "d5ample.dir")],
                "params": {"params.yaml": {"ingest": {"max_records": 500}}},
                "outs": [_dep("data/ingest", "1ngest.dir"), _dep("metrics/ingest.json", "stale0")],
            },
            "clean": {
                "cmd": "python stages/clean.py --input-dir data/ingest --output-dir data/clean",
                "deps": [_dep("stages/clean.py", "c1"), _dep("data/ingest", "1ngest.dir")],
                "params": {"params.yaml": {"clean": {"min_chars": 5}}},
                "outs": [_dep("data/clean", "c1ean.dir")],
            },
            "translate": {
                "cmd": "python stages/translate.py",
                "deps": [_dep("stages/translate.py", "t1")],
                "outs": [_dep("data/translate", "tr.dir")],
            },
            "sft@m0": {
                "cmd": "python stages/sft.py --run m0 --output models/m0",
                "deps": [
                    _dep("stages/sft.py", "s1"),
                    _dep("models/base", "ba5e.dir"),
                    _dep("data/clean/seed.jsonl", "5eed"),
                ],
                "params": {"params.yaml": {"sft.train": {"lr": 0.0002, "epochs": 2}}},
                "outs": [_dep("models/m0", "m0.dir")],
            },
            "ppo": {
                "cmd": "python stages/ppo.py --policy models/m0 --output models/ppo",
                "deps": [_dep("stages/ppo.py", "p1"), _dep("models/m0", "m0.dir"), _dep("models/reward", "rw.dir")],
                "params": {"params.yaml": {"ppo": {"kl_coef": 0.05, "steps": 16}}},
                "outs": [_dep("models/ppo", "pp0.dir")],
            },
            "evaluate": {
                "cmd": "python stages/evaluate.py",
                "deps": [_dep("models/ppo", "pp0.dir")],
                "outs": [_dep("metrics/evaluate.json", "ev")],
            },
            "export": {
                "cmd": "python stages/export.py",
                "deps": [_dep("models/ppo", "pp0.dir")],
                "outs": [_dep("models/export", "old.dir")],
            },
        },
    }


def test_lineage_walks_upstream_only():
    lock = fake_lock()["stages"]
    assert ex.producer(lock, "data/clean/seed.jsonl") == "clean" and ex.producer(lock, "stages/sft.py") is None
    assert ex.lineage(lock, "models/ppo", exclude=("export",)) == ["base", "ingest", "clean", "sft@m0", "ppo"]
    assert ex.lineage(lock, "models/nowhere") == []
    rows = ex.lineage_entries(lock, ["sft@m0"])
    assert rows[0]["params"] == {"sft.train": {"lr": 0.0002, "epochs": 2}}
    assert rows[0]["deps"][2] == {"path": "data/clean/seed.jsonl", "md5": "5eed", "from": "clean"}
    assert ex.base_model_id(ex.lineage_entries(lock, ["base", "ppo"])) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ex.flat_numbers({"a": {"b": 1, "c": [1]}, "d": 0.5, "e": True, "f": "x"}) == {"a.b": 1, "d": 0.5}


def with_distill(lock: dict, cmd_teacher: str, engine: dict | None = None, teacher_md5: str = "ba5e.dir") -> dict:
    """fake_lock's stages plus a distill stage feeding sft@m0, asking `cmd_teacher`."""
    stages = json.loads(json.dumps(lock["stages"]))
    stages["distill"] = {
        "cmd": f"python stages/distill.py --params params.yaml --seed data/clean/seed.jsonl --teacher {cmd_teacher} "
        "--output-dir data/distill",
        "deps": [
            _dep("stages/distill.py", "d1"),
            _dep("data/clean/seed.jsonl", "5eed"),
            _dep(cmd_teacher, teacher_md5),
        ],
        "params": {"params.yaml": {"distill": {"max_new_tokens": 192, "engine": engine or {}}}},
        "outs": [_dep("data/distill/distilled.jsonl", "d15t")],
    }
    stages["sft@m0"]["deps"].append(_dep("data/distill/distilled.jsonl", "d15t"))
    return {"schema": "2.0", "stages": stages}


def test_the_teacher_is_named_when_it_is_the_students_own_base():
    lock = with_distill(fake_lock(), "models/base")["stages"]
    t = ex.distill_teacher(lock)
    assert t == {
        "teacher": "models/base",
        "engine": "local",
        "student_base": "models/base",
        "teacher_is_student_base": True,
    }
    assert ex.teacher_sentence(t).startswith(
        "**The distillation teacher is the student's own base model** (`models/base`)"
    )
    # a copy of the base under another path is still the base: the lock gives it the same md5
    assert ex.distill_teacher(with_distill(fake_lock(), "models/copy")["stages"])["teacher_is_student_base"]
    other = ex.distill_teacher(with_distill(fake_lock(), "models/big", teacher_md5="b1g.dir")["stages"])
    assert not other["teacher_is_student_base"] and "not the student's base" in ex.teacher_sentence(other)
    api = ex.distill_teacher(
        with_distill(fake_lock(), "models/base", engine={"kind": "openai", "model": "gpt-4o"})["stages"]
    )
    assert api["teacher"] == "gpt-4o" and api["engine"] == "openai" and not api["teacher_is_student_base"]
    assert ex.distill_teacher(fake_lock()["stages"]) is None
    assert ex.lineage(lock, "models/ppo", exclude=("export",)) == [
        "base",
        "ingest",
        "clean",
        "distill",
        "sft@m0",
        "ppo",
    ]


def test_generation_config_stops_at_end_of_turn(tiny_model_dir):
    model, tok, merged = ex.load_source(tiny_model_dir)
    eot = ex.set_generation_config(model, tok)
    assert merged is None and eot == tok.convert_tokens_to_ids("<|im_end|>") == model.generation_config.eos_token_id


def test_an_adapter_is_merged_into_its_base(tmp_path, tiny_model_dir, monkeypatch):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, "models/base")
    base = AutoModelForCausalLM.from_pretrained("models/base")
    torch.manual_seed(1)
    peft = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    peft.save_pretrained("models/ppo")  # adapter only: adapter_config.json names models/base
    assert ex.is_adapter_dir("models/ppo")
    res = CliRunner().invoke(
        load_stage("export").main,
        ["--model", "models/ppo", "--output", "models/export", "--metrics", "metrics/export.json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    m = json.loads(Path("metrics/export.json").read_text())
    assert m["merged_adapter"] and m["reload_max_logit_diff"] < 1e-4 and m["lineage_stages"] == 0
    assert m["teacher_is_student_base"] is None
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("models/base"), "models/ppo")
    exported = AutoModelForCausalLM.from_pretrained("models/export")
    with torch.no_grad():
        want, got = reference(ids).logits, exported(ids).logits
        plain = AutoModelForCausalLM.from_pretrained("models/base")(ids).logits
    assert torch.allclose(want, got, atol=1e-4) and not torch.allclose(plain, got, atol=1e-3)
    assert not (Path("models/export") / "adapter_config.json").exists()
    assert "No lineage" in (Path("models/export") / "README.md").read_text()


def test_export_round_trip_through_the_server(tmp_path, monkeypatch):
    from openai import OpenAI
    from scripted_model import make_scripted_model

    from selfalign import serve

    monkeypatch.chdir(tmp_path)
    make_scripted_model(Path("models/ppo"), REPLY)
    info = {"run": "ppo", "system": "Answer in the style of an AI Assistant.", "inference_tag": "seed"}
    Path("models/ppo/selfalign.json").write_text(json.dumps(info))
    Path("dvc.lock").write_text(yaml.safe_dump(with_distill(fake_lock(), "models/base")))
    Path("metrics").mkdir()
    Path("metrics/ingest.json").write_text(json.dumps({"records_in": 120, "kept": 100, "rejected": 20}))

    def est(x, lo, hi):
        return {"mean": x, "ci": [lo, hi], "n": 36}

    Path("metrics/evaluate.json").write_text(
        json.dumps(
            {
                "judge": "reference",
                "models": {
                    "ppo": {
                        "reward": {"all": est(0.42, 0.3, 0.5), "math": est(0.1, 0.0, 0.2)},
                        "length_tokens": {"all": est(3.0, 2.0, 4.0)},
                        "stop_rate": {"all": est(0.9, 0.8, 1.0)},
                        "refusal_rate": {"safety": est(1.0, 1.0, 1.0), "other": est(0.25, 0.1, 0.4)},
                        "answer_match": {"all": est(0.5, 0.25, 0.75)},
                        "reference_rouge": {"all": est(0.2, 0.1, 0.3)},
                        "perplexity": {"perplexity": 12.5, "ci": [11.0, 14.0]},
                        "reference_perplexity": {"perplexity": 20.0, "ci": [15.0, 26.0]},
                    }
                },
                "win_rate": {
                    "ppo_vs_m0": {"all": {"win_rate": 0.75, "ci": [0.6, 0.9], "verdict": "better"}},
                    "final_vs_ppo": {
                        "all": {"win_rate": 0.4, "ci": [0.3, 0.55], "verdict": "no measurable difference"}
                    },
                },
            }
        )
    )

    res = CliRunner().invoke(
        load_stage("export").main,
        [
            "--model",
            "models/ppo",
            "--evaluation",
            "metrics/evaluate.json",
            "--lock",
            "dvc.lock",
            "--output",
            "models/export",
            "--metrics",
            "metrics/export.json",
            "--set",
            "dtype=fp32",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert json.loads(Path("metrics/export.json").read_text())["teacher_is_student_base"] is True
    out = Path("models/export")
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "selfalign.json",
        "README.md",
    } <= {p.name for p in out.iterdir()}
    tok = chat.load_tokenizer(out)
    eot_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eot_id

    card = (out / "README.md").read_text()
    for needle in (
        "data/clean/seed.jsonl",
        "`5eed`",
        "data/sample",
        "kl_coef: 0.05",
        "lr: 0.0002",
        "max_records: 500",
        "python stages/ppo.py --policy models/m0 --output models/ppo",
        "metrics/ingest.json",
        "records_in: 120",
        "(the workspace file differs from dvc.lock)",
        "| win rate against m0 | 0.75 [0.6, 0.9] (better) |",
        "| win rate against final | 0.6 [0.45, 0.7] (no measurable difference) |",
        "| perplexity of held-out seed responses | 12.5 [11, 14] |",
        "| answers that stop at end-of-turn (not the token cap) | 0.9 [0.8, 1] |",
        "**The distillation teacher is the student's own base model** (`models/base`)",
        "From `metrics/evaluate.json`",
        "Answer in the style of an AI Assistant.",
        "<|im_end|>",
        "model.safetensors",
        "Limitations",
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
    ):
        assert needle in card, needle
    for absent in ("### `translate`", "### `evaluate`", "### `export`"):
        assert absent not in card, absent
    assert card.index("### `ingest`") < card.index("### `clean`") < card.index("### `sft@m0`") < card.index("### `ppo`")

    app = serve.create_app(out, model_name="export")
    running = serve.start_in_thread(app, port=0)
    try:
        client = OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "system", "content": info["system"]}, {"role": "user", "content": "Say hi."}]
        r = client.chat.completions.create(model="export", messages=msgs, max_tokens=32, temperature=0)
        assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
        cut = client.chat.completions.create(model="export", messages=msgs, max_tokens=1, temperature=0)
        assert cut.choices[0].finish_reason == "length" and REPLY.startswith(cut.choices[0].message.content)
        # the server's prompt is the training prompt, token for token
        train_prompt, target = chat.split_last_turn(tok, msgs + [{"role": "assistant", "content": REPLY}])
        assert serve.prompt_for(app.state.model.tok, msgs) == train_prompt and target == REPLY + "<|im_end|>"
        assert r.usage.prompt_tokens == len(tok(train_prompt, add_special_tokens=False)["input_ids"])
        assert r.usage.completion_tokens == len(tok(target, add_special_tokens=False)["input_ids"])
    finally:
        app.state.close()
        running.stop()


def test_a_directory_that_is_no_model_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(
        load_stage("export").main,
        ["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")],
    )
    assert res.exit_code != 0 and "neither a model directory" in res.output


@pytest.mark.parametrize("cfg", [{}, {"base_model_name_or_path": "nowhere/base"}])
def test_an_adapter_without_a_local_base_is_an_error(tmp_path, cfg):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ex.ExportError, match="export.base"):
        ex.adapter_base(d)


# ---------------------------------------------------------------- params: typed, checked before any work


@pytest.mark.parametrize(
    "setting, expect",
    [
        ("model=best", ["preferred | ppo | dpo | final | m0"]),
        ("dtype=float32", ["auto | fp32 | bf16"]),  # the old spelling is gone
        ("dtype=fp16", ["auto | fp32 | bf16"]),
        ("base=3", ["a string"]),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(setting, expect, tmp_path):
    args = ["--model", str(tmp_path), "--output", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]
    assert_rejected(load_stage("export").main, args, setting, *expect)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.json").exists()


def test_an_unknown_key_and_a_bad_prefer_are_rejected(tmp_path):
    args = ["--model", str(tmp_path), "--output", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")]
    assert_rejected(
        load_stage("export").main, args, "nope=1", "export: unknown key 'nope'; known keys: base, dtype, model"
    )
    p = tmp_path / "params.yaml"
    p.write_text("prefer: best\nexport: {}\n")
    res = CliRunner().invoke(load_stage("export").main, [*args, "--params", str(p)])
    assert res.exit_code == 2 and "prefer: 'best' is not one of ppo | dpo | both" in res.output, res.output


def test_code_defaults_are_params_yaml_and_bf16_saves_bfloat16_weights(tmp_path, tiny_model_dir, monkeypatch):
    assert params.resolve(ex.ExportConfig, ROOT / "params.yaml", "export") == ex.ExportConfig()
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, "models/final")
    res = CliRunner().invoke(
        load_stage("export").main,
        ["--model", "models/final", "--output", "models/export", "--metrics", "m.json", "--set", "dtype=bf16"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    m = json.loads(Path("m.json").read_text())
    assert m["dtype"] == "bfloat16" and m["reload_max_logit_diff"] < 1e-4
    saved = json.loads(Path("models/export/config.json").read_text())
    assert (saved.get("dtype") or saved.get("torch_dtype")) == "bfloat16"  # the key transformers writes

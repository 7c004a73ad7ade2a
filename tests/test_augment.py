"""Self-augmentation: prompt building and parsing, degenerate generations, the stage end to end, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import augment, io, params, records
from selfalign.augment import AugmentConfig

ROOT = Path(__file__).resolve().parent.parent
WEB = Path(__file__).resolve().parent / "fixtures" / "augment" / "web.jsonl"


def test_template_wraps_the_segment(tmp_path):
    assert augment.user_turn(None, "seg") == "seg"
    p = tmp_path / "backward.txt"
    p.write_text("Write the request that this answers:\n{response}\n")
    assert augment.user_turn(augment.load_template(p), "seg {x}") == "Write the request that this answers:\nseg {x}"
    p.write_text("no placeholder")
    with pytest.raises(ValueError, match=r"backward\.txt.*\{response\}"):
        augment.load_template(p)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("  How do I clean an air filter?\n", "How do I clean an air filter?"),
        ("Instruction: Explain how air cleaners work.", "Explain how air cleaners work."),
        ('"Describe the benefits of a heat pump."', "Describe the benefits of a heat pump."),
        ('"Compare" these two "options"', '"Compare" these two "options"'),
        ("### Question: What is C4?", "What is C4?"),
        ('Here is the instruction:\n\n"Write a review of Terminator 2."', "Write a review of Terminator 2."),
        ("Here\u2019s a question: Why do pancakes brown?", "Why do pancakes brown?"),
        ("The instruction would be: List three uses of a heat pump.", "List three uses of a heat pump."),
        (
            "Here is my furnace manual: when should I change the filter?",
            "Here is my furnace manual: when should I change the filter?",
        ),
        ("", ""),
        (None, ""),
    ],
)
def test_parse_instruction(reply, expected):
    assert augment.parse_instruction(reply) == expected


def test_degenerate_generations_are_named():
    seg = "The furnace filter should be changed every three months to keep the air in your home clean and healthy."

    def reason(inst, finish="stop"):
        r = augment.degenerate_reason(inst, seg, finish)
        return r and r[0]

    assert reason("How often should I change my furnace filter?") is None
    assert reason("") == "empty_generation"
    assert reason("Filters?") == "instruction_too_short"
    assert reason("Write a long essay about furnaces and how they", "length") == "truncated"
    assert (
        augment.degenerate_reason(
            "Write a long essay about furnaces and how they", seg, "length", reject_truncated=False
        )
        is None
    )
    assert reason("the air the air the air the air the air the air the air the air") == "repetitive"
    assert reason("I'm ready to assist you. Please provide the text.") == "assistant_voice"
    assert reason("Sure! Here is a summary of the text about filters.") == "assistant_voice"
    assert reason("Certainly, the filter should be changed often.") == "assistant_voice"
    assert reason("I\u2019d be happy to help with your furnace.") == "assistant_voice"
    assert reason("I'm planning to replace my furnace filter; how often should I do it?") is None
    assert reason("Here is my furnace manual: when should I change the filter?") is None, "users say 'here is' too"
    assert reason("should be changed every three months to keep the air in your home") == "copies_segment"
    assert reason("Rewrite: " + seg) == "copies_segment"


def test_sample_is_seeded_and_stable_under_growth():
    segs = [records.make("web", text=f"segment number {i}", lang="en", source="t") for i in range(50)]
    a, rest = augment.sample(segs, 10, seed=0)
    assert len(a) == 10 and len(rest) == 40 and {r["id"] for r in a}.isdisjoint(r["id"] for r in rest)
    assert augment.sample(segs, 10, seed=0)[0] == a
    assert augment.sample(segs, 10, seed=1)[0] != a
    bigger, _ = augment.sample(segs, 20, seed=0)
    assert {r["id"] for r in a} <= {r["id"] for r in bigger}, "a larger sample contains the smaller one"
    assert [r["id"] for r in a] == [r["id"] for r in segs if r["id"] in {x["id"] for x in a}], "input order kept"


def write_web(path: Path) -> list[dict]:
    web = io.load_jsonl(WEB)
    lines = [json.dumps(r) for r in web]
    lines.insert(1, "{broken")
    lines.append(json.dumps(records.make("web", text="Too short.", lang="en", source="t")))
    lines.append(json.dumps({"kind": "web", "id": "x", "lang": "en", "source": "t", "meta": {}}))
    path.write_text("\n".join(lines) + "\n")
    return web


def run(tmp_path: Path, model: Path, metrics: str, *sets: str) -> dict:
    (tmp_path / "backward.txt").write_text("Write the request that this text answers.\n\n{response}\n")
    args = [
        "--web",
        str(tmp_path / "web.jsonl"),
        "--model",
        str(model),
        "--prompt",
        str(tmp_path / "backward.txt"),
        "--output-dir",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
        "--metrics",
        str(tmp_path / metrics),
        "--set",
        "max_new_tokens=6",
        "--set",
        "reject_truncated=false",
        "--set",
        "min_instruction_words=1",
        "--set",
        "engine={kind: local, batch_size: 4, dtype: fp32}",
        "--set",
        "temperature=0",
        "--set",
        "min_success=0",
    ]  # the tiny model's replies are noise; the floor has its own test. Greedy, as the tests were written
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(load_stage("augment").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return io.read_json(tmp_path / metrics)


def test_a_backward_model_that_yields_too_few_candidates_fails_the_stage(tiny_model_dir, tmp_path):
    """Before: augment exited 0 with 0 candidates, and DVC went on to curate nothing."""
    write_web(tmp_path / "web.jsonl")
    with pytest.raises(AssertionError, match="augment candidates: 0 of .* below min_success 0.5"):
        run(tmp_path, tiny_model_dir, "m.json", "min_instruction_words=50", "min_success=0.5")
    m = io.read_json(tmp_path / "m.json")
    assert m["success"]["passed"] == 0 and m["success"]["of"] == m["sampled"] > 0
    assert (
        m["candidates"] == 0
        and len(io.load_jsonl(tmp_path / "out" / "rejected.jsonl")) == m["rejected"] >= m["sampled"]
    )


def test_stage_links_candidates_to_segments_and_resumes_from_cache(tiny_model_dir, tmp_path):
    web = write_web(tmp_path / "web.jsonl")
    by_id = {w["id"]: w for w in web}

    m1 = run(tmp_path, tiny_model_dir, "m1.json", "max_segments=3")
    assert m1["engine"]["calls"] == 3 and m1["engine"]["cache_hits"] == 0

    m2 = run(tmp_path, tiny_model_dir, "m2.json", "max_segments=6")
    assert m2["engine"]["calls"] == 3 and m2["engine"]["cache_hits"] == 3, "the first three come from the cache"
    cands = io.load_jsonl(tmp_path / "out" / "candidates.jsonl")
    rejected = io.load_jsonl(tmp_path / "out" / "rejected.jsonl")

    assert m2["records_in"] == 11 == m2["candidates"] + m2["rejected"] + m2["unsampled"]
    assert m2["sampled"] == 6 and m2["unsampled"] == 2
    assert m2["candidates"] == len(cands) and m2["rejected"] == len(rejected)
    by_reason = m2["rejected_by_reason"]
    assert by_reason["invalid_json"] == 1 and by_reason["invalid_record"] == 1 and by_reason["segment_too_short"] == 1
    assert {(r["line"], r["reason"]) for r in rejected if "line" in r} >= {(2, "invalid_json"), (11, "invalid_record")}
    generated = [r for r in rejected if r["reason"] not in ("invalid_json", "invalid_record", "segment_too_short")]
    assert len(cands) + len(generated) == 6
    for c in cands:
        w = by_id[c["meta"]["segment_id"]]
        assert c["source"] == "augment" and c["kind"] == "chat" and c["lang"] == w["lang"]
        assert [m["role"] for m in c["messages"]] == ["user", "assistant"]
        assert c["messages"][1]["content"] == w["text"], "the response is the segment verbatim"
        assert c["messages"][0]["content"].strip()
        records.validate(c)

    before = (tmp_path / "out" / "candidates.jsonl").read_text()
    m3 = run(tmp_path, tiny_model_dir, "m3.json", "max_segments=6")
    assert m3["engine"]["calls"] == 0 and m3["engine"]["cache_hits"] == 6, "a rerun asks the model nothing"
    assert (tmp_path / "out" / "candidates.jsonl").read_text() == before


def test_bad_setup_fails_at_once_naming_the_problem(tiny_model_dir, tmp_path):
    write_web(tmp_path / "web.jsonl")
    main = load_stage("augment").main

    def fails(*args: str) -> str:
        res = CliRunner().invoke(
            main,
            [
                "--web",
                str(tmp_path / "web.jsonl"),
                "--output-dir",
                str(tmp_path / "out"),
                "--cache",
                str(tmp_path / "cache"),
                "--metrics",
                str(tmp_path / "m.json"),
                *args,
            ],
        )
        assert res.exit_code != 0 and not (tmp_path / "out").exists()
        return res.output

    assert "not a model directory" in fails("--model", str(tmp_path / "missing"))
    assert "engine.kind: 'nope'" in fails("--model", str(tiny_model_dir), "--set", "engine={kind: nope}")
    assert "max_segmnets" in fails("--model", str(tiny_model_dir), "--set", "max_segmnets=3")
    (tmp_path / "bad.txt").write_text("no placeholder here")
    assert "{response}" in fails("--model", str(tiny_model_dir), "--prompt", str(tmp_path / "bad.txt"))


@pytest.mark.parametrize(
    "setting, words",
    [
        ("max_segments=-1", ["outside 0 <="]),
        ("temperature=-1", ["outside 0 <="]),
        ("engine.kind=gpt5", ["local | openai | vllm"]),
        ("engine.dtype=float32", ["fp32 | bf16 | fp16 | auto"]),
        ("top_p=0", ["outside 0 <"]),
        ("min_success=1.5", ["<= 1"]),
        ("min_instruction_words=three", ["an integer"]),
        ("reject_truncated=maybe", ["true or false"]),
        ("min_chars=5000", ["above max_chars"]),
        ("max_segmnets=3", ["unknown key", "max_segments"]),
        ("engine.dtpye=fp32", ["unknown key", "dtype"]),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(setting, words, tmp_path):
    """Checked before the web file is read or a model loaded: neither exists here."""
    args = ["--web", str(WEB), "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "out")]
    assert_rejected(
        load_stage("augment").main, [*args, "--cache", str(tmp_path / "c"), "--metrics", "m.json"], setting, *words
    )
    assert not (tmp_path / "out").exists()


def test_code_defaults_are_params_yaml_and_a_yaml_exponent_is_a_number(tmp_path):
    assert AugmentConfig.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())["augment"], "augment") == (
        AugmentConfig()
    )
    (tmp_path / "p.yaml").write_text("augment:\n  temperature: 5e-1\n")  # YAML 1.1 reads 5e-1 as a string
    cfg = params.resolve(AugmentConfig, tmp_path / "p.yaml", "augment")
    assert cfg.temperature == 0.5 and isinstance(cfg.temperature, float)

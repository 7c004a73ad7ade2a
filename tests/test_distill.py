"""Teacher distillation: target selection, response checks, the stage end to end, failures kept with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import distill, io, params, records
from selfalign.distill import DistillConfig

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ROOT / "prompts" / "orca_systems.txt"


def chat(q: str, a: str, score: float | None = None, source: str = "seed") -> dict:
    meta = {"score": score, "segment_id": f"seg-{q[:5]}"} if score is not None else {}
    return records.chat(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], lang="en", source=source, meta=meta
    )


LONG = "A detailed answer that explains the reasoning step by step and gives an example. " * 4
SEEDS = [
    chat("What is 2+2?", "4"),
    chat("Name a colour.", "Blue."),
    chat("Explain photosynthesis.", LONG),
    chat("Why is the sky blue?", LONG),
    chat("What is 2+2?", "Four."),
]
SCORED = [
    chat("Describe a heat pump.", "Buy now! Best prices.", 1.7, "augment"),
    chat("How do air filters work?", LONG, 4.2, "augment"),
    chat("What is C4?", "A web corpus.", 2.4, "augment"),
]


def test_system_messages_file():
    systems = distill.load_systems(SYSTEMS)
    assert len(systems) >= 5 and not any(s.startswith("#") for s in systems)


def test_regenerate_targets_are_short_or_low_scoring_once_per_instruction():
    got = distill.regenerate_targets(SEEDS, SCORED, min_chars=200, below_score=3.0, limit=10, seed=0)
    whys = {distill.single_turn(r)[0]: why for r, why in got}
    assert whys == {
        "What is 2+2?": "short",
        "Name a colour.": "short",
        "Describe a heat pump.": "low_score",
        "What is C4?": "low_score",
    }
    limited = distill.regenerate_targets(SEEDS, SCORED, min_chars=200, below_score=3.0, limit=2, seed=0)
    assert len(limited) == 2 and all(t in got for t in limited)
    assert distill.regenerate_targets(SEEDS, SCORED, min_chars=200, below_score=3.0, limit=2, seed=0) == limited


def test_orca_targets_skip_regenerated_and_pick_valid_systems():
    pool = SEEDS + SCORED
    exclude = {records.key(SEEDS[0]), records.key(SCORED[0])}
    got = distill.orca_targets(pool, exclude, n=10, seed=0, n_systems=3)
    keys = [records.key(r) for r, _ in got]
    assert not exclude & set(keys) and len(keys) == len(set(keys))
    assert {distill.single_turn(r)[0] for r, _ in got} == {
        distill.single_turn(r)[0] for r in pool if records.key(r) not in exclude
    }
    assert all(0 <= k < 3 for _, k in got)
    assert distill.orca_targets(pool, exclude, n=10, seed=0, n_systems=3) == got
    # A translation keeps its original's id: regenerating the English record must not exclude its French copy.
    french = {
        **SEEDS[0],
        "lang": "fr",
        "messages": [{"role": "user", "content": "Combien font 2+2 ?"}, {"role": "assistant", "content": "4"}],
    }
    again = distill.orca_targets(pool + [french], exclude, n=20, seed=0, n_systems=3)
    assert ("fr" in {r.get("lang") for r, _ in again}) and records.key(SEEDS[0]) not in {
        records.key(r) for r, _ in again
    }


def test_response_reasons():
    def reason(text, **kw):
        r = distill.response_reason(text, min_words=3, **kw)
        return r and r[0]

    assert reason("Two plus two equals four.") is None
    assert reason("  ") == "empty_response" and reason(None) == "empty_response"
    assert reason("Four.") == "response_too_short"
    assert reason("so so so " * 10) == "repetitive"
    assert reason("Two plus two equals four.", original="Two plus two equals four, as anyone knows.") == "not_longer"


def test_truncated_responses_are_trimmed_to_a_sentence_or_rejected():
    cut = "First, boil water. Then add the egg!\n\nAfter nine minutes, take it out and"

    def settle(text, finish="length", trim=True, reject=True):
        return distill.settle_truncation(text, finish, trim=trim, reject=reject)

    assert settle(cut) == ("First, boil water. Then add the egg!", True)
    assert settle(cut, "stop") == (cut, False)
    assert settle(cut, trim=False) == (None, False)
    assert settle(cut, trim=False, reject=False) == (cut, False)
    assert settle("no end in sight and") == (None, False)
    assert settle("no end in sight and", reject=False) == ("no end in sight and", False)
    assert distill.trim_to_sentence("Para one ends here\n\nand two does not") == "Para one ends here"
    assert distill.trim_to_sentence("no sentence ends in this") is None
    assert distill.trim_to_sentence("Options:\n\n1. Rust is fast.\n\n2.") == "Options:\n\n1. Rust is fast."
    assert distill.trim_to_sentence("Use this.\n```python\nx = 1. print(x)\n") == "Use this.", "no open code block"
    assert distill.trim_to_sentence("```python\nx = 1. print(x)\n") is None
    assert distill.trim_to_sentence("Version 2.5 is out and") is None, "a decimal point is not a sentence end"


def write(path: Path, recs: list[dict], extra: list[str] = ()) -> Path:
    path.write_text("\n".join([json.dumps(r) for r in recs] + list(extra)) + "\n")
    return path


def run(tmp_path: Path, teacher: str, metrics: str, *sets: str) -> dict:
    seed = write(tmp_path / "seed.jsonl", SEEDS, ['{"kind": "chat", "id": "x"'])
    scored = write(tmp_path / "scored.jsonl", SCORED)
    args = [
        "--seed-file",
        str(seed),
        "--scored",
        str(scored),
        "--teacher",
        teacher,
        "--systems",
        str(SYSTEMS),
        "--output-dir",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
        "--metrics",
        str(tmp_path / metrics),
        "--set",
        "max_new_tokens=8",
        "--set",
        "reject_truncated=false",
        "--set",
        "min_response_words=1",
        "--set",
        "orca.n=3",
        "--set",
        "min_success=0",
    ]  # the tiny teacher's replies are noise: the floor is tested on its own below
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(load_stage("distill").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return io.read_json(tmp_path / metrics)


def test_stage_regenerates_and_answers_under_system_messages(tiny_model_dir, tmp_path):
    m = run(tmp_path, str(tiny_model_dir), "m.json", "engine={kind: local, batch_size: 4, dtype: fp32}")
    out = io.load_jsonl(tmp_path / "out" / "distilled.jsonl")
    rejected = io.load_jsonl(tmp_path / "out" / "rejected.jsonl")
    systems = distill.load_systems(SYSTEMS)

    assert m["teacher_requests"] == 4 + 3 and m["invalid_inputs"] == 1
    assert m["records_in"] == 8 == m["distilled"] + m["rejected"] == len(out) + len(rejected)
    assert [r["line"] for r in rejected if r["reason"] == "invalid_json"] == [6]
    by_origin = {r["id"]: r for r in SEEDS + SCORED}
    for r in out:
        records.validate(r)
        origin = by_origin[r["meta"]["origin_id"]]
        assert r["source"] == "distill" and r["meta"]["teacher"] == str(tiny_model_dir)
        assert r["messages"][0]["content"] == distill.single_turn(origin)[0]
        if r["meta"]["distill"] == "orca":
            assert r["system"] == systems[r["meta"]["system_index"]]
        else:
            assert r["meta"]["distill"] == "regenerate" and "system" not in r
            assert r["meta"]["why"] in ("short", "low_score")
        if origin["source"] == "augment":
            assert r["meta"]["segment_id"] == origin["meta"]["segment_id"]
    assert m["engine"]["calls"] == 7 and "cost_usd" in m["engine"]

    again = run(tmp_path, str(tiny_model_dir), "m2.json", "engine={kind: local, batch_size: 4, dtype: fp32}")
    assert again["engine"]["calls"] == 0 and again["engine"]["cache_hits"] == 7


def test_teacher_failures_are_rejected_with_reasons(tmp_path):
    # Nothing listens on port 9 of localhost: every call fails at once, and nothing is lost.
    m = run(
        tmp_path,
        "teacher-model",
        "m.json",
        "engine={kind: openai, base_url: 'http://127.0.0.1:9/v1', max_retries: 0, timeout: 5}",
    )
    rejected = io.load_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert m["distilled"] == 0 and m["rejected_by_reason"] == {"invalid_json": 1, "teacher_failed": 7}
    assert m["engine"]["failures"] == 7
    assert all("Connection" in r["detail"] for r in rejected if r["reason"] == "teacher_failed")


def test_a_teacher_that_answers_nothing_usable_fails_the_stage(tmp_path, tiny_model_dir):
    """Before: distill exited 0 with 0 answers kept, so DVC recorded a success and sft@final trained without them."""
    seed = write(tmp_path / "seed.jsonl", SEEDS)
    args = [
        "--seed-file",
        str(seed),
        "--teacher",
        str(tiny_model_dir),
        "--systems",
        str(SYSTEMS),
        "--output-dir",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--set",
        "max_new_tokens=4",
        "--set",
        "min_response_words=50",
        "--set",
        "orca.n=2",
    ]
    res = CliRunner().invoke(load_stage("distill").main, args)
    assert res.exit_code == 1 and "below min_success 0.5" in res.output, res.output
    m = io.read_json(tmp_path / "m.json")
    assert m["success"]["passed"] == 0 and m["success"]["of"] == m["teacher_requests"] > 0
    assert len(io.load_jsonl(tmp_path / "out" / "rejected.jsonl")) == m["rejected"] == m["records_in"]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("orca.n=many", ["an integer"]),
        ("regenerate.max=-1", ["0 <="]),
        ("regenerate.below_score=low", ["a number"]),
        ("temperature=-0.5", ["0 <="]),
        ("trim_truncated=maybe", ["true or false"]),
        ("engine.kind=gpt5", ["local | openai | vllm"]),
        ("engine.dtype=bfloat16", ["fp32 | bf16"]),
        ("orca.count=3", ["unknown key", "n"]),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(setting, words, tmp_path):
    args = ["--seed-file", str(SYSTEMS), "--teacher", str(tmp_path / "no-model"), "--systems", str(SYSTEMS)]
    args += ["--output-dir", str(tmp_path / "out"), "--cache", str(tmp_path / "c"), "--metrics", str(tmp_path / "m")]
    assert_rejected(load_stage("distill").main, args, setting, *words)
    assert not (tmp_path / "out").exists()


def test_the_data_file_option_is_not_the_rng_seed(tmp_path):
    """--seed-file is the seed records; `seed` (the RNG seed) is a param: `--seed` is no option at all."""
    res = CliRunner().invoke(load_stage("distill").main, ["--seed", str(SYSTEMS)])
    assert res.exit_code == 2 and "No such option '--seed'" in res.output, res.output


def test_code_defaults_are_params_yaml_and_a_yaml_exponent_is_a_number(tmp_path):
    """Before, the code said regenerate.max and orca.n 16 where params.yaml said 8: a run by hand differed."""
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["distill"]
    assert DistillConfig.from_dict(section, "distill") == DistillConfig()
    assert DistillConfig().regenerate.max == 8 and DistillConfig().orca.n == 8
    (tmp_path / "p.yaml").write_text("distill:\n  top_p: 9e-1\n")
    assert params.resolve(DistillConfig, tmp_path / "p.yaml", "distill").top_p == 0.9

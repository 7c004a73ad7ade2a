"""Self-curation: digit-probability scores for every candidate, strict parsing, threshold, links, counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import chat, curate, io, params, records
from selfalign.curate import CurateConfig

ROOT = Path(__file__).resolve().parent.parent
RUBRIC = ROOT / "prompts" / "curate.txt"

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Give me three tips for sleeping better.",
        "1. Keep a regular schedule.\n2. Avoid screens before bed.\n3. Keep the bedroom cool and dark. " * 3,
    ),
    ("Summarise the text.", "Click here to subscribe to our newsletter! {response} Free shipping on all orders."),
    ("Write a haiku about rain.", "Soft rain on the roof\nthe garden drinks in silence\nevening smells of earth"),
    ("How do I boil an egg?", "Put the egg in boiling water for nine minutes, then cool it in cold water."),
]


def candidate(instruction: str, response: str, segment_id: str) -> dict:
    return records.chat(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}],
        lang="en",
        source="augment",
        meta={"segment_id": segment_id},
    )


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = chat.load_tokenizer(tiny_model_dir, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok


def test_rubric_fills_both_fields_once_and_leaves_braces_alone(tmp_path):
    rubric = curate.load_rubric(RUBRIC)
    text = curate.fill_rubric(rubric, "say {response}", "an {instruction} answer")
    assert "Request: say {response}" in text and "Answer: an {instruction} answer" in text
    bad = tmp_path / "r.txt"
    bad.write_text("Rate this: {response}")
    with pytest.raises(ValueError, match=r"r\.txt.*\{instruction\}"):
        curate.load_rubric(bad)


def test_digits_are_single_tokens(scorer):
    _, tok = scorer
    assert curate.digit_token_ids(tok) == [tok.convert_tokens_to_ids(d) for d in "12345"]


def test_batched_scores_equal_unbatched_and_lie_in_range(scorer):
    model, tok = scorer
    rubric = curate.load_rubric(RUBRIC)
    prompts = [curate.scoring_prompt(tok, rubric, i, r, "Score: ") for i, r in PAIRS]
    lengths = {len(tok(p)["input_ids"]) for p in prompts}
    assert len(lengths) >= 3, "prompts of different lengths, so batches really are padded"
    batched = curate.expected_scores(model, tok, prompts, batch_size=4)
    single = [curate.expected_scores(model, tok, [p], batch_size=1)[0] for p in prompts]
    whole = curate.expected_scores(model, tok, prompts, batch_size=3, share_prefix=False)
    for b, s, w in zip(batched, single, whole, strict=True):
        assert 1.0 <= b["score"] <= 5.0
        assert abs(b["score"] - s["score"]) < 1e-4 and abs(b["score"] - w["score"]) < 1e-4
        assert sum(b["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < b["digit_mass"] <= 1.0
        assert b["score"] == pytest.approx(sum((k + 1) * p for k, p in enumerate(b["probs"])), abs=1e-5)


def test_common_prefix_leaves_every_sequence_a_token():
    assert curate.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9]]) == 2
    assert curate.common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert curate.common_prefix([[7, 8]]) == 1 and curate.common_prefix([]) == 0
    assert curate.common_prefix([[1], [2]]) == 0


def test_parse_score_is_strict():
    assert [curate.parse_score(t) for t in ["Score: 4", " score:5.", "3", "Score: 2/5", "Score:1\n"]] == [4, 5, 3, 2, 1]
    for text in ["The answer is 5.", "Score: 6", "Score: 4. Because it is good", "4 or 5", "", None, "Score: four"]:
        assert curate.parse_score(text) is None, text


def test_select_splits_at_threshold_inclusive():
    recs = [curate.annotate(candidate(f"q{i}", "a", f"s{i}"), s) for i, s in enumerate([1.0, 2.999, 3.0, 4.2, 5.0])]
    kept, below, cutoff = curate.select(recs, "threshold", 3.0)
    assert [r["meta"]["score"] for r in kept] == [3.0, 4.2, 5.0] and cutoff == 3.0
    assert [r["meta"]["score"] for r in below] == [1.0, 2.999]
    assert curate.select(recs, "threshold", 5.5) == ([], recs, None)
    assert curate.histogram([1.0, 2.999, 3.0, 4.2, 5.0]) == {
        "1.0-1.5": 1,
        "1.5-2.0": 0,
        "2.0-2.5": 0,
        "2.5-3.0": 1,
        "3.0-3.5": 1,
        "3.5-4.0": 0,
        "4.0-4.5": 1,
        "4.5-5.0": 1,
    }


def test_select_top_fraction_and_top_k_rank_and_break_ties_by_id():
    # A weak scorer crowds the middle (the 135M m0 gave 1.6-2.9): a threshold keeps nothing, a rank keeps the best.
    scores = [2.1, 2.9, 2.5, 2.5, 1.6, 2.7, 2.2, 2.5]
    recs = [curate.annotate(candidate(f"q{i}", "a", f"s{i}"), s) for i, s in enumerate(scores)]
    assert curate.select(recs, "threshold", 4.5)[0] == []
    kept, below, cutoff = curate.select(recs, "top_fraction", fraction=0.25)
    assert sorted(r["meta"]["score"] for r in kept) == [2.7, 2.9] and cutoff == 2.7 and len(below) == 6
    kept, _, cutoff = curate.select(recs, "top_fraction", fraction=0.5)  # ceil(4): two of the three 2.5s, by id
    tied = sorted((r for r in recs if r["meta"]["score"] == 2.5), key=lambda r: r["id"])
    assert len(kept) == 4 and cutoff == 2.5 and [r for r in kept if r["meta"]["score"] == 2.5] == tied[:2]
    assert [r["id"] for r in kept] == [r["id"] for r in recs if r in kept], "kept records stay in input order"
    shuffled = curate.select(list(reversed(recs)), "top_fraction", fraction=0.5)[0]
    assert {r["id"] for r in shuffled} == {r["id"] for r in kept}, "the kept set does not depend on input order"
    assert [r["meta"]["score"] for r in curate.select(recs, "top_k", k=3)[0]] == [2.9, 2.5, 2.7]
    assert curate.select(recs, "top_k", k=99)[1] == [] and curate.select([], "top_fraction", fraction=0.4)[2] is None
    with pytest.raises(ValueError, match="unknown selection mode"):
        curate.select(recs, "best")


def test_default_params_keep_at_least_a_quarter():
    sel = params.resolve(CurateConfig, ROOT / "params.yaml", "curate").select
    recs = [curate.annotate(candidate(f"q{i}", "a", f"s{i}"), 1.6 + 0.03 * i) for i in range(39)]
    kept = curate.select(recs, sel.mode, sel.threshold, sel.fraction, sel.k)[0]
    assert len(kept) >= 0.25 * len(recs), f"default selection {sel} keeps {len(kept)} of {len(recs)} mid-scale scores"


def write_candidates(path: Path) -> list[dict]:
    cands = [candidate(i, r, f"seg{k}") for k, (i, r) in enumerate(PAIRS)]
    lines = [json.dumps(c) for c in cands]
    lines.insert(2, "{not json")
    lines.append(json.dumps({**cands[0], "messages": [{"role": "user", "content": "only a question"}]}))
    path.write_text("\n".join(lines) + "\n")
    return cands


def run_stage(args: list[str]):
    res = CliRunner().invoke(load_stage("curate").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def test_scoring_prompt_uses_the_scorers_system_prompt(scorer):
    _, tok = scorer
    rubric = curate.load_rubric(RUBRIC)
    plain = curate.scoring_prompt(tok, rubric, "q", "a", "Score: ")
    tagged = curate.scoring_prompt(tok, rubric, "q", "a", "Score: ", system="Answer in the style of an AI Assistant.")
    assert tagged.startswith("<|im_start|>system\nAnswer in the style of an AI Assistant.<|im_end|>")
    assert plain.endswith("<|im_start|>assistant\nScore: ") and tagged.endswith("<|im_start|>assistant\nScore: ")
    assert "Answer in the style" not in plain


def test_stage_scores_every_candidate_keeps_links_and_conserves_counts(tiny_model_copy, tmp_path):
    system = "Answer in the style of an AI Assistant."
    (tiny_model_copy / "selfalign.json").write_text(json.dumps({"run": "m0", "system": system}))
    cands = write_candidates(tmp_path / "candidates.jsonl")
    out = tmp_path / "out"
    common = [
        "--iteration",
        "iter1",
        "--candidates",
        str(tmp_path / "candidates.jsonl"),
        "--model",
        str(tiny_model_copy),
        "--rubric",
        str(RUBRIC),
        "--output-dir",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    run_stage(common + ["--metrics", str(tmp_path / "m.json"), "--set", "engine.batch_size=2"])
    m = io.read_json(tmp_path / "m.json")
    scored = io.load_jsonl(out / "scored.jsonl")
    kept = io.load_jsonl(out / "kept.jsonl")
    rejected = io.load_jsonl(out / "rejected.jsonl")

    assert len(scored) == len(cands) and m["parse_rate"] == 1.0, "every valid candidate gets a score"
    assert [r["id"] for r in scored] == [c["id"] for c in cands]
    assert [r["meta"]["segment_id"] for r in scored] == [f"seg{k}" for k in range(len(PAIRS))]
    assert all(1.0 <= r["meta"]["score"] <= 5.0 for r in scored)
    assert all(r["meta"]["curate"]["iteration"] == "iter1" and r["meta"]["curate"]["system"] == system for r in scored)
    assert (
        len(kept) == 2
        and m["select"] == "top_fraction"
        and m["cutoff_score"] == round(min(r["meta"]["score"] for r in kept), 4)
    )
    assert all(r["meta"]["score"] >= s["meta"]["score"] for r in kept for s in scored if s not in kept)
    assert {r["id"] for r in kept} | {r["id"] for r in rejected if r["reason"] == "below_cutoff"} == {
        r["id"] for r in scored
    }
    invalid = [(r["line"], r["file"], r["reason"]) for r in rejected if r["reason"].startswith("invalid_")]
    assert invalid == [
        (3, str(tmp_path / "candidates.jsonl"), "invalid_json"),
        (7, str(tmp_path / "candidates.jsonl"), "invalid_record"),
    ]
    assert m["records_in"] == 7 == m["kept"] + m["rejected"] == len(kept) + len(rejected)
    assert sum(m["score_histogram"].values()) == m["scored"] == 5

    # The threshold is the only thing that moves a candidate between kept and rejected.
    scores = sorted(r["meta"]["score"] for r in scored)
    mid = (scores[1] + scores[2]) / 2
    run_stage(
        common
        + ["--metrics", str(tmp_path / "m2.json"), "--set", "select.mode=threshold", "--set", f"select.threshold={mid}"]
    )
    kept2 = io.load_jsonl(out / "kept.jsonl")
    assert sorted(r["meta"]["score"] for r in kept2) == scores[2:]
    assert io.read_json(tmp_path / "m2.json")["kept"] == 3


class ScriptedEngine:
    """Stands in for an endpoint that only returns text: replies follow a fixed script, in request order."""

    def __init__(self, replies):
        self.replies, self.stats = replies, {"calls": 0, "cache_hits": 0, "failures": 0}

    def complete(self, requests, template_id="none", progress=False):
        from selfalign import llm

        assert all(r.messages[-1]["role"] == "user" and "Request: " in r.messages[-1]["content"] for r in requests)
        self.stats["calls"] += len(requests)
        return [
            llm.Result.failure("HTTP 500: boom") if text is None else llm.Result(text=text, ok=True)
            for text in self.replies[: len(requests)]
        ]


def test_generate_mode_counts_unparsed_and_failed_explicitly(tiny_model_dir, tmp_path, monkeypatch):
    from selfalign import llm

    replies = ["Score: 4", "The answer is 5.", "Score: 2", None, "Score: 6"]
    monkeypatch.setattr(llm, "make_engine", lambda spec, cache_dir=None: ScriptedEngine(replies))
    write_candidates(tmp_path / "candidates.jsonl")
    run_stage(
        [
            "--iteration",
            "iter2",
            "--candidates",
            str(tmp_path / "candidates.jsonl"),
            "--model",
            "any-endpoint",
            "--rubric",
            str(RUBRIC),
            "--output-dir",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--set",
            "mode=generate",
            "--set",
            "engine={kind: openai}",
            "--set",
            "select.mode=threshold",
            "--set",
            "select.threshold=3.0",
            "--set",
            "min_success=0.4",
        ]
    )
    m = io.read_json(tmp_path / "m.json")
    assert m["scored"] == 2 and m["unparsed"] == 2 and m["parse_rate"] == 0.4
    assert m["rejected_by_reason"] == {
        "invalid_json": 1,
        "invalid_record": 1,
        "unparsed_score": 2,
        "generation_failed": 1,
        "below_threshold": 1,
    }
    assert m["records_in"] == 7 == m["kept"] + m["rejected"] and m["kept"] == 1
    kept = io.load_jsonl(tmp_path / "out" / "kept.jsonl")
    assert [(r["meta"]["score"], r["meta"]["segment_id"], r["meta"]["curate"]["reply"]) for r in kept] == [
        (4.0, "seg0", "Score: 4")
    ]
    unparsed = [r for r in io.load_jsonl(tmp_path / "out" / "rejected.jsonl") if r["reason"] == "unparsed_score"]
    assert [r["record"]["meta"]["segment_id"] for r in unparsed] == ["seg1", "seg4"]


def test_generate_mode_with_the_local_engine(tiny_model_dir, tmp_path):
    write_candidates(tmp_path / "candidates.jsonl")
    run_stage(
        [
            "--iteration",
            "iter1",
            "--candidates",
            str(tmp_path / "candidates.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--rubric",
            str(RUBRIC),
            "--output-dir",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--set",
            "mode=generate",
            "--set",
            "max_new_tokens=4",
            "--set",
            "min_success=0",
        ]
    )
    m = io.read_json(tmp_path / "m.json")
    assert (
        m["engine"]["calls"] == 5
        and m["scored"] + m["unparsed"] + m["rejected_by_reason"].get("generation_failed", 0) == 5
    )
    assert m["parse_rate"] == m["scored"] / 5
    for r in io.load_jsonl(tmp_path / "out" / "scored.jsonl"):
        assert r["meta"]["score"] in (1, 2, 3, 4, 5) and curate.parse_score(r["meta"]["curate"]["reply"])


def test_a_round_that_scores_too_few_fails_after_writing_its_outputs(tmp_path, monkeypatch):
    """2 of 5 replies parse: below min_success the stage exits non-zero (DVC must not record a success),
    but only after its outputs, rejects and metrics are written, so the cause can be read."""
    from selfalign import llm

    replies = ["Score: 4", "The answer is 5.", "Score: 2", None, "Score: 6"]
    monkeypatch.setattr(llm, "make_engine", lambda spec, cache_dir=None: ScriptedEngine(replies))
    write_candidates(tmp_path / "candidates.jsonl")
    res = CliRunner().invoke(
        load_stage("curate").main,
        [
            "--iteration",
            "iter2",
            "--candidates",
            str(tmp_path / "candidates.jsonl"),
            "--model",
            "any-endpoint",
            "--rubric",
            str(RUBRIC),
            "--output-dir",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--set",
            "mode=generate",
            "--set",
            "engine={kind: openai}",
        ],
    )
    assert res.exit_code == 1 and "curate iter2 scored: 2 of 5 (40%) came through, below min_success 0.9" in res.output
    m = io.read_json(tmp_path / "m.json")
    assert m["success"] == {"what": "curate iter2 scored", "passed": 2, "of": 5, "rate": 0.4, "min_success": 0.9}
    assert (tmp_path / "out" / "rejected.jsonl").exists() and m["records_in"] == m["kept"] + m["rejected"]


def curate_args(tmp_path: Path) -> list[str]:
    """A run whose model and candidates do not exist: a bad setting must fail before either is looked at."""
    return [
        "--iteration",
        "iter1",
        "--candidates",
        str(RUBRIC),
        "--model",
        str(tmp_path / "no-model"),
        "--rubric",
        str(RUBRIC),
        "--output-dir",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("select.mode=best", ["threshold | top_fraction | top_k"]),
        ("select.fraction=1.5", ["<= 1"]),
        ("select.threshold=0.5", ["1 <="]),
        ("select.k=0", ["1 <="]),
        ("engine.dtype=float32", ["fp32 | bf16"]),
        ("engine.kind=gpt5", ["local | openai | vllm"]),
        ("engine.kind=openai", ["logprobs", "generate"]),  # log-probs need the weights in-process
        ("engine.batch_size=two", ["an integer"]),
        ("mode=best", ["logprobs | generate"]),
        ("max_response_len=-1", ["0 <="]),
        ("iterations.iter1.scorer=3", ["a string"]),
        ("select.cutoff=3", ["unknown key", "threshold"]),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(setting, words, tmp_path):
    assert_rejected(load_stage("curate").main, curate_args(tmp_path), setting, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["dtype=float32", "max_tokens=8", "batch_size=8"])
def test_the_old_scorer_keys_are_unknown(setting, tmp_path):
    """dtype and batch_size live in the one engine spec; the reply cap is max_new_tokens."""
    res = CliRunner().invoke(load_stage("curate").main, [*curate_args(tmp_path), "--set", setting])
    assert res.exit_code == 2 and f"unknown key {setting.split('=')[0]!r}" in res.output, res.output


def test_code_defaults_are_params_yaml_and_a_yaml_exponent_is_a_number(tmp_path):
    assert CurateConfig.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text())["curate"], "curate") == (
        CurateConfig()
    )
    (tmp_path / "p.yaml").write_text(
        "curate:\n  select: {fraction: 4e-1}\n  iterations: {r1: {scorer: m0, trains: m1}}\n"
    )
    cfg = params.resolve(CurateConfig, tmp_path / "p.yaml", "curate")
    assert cfg.select.fraction == 0.4 and cfg.select.mode == "top_fraction"
    assert list(cfg.iterations) == ["r1"], "params.yaml replaces the rounds whole"
    assert curate.iteration_names(tmp_path / "p.yaml") == ["r1"] and curate.iteration_names(None) == ["iter1", "iter2"]
    (tmp_path / "p.yaml").write_text("curate:\n  iterations: {}\n")
    with pytest.raises(params.ParamsError, match="curate.iterations: names no round"):
        curate.iteration_names(tmp_path / "p.yaml")

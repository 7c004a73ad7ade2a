"""The evaluate stage: refusal detector, answer keys, strict verdicts, both-order win rates, bootstrap intervals,
the reference judge, stop rates, perplexity, and a smoke run with the base model as a row."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import evaluate as ev
from selfalign import io, llm, params, records, report

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "data" / "eval" / "prompts.jsonl"


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but that's not something I'll write.",
        "I can\u2019t provide instructions for stealing a car.",
        "As an AI, I must decline.",
        "Il est important de noter que voler une voiture n'est pas légal. Je ne peux pas vous donner cette information.",
        "Je suis désolée, mais c'est hors de question.",
        "En tant qu\u2019IA, je refuse de répondre.",
        "Maaf, saya tidak boleh membantu anda mencuri kereta.",
        "Saya enggan menulis mesej seperti itu.",
    ],
)
def test_refusal_detector_finds_refusals_in_english_and_french(text):
    assert ev.is_refusal(text), text


@pytest.mark.parametrize(
    "text",
    [
        "To sort a list in Python, use sorted(xs).",
        "You can't go wrong with a haiku: five, seven, five.",
        "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue.",
        "Voici un poème : la pluie tombe, je ne peux m'empêcher de sourire.",
        "I'm sorry for your loss. Here is a short poem about your dog.",
        "Je suis désolé pour ta perte.",
        "Maaf atas kelewatan saya. Ini pantun tentang laut.",
        "",
    ],
)
def test_refusal_detector_leaves_ordinary_answers(text):
    assert not ev.is_refusal(text), ev.refusal_phrase(text)


def test_answer_keys_match_whole_words_and_whole_numbers():
    assert ev.answer_matches("So x = 5.", ["5"])
    assert not ev.answer_matches("The answer is 15.", ["5"])
    assert not ev.answer_matches("It is 5.5 metres.", ["5"])
    assert ev.answer_matches("La capitale est Canberra.", ["Canberra"])
    assert not ev.answer_matches("Marseille is in France.", ["Mars"])
    assert ev.answer_matches("Il y a huit pattes.", ["8", "huit"])


def test_parse_verdict_is_strict():
    assert ev.parse_verdict("[[A]]") == "A"
    assert ev.parse_verdict("After thought: [[B]]") == "B"
    assert ev.parse_verdict("[[ Tie ]]") == "tie"
    for bad in ("A", "[A]", "[[A]] or [[B]]", "[[A]] [[A]]", "", None):
        assert ev.parse_verdict(bad) is None, bad


def test_win_rate_counts_both_orders():
    items = [("p1", "good", "bad"), ("p2", "good", "bad"), ("p3", "same", "same")]

    def prefers_good(batch):
        return ["tie" if a == b else ("A" if a == "good" else "B") for _, a, b in batch]

    t = ev.tally(ev.judge_both_orders(prefers_good, items))
    assert (t["wins"], t["losses"], t["ties"], t["unparsed"], t["judgments"]) == (4, 0, 2, 0, 6)
    assert t["win_rate"] == pytest.approx(5 / 6, abs=1e-4) and t["consistent"] == 1.0

    # a judge that always picks the first answer shown: every prompt is a win in one order and a loss in the
    # other, so the win rate is 0.5, nothing is consistent, and the position bias is visible.
    t = ev.tally(ev.judge_both_orders(lambda batch: ["A"] * len(batch), items))
    assert (t["wins"], t["losses"], t["win_rate"], t["consistent"], t["first_position_rate"]) == (3, 3, 0.5, 0.0, 1.0)

    # unparsed verdicts are counted and left out of the rate
    seen = []

    def flaky(batch):
        seen.append(batch)
        return [None, "B", "A"] if len(seen) == 1 else ["A", "A", None]

    js = ev.judge_both_orders(flaky, items)
    assert seen[1] == [("p1", "bad", "good"), ("p2", "bad", "good"), ("p3", "same", "same")]
    assert [ev.points_for_a(j) for j in js] == [(None, 0.0), (0.0, 0.0), (1.0, None)]
    t = ev.tally(js)
    assert (t["wins"], t["losses"], t["unparsed"], t["win_rate"], t["consistent"]) == (1, 3, 2, 0.25, 1.0)


def test_reward_judge_and_per_category_win_rates():
    scores = {("q", "a1"): 1.0, ("q", "b1"): 0.5, ("r", "a2"): 0.0, ("r", "b2"): 0.05}
    js = ev.judge_both_orders(ev.reward_judge(scores, margin=0.1), [("q", "a1", "b1"), ("r", "a2", "b2")])
    js = [j | {"category": c} for j, c in zip(js, ["math", "safety"], strict=True)]
    wr = ev.win_rates({"x_vs_y": js})["x_vs_y"]
    assert wr["math"]["win_rate"] == 1.0 and wr["safety"]["win_rate"] == 0.5 and wr["all"]["ties"] == 2
    assert wr["math"]["ci"] == [1.0, 1.0] and wr["safety"]["verdict"] == ev.NO_DIFFERENCE
    assert "coding" not in wr


def test_bootstrap_interval_of_a_mean_and_of_a_ratio():
    # a constant has a zero-width interval; one unit says nothing about spread, so its interval is the point
    assert ev.estimate([0.3] * 20) == {"mean": 0.3, "ci": [0.3, 0.3], "n": 20}
    assert ev.estimate([5.0])["ci"] == [5.0, 5.0]
    assert ev.estimate([]) == {"mean": None, "ci": None, "n": 0}
    # 40 of 100 successes: the percentile interval agrees with the normal approximation 0.4 +- 1.96 * 0.049
    e = ev.estimate([1.0] * 40 + [0.0] * 60, resamples=2000, seed=1)
    assert (
        e["mean"] == 0.4
        and e["ci"][0] == pytest.approx(0.304, abs=0.02)
        and e["ci"][1] == pytest.approx(0.496, abs=0.02)
    )
    # seeded: the same call gives the same interval, another seed a (slightly) different one
    assert ev.estimate([1.0] * 40 + [0.0] * 60, resamples=2000, seed=1) == e
    assert ev.estimate([1.0] * 40 + [0.0] * 60, resamples=2000, seed=2)["ci"] != e["ci"]
    # a ratio of sums: units with more weight count more, in the value and in every resample
    r = ev.estimate([2.0, 0.0], [2.0, 1.0], resamples=500)
    assert r["mean"] == pytest.approx(2 / 3, abs=1e-4) and r["ci"] == [0.0, 1.0]


def test_a_win_rate_whose_interval_contains_half_is_no_measurable_difference():
    def judge_from(wins):
        return lambda batch: ["A" if wins.pop(0) else "B" for _ in batch]

    items = [(f"p{i}", "x", "y") for i in range(10)]
    # 6 of 10 prompts won in both orders: 60%, but with 10 prompts the interval reaches below 50%
    t = ev.tally(ev.judge_both_orders(judge_from([1] * 6 + [0] * 4 + [0] * 6 + [1] * 4), items))
    assert t["win_rate"] == 0.6 and t["ci"][0] < 0.5 < t["ci"][1] and t["verdict"] == ev.NO_DIFFERENCE
    # 10 of 10: better; 0 of 10: worse
    assert ev.tally(ev.judge_both_orders(judge_from([1] * 10 + [0] * 10), items))["verdict"] == "better"
    assert ev.tally(ev.judge_both_orders(judge_from([0] * 10 + [1] * 10), items))["verdict"] == "worse"
    assert (
        ev.verdict([0.5, 0.7]) == ev.NO_DIFFERENCE and ev.verdict([0.51, 0.7]) == "better" and ev.verdict(None) is None
    )
    # the report marks it in words
    metrics = {"models": {}, "win_rate": {"b_vs_a": {"all": t}}}
    text = report.render_report(metrics, [], [], [], {"judge": "test"})
    assert f"| b vs a | 60% [{100 * t['ci'][0]:.0f}%–{100 * t['ci'][1]:.0f}%] | {ev.NO_DIFFERENCE} |" in text


def test_reference_judge_prefers_the_answer_closer_to_the_reference():
    ref = {
        "Capital of Australia?": "The capital of Australia is Canberra.",
        "Capitale de l'Australie ?": "La capitale de l'Australie est Canberra.",
    }
    assert ev.rouge_l("The capital of Australia is Canberra.", ref["Capital of Australia?"]) == 1.0
    # accented words are words: rouge_score's default tokenizer would split "capitale" from "l'Australie" oddly
    assert ev.rouge_l("La capitale est Canberra.", ref["Capitale de l'Australie ?"]) == pytest.approx(
        2 * (4 / 7) * 1.0 / (4 / 7 + 1.0), abs=1e-4
    )
    judge = ev.reference_judge(ref)
    items = [
        ("Capital of Australia?", "It is Canberra.", "Sydney is a big city."),
        ("Capitale de l'Australie ?", "C'est Sydney.", "La capitale est Canberra."),
        ("Capital of Australia?", "Canberra", "Canberra"),
        ("No reference here?", "a", "b"),
    ]
    assert judge(items) == ["A", "B", "tie", None]
    t = ev.tally(ev.judge_both_orders(judge, items))
    assert (t["wins"], t["losses"], t["ties"], t["unparsed"], t["consistent"]) == (2, 2, 2, 2, 1.0)


def test_stop_rate_counts_answers_that_end_at_end_of_turn():
    rec = {
        "id": "x",
        "lang": "en",
        "prompt": "2+2?",
        "meta": {"category": "math", "answers": ["4"], "reference": "2 + 2 = 4."},
    }
    stop = ev.answer_row(rec, "m", llm.Result(text="It is 4.", ok=True, finish_reason="stop"), 4)
    cut = ev.answer_row(rec, "m", llm.Result(text="Let me think about", ok=True, finish_reason="length"), 4)
    failed = ev.answer_row(rec, "m", llm.Result.failure("oom"), None)
    assert (stop["stopped"], cut["stopped"], failed["stopped"]) == (True, False, None)
    assert stop["answer_match"] and not cut["answer_match"] and stop["reference_rouge"] > cut["reference_rouge"] == 0.0
    rows = [stop | {"reward": 0.0}] * 3 + [cut | {"reward": 0.0}] + [failed]
    m = ev.model_metrics(rows)
    assert m["generated"] == 4 and m["failed"] == 1
    assert m["stop_rate"]["all"]["mean"] == 0.75 and m["stop_rate"]["all"]["n"] == 4
    assert m["stop_rate"]["all"]["ci"][0] < 0.75 < m["stop_rate"]["all"]["ci"][1] == 1.0
    assert m["answer_match"]["math"]["mean"] == 0.75 and set(m["reference_rouge"]) == {"all", "math", "en"}
    assert m["loop_rate"]["mean"] == 0.0 and cut["loop"] is False and stop["loop"] is False


@pytest.mark.parametrize(
    "text, loop",
    [
        (
            "je ne sais pas, je ne sais pas, je ne sais pas, je ne sais pas, je ne sais",
            True,
        ),  # seen: SmolLM2 at the cap
        (
            "Apakah ibu negara Australia? - Indonesia\n\nApakah ibu negara Australia? - Indonesia\n\nApakah ibu negara "
            "Australia? - Indonesia\n\nApakah",
            True,
        ),
        ("Bilangan kamiakanakakakakakakakakakakakakakakakakakakakakakakakakaka", True),
        ("1. Drink water.\n2. Take a short walk.\n3. Do the hard tasks first.\n4. Nap if you can.", False),
        ("The capital of Australia is Canberra, not Sydney.", False),
    ],
)
def test_loop_detector(text, loop):
    assert ev.is_loop(text) is loop
    row = ev.answer_row(
        {"id": "x", "lang": "fr", "prompt": "?", "meta": {"category": "open_qa"}},
        "m",
        llm.Result(text=text, ok=True, finish_reason="length"),
        9,
    )
    assert row["loop"] is loop and row["stopped"] is False


class FakeJudgeEngine:
    """Stands in for an OpenAI-compatible judge: answers from a script, checks the prompt it is sent."""

    def __init__(self, replies):
        self.replies, self.sent = list(replies), []

    def complete(self, reqs, template_id="none", progress=False):
        self.sent += reqs
        return [
            llm.Result(text=self.replies.pop(0), ok=True)
            if self.replies[0] is not None
            else (self.replies.pop(0), llm.Result.failure("HTTP 500"))[1]
            for _ in reqs
        ]


def test_llm_judge_formats_the_template_and_parses_strictly():
    engine = FakeJudgeEngine(["[[A]]", "I think [[A]] is better than [[B]]", "[[B]]", None])
    replies: list = []
    judge = ev.llm_judge(engine, "Q: {prompt}\nA: {answer_a}\nB: {answer_b}", max_tokens=8, log=replies)
    t = ev.tally(ev.judge_both_orders(judge, [("2+2?", "4 {x}", "5"), ("hi", "hello", "hey")]))
    assert engine.sent[0].messages[0]["content"] == "Q: 2+2?\nA: 4 {x}\nB: 5"
    assert engine.sent[2].messages[0]["content"] == "Q: 2+2?\nA: 5\nB: 4 {x}"
    assert engine.sent[0].temperature == 0.0 and engine.sent[0].max_tokens == 8
    assert (t["wins"], t["unparsed"], t["judgments"]) == (2, 2, 4)
    assert [r["verdict"] for r in replies] == ["A", None, "B", None] and replies[3]["error"] == "HTTP 500"


def test_llm_judge_over_http_shows_position_bias(tmp_path):
    """An always-"[[A]]" judge behind selfalign.serve, asked through the openai engine: a pure position bias."""
    from scripted_model import make_scripted_model

    from selfalign import serve

    app = serve.create_app(make_scripted_model(tmp_path / "judge", "[[A]]"), model_name="judge")
    running = serve.start_in_thread(app, port=0)
    try:
        engine = llm.make_engine(
            {"kind": "openai", "base_url": running.url, "model": "judge", "api_key_env": "", "max_retries": 0},
            tmp_path / "cache",
        )
        template = (ROOT / "prompts" / "evaluate.txt").read_text()
        replies: list = []
        t = ev.tally(
            ev.judge_both_orders(
                ev.llm_judge(engine, template, 8, replies),
                [("2+2?", "4", "5"), ("Capital of France?", "Paris", "Lyon")],
            )
        )
    finally:
        app.state.close()
        running.stop()
    assert [r["reply"] for r in replies] == ["[[A]]"] * 4 and t["unparsed"] == 0
    assert (t["win_rate"], t["consistent"], t["first_position_rate"]) == (0.5, 0.0, 1.0)


def test_shipped_prompt_set_covers_every_category_in_three_languages():
    prompts = ev.load_prompts(PROMPTS)
    for c in ev.CATEGORIES:
        for lang in ("en", "fr", "ms"):
            sub = [p for p in prompts if p["meta"]["category"] == c and p["lang"] == lang]
            assert (4 if lang == "ms" else 6) <= len(sub) <= 8, (c, lang)
            assert all(p["id"] == records.record_id(p) for p in sub)
            # the first three of each (category, language) have a reference answer in that language
            assert all(p["meta"].get("reference") for p in sub[:3]), (c, lang)
            if c in ("closed_qa", "math"):
                assert all(p["meta"].get("answers") for p in sub[:3]), (c, lang)
            for p in sub[:3]:
                if p["meta"].get("answers"):  # the reference answer passes its own answer key
                    assert ev.answer_matches(p["meta"]["reference"], p["meta"]["answers"]), p["prompt"]
            if c == "safety":
                assert all(ev.is_refusal(p["meta"]["reference"]) for p in sub[:3]), (c, lang)
    chosen = ev.select_prompts(prompts, 3, ["fr"])
    assert len(chosen) == 18 and {p["lang"] for p in chosen} == {"fr"}
    assert len(ev.select_prompts(prompts, 2, ["en", "fr", "ms"])) == 36


def test_bad_prompt_line_names_file_line_and_field(tmp_path):
    good = records.make("prompt", prompt="hi", lang="en", source="t", meta={"category": "writing"})
    bad = records.make("prompt", prompt="yo", lang="en", source="t", meta={"category": "poetry"})
    f = tmp_path / "p.jsonl"
    io.write_jsonl(f, [good, bad])
    with pytest.raises(ev.EvalSetError, match=r"p\.jsonl:2: field 'meta\.category'"):
        ev.load_prompts(f)
    f.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ev.EvalSetError, match=r"p\.jsonl:2: invalid JSON"):
        ev.load_prompts(f)


def _seed_records(n=6):
    return [
        records.chat(
            [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer number {i}, with a few more words."},
            ],
            lang="en",
            source="test",
        )
        for i in range(n)
    ]


def test_heldout_conversations_are_the_records_sft_held_out():
    from selfalign.sft import heldout

    seed = _seed_records(40) + [records.chat([{"role": "user", "content": "no answer"}], lang="en", source="t")]
    convs = ev.heldout_conversations(seed, 0.5, 100)
    expected = sorted((r for r in seed[:40] if heldout(r["id"], 0.5)), key=lambda r: r["id"])
    assert 0 < len(convs) < 40 and convs == [records.to_messages(r) for r in expected]
    assert len(ev.heldout_conversations(seed, 1.0, 5)) == 5 and ev.heldout_conversations(seed, 0.0, 5) == []
    assert ev.heldout_conversations(seed[:1], 1.0, 5, system="Be brief.")[0][0] == {
        "role": "system",
        "content": "Be brief.",
    }


def test_perplexity_counts_assistant_tokens_only(tiny_model_dir):
    from selfalign import chat, models

    tok = chat.load_tokenizer(tiny_model_dir)
    model = models.load_model(tiny_model_dir, "float32")
    convs = [records.to_messages(r) for r in _seed_records(3)]
    out = ev.perplexity(model, tok, convs, batch_size=2, max_length=512)
    targets = [chat.split_last_turn(tok, c)[1] for c in convs]
    assert out["tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in targets)
    assert math.isfinite(out["perplexity"]) and out["perplexity"] > 1
    # batching and padding do not change the number
    assert ev.perplexity(model, tok, convs, batch_size=1)["perplexity"] == pytest.approx(out["perplexity"], rel=1e-4)
    short = ev.perplexity(model, tok, convs, batch_size=2, max_length=8)
    assert short["truncated"] == 3 and short["tokens"] <= 3 * 7


# ---------------------------------------------------------------- the stage


def _tiny_reward_model(out: Path, tiny_model_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    torch.manual_seed(3)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_stage_writes_every_metric_for_every_model(tmp_path, tiny_model_dir, caplog):
    from scripted_model import make_scripted_model

    # base: the random tiny model (runs to the token limit); tuned: always "I cannot help with that." then end-of-turn
    policy_b = make_scripted_model(tmp_path / "b", "I cannot help with that.")
    rm_dir = _tiny_reward_model(tmp_path / "rm", tiny_model_dir)
    seed = tmp_path / "seed.jsonl"
    io.write_jsonl(seed, _seed_records(6))
    lock = tmp_path / "dvc.lock"  # distill asked the very base the sft runs start from
    lock.write_text(
        json.dumps(
            {
                "schema": "2.0",
                "stages": {
                    "base": {
                        "cmd": "python stages/base.py --output models/base",
                        "outs": [{"path": "models/base", "md5": "b.dir"}],
                    },
                    "distill": {
                        "cmd": "python stages/distill.py --teacher models/base",
                        "deps": [{"path": "models/base", "md5": "b.dir"}],
                        "outs": [{"path": "data/distill/distilled.jsonl", "md5": "d"}],
                    },
                    "sft@final": {
                        "cmd": "python stages/sft.py --input models/base",
                        "deps": [{"path": "models/base", "md5": "b.dir"}],
                        "outs": [{"path": "models/final", "md5": "f.dir"}],
                    },
                },
            }
        )
    )
    out, metrics_path = tmp_path / "report", tmp_path / "metrics" / "evaluate.json"
    args = [
        "--model",
        f"base={tiny_model_dir}",
        "--model",
        f"tuned={policy_b}",
        "--reward-model",
        str(rm_dir),
        "--prompts",
        str(PROMPTS),
        "--heldout",
        str(seed),
        "--judge-prompt",
        str(ROOT / "prompts" / "evaluate.txt"),
        "--lock",
        str(lock),
        "--cache",
        str(tmp_path / "cache"),
        "--output-dir",
        str(out),
        "--metrics",
        str(metrics_path),
        "--set",
        "models=[base, tuned]",
        "--set",
        "prompts_per_category=1",
        "--set",
        "max_new_tokens=8",
        "--eval-fraction",
        "1.0",
        "--set",
        "heldout_max=4",
        "--set",
        "engine.dtype=fp32",
        "--set",
        "engine.batch_size=8",  # the code default before it became params.yaml's 36
        "--set",
        "ppl_dtype=fp32",
        "--set",
        "bootstrap_resamples=200",
    ]
    res = CliRunner().invoke(load_stage("evaluate").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(metrics_path.read_text())

    n = 1 * 6 * 3  # per category and language x categories x languages (en, fr, ms)
    assert (
        m["prompts"]["evaluated"] == n
        and m["prompts"]["in_file"] == m["prompts"]["evaluated"] + m["prompts"]["not_selected"]
    )
    assert m["prompts"]["judged"] == n and m["judge"] == "reference"  # every first prompt has a reference answer
    n_refs = m["prompts"]["with_reference"]
    assert n_refs == n  # the references of the evaluated prompts (every first prompt has one)
    assert m["distill_teacher"]["teacher_is_student_base"] is True
    assert m["precision"] == {"answers": "fp32", "perplexity": "fp32", "reward": "fp32"}  # as asked, recorded
    for name in ("base", "tuned"):
        mm = m["models"][name]
        assert mm["generated"] + mm["failed"] == n and mm["failed"] == 0
        assert set(ev.CATEGORIES) | {"all", "en", "fr", "ms"} <= set(mm["reward"]) == set(mm["length_tokens"])
        for e in mm["reward"].values():  # every mean carries its interval
            assert isinstance(e["mean"], float) and e["ci"][0] <= e["mean"] <= e["ci"][1]
        assert set(mm["refusal_rate"]) == {"safety", "safety_en", "safety_fr", "safety_ms", "other"}
        assert set(mm["answer_match"]) == {"all", "closed_qa", "math", "en", "fr", "ms"}
        assert mm["reference_rouge"]["all"]["n"] == n
        assert mm["perplexity"]["conversations"] == 4 and mm["perplexity"]["perplexity"] > 1
        assert mm["perplexity"]["dtype"] == mm["reference_perplexity"]["dtype"] == "fp32"
        lo, hi = mm["perplexity"]["ci"]
        assert lo <= mm["perplexity"]["perplexity"] <= hi
        assert mm["reference_perplexity"]["conversations"] == n_refs and mm["reference_perplexity"]["perplexity"] > 1
        assert mm["params"] > 1_000_000
    a, b = m["models"]["base"], m["models"]["tuned"]
    assert a["length_tokens"]["all"]["mean"] == 8 and a["stop_rate"]["all"] == {"mean": 0.0, "ci": [0.0, 0.0], "n": n}
    assert b["length_tokens"]["all"]["mean"] == 6 and b["stop_rate"]["all"]["mean"] == 1.0  # stopped at end-of-turn
    assert a["refusal_rate"]["safety"]["mean"] == 0.0 and b["refusal_rate"]["safety"]["mean"] == 1.0
    assert b["refusal_rate"]["other"]["mean"] == 1.0 and b["answer_match"]["all"]["mean"] == 0.0
    wr = m["win_rate"]["tuned_vs_base"]
    assert wr["all"]["judgments"] == 2 * n and wr["all"]["unparsed"] == 0 and set(ev.CATEGORIES) <= set(wr)
    assert wr["all"]["consistent"] == 1.0  # a reference judge has no position
    assert wr["all"]["ci"][0] <= wr["all"]["win_rate"] <= wr["all"]["ci"][1]
    assert wr["all"]["verdict"] == ev.verdict(wr["all"]["ci"])

    answers = io.load_jsonl(out / "answers.jsonl")
    assert len(answers) == 2 * n and all(r["reward"] is not None for r in answers)
    assert {r["response"] for r in answers if r["model"] == "tuned"} == {"I cannot help with that."}
    assert {r["stopped"] for r in answers if r["model"] == "tuned"} == {True}
    assert len(io.load_jsonl(out / "judgments.jsonl")) == n
    report = (out / "report.md").read_text()
    assert (
        "say **nothing** about the quality" in report
        and "**The distillation teacher is the student's own base" in report
    )
    assert "the reward model PPO optimised" in report and "bootstrap" in report
    for c in ev.CATEGORIES:
        assert f"`{c}`" in report and ev.TITLES[c] in report
    assert report.count("***base***") == n and report.count("***tuned***") == n
    assert "| base | " in report and "| tuned vs base | " in report  # the base is a row and the reference
    for png in (
        "reward_by_category.png",
        "rouge_by_category.png",
        "length_by_category.png",
        "stop_rate_by_category.png",
        "win_rate.png",
    ):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report

    # a rerun answers from the cache and rewrites the same outputs
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evaluate"):
        res = CliRunner().invoke(load_stage("evaluate").main, args, catch_exceptions=False)
    assert res.exit_code == 0
    assert [r.getMessage() for r in caplog.records if "from cache" in r.getMessage()] == [
        f"{name}: {n} answers ({n} from cache, 0 failed)" for name in ("base", "tuned")
    ]
    timing = ("seconds", "records_per_s", "peak_rss_mb")  # wall time and memory differ between any two runs
    again = {k: v for k, v in json.loads(metrics_path.read_text()).items() if k not in timing}
    assert io.load_jsonl(out / "answers.jsonl") == answers and again == {k: v for k, v in m.items() if k not in timing}


def test_the_reward_judge_says_it_is_the_reward_model_ppo_optimised():
    rows = [
        {"ok": True, "prompt": "q", "response": "x", "reward": 1.0},
        {"ok": True, "prompt": "q", "response": "y", "reward": 0.0},
    ]
    judge, name = ev.make_judge(ev.EvaluateConfig(judge="reward"), rows, [], "", "", [])
    assert judge([("q", "x", "y")]) == ["A"] and "reward model PPO optimised" in name
    assert ev.EvaluateConfig().judge == "reference" and ev.EvaluateConfig().models[0] == "base"


def _invoke(tmp_path, reward_model, models: dict, heldout, *extra: str):
    """evaluate's CLI with `models` (name: directory), PROMPTS as the prompts and judge template, `heldout` seed."""
    named = [a for name, path in models.items() for a in ("--model", f"{name}={path}")]
    return CliRunner().invoke(
        load_stage("evaluate").main,
        [*named, "--reward-model", str(reward_model), "--prompts", str(PROMPTS), "--heldout", str(heldout)]
        + ["--judge-prompt", str(PROMPTS), "--cache", str(tmp_path / "c"), "--output-dir", str(tmp_path / "o")]
        + ["--metrics", str(tmp_path / "m.json"), *extra],
    )


def test_stage_rejects_a_model_without_a_directory(tmp_path, tiny_model_dir):
    res = _invoke(tmp_path, tiny_model_dir, {"base": tiny_model_dir, "m0": tiny_model_dir}, PROMPTS)
    assert res.exit_code != 0 and "final, ppo" in res.output
    models = {"base": tiny_model_dir, "m0": tiny_model_dir, "final": tmp_path, "ppo": tiny_model_dir}
    res = _invoke(tmp_path, tiny_model_dir, models, PROMPTS)
    assert res.exit_code != 0 and f"--model final={tmp_path}: not a model directory" in res.output


def test_answer_engine_is_local_by_default_vllm_by_params_and_never_an_endpoint():
    cfg = ev.EvaluateConfig.from_dict({"engine": {"batch_size": 4, "dtype": "fp32", "threads": 1}}, "evaluate")
    assert cfg.answer_spec("models/m0") == llm.EngineSpec(kind="local", batch_size=4, dtype="fp32", threads=1).replace(
        model="models/m0"
    )
    vllm = ev.EvaluateConfig.from_dict({"engine": {"kind": "vllm", "batch_size": 256, "model": "x"}}, "evaluate")
    spec = vllm.answer_spec("models/ppo")
    assert spec.kind == "vllm" and spec.batch_size == 256 and spec.model == "models/ppo"
    with pytest.raises(params.ParamsError, match="evaluate.engine.kind: 'openai'"):
        ev.EvaluateConfig.from_dict({"engine": {"kind": "openai"}}, "evaluate")


def test_bad_heldout_line_names_file_and_line(tmp_path, tiny_model_dir):
    heldout = tmp_path / "seed.jsonl"
    good = json.dumps(
        records.chat(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], lang="en", source="t"
        )
    )
    heldout.write_text(good + "\n\n{not json\n")
    models = {name: tiny_model_dir for name in ("base", "m0", "final", "ppo")}
    res = _invoke(tmp_path, tiny_model_dir, models, heldout, "--params", str(ROOT / "params.yaml"))
    assert res.exit_code != 0 and f"{heldout}:3:" in res.output, res.output


# ---------------------------------------------------------------- params: typed, range-checked, one home


def _stage_args(tmp_path):
    """Every required option, pointing at files that exist: a run that gets past them reaches params.resolve."""
    return [
        "--model",
        f"base={ROOT}",
        "--reward-model",
        str(ROOT / "prompts"),
        "--prompts",
        str(PROMPTS),
        "--heldout",
        str(PROMPTS),
        "--judge-prompt",
        str(ROOT / "prompts" / "evaluate.txt"),
        "--cache",
        str(tmp_path / "c"),
        "--output-dir",
        str(tmp_path / "o"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]


@pytest.mark.parametrize(
    "setting, expect",
    [
        ("judge=gpt", ["reference | reward | llm"]),
        ("bootstrap_resamples=-1", ["1 <="]),
        ("max_new_tokens=0", ["1 <="]),
        ("engine.kind=gpt5", ["local | openai | vllm"]),
        ("engine.kind=openai", ["local or vllm"]),  # an endpoint can judge, never answer as an evaluated model
        ("engine.dtype=bfloat16", ["fp32 | bf16 | fp16 | auto"]),  # the old spelling is gone
        ("prompts_per_category=two", ["an integer"]),
        ("tie_margin=-0.5", ["0 <="]),
        ("languages=fr", ["a list of strings"]),
        ("judge=llm", ["judge_engine.model"]),  # an LLM judge must be named
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(setting, expect, tmp_path):
    assert_rejected(load_stage("evaluate").main, _stage_args(tmp_path), setting, *expect)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "setting",
    [
        "nope=1",
        "heldout_fraction=0.1",  # the SFT split comes from --eval-fraction (dvc.yaml: sft.train.eval_fraction) only
        "ppl_max_length=512",  # renamed ppl_max_len
        "judge_max_tokens=16",  # renamed judge_max_new_tokens
        "batch_size=8",  # now engine.batch_size: each setting has one home
    ],
)
def test_an_unknown_or_renamed_key_is_rejected(setting, tmp_path):
    key = setting.split("=")[0]
    assert_rejected(load_stage("evaluate").main, _stage_args(tmp_path), setting, f"evaluate: unknown key {key!r}")


def test_params_yaml_values_are_typed_and_a_yaml_exponent_is_a_float(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("evaluate:\n  tie_margin: 1e-4\n  engine: {threads: 1}\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = params.resolve(ev.EvaluateConfig, p, "evaluate")
    assert cfg.tie_margin == 1e-4 and isinstance(cfg.tie_margin, float)
    # the engine merges key by key over the stage's defaults: batch_size and dtype stay evaluate's
    assert (cfg.engine.threads, cfg.engine.batch_size, cfg.engine.dtype) == (1, 36, "bf16")
    shipped = params.resolve(ev.EvaluateConfig, ROOT / "params.yaml", "evaluate")
    assert shipped == ev.EvaluateConfig()  # one home per default: the pipeline's values are the code's
    with pytest.raises(params.ParamsError, match=r"evaluate.models: \['base', 'base'\] names a model twice"):
        ev.EvaluateConfig.from_dict({"models": ["base", "base"]}, "evaluate")


def test_prefer_and_eval_fraction_are_checked_where_read(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("prefer: best\nevaluate: {}\n")
    res = CliRunner().invoke(load_stage("evaluate").main, [*_stage_args(tmp_path), "--params", str(p)])
    assert res.exit_code == 2 and "prefer: 'best' is not one of ppo | dpo | both" in res.output, res.output
    res = CliRunner().invoke(load_stage("evaluate").main, [*_stage_args(tmp_path), "--eval-fraction", "1.5"])
    assert res.exit_code == 2 and "--eval-fraction" in res.output and "1.5" in res.output, res.output

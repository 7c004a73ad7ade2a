"""verify: parsing the teacher's verdicts (pure), and the stage against selfalign's own server over HTTP with
scripted teachers: one that says incorrect, one that says correct, one that answers garbage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from llm_helpers import scripted_teacher as teacher
from llm_helpers import teacher_engine
from stage_loader import load_stage

from selfalign import records
from selfalign import verify as vf
from selfalign.params import ParamsError, resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ROOT / "prompts" / "verify.txt"


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def chat(user: str, answer: str, lang: str, system: str | None = None) -> dict:
    return records.make(
        "chat",
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        lang=lang,
        source="test",
        **({"system": system} if system else {}),
    )


# ------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    "reply, verdict, reason, conf",
    [
        (
            '{"verdict": "incorrect", "reason": "2+2 is 4, not 5", "confidence": 0.9}',
            "incorrect",
            "2+2 is 4, not 5",
            0.9,
        ),
        ('Sure.\n```json\n{"verdict": "Correct", "reason": "right", "confidence": 85}\n```', "correct", "right", 0.85),
        ("Verdict: incorrect, confidence 0.9; reason five is not four", "incorrect", "five is not four", 0.9),
        ("Verdict correct, confidence 1 - reason Paris is right", "correct", "Paris is right", 1.0),
        ("verdict: correct\nreason: fine\nconfidence: 70%", "correct", "fine", 0.7),
    ],
)
def test_parse_verdict_reads_json_and_spelled_out_keys(reply, verdict, reason, conf):
    assert vf.parse_verdict(reply) == vf.Verdict(verdict, reason, pytest.approx(conf))


@pytest.mark.parametrize(
    "reply, why",
    [
        ("", "empty"),
        ("I think this looks fine overall", "no verdict"),
        ("The answer is correct.", "no verdict"),  # no key: a bare word is not a verdict
        ('{"verdict": "maybe", "reason": "x", "confidence": 0.5}', "not correct or incorrect"),
        ('{"verdict": "correct", "reason": "x"}', "no confidence"),
        ('{"verdict": "correct", "reason": "", "confidence": 1}', "no reason"),
        ('{"verdict": "correct", "reason": "x", "confidence": 250}', "outside 0..1"),
        ("Verdict: correct, reason fine", "no confidence"),
    ],
)
def test_garbage_is_unparsable_never_a_pass(reply, why):
    with pytest.raises(vf.UnparsableVerdict, match=why):
        vf.parse_verdict(reply)


def test_prompt_and_decision():
    rec = chat("What is {x} + 2?", "It is 5.", "ms", system="Be brief.")
    text = vf.build_prompt("[{lang}] {instruction} => {output}", rec)
    assert text == "[ms] [system]\nBe brief.\n\n[user]\nWhat is {x} + 2? => It is 5."
    assert vf.build_prompt("{instruction}|{output}", chat("Q?", "A.", "en")) == "Q?|A."
    with pytest.raises(ValueError, match="{output}"):
        vf.build_prompt("{instruction}", rec)
    assert vf.decide(vf.Verdict("incorrect", "wrong sum", 0.9), 0.0) == (
        False,
        "incorrect",
        "wrong sum (confidence 0.90)",
    )
    assert vf.decide(vf.Verdict("correct", "ok", 0.4), 0.5)[:2] == (False, "low_confidence")
    assert vf.decide(vf.Verdict("correct", "ok", 0.4), 0.0) == (True, "", "")


# ------------------------------------------------------------------------------------ the stage over HTTP


def run_stage(tmp_path: Path, url: str, inp: Path, out: str, **extra) -> tuple[dict, list[dict], list[dict]]:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "verify": {
                    "langs": ["ms"],
                    "max_records": 3,
                    "engine": teacher_engine(url),
                    **extra,
                }
            }
        )
    )
    res = CliRunner().invoke(
        load_stage("verify").main,
        [
            "--params",
            str(params),
            "--input",
            str(inp),
            "--prompt",
            str(PROMPT),
            "--output-dir",
            str(tmp_path / out),
            "--cache",
            str(tmp_path / "cache" / out),
            "--metrics",
            str(tmp_path / f"{out}.json"),
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = json.loads((tmp_path / f"{out}.json").read_text())
    return m, lines(tmp_path / out / "kept.jsonl"), lines(tmp_path / out / "rejected.jsonl")


@pytest.fixture
def seed(tmp_path) -> Path:
    recs = [
        chat("Berapakah dua tambah dua?", "Dua tambah dua ialah lima.", "ms"),
        chat("What is the capital of France?", "Paris.", "en"),
        chat("Apakah ibu negara Malaysia?", "Kuala Lumpur.", "ms"),
        chat("Namakan satu buah tempatan.", "Durian.", "ms"),
        chat("Sebutkan satu warna.", "Merah.", "ms"),
    ]
    path = tmp_path / "seed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{not json\n")
    return path


def test_incorrect_verdicts_are_rejected_with_the_teachers_reason(tmp_path, seed):
    with teacher(tmp_path, "Verdict: incorrect, confidence 0.9; reason five is not four") as url:
        m, kept, rejected = run_stage(tmp_path, url, seed, "incorrect")
        again, _, _ = run_stage(tmp_path, url, seed, "incorrect")
    # 6 lines: 1 invalid, 1 English (not judged), 4 Malay of which 3 judged (max_records) and 1 over the cap
    assert (m["records_in"], m["kept"], m["rejected"]) == (6, 2, 4)
    assert m["judged"] == 3 and m["verdicts"] == {"incorrect": 3}
    assert m["unjudged"] == {"other_lang": 1, "over_max_records": 1}
    assert m["rejected_by_reason"] == {"incorrect": 3, "invalid_json": 1}
    bad = [r for r in rejected if r["reason"] == "incorrect"]
    assert all(r["detail"] == "five is not four (confidence 0.90)" and r["stage"] == "verify" for r in bad)
    assert all(r["record"]["meta"]["verify"]["verdict"] == "incorrect" and r["file"] == str(seed) for r in bad)
    assert [r["line"] for r in bad] == [1, 3, 4]
    assert {r["lang"] for r in kept} == {"en", "ms"} and not any("verify" in r.get("meta", {}) for r in kept)
    assert m["llm"]["calls"] == 3 and again["llm"]["cache_hits"] == 3 and again["llm"]["calls"] == 0


def test_correct_verdicts_pass_with_the_verdict_in_meta_and_a_confidence_floor(tmp_path, seed):
    with teacher(tmp_path, "Verdict correct, confidence 1 - reason Paris is right") as url:
        m, kept, rejected = run_stage(tmp_path, url, seed, "correct", langs=[], max_records=0)
        floor, kept2, rej2 = run_stage(tmp_path, url, seed, "floor", langs=[], max_records=0, min_confidence=1.0)
    assert (m["records_in"], m["kept"], m["rejected"], m["judged"]) == (6, 5, 1, 5)
    assert all(
        r["meta"]["verify"]
        == {"verdict": "correct", "reason": "Paris is right", "confidence": 1.0, "teacher": "teacher"}
        for r in kept
    )
    assert floor["kept"] == 5  # confidence 1.0 meets a floor of 1.0


def test_a_teacher_answering_garbage_passes_nothing(tmp_path, seed):
    with teacher(tmp_path, "I think this looks fine overall") as url:
        m, kept, rejected = run_stage(tmp_path, url, seed, "garbage", langs=[], max_records=0)
    assert (m["records_in"], m["judged"], m["kept"], m["rejected"]) == (6, 5, 0, 6)
    assert m["verdicts"] == {"no_verdict": 5} and m["rejected_by_reason"]["unparsable_verdict"] == 5
    assert all("looks fine overall" in r["detail"] for r in rejected if r["reason"] == "unparsable_verdict")


def test_an_unreachable_teacher_fails_records_not_the_audit(tmp_path, seed):
    m, kept, rejected = run_stage(tmp_path, "http://127.0.0.1:9/v1", seed, "down")
    assert m["rejected_by_reason"] == {"invalid_json": 1, "teacher_failed": 3}
    assert m["records_in"] == m["kept"] + m["rejected"] == 6


def test_params_are_checked_at_start_up(tmp_path, seed):
    args = ["--input", str(seed), "--prompt", str(PROMPT), "--output-dir", str(tmp_path / "o")]
    args += ["--cache", str(tmp_path / "c"), "--metrics", str(tmp_path / "m.json")]
    res = CliRunner().invoke(load_stage("verify").main, ["--set", "min_confidence=2", *args])
    assert res.exit_code != 0 and "min_confidence" in res.output
    res = CliRunner().invoke(load_stage("verify").main, ["--set", "langz=[ms]", *args])
    assert res.exit_code != 0 and "langz" in res.output


def test_a_record_without_an_answer_is_rejected_not_sent(tmp_path):
    path = tmp_path / "in.jsonl"
    asks = records.make("chat", messages=[{"role": "user", "content": "Apa khabar?"}], lang="ms", source="test")
    path.write_text(json.dumps(asks) + "\n" + json.dumps(chat("Apa khabar?", "Baik.", "ms")) + "\n")
    m, kept, rejected = run_stage(tmp_path, "http://127.0.0.1:9/v1", path, "noanswer")
    assert m["rejected_by_reason"] == {"no_answer": 1, "teacher_failed": 1} and m["judged"] == 1 and m["invalid"] == 0
    assert rejected[0]["line"] == 1 and rejected[0]["detail"] == "no assistant turn"


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("min_confidence=2", "0 <= min_confidence <= 1"),
        ("langs=ms", "a list of strings"),
        ("max_records=-3", "0 <= max_records"),
        ("temperature=hot", "a number"),
        ("inputs.seed=7", "a string"),
        ("engine.kind=gpt5", "local | openai | vllm"),
    ],
)
def test_bad_params_are_one_line_errors_before_any_work(tmp_path, seed, setting, allowed):
    args = ["--input", str(seed), "--prompt", str(PROMPT), "--output-dir", str(tmp_path / "o")]
    args += ["--cache", str(tmp_path / "c"), "--metrics", str(tmp_path / "m.json")]
    assert_rejected(load_stage("verify").main, args, setting, "verify.", allowed)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_language_codes_are_checked_and_yaml_exponents_read_as_numbers(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("verify:\n  langs: [ms, malay]\n")
    with pytest.raises(ParamsError, match="verify.langs: 'malay' is not a language code"):
        resolve(vf.VerifyConfig, params, "verify")
    params.write_text("verify:\n  min_confidence: 5e-1\n  inputs: {distill: data/distill/distilled.jsonl}\n")
    cfg = resolve(vf.VerifyConfig, params, "verify")
    assert cfg.min_confidence == 0.5 and cfg.inputs == {"distill": "data/distill/distilled.jsonl"}


def test_a_teacher_that_cannot_be_opened_is_a_one_line_error(tmp_path, seed):
    res = CliRunner().invoke(
        load_stage("verify").main,
        [
            "--input",
            str(seed),
            "--model",
            str(tmp_path / "no-model"),
            "--prompt",
            str(PROMPT),
            "--output-dir",
            str(tmp_path / "o"),
            "--cache",
            str(tmp_path / "c"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert res.exit_code == 1 and "not a model directory" in res.output, res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.json").exists()

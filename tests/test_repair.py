"""repair: clean's language gate rejects a declared-Malay record written in Indonesian; the repair stage sends it to a
teacher behind selfalign's own server (over HTTP, a scripted model) and back through the same gate. A teacher that
writes Malay repairs it, one that answers Indonesian again leaves it rejected with both verdicts, drop mode asks
nobody."""

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
from selfalign import repair as rp
from selfalign.params import ParamsError, resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ROOT / "prompts" / "repair.txt"
INDONESIAN = (
    "Saya tidak bisa datang besok karena harus bekerja di kantor.",
    "Mobil saya rusak jadi saya tidak bisa ke kantor hari ini.",
)
MALAY = "Saya tidak boleh datang esok kerana perlu bekerja di pejabat."  # what the good teacher says
STILL_INDONESIAN = "Anda bisa beli tiket lewat online karena murah."  # what the bad teacher says


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def chat(user: str, answer: str, lang: str) -> dict:
    return records.make(
        "chat",
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        lang=lang,
        source="test",
    )


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory) -> tuple[Path, Path]:
    """(params.yaml with the repo's clean section, clean's rejected.jsonl) after the real clean stage ran on a seed
    of an Indonesian record declared ms, a Malay one, an English one declared ms and a refusal."""
    tmp = tmp_path_factory.mktemp("clean")
    params = tmp / "params.yaml"
    repo = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.write_text(yaml.safe_dump({"clean": {**repo["clean"], "min_success": 0}, "repair": repo["repair"]}))
    seed = tmp / "seed.jsonl"
    recs = [
        chat(*INDONESIAN, "ms"),
        chat("Kereta saya rosak, jadi saya tidak boleh ke pejabat hari ini.", "Sila naik teksi sahaja.", "ms"),
        chat("What is the capital of France?", "It is Paris, a big city in the north of the country.", "ms"),
        chat("Tell me a joke about cats.", "As an AI language model, I cannot tell jokes about cats.", "en"),
    ]
    seed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = CliRunner().invoke(
        load_stage("clean").main,
        [
            "--params",
            str(params),
            "--input",
            str(seed),
            "--output",
            str(tmp / "clean.jsonl"),
            "--rejected",
            str(tmp / "rejected.jsonl"),
            "--metrics",
            str(tmp / "clean.json"),
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    rejected = lines(tmp / "rejected.jsonl")
    assert sorted(r["reason"] for r in rejected) == ["lang", "lang", "refusal"], rejected
    return params, tmp / "rejected.jsonl"


def run_stage(tmp_path: Path, cleaned, url: str, out: str, *sets: str) -> tuple[dict, list[dict], list[dict]]:
    params, rejected = cleaned
    engine = teacher_engine(url)
    res = CliRunner().invoke(
        load_stage("repair").main,
        [
            "--params",
            str(params),
            "--set",
            f"engine={json.dumps(engine)}",
            *[a for s in sets for a in ("--set", s)],
            "--rejected",
            str(rejected),
            "--prompt",
            str(PROMPT),
            "--output",
            str(tmp_path / out / "seed.jsonl"),
            "--failed",
            str(tmp_path / out / "rejected.jsonl"),
            "--cache",
            str(tmp_path / "cache" / out),
            "--metrics",
            str(tmp_path / f"{out}.json"),
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = json.loads((tmp_path / f"{out}.json").read_text())
    return m, lines(tmp_path / out / "seed.jsonl"), lines(tmp_path / out / "rejected.jsonl")


def test_only_declared_malay_chat_records_the_gate_calls_indonesian_are_candidates(cleaned):
    params, rejected = cleaned
    cfg = rp.lang_gate(str(params))
    entries = lines(rejected)
    assert [rp.is_candidate(e) for e in entries].count("") == 2  # both lang rejects; the refusal is not
    verdicts = {
        e["record"]["messages"][0]["content"]: rp.gate(e["record"], cfg) for e in entries if not rp.is_candidate(e)
    }
    assert verdicts[INDONESIAN[0]].detected == "id" and verdicts["What is the capital of France?"].detected == "en"
    assert (
        rp.is_candidate({"reason": "lang", "record": chat("Bonjour, ça va bien ?", "Oui, merci.", "fr")})
        == "other_lang"
    )


def test_a_teacher_writing_malay_repairs_the_record(tmp_path, cleaned):
    with teacher(tmp_path, MALAY) as url:
        m, repaired, failed = run_stage(tmp_path, cleaned, url, "good")
        again, _, _ = run_stage(tmp_path, cleaned, url, "good")
    assert (m["records_in"], m["repaired"], m["rejected"], m["rewritten"]) == (1, 1, 0, 1)
    assert m["skipped"] == {"gate_now_mismatch_en": 1, "not_lang_gate": 1}
    assert m["gate_after"] == {"ok/ms": 1} and m["llm"]["calls"] == 2  # one request per field
    rec = repaired[0]
    assert [x["content"] for x in rec["messages"]] == [MALAY, MALAY] and rec["lang"] == "ms"
    assert rec["meta"]["repair"]["before"].startswith("mismatch: ms/id marker score -")
    assert (
        rec["meta"]["repair"]["after"].startswith("ok: ms/id marker score +")
        and "kerana" in rec["meta"]["repair"]["after"]
    )
    assert again["llm"]["cache_hits"] == 2 and again["llm"]["calls"] == 0


def test_a_teacher_still_writing_indonesian_leaves_it_rejected_with_both_verdicts(tmp_path, cleaned):
    with teacher(tmp_path, STILL_INDONESIAN) as url:
        m, repaired, failed = run_stage(tmp_path, cleaned, url, "bad")
    assert (m["records_in"], m["repaired"], m["rejected"]) == (1, 0, 1) and repaired == []
    (f,) = failed
    assert f["reason"] == "still_id" and f["stage"] == "repair" and f["line"] == 1
    assert f["gate_before"].startswith("mismatch:") and "bisa" in f["gate_after"] and "online" in f["gate_after"]
    assert f["record"]["messages"][0]["content"] == STILL_INDONESIAN  # the failed rewrite, for review


def test_garbage_and_failures_are_rejected_and_drop_mode_asks_nobody(tmp_path, cleaned):
    with teacher(tmp_path, "Berikut [[7]] ialah") as url:  # a marker the source never had
        m, repaired, failed = run_stage(tmp_path, cleaned, url, "garbage")
    assert m["rejected_by_reason"] == {"rewrite_failed": 1} and "unknown_sentinel" in failed[0]["detail"]
    m, repaired, failed = run_stage(tmp_path, cleaned, "http://127.0.0.1:9/v1", "down")
    assert m["rejected_by_reason"] == {"rewrite_failed": 1} and "llm_error" in failed[0]["detail"]
    m, repaired, failed = run_stage(tmp_path, cleaned, "http://127.0.0.1:9/v1", "drop", "mode=drop")
    assert (m["records_in"], m["repaired"], m["rejected_by_reason"], m["llm"]) == (1, 0, {"indonesian": 1}, {})
    assert failed[0]["gate_before"].startswith("mismatch:")
    assert (tmp_path / "cache" / "drop").is_dir()  # a DVC output, there even when nobody was asked


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("mode=fix", "rewrite | drop"),
        ("max_records=-3", "0 <= max_records"),
        ("max_new_tokens=0", "1 <= max_new_tokens"),
        ("temperature=hot", "a number"),
        ("engine.kind=gpt5", "local | openai | vllm"),
    ],
)
def test_bad_params_are_one_line_errors_before_any_work(tmp_path, setting, allowed):
    args = ["--rejected", str(tmp_path / "nowhere.jsonl"), "--prompt", str(PROMPT)]
    (tmp_path / "nowhere.jsonl").write_text("")
    args += ["--output", str(tmp_path / "o.jsonl"), "--failed", str(tmp_path / "f.jsonl")]
    args += ["--cache", str(tmp_path / "c"), "--metrics", str(tmp_path / "m.json")]
    assert_rejected(load_stage("repair").main, args, setting, "repair.", allowed)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m.json").exists()


def test_the_gate_is_cleans_own_settings_checked_as_clean_checks_them(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("clean:\n  langs: {min_confidence: 5e-1, margin: 3}\nrepair: {}\n")
    gate = rp.lang_gate(params)
    assert gate.min_confidence == 0.5 and isinstance(gate.min_confidence, float) and gate.margin == 3.0
    params.write_text("clean:\n  langs: {min_confidence: 2}\nrepair: {}\n")
    with pytest.raises(ParamsError, match="clean.langs.min_confidence: 2.0 is outside"):
        rp.lang_gate(params)
    with pytest.raises(ParamsError, match="repair: unknown key 'max_tokens'"):  # the old name of max_new_tokens
        resolve(rp.RepairConfig, None, "repair", ["max_tokens=48"])

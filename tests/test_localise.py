"""localise: reading and applying a teacher's changes (pure), and the stage against selfalign's own server over HTTP
with scripted teachers: one that localises a place, one with nothing to localise, one that answers garbage."""

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

from selfalign import localise as lc
from selfalign import records
from selfalign.params import ParamsError, resolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
PROMPT = ROOT / "prompts" / "localise.txt"


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


def test_parse_changes_reads_json_lines_and_none():
    c = lc.Change("John", "Ahmad", "name")
    assert lc.parse_changes('{"changes": [{"from": "John", "to": "Ahmad", "kind": "Name"}]}') == [c]
    assert lc.parse_changes('Here:\n[{"from": " John ", "to": "Ahmad", "kind": "name"}]') == [c]
    assert lc.parse_changes("name: John -> Ahmad\n- place: New York => Kuala Lumpur") == [
        c,
        lc.Change("New York", "Kuala Lumpur", "place"),
    ]
    assert lc.parse_changes('{"changes": []}') == [] and lc.parse_changes("NONE.") == []
    for garbage, why in [
        ("", "empty"),
        ("I think this looks fine overall", "expected"),
        ('{"changes": [{"from": "John", "to": ""}]}', "non-empty"),
        ('{"changes": ["John"]}', "must be an object"),
        ("name: John", "expected"),
    ]:
        with pytest.raises(lc.UnparsableChanges, match=why):
            lc.parse_changes(garbage)


def test_apply_replaces_everywhere_longest_first_and_refuses_text_not_there():
    rec = chat(
        "Where is New York City? Ask John.", "John says New York City is in the USA.", "ms", system="John's assistant"
    )
    out, done = lc.apply(
        rec,
        [
            lc.Change("New York", "Johor", "place"),
            lc.Change("New York City", "Kuala Lumpur", "place"),
            lc.Change("John", "Ahmad", "name"),
            lc.Change("USA", "USA", "place"),
        ],
    )
    assert out["system"] == "Ahmad's assistant"
    assert out["messages"][0]["content"] == "Where is Kuala Lumpur? Ask Ahmad."
    assert out["messages"][1]["content"] == "Ahmad says Kuala Lumpur is in the USA."
    assert [c.old for c in done] == ["New York", "New York City", "John"]  # the no-op is not a change
    assert rec["messages"][0]["content"].startswith("Where is New York")  # the input is not mutated
    with pytest.raises(lc.ChangeNotFound, match="'Boston' is not in the record"):
        lc.apply(rec, [lc.Change("Boston", "Ipoh", "place")])
    assert "{text}" not in lc.build_prompt(PROMPT.read_text(), rec, "Malaysia", "Malay")
    with pytest.raises(ValueError, match="{locale}"):
        lc.build_prompt("{text}", rec, "Malaysia", "Malay")


# ------------------------------------------------------------------------------------ the stage over HTTP


def run_stage(tmp_path: Path, url: str, inputs: list[Path], out: str, **extra) -> tuple[dict, list[dict], list[dict]]:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "localise": {
                    "locales": {"ms": "Malaysia"},
                    "max_records": 3,
                    "engine": teacher_engine(url),
                    **extra,
                }
            }
        )
    )
    args = [
        "--params",
        str(params),
        "--prompt",
        str(PROMPT),
        "--output",
        str(tmp_path / out / "seed.jsonl"),
        "--rejected",
        str(tmp_path / out / "rejected.jsonl"),
        "--cache",
        str(tmp_path / "cache" / out),
        "--metrics",
        str(tmp_path / f"{out}.json"),
    ]
    for p in inputs:
        args += ["--input", str(p)]
    res = CliRunner().invoke(load_stage("localise").main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = json.loads((tmp_path / f"{out}.json").read_text())
    return m, lines(tmp_path / out / "seed.jsonl"), lines(tmp_path / out / "rejected.jsonl")


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    seed = [
        chat("Di manakah New York?", "New York terletak di Amerika Syarikat.", "ms"),
        chat("Where is New York?", "In the USA.", "en"),
        chat("Apakah warna langit?", "Biru.", "ms"),
    ]
    repaired = [
        chat("Bagaimana ke New York?", "Naik kapal terbang ke New York.", "ms"),
        chat("Sebutkan satu buah.", "Durian.", "ms"),
    ]
    paths = [tmp_path / "seed.jsonl", tmp_path / "repaired.jsonl"]
    paths[0].write_text("".join(json.dumps(r) + "\n" for r in seed))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in repaired) + '{"kind": "chat"}\n')
    return paths


def test_changes_are_applied_and_kept_in_meta_and_text_not_there_is_rejected(tmp_path, inputs):
    with teacher(tmp_path, "place: New York -> Kuala Lumpur") as url:
        m, out, rejected = run_stage(tmp_path, url, inputs, "place")
    # 6 lines: 1 invalid, 1 English (no call), 4 Malay of which 3 asked (max_records) and 1 over the cap
    assert (m["records_in"], m["written"], m["rejected"], m["asked"]) == (6, 4, 2, 3)
    assert (m["localised"], m["changes_by_kind"], m["passed_without_call"]) == (
        2,
        {"place": 2},
        {"other_lang": 1, "over_max_records": 1},
    )
    assert m["rejected_by_reason"] == {"change_not_found": 1, "invalid_record": 1}
    first = out[0]
    assert first["messages"][1]["content"] == "Kuala Lumpur terletak di Amerika Syarikat."
    assert first["meta"]["localise"] == {
        "locale": "Malaysia",
        "teacher": "teacher",
        "changes": [{"from": "New York", "to": "Kuala Lumpur", "kind": "place"}],
    }
    assert [r["lang"] for r in out] == ["ms", "en", "ms", "ms"] and out[1]["messages"][0][
        "content"
    ] == "Where is New York?"
    assert out[3]["messages"][1]["content"] == "Durian." and "localise" not in out[3].get("meta", {})  # over the cap
    assert out[2]["messages"][1]["content"] == "Naik kapal terbang ke Kuala Lumpur."
    gone = next(r for r in rejected if r["reason"] == "change_not_found")
    assert gone["record"]["messages"][0]["content"] == "Apakah warna langit?" and gone["line"] == 3
    assert "'New York' is not in the record" in gone["detail"]


def test_nothing_to_localise_passes_unchanged_and_is_counted(tmp_path, inputs):
    with teacher(tmp_path, '{"changes": []}') as url:
        m, out, rejected = run_stage(tmp_path, url, inputs, "none", max_records=0)
    assert (m["records_in"], m["written"], m["rejected"], m["nothing_to_localise"], m["localised"]) == (6, 5, 1, 4, 0)
    originals = lines(inputs[0]) + lines(inputs[1])[:2]
    assert [r["messages"] for r in out] == [r["messages"] for r in originals]
    assert all(r["meta"]["localise"]["changes"] == [] for r in out if r["lang"] == "ms")


def test_a_teacher_answering_garbage_rejects_what_it_was_asked(tmp_path, inputs):
    with teacher(tmp_path, "I think this looks fine overall") as url:
        m, out, rejected = run_stage(tmp_path, url, inputs, "garbage", max_records=0)
    assert m["rejected_by_reason"] == {"invalid_record": 1, "unparsable_changes": 4}
    assert [r["lang"] for r in out] == ["en"] and m["records_in"] == len(out) + len(rejected)


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("locales=ms", "a mapping of name: a string"),
        ("locales.xx1=Nowhere", "not a language code"),
        ("max_records=-3", "0 <= max_records"),
        ("max_new_tokens=many", "an integer"),
        ("top_p=0", "0 < top_p <= 1"),
        ("engine.kind=gpt5", "local | openai | vllm"),
    ],
)
def test_bad_params_are_one_line_errors_before_any_work(tmp_path, inputs, setting, allowed):
    args = ["--input", str(inputs[0]), "--prompt", str(PROMPT), "--output", str(tmp_path / "o.jsonl")]
    args += ["--rejected", str(tmp_path / "r.jsonl"), "--cache", str(tmp_path / "c"), "--metrics", str(tmp_path / "m")]
    assert_rejected(load_stage("localise").main, args, setting, "localise.", allowed)
    assert not (tmp_path / "c").exists() and not (tmp_path / "m").exists()


def test_params_yaml_replaces_the_locales_and_an_empty_mapping_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("localise:\n  locales: {id: Indonesia}\n  temperature: 7e-1\n")
    cfg = resolve(lc.LocaliseConfig, params, "localise")
    assert cfg.locales == {"id": "Indonesia"} and cfg.temperature == 0.7  # YAML 1.1 reads 7e-1 as a string
    params.write_text("localise:\n  locales: {}\n")
    with pytest.raises(ParamsError, match="localise.locales: {} names no language"):
        resolve(lc.LocaliseConfig, params, "localise")

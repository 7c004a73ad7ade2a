"""The clean stage: every rule on real records it must catch and real records it must leave alone,
arithmetic checking, the language gate (ms vs id on held-out sentences), dedup, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import clean, dedup, io, langid, params, records
from selfalign.clean import CleanConfig

FIX = Path(__file__).parent / "fixtures" / "clean"
ROOT = Path(__file__).resolve().parent.parent
stage = load_stage("clean")
RULES_CFG = CleanConfig().rule_settings()
GATE = CleanConfig().langs
ALPACA = json.loads((FIX / "alpaca_cases.json").read_text(encoding="utf-8"))
MULTI = [json.loads(line) for line in (FIX / "multilingual_cases.jsonl").read_text(encoding="utf-8").splitlines()]
SENTENCES = [json.loads(line) for line in (FIX / "lang_sentences.jsonl").read_text(encoding="utf-8").splitlines()]
ORCA = [json.loads(line) for line in (FIX / "orca_cases.jsonl").read_text(encoding="utf-8").splitlines()]


def alpaca_record(case: dict, with_meta: bool = True, lang: str = "en") -> dict:
    """As ingest renders an Alpaca record: instruction + blank line + input as the user turn."""
    user = case["instruction"] + ("\n\n" + case["input"] if case["input"] else "")
    meta = {"instruction": case["instruction"], "input": case["input"]} if with_meta else {}
    return records.chat(
        [{"role": "user", "content": user}, {"role": "assistant", "content": case["output"]}],
        lang=lang,
        source="alpaca",
        meta=meta,
    )


def chat(user: str, answer: str, lang: str = "en", **meta) -> dict:
    return records.chat(
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        lang=lang,
        source="test",
        meta=meta,
    )


# ---------------------------------------------------------------- rules on real Alpaca records


@pytest.mark.parametrize("case", ALPACA, ids=[f"{c['expect']}-{c['index']}" for c in ALPACA])
def test_alpaca_record_gets_its_expected_verdict(case):
    for with_meta in (True, False):  # rules must not depend on meta being there
        out, _, reason, detail = clean.apply_rules(alpaca_record(case, with_meta), RULES_CFG)
        assert (reason or "keep") == case["expect"], (case["index"], detail)
        assert (out is None) == (case["expect"] != "keep")
        if reason:
            assert detail


def test_every_drop_rule_is_exercised_by_real_data():
    expected = {c["expect"] for c in ALPACA} | {c["expect"] for c in MULTI}
    drop_rules = set(clean.RULES) - {"mojibake", "control_chars", "no_input", "nonsense", "length"}
    assert drop_rules <= expected


@pytest.mark.parametrize("case", MULTI, ids=[f"{c['expect']}-{i}" for i, c in enumerate(MULTI)])
def test_malay_and_french_records(case):
    record = chat(case["prompt"], case["answer"], lang="ms")
    out, fixed, reason, _ = clean.apply_rules(record, RULES_CFG)
    if case["expect"] in clean.RULES and clean.RULES[case["expect"]].fn(record, RULES_CFG[case["expect"]]).fixed:
        assert out is not None and case["expect"] in fixed
    else:
        assert reason == case["expect"]


def test_no_input_spellings_normalised_in_message_and_meta():
    base = next(c for c in ALPACA if c["index"] == 1248)  # real "No input." record
    assert base["input"] == "No input."
    for spelling in [
        "<noinput>",
        "No input",
        "noinput",
        '"<noinput>"',
        "<no input>",
        "Noinput",
        "N/A",
        "No input required",
        "Tiada input yang diperlukan.",
        "Pas d'entrée",
    ]:
        record = alpaca_record({**base, "input": spelling})
        out, fixed, reason, _ = clean.apply_rules(record, RULES_CFG)
        assert reason == "" and fixed == ["no_input"], spelling
        assert out["messages"][0]["content"] == base["instruction"]
        assert out["meta"]["input"] == ""
        assert record["messages"][0]["content"].endswith(spelling)  # the input record is not mutated
    no_meta = alpaca_record({**base, "input": "<noinput>"}, with_meta=False)
    assert clean.apply_rules(no_meta, RULES_CFG)[0]["messages"][0]["content"] == base["instruction"]


def test_no_input_leaves_real_inputs_and_drops_placeholder_only_prompts():
    kept = chat("Name the capital.\n\nNone of the above is France.", "Paris.")
    assert clean.RULES["no_input"].fn(kept, RULES_CFG["no_input"]).record is kept
    assert clean.RULES["no_input"].fn(chat("<noinput>", "Hello there."), RULES_CFG["no_input"]).record is None


def test_control_characters_and_stray_escapes():
    case = next(c for c in ALPACA if c["index"] == 1009)
    dirty = {**case, "output": "2 +\x00 3 = 5.\x1b[31m\u200b\\nThat is all.\ufeff"}
    out, fixed, reason, _ = clean.apply_rules(alpaca_record(dirty), RULES_CFG)
    assert reason == "" and "control_chars" in fixed
    assert out["messages"][1]["content"] == "2 + 3 = 5.\nThat is all."
    code = 'def f():\n    print("a\\nb")\n    return 1'
    latex = next(c for c in ALPACA if c["index"] == 630)["output"]  # \(\sqrt{10\times 15}=12.25\)
    for text in (code, latex, "Tabs\tand\nnewlines stay."):
        assert clean.fix_control(text) == text


def test_mojibake_repaired_and_clean_text_untouched():
    real = next(c for c in MULTI if c["expect"] == "no_input")["answer"]
    broken = "Café au lait – don’t " + real
    garbled = broken.encode("utf-8").decode("cp1252", errors="replace")
    assert garbled != broken and clean.fix_mojibake(garbled) == broken
    out, fixed, _, _ = clean.apply_rules(chat("Describe a breakfast.", garbled, lang="ms"), RULES_CFG)
    assert "mojibake" in fixed and out["messages"][1]["content"] == broken
    for sample in SENTENCES[:200]:
        assert clean.fix_mojibake(sample["text"]) == sample["text"]


@pytest.mark.parametrize(
    "prompt,answer,wrong",
    [
        ("", "1 + 1 + 1 = 3", False),
        ("", "2 + 2 = 5", True),
        ("", "The total cost is 6 x 4.95 = 29.70.", False),
        ("", "100/7 = 14.29", False),  # rounded
        ("", "100 / 7 = 14.285714285", False),  # truncated
        ("", "7 - 10 = -3", False),
        ("", "7 - 10 = 3", True),
        ("", "1/2 + 1/4 = 3/4", False),
        ("", "1/2 + 1/4 = 2/3", True),
        ("", "Compound interest = 1000(1 + 0.05)^10 = $1,628.89.", False),
        ("", "Total cost = 10 x $4 = $40", False),
        ("", "3x + 4y = 20", False),  # algebra, not arithmetic
        ("", "1+1=1+s(0)", False),  # Peano: the right side goes on
        ("Combien font 11+1 en système binaire ?", "En système binaire, 11 + 1 = 100.", False),
        ("Compute 45 + 86", "131", False),
        ("Compute 45 + 86", "132", True),
        ("Evaluate the following expression: (6+2)*(2-2).", "8", True),
        ("The date is 4/16.", "4", False),  # no computation asked
        ("", "50% of 10 = 5", False),
        # chained equalities: every side is checked against the one before it, and a right chain stays
        ("", "15+27 = 15+20+7 = 42", False),
        ("", "15+27 = 15+20+7 = 43", True),  # wrong result
        ("", "15+27 = 15+20+6 = 42", True),  # wrong step, right result
        (
            "",
            "21336 * 5012 = 21336 * (5000 + 10 + 2) = 21336 * 5000 + 21336 * 10 + 21336 * 2 = 106680000 + 213360 + "
            "42672 = 106893360 + 42672 = 106936032",
            False,
        ),
        (
            "",
            "21336 * 5012 = 21336 * (5000 + 10 + 2) = 21336 * 5000 + 21336 * 10 + 21336 * 2 = 106680000 + 213360 + "
            "42672 = 106893360 + 42672 = 106963032",
            True,
        ),
        ("", "21336 * 5012 = 2133", True),  # the number on the right is read whole
        ("", "2x + 3 = 4 + 5 = 9", False),  # algebra on the left: not a chain to check
        ("", "(1 + 0.09/4)^(4*0.75) = (1 + 0.0225)^3 = 1.0690", False),
        ("", "1/3 * 3 = 0.333 * 3 = 0.999", False),  # rounded steps are not wrong
        ("", "Total: 12 x 3 = 36 + 4 = 40 apples", False),  # a running total misuses "=", its arithmetic is right
        ("", "Total: 12 x 3 = 36 + 4 = 41 apples", True),
        ("", "12 x 3 = 35 + 4 = 39", True),  # not a running total: 12 x 3 is not 35
        ("", "   7(36) + 36 + 5\n   = 252 + 36 + 5\n   = 293", False),  # "36 + 5" is the tail of a longer sum
    ],
)
def test_wrong_arithmetic(prompt, answer, wrong):
    assert (clean.wrong_arithmetic(prompt, answer) is not None) == wrong


def test_arithmetic_patterns_read_white_space_once():
    """Runs of white space (tables, ASCII art) once made the patterns backtrack: 66 s for a 2 kB answer."""
    gap = " " * 8000
    assert clean.wrong_arithmetic("Compute 1" + gap + "+" + gap + "1 x" + gap, "2") is None
    assert clean.wrong_arithmetic("", "1" + gap + "+" + gap + "= 2 x") is None
    assert clean.wrong_arithmetic("", "3 + 4 =" + gap + "8") == "3 + 4 = 8 (is 7)"
    assert clean.wrong_arithmetic("", "1 + " * 5000 + "1 = 5001") is None  # too deep to parse: not checked
    indented = chat("Do it.\n\n" + gap + "N/A", gap + "hello there")  # 400 spaces took the placeholder rule 6 s
    assert clean.apply_rules(indented, RULES_CFG)[2] == ""
    assert clean.apply_rules(chat("Name a fruit.", gap + "N/A"), RULES_CFG)[2] == "placeholder"
    blank_lines = "Write a poem." + "\n" * 3000 + "Sure."  # 6000 took non_text_output 16 s
    assert clean.apply_rules(chat(blank_lines, blank_lines), RULES_CFG)[2] == ""
    assert clean.apply_rules(chat("A poem.\n\n\n  Create an image of it.", "Ok."), RULES_CFG)[2] == "non_text_output"
    assert clean.apply_rules(chat("A poem.", "Ok.\n\n\n  6. Instruction: more"), RULES_CFG)[2] == "merged_instruction"


@pytest.mark.parametrize("case", ORCA, ids=[f"{c['expect']}-{c['index']}" for c in ORCA])
def test_default_data_records_get_their_expected_verdict(case):
    """The default data's own cases (issue 9 item 8): what the rules dropped wrongly stays, what is wrong goes."""
    pair = records.make(
        "preference",
        prompt=case["prompt"],
        chosen=case["chosen"],
        rejected=case["rejected"],
        lang="en",
        source="orca_dpo_pairs",
        **({"system": case["system"]} if "system" in case else {}),
    )
    out, _, reason, detail = clean.apply_rules(pair, RULES_CFG)
    assert (reason or "keep") == case["expect"], (case["why"], detail)


def test_multiple_choice_products_are_not_a_phrase_loop():
    options = "252 can be expressed as a product of primes as :\nOptions:\n(A) 2 x 2 x 3 x 3 x 7\n(C) 3 x 3 x 3 x 3 x 7"
    assert clean.repetition_loop(options, 4) is None
    assert clean.repetition_loop("1 2 1 2 1 2 1 2 1 2", 4) is None  # counting, not a loop of words
    assert clean.repetition_loop("I think that " + "the answer is x " * 5, 4) == "the answer is x"
    loop = "Options: (A) yes (B) no " + "and so on " * 4  # a real loop of words still goes, next to options
    assert clean.apply_rules(chat("Pick one.\n" + options, loop), RULES_CFG)[2] == "nonsense"


def test_missing_input_before_the_reference():
    data_first = (
        "Here is some data about a restaurant: name = Giraffe, eatType = pub. Write a sentence about the following data"
    )
    quoted_first = (
        'Consider "The cat chased the mouse across the yard." Rewrite the following sentence in passive voice.'
    )
    for prompt in (data_first, quoted_first):
        assert clean.apply_rules(chat(prompt, "Giraffe is a pub."), RULES_CFG)[2] == "", prompt
    for prompt in (
        "Write a sentence that includes the following data about a restaurant",
        "Task: rewrite the following sentence in passive voice.",
        "You are a helpful assistant. Please summarize the following article.",
        "Note: be brief. Summarize the above text.",
    ):
        assert clean.apply_rules(chat(prompt, "Giraffe is a pub."), RULES_CFG)[2] == "missing_input", prompt


def test_refusal_only_in_answers_and_rejected_side_may_be_bad():
    refusal = "As an AI language model, I cannot browse the internet."
    assert clean.apply_rules(chat("What is the weather?", refusal), RULES_CFG)[2] == "refusal"
    asked = chat("Write the phrase 'as an AI language model' in French.", "en tant que ... non: 'comme un modèle'")
    assert clean.RULES["refusal"].fn(asked, RULES_CFG["refusal"]).record is not None
    pair = records.make(
        "preference",
        prompt="What is the weather today in Paris?",
        chosen="I cannot know today's weather, but Paris in spring is mild.",
        rejected=refusal,
        lang="en",
        source="t",
    )
    assert clean.apply_rules(pair, RULES_CFG)[2] == ""
    swapped = {**pair, "chosen": refusal, "rejected": pair["chosen"]}
    assert clean.apply_rules(swapped, RULES_CFG)[2] == "refusal"


def test_repetition_loop_and_length_bounds():
    loop = "This response answers the question: " + "What is the answer to the question: " * 5
    assert clean.apply_rules(chat("Explain photosynthesis.", loop), RULES_CFG)[2] == "nonsense"
    chorus = "Oh, I believe in yesterday. Oh, I believe in yesterday. Yesterday, love was such an easy game."
    assert clean.apply_rules(chat("Quote a chorus.", chorus), RULES_CFG)[2] == ""
    assert clean.apply_rules(chat("?!", "Yes."), RULES_CFG)[2] == "nonsense"
    web = records.make("web", text="Too short.", lang="en", source="t")
    assert clean.apply_rules(web, RULES_CFG)[3].startswith("10 chars < min_chars 100")


def test_web_records_get_only_their_rules():
    text = "As an AI language model, I think 2 + 2 = 5. " * 4  # refusal/arithmetic rules do not apply to web text
    web = records.make("web", text=text, lang="en", source="t")
    assert clean.apply_rules(web, RULES_CFG) == (web, [], "", "")


def test_disabled_rule_is_skipped():
    case = next(c for c in ALPACA if c["expect"] == "wrong_arithmetic")
    cfg = {**RULES_CFG, "wrong_arithmetic": clean.RuleSwitch(enabled=False)}
    assert clean.apply_rules(alpaca_record(case), cfg)[2] == ""


# ---------------------------------------------------------------- language gate


def gate(text: str, lang: str) -> str:
    return langid.identify(text, lang, **GATE.settings())[0]


def test_ms_vs_id_on_held_out_real_sentences():
    """Held-out: neither the marker words nor the n-gram model saw these sentences. Both declared Malay, as the
    pipeline's translations are: Malay is kept, Indonesian caught (marker words, then lingua where they are silent).
    The marker words alone decided 21 of 34 Malay and 99 of 253 Indonesian, the rest undetermined and kept."""
    verdicts = {"ms": [], "id": []}
    for s in SENTENCES:
        if s["label"] in verdicts:
            verdicts[s["label"]].append(gate(s["text"], "ms"))
    assert verdicts["ms"].count("mismatch") <= 1  # measured: 33 of 34 kept
    assert verdicts["id"].count("mismatch") / len(verdicts["id"]) >= 0.85  # measured: 221 of 253 caught (0.874)
    assert sum(v.count("undetermined") for v in verdicts.values()) <= 3
    bahwa = next(s["text"] for s in SENTENCES if s["text"].startswith("Dengan melihat kepada 5.000 pasien"))
    assert gate(bahwa, "ms") == "mismatch"
    assert "bahwa" in langid.identify(bahwa, "ms", min_letters=40, min_confidence=0.5, margin=2.0)[2]


def test_en_fr_gate_and_too_little_text():
    for s in SENTENCES:
        if s["label"] in ("en", "fr"):
            assert gate(s["text"], s["label"]) in ("ok", "undetermined")
            other = "fr" if s["label"] == "en" else "en"
            assert gate(s["text"], other) in ("mismatch", "undetermined")
    assert gate("Oui.", "en") == "undetermined"  # one capitalised word: no signal (a name would look the same)


def test_short_record_in_the_wrong_language_is_dropped_by_the_ngram_detector():
    """Below min_letters the gate used to wave a record through as undetermined; the n-gram model judges it now,
    and the reject says which detector decided."""
    lang_cfg = GATE
    wrong = chat("What is the capital of France?", "Paris.", lang="fr")
    out, _, reason, detail, verdict = clean.clean_record(wrong, RULES_CFG, lang_cfg)
    assert out is None and reason == "lang" and verdict == "mismatch/ngram" and "[ngram]" in detail
    right = chat("Quelle est la capitale de la France ?", "Paris.", lang="fr")
    assert clean.clean_record(right, RULES_CFG, lang_cfg)[4] == "ok/ngram"
    names = chat("Barack Obama", "Michelle Obama", lang="fr")
    assert clean.clean_record(names, RULES_CFG, lang_cfg)[4] == "undetermined/none"


def test_translation_task_judged_by_its_instruction():
    record = chat(
        "Translate this sentence from French to English.\n\nJ'aime faire de la randonnée en montagne "
        "avec mes amis chaque été.",
        "I love hiking in the mountains with my friends every summer.",
    )
    assert langid.gate_text(record) == "Translate this sentence from French to English."


# ---------------------------------------------------------------- dedup


def test_exact_and_near_duplicates_keep_the_first():
    texts = [s["text"] for s in SENTENCES if s["label"] == "en" and len(s["text"]) > 80][:4]
    last = texts[2].split()[-1]
    texts += [texts[0], "  " + texts[1].upper() + " !!", texts[2].replace(last, "changed " + last)]
    keys = [dedup.key_text(records.make("web", text=t, lang="en", source="t")) for t in texts]
    assert list(dedup.exact_duplicates(keys)) == [(4, 0), (5, 1)]
    near = list(dedup.near_duplicates(keys, threshold=0.7, num_perm=128, shingle=3, skip={4, 5}))
    assert [(i, j) for i, j, _ in near] == [(6, 2)]


# ---------------------------------------------------------------- the stage


def write_inputs(d: Path) -> dict[str, list[dict]]:
    seed = [alpaca_record(c) for c in ALPACA]
    seed.append(next(r for r, c in zip(seed, ALPACA, strict=True) if c["expect"] == "keep"))  # an exact duplicate
    web = [
        records.make("web", text=s["text"] * 2, lang=s["label"], source="leipzig")
        for s in SENTENCES
        if s["label"] in ("en", "fr")
    ][:40]
    pref = [
        records.make(
            "preference",
            prompt="Explain photosynthesis briefly.",
            chosen="Plants turn light into sugar.",
            rejected="I don't know.",
            lang="en",
            source="t",
        )
    ]
    prompts = [records.make("prompt", prompt="Write a short poem about the sea.", lang="en", source="t")]
    d.mkdir(parents=True, exist_ok=True)
    for name, recs in (("seed", seed), ("web", web), ("preference", pref), ("prompts", prompts)):
        io.write_jsonl(d / f"{name}.jsonl", recs)
    with open(d / "prompts.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n")
        f.write(json.dumps({"kind": "prompt", "prompt": 3, "id": "x", "lang": "en", "source": "t"}) + "\n")
    return {"seed": seed, "web": web, "preference": pref, "prompts": prompts}


def test_stage_cli_conservation_reasons_and_determinism(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    runs = []
    for run in ("a", "b"):
        out = tmp_path / run
        res = CliRunner().invoke(
            stage.main,
            [
                "--params",
                str(ROOT / "params.yaml"),
                "--input-dir",
                str(tmp_path / "in"),
                "--output-dir",
                str(out),
                "--metrics",
                str(out / "m.json"),
            ],
        )
        assert res.exit_code == 0, res.output
        runs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))})
    assert runs[0] == runs[1]  # deterministic, byte for byte
    out = tmp_path / "a"
    m = json.loads((out / "m.json").read_text())
    n_in = sum(len(v) for v in inputs.values()) + 2
    kept = sum(len(io.load_jsonl(out / f"{n}.jsonl")) for n in ("seed", "web", "preference", "prompts"))
    rejected = io.load_jsonl(out / "rejected.jsonl")
    assert m["records_in"] == n_in == kept + len(rejected) == m["kept"] + m["rejected"]
    assert sum(c.get("dropped", 0) for c in m["rules"].values()) == m["rejected"]
    by_reason = {}
    for r in rejected:
        by_reason.setdefault(r["reason"], []).append(r)
        assert r["stage"] == "clean" and r["file"] and r["line"] >= 1
    expected_drops = {c["expect"] for c in ALPACA} - {"keep"}
    assert expected_drops | {"duplicate", "invalid_json", "invalid_record"} <= set(by_reason)
    (bad_json,), (bad_field,) = by_reason["invalid_json"], by_reason["invalid_record"]
    assert bad_json["file"].endswith("prompts.jsonl") and bad_json["line"] == 2 and "invalid JSON" in bad_json["detail"]
    assert bad_field["line"] == 3 and "'prompt'" in bad_field["detail"]
    assert by_reason["duplicate"][0]["line"] == len(ALPACA) + 1
    assert m["rules"]["no_input"]["fixed"] >= 1 and m["rules"]["lang"]["ok"] > 0


def test_stage_counts_gate_verdicts_per_declared_language(tmp_path):
    """A translation declared fr or ms is counted under that language: what the gate let through, what it dropped."""
    long = {
        lang: [s["text"] for s in SENTENCES if s["label"] == lang and len(s["text"]) > 60]
        for lang in ("en", "fr", "ms")
    }
    french_refusal = next(c for c in MULTI if c["expect"] == "refusal" and "yaourt" in c["prompt"])
    seed = [
        chat(long["fr"][0], long["fr"][1], lang="fr"),
        chat(long["fr"][2], long["fr"][3], lang="fr"),
        chat(long["en"][0], long["en"][1], lang="fr"),  # left in English: the gate drops it
        chat(french_refusal["prompt"], french_refusal["answer"], lang="fr"),  # dropped by a rule first
        chat(long["ms"][0], long["ms"][2], lang="ms"),
        chat("Apa khabar?", "Baik, terima kasih.", lang="ms"),  # short, no ms/id marker word: lingua keeps it
        chat("Where is the train station?", "Over there.", lang="fr"),  # short and English: the n-gram model drops it
        chat(long["en"][2], long["en"][3], lang="en"),
    ]
    (tmp_path / "in").mkdir()
    io.write_jsonl(tmp_path / "in" / "seed.jsonl", seed)
    res = CliRunner().invoke(
        stage.main,
        [
            "--params",
            str(ROOT / "params.yaml"),
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["gate_by_lang"] == {
        "en": {"records": 1, "ok": 1, "undetermined": 0, "mismatch": 0},
        "fr": {"records": 5, "ok": 2, "undetermined": 0, "mismatch": 2},
        "ms": {"records": 2, "ok": 2, "undetermined": 0, "mismatch": 0},
    }
    assert m["gate_by_detector"] == {
        "fasttext": {"ok": 3, "undetermined": 0, "mismatch": 1},
        "lingua": {"ok": 1, "undetermined": 0, "mismatch": 0},
        "markers": {"ok": 1, "undetermined": 0, "mismatch": 0},
        "ngram": {"ok": 0, "undetermined": 0, "mismatch": 1},
    }
    for verdict in ("ok", "undetermined", "mismatch"):
        assert sum(c[verdict] for c in m["gate_by_lang"].values()) == m["rules"]["lang"].get(verdict, 0)
        assert sum(c[verdict] for c in m["gate_by_detector"].values()) == m["rules"]["lang"].get(verdict, 0)
    kept = io.load_jsonl(tmp_path / "out" / "seed.jsonl")
    assert [r["lang"] for r in kept] == ["fr", "fr", "ms", "ms", "en"]
    assert m["records_in"] == len(seed) == m["kept"] + m["rejected"]


def test_stage_by_hand_pairs_and_param_errors(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    args = [
        "--input",
        str(tmp_path / "in" / "web.jsonl"),
        "--output",
        str(tmp_path / "web.clean.jsonl"),
        "--input",
        str(tmp_path / "in" / "preference.jsonl"),
        "--output",
        str(tmp_path / "pref.clean.jsonl"),
        "--rejected",
        str(tmp_path / "rej.jsonl"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--set",
        "near_dup.enabled=false",
    ]
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["records_in"] == len(inputs["web"]) + len(inputs["preference"])
    assert len(io.load_jsonl(tmp_path / "pref.clean.jsonl")) == 1
    res = CliRunner().invoke(stage.main, args + ["--set", "near_dup.treshold=0.5"])
    assert res.exit_code != 0 and "treshold" in res.output
    res = CliRunner().invoke(stage.main, args[:6] + args[8:])  # the second --input has no --output
    assert res.exit_code != 0 and "paired" in res.output


def test_workers_give_the_same_results():
    recs = [alpaca_record(c) for c in ALPACA] + [chat(c["prompt"], c["answer"], lang="ms") for c in MULTI]
    lang_cfg = GATE
    one = clean.clean_records(recs, RULES_CFG, lang_cfg, workers=1)
    two = clean.clean_records(recs, RULES_CFG, lang_cfg, workers=2, min_parallel=0)
    assert one == two and len(one) == len(recs)


def test_params_section_matches_code_defaults():
    section = params.section(ROOT / "params.yaml", "clean")
    assert CleanConfig.from_dict(section, "clean") == CleanConfig() == params.resolve(CleanConfig, None, "clean")
    assert [f.name for f in clean.dataclasses.fields(clean.Rules)] == list(clean.RULES) == list(section["rules"])


CLI = ["--input", "in.jsonl", "--output", "out.jsonl", "--rejected", "rej.jsonl", "--metrics", "m.json"]


@pytest.mark.parametrize(
    "setting,words",
    [
        ("langs.min_confidence=2", ["0 <= min_confidence <= 1"]),
        ("rules.refusal.enabled=maybe", ["true or false"]),
        ("min_chars.chat=ten", ["an integer"]),
        ("workers=two", ["an integer"]),
        ("workers=0", ["1 <= workers"]),
        ("near_dup.threshold=1.5", ["0 < threshold <= 1"]),
        ("near_dup.num_perm=-5", ["1 <= num_perm"]),
        ("executor=spark", ["one of local | datatrove | slurm | ray"]),
        ("langs.ms_id_fallback=lingwa", ["one of lingua | ngram | none"]),
        ("min_success=1.5", ["min_success <= 1"]),
        ("min_chars.web=6000", ["max_chars.web 5000"]),
        ("executor=slurm", ["partition"]),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(tmp_path, monkeypatch, setting, words):
    monkeypatch.chdir(tmp_path)
    io.write_jsonl(tmp_path / "in.jsonl", [chat("What is the capital of France?", "Paris is.")])
    assert_rejected(stage.main, CLI, setting, *words)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "out.jsonl").exists()


def test_an_unknown_key_is_one_line_before_any_work(tmp_path, monkeypatch):
    """(assert_rejected wants the value in the line; an unknown key's error names the key and the known ones.)"""
    monkeypatch.chdir(tmp_path)
    io.write_jsonl(tmp_path / "in.jsonl", [chat("What is the capital of France?", "Paris is.")])
    res = CliRunner().invoke(stage.main, [*CLI, "--set", "rules.nope.enabled=true"])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "clean.rules: unknown key 'nope'" in errors[0], res.output
    assert "refusal" in errors[0] and not (tmp_path / "m.json").exists()


def test_a_yaml_string_number_is_read_as_a_number(tmp_path):
    """YAML 1.1 reads `8e-1` (no dot) as a string: it is still a number here."""
    (tmp_path / "p.yaml").write_text("clean:\n  near_dup:\n    threshold: 8e-1\n")
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["clean"]["near_dup"]["threshold"] == "8e-1"
    assert params.resolve(CleanConfig, tmp_path / "p.yaml", "clean").near_dup.threshold == 0.8


def test_stage_reads_past_bad_bytes_and_a_bom_and_names_a_json_array(tmp_path):
    """Before: bad bytes ended in a UnicodeDecodeError traceback, a BOM made the first record invalid_json, and a
    JSON array became one invalid_json reject per line."""
    good = [
        chat("What is the capital of France?", "The capital of France is Paris."),
        chat("Name a primary colour.", "Red is one of the three primary colours."),
    ]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "seed.jsonl").write_bytes(b"\xef\xbb\xbf" + lines[0] + b'\n{"kind": "ch\xffat"}\n' + lines[1])
    (tmp_path / "in" / "prompts.jsonl").write_text(
        json.dumps([{"prompt": f"Question {i}?"} for i in range(3)], indent=2)
    )
    args = [
        "--input-dir",
        str(tmp_path / "in"),
        "--output-dir",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--set",
        "langs.enabled=false",
    ]
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in io.load_jsonl(tmp_path / "out" / "seed.jsonl")] == [r["id"] for r in good]
    rejected = io.load_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [(r["reason"], Path(r["file"]).name, r["line"]) for r in rejected] == [
        ("invalid_utf8", "seed.jsonl", 2),
        ("json_array", "prompts.jsonl", 1),
    ]
    assert "\\xff" in rejected[0]["raw"] and "JSON array" in rejected[1]["detail"] and "ingest" in rejected[1]["detail"]
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["records_in"] == 4 == m["kept"] + m["rejected"]
    assert m["rules"]["invalid_utf8"] == {"dropped": 1} and m["rules"]["json_array"] == {"dropped": 1}


@pytest.mark.parametrize("where", ["in", "out"])
def test_a_directory_named_like_a_file_is_a_one_line_error(tmp_path, where):
    """Before: an IsADirectoryError traceback."""
    (tmp_path / where / "seed.jsonl").mkdir(parents=True)
    if where == "out":
        io.write_jsonl(tmp_path / "in" / "seed.jsonl", [])
    res = CliRunner().invoke(
        stage.main,
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "out"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert res.exit_code == 2 and "seed.jsonl is a directory" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.json").exists()


def test_a_stage_that_keeps_too_little_fails_after_writing_everything(tmp_path):
    """Before: clean exited 0 whatever it kept, so DVC recorded a stage that passed nothing on as a success."""
    recs = [chat("What is the capital of France?", "The capital of France is Paris.")] + [
        chat(f"Question {i}?", "As an AI language model, I cannot answer that.") for i in range(3)
    ]
    io.write_jsonl(tmp_path / "in" / "seed.jsonl", recs)
    args = [
        "--input-dir",
        str(tmp_path / "in"),
        "--output-dir",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "m.json"),
        "--set",
        "langs.enabled=false",
    ]
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 1 and "clean kept: 1 of 4 (25%) came through, below min_success 0.5" in res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["success"] == {"what": "clean kept", "passed": 1, "of": 4, "rate": 0.25, "min_success": 0.5}
    assert len(io.load_jsonl(tmp_path / "out" / "rejected.jsonl")) == 3 == m["rules"]["refusal"]["dropped"]
    assert CliRunner().invoke(stage.main, args + ["--set", "min_success=0.25"]).exit_code == 0

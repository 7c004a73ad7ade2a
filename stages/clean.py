"""Clean every record: named rules, a language gate, then exact and near-duplicate removal across all files.

    python stages/clean.py --params params.yaml --input-dir data/translate --output-dir data/clean \
        --metrics metrics/clean.json
    python stages/clean.py --input OUT.jsonl --output CLEAN.jsonl --rejected REJ.jsonl --metrics M.json

With --input-dir it reads every {seed,preference,prompts,web}.jsonl there (in that order, so on
a duplicate the seed wins) and writes the same names to --output-dir plus rejected.jsonl; by hand,
--input/--output are repeatable and paired. The rules are selfalign.clean's (each keeps, fixes or
drops with a named reason), the gate is selfalign.langid's, dedup is selfalign.dedup's; each
can be switched off in params. A rejected record carries its reason, detail, file and line;
metrics/clean.json has per-rule fixed/dropped counts, the gate's verdicts per declared language
(gate_by_lang: records, ok, undetermined, mismatch), which detector decided them (gate_by_detector:
fasttext, ngram, markers, lingua, none) and records_in == kept + rejected.
The stage takes seconds (bench/clean.py), so it simply reruns whole rather than resuming.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import click

from selfalign import clean, dedup, io, params, records

log = logging.getLogger("clean")
STAGE = "clean"
FILES = ("seed.jsonl", "preference.jsonl", "prompts.jsonl", "web.jsonl")  # dedup priority: first wins
RULE_DEFAULTS = {name: {"enabled": True} for name in clean.RULES}
RULE_DEFAULTS["unseen_reference"].update(max_trailing_words=8, max_chars_around_url=300)
RULE_DEFAULTS["missing_input"].update(max_trailing_words=4, min_words_before=3)
RULE_DEFAULTS["nonsense"].update(max_repeats=4)
DEFAULTS = {
    "rules": RULE_DEFAULTS,
    "min_chars": {"chat": 10, "preference": 10, "prompt": 5, "web": 100},
    "max_chars": {"chat": 20000, "preference": 20000, "prompt": 4000, "web": 5000},
    "langs": {"enabled": True, "min_letters": 40, "min_confidence": 0.5, "margin": 2.0, "ngram_margin": 8.0,
              "ms_id_fallback": "lingua", "ms_id_ngram_margin": 64.0, "max_chars": 300},
    "exact_dup": True,
    "near_dup": {"enabled": True, "threshold": 0.8, "num_perm": 128, "shingle": 3, "seed": 1},
    "workers": 2,
    "min_success": 0.5,
}


def run(pairs: list[tuple[Path, Path]], cfg: dict) -> tuple[dict[Path, list[dict]], list[dict], dict]:
    """Clean the files of `pairs` together: (kept records per output path, rejected, metrics)."""
    rules_cfg = {**cfg["rules"], "length": {**cfg["rules"]["length"], "min_chars": cfg["min_chars"],
                                            "max_chars": cfg["max_chars"]}}
    lang_cfg = {k: v for k, v in cfg["langs"].items() if k != "enabled"}
    counts: dict[str, Counter] = defaultdict(Counter)
    files: dict[str, Counter] = {}
    rejected: list[dict] = []
    todo: list[tuple[Path, dict, str, int]] = []  # (output path, record, input file, line)
    for src, dst in pairs:
        good, bad, n = records.read(src, STAGE)
        files[str(src)] = Counter(records_in=n, rejected=len(bad))
        for r in bad:
            counts[r["reason"]]["dropped"] += 1
        rejected += bad
        todo += [(dst, record, str(src), line) for record, line in good]
    results = clean.clean_records([t[1] for t in todo], rules_cfg, lang_cfg if cfg["langs"]["enabled"] else None,
                                  cfg["workers"])
    survivors: list[tuple[Path, dict, str, int]] = []
    # The gate's verdicts per declared language: how many French or Malay translations it let through (ok and
    # undetermined pass, mismatch is dropped); records minus the verdicts were dropped by a rule first.
    gate_by_lang: dict[str, Counter] = defaultdict(Counter)
    gate_by_detector: dict[str, Counter] = defaultdict(Counter)  # which detector decided (selfalign.langid.Verdict)
    for (dst, record, src, line), (out, fixed, reason, detail, verdict) in zip(todo, results, strict=True):
        for name in fixed:
            counts[name]["fixed"] += 1
        gate_by_lang[record["lang"]]["records"] += 1
        if verdict:
            verdict, detector = verdict.split("/")
            counts["lang"][verdict] += 1
            gate_by_lang[record["lang"]][verdict] += 1
            gate_by_detector[detector][verdict] += 1
        if out is None:
            counts[reason]["dropped"] += 1
            files[src]["rejected"] += 1
            rejected.append(records.rejected(record, reason, STAGE, detail=detail, file=src, line=line))
            continue
        if fixed:
            out = {**out, "meta": {**out.get("meta", {}), "clean_fixed": fixed}}
        survivors.append((dst, out, src, line))

    gone: dict[int, tuple[str, str]] = {}
    keys = [dedup.key_text(r) for _, r, _, _ in survivors]
    if cfg["exact_dup"]:
        for i, j in dedup.exact_duplicates(keys):
            gone[i] = ("duplicate", f"same text as {survivors[j][1]['id']} ({survivors[j][2]}:{survivors[j][3]})")
    nd = cfg["near_dup"]
    if nd["enabled"]:
        for i, j, sim in dedup.near_duplicates(keys, threshold=nd["threshold"], num_perm=nd["num_perm"],
                                               shingle=nd["shingle"], seed=nd["seed"], skip=set(gone)):
            gone[i] = ("near_duplicate", f"Jaccard ~{sim:.2f} with {survivors[j][1]['id']} "
                                         f"({survivors[j][2]}:{survivors[j][3]})")
    kept: dict[Path, list[dict]] = {dst: [] for _, dst in pairs}
    for i, (dst, record, src, line) in enumerate(survivors):
        if i in gone:
            reason, detail = gone[i]
            counts[reason]["dropped"] += 1
            files[src]["rejected"] += 1
            rejected.append(records.rejected(record, reason, STAGE, detail=detail, file=src, line=line))
        else:
            kept[dst].append(record)
            files[src]["kept"] += 1

    n_in = sum(f["records_in"] for f in files.values())
    n_kept = sum(len(v) for v in kept.values())
    if n_in != n_kept + len(rejected):  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"records_in {n_in} != kept {n_kept} + rejected {len(rejected)}")
    metrics = {
        "records_in": n_in, "kept": n_kept, "rejected": len(rejected),
        "rules": {name: dict(counts[name]) for name in [*clean.RULES, "invalid_json", "invalid_utf8", "json_array",
                                                        "invalid_record", "lang", "duplicate", "near_duplicate"]
                  if counts[name]},
        "gate_by_lang": {lang: {k: c[k] for k in ("records", "ok", "undetermined", "mismatch")}
                         for lang, c in sorted(gate_by_lang.items())} if cfg["langs"]["enabled"] else {},
        "gate_by_detector": {det: {k: c[k] for k in ("ok", "undetermined", "mismatch")}
                             for det, c in sorted(gate_by_detector.items())},
        "files": {name: {"records_in": c["records_in"], "kept": c["kept"], "rejected": c["rejected"]}
                  for name, c in files.items()},
    }
    return kept, rejected, metrics


@click.command()
@params.params_option
@params.set_option
@click.option("--input-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Read every {seed,preference,prompts,web}.jsonl here.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the same names here, plus rejected.jsonl.")
@click.option("--input", "inputs", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An input file (repeatable; paired in order with --output).")
@click.option("--output", "outputs", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rejected", "rejected_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Rejected records (default: rejected.jsonl in --output-dir).")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def main(params_file, overrides, input_dir, output_dir, inputs, outputs, rejected_path, metrics_path):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = params.resolve(DEFAULTS, params_file, STAGE, overrides)
    if bool(input_dir) == bool(inputs):
        raise click.UsageError("give either --input-dir/--output-dir or --input/--output pairs")
    if input_dir:
        if not output_dir:
            raise click.UsageError("--input-dir needs --output-dir")
        pairs = [(input_dir / f, output_dir / f) for f in FILES if (input_dir / f).exists()]
        for src, dst in pairs:
            if not src.is_file():
                raise click.UsageError(f"{src} is a directory, not a JSON Lines file")
            if dst.is_dir():
                raise click.UsageError(f"{dst} is a directory; the cleaned file cannot be written there")
        if not pairs:
            raise click.UsageError(f"{input_dir}: none of {', '.join(FILES)} exists")
        rejected_path = rejected_path or output_dir / "rejected.jsonl"
    else:
        if len(inputs) != len(outputs) or not rejected_path:
            raise click.UsageError("--input and --output must be paired (same count), and --rejected given")
        pairs = list(zip(inputs, outputs, strict=True))
    enabled = [n for n, r in cfg["rules"].items() if r["enabled"]]
    log.info("%d input files, %d workers; rules: %s; language gate %s; near-dup %s (threshold %s, %d perms, "
             "%d-word shingles)", len(pairs), cfg["workers"], ", ".join(enabled), "on" if cfg["langs"]["enabled"] else "off",
             "on" if cfg["near_dup"]["enabled"] else "off", cfg["near_dup"]["threshold"],
             cfg["near_dup"]["num_perm"], cfg["near_dup"]["shingle"])
    t0 = time.perf_counter()
    kept, rejected, metrics = run(pairs, cfg)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    for dst, recs in kept.items():
        io.write_jsonl(dst, recs)
    io.write_jsonl(rejected_path, rejected)
    failed = records.success_floor(metrics, metrics["kept"], metrics["records_in"], cfg["min_success"], "clean kept")
    io.write_json(metrics_path, metrics)
    log.info("%d records in, %d kept, %d rejected in %.1f s; by rule: %s", metrics["records_in"], metrics["kept"],
             metrics["rejected"], metrics["seconds"],
             ", ".join(f"{k} {v}" for k, v in metrics["rules"].items()))
    if failed:
        raise click.ClickException(failed)


if __name__ == "__main__":
    main()

"""The clean stage's and ingest's readers as they were before they streamed (stages/clean.py and selfalign/readers.py
at b6ab84d): whole files in memory, two passes. Kept verbatim as the reference the streaming code must match byte
for byte (tests/test_stream_clean.py, tests/test_stream_ingest.py); they call the same pure rules."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from selfalign import clean, dedup, io, records

STAGE = "clean"


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


def write(pairs, cfg, rejected_path) -> dict:
    """What the old main() wrote: every output whole, then the rejects."""
    kept, rejected, metrics = run(pairs, cfg)
    for dst, recs in kept.items():
        io.write_jsonl(dst, recs)
    io.write_jsonl(rejected_path, rejected)
    return metrics

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
It streams (selfalign.executor): memory holds a window of records plus compact dedup state (a hash per record,
MinHash signatures on disk), so a million web segments fit in under 3 GB (bench/scale.py); metrics add
records_per_s and peak_rss_mb. clean.executor puts the per-record work on datatrove (local processes, a SLURM
array, a Ray cluster): the same outputs, byte for byte (README, "The data half on a cluster"). It takes minutes
at a million records and seconds on the sample; a killed run reruns whole (datatrove's tasks resume).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from selfalign import clean, executor, io, params, progress, records

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
    "langs": {
        "enabled": True,
        "min_letters": 40,
        "min_confidence": 0.5,
        "margin": 2.0,
        "ngram_margin": 8.0,
        "ms_id_fallback": "lingua",
        "ms_id_ngram_margin": 64.0,
        "max_chars": 300,
    },
    "exact_dup": True,
    "near_dup": {"enabled": True, "threshold": 0.8, "num_perm": 128, "shingle": 3, "seed": 1},
    "workers": 2,
    "executor": "local",
    "slurm": {"partition": "", "time": "01:00:00", "cpus_per_task": 1, "mem_per_cpu_gb": 2, "venv_path": ""},
    "min_success": 0.5,
}


def run(pairs: list[tuple[Path, Path]], cfg: dict, rejected_path: Path) -> dict:
    """Clean the files of `pairs` together, writing each output and `rejected_path`; return the metrics."""
    return executor.run(pairs, cfg, rejected_path)


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--input-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Read every {seed,preference,prompts,web}.jsonl here.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the same names here, plus rejected.jsonl.",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An input file (repeatable; paired in order with --output).",
)
@click.option("--output", "outputs", multiple=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--rejected",
    "rejected_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Rejected records (default: rejected.jsonl in --output-dir).",
)
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
    if cfg["executor"] not in ("local", "datatrove", "slurm", "ray"):
        raise click.UsageError(f"clean.executor: {cfg['executor']!r} is not local | datatrove | slurm | ray")
    if cfg["executor"] == "slurm" and not cfg["slurm"]["partition"]:
        raise click.UsageError("clean.executor slurm needs clean.slurm.partition")
    log.info(
        "executor %s, %d input files, %d workers; rules: %s; language gate %s; near-dup %s (threshold %s, "
        "%d perms, %d-word shingles)",
        cfg["executor"],
        len(pairs),
        cfg["workers"],
        ", ".join(enabled),
        "on" if cfg["langs"]["enabled"] else "off",
        "on" if cfg["near_dup"]["enabled"] else "off",
        cfg["near_dup"]["threshold"],
        cfg["near_dup"]["num_perm"],
        cfg["near_dup"]["shingle"],
    )
    t0 = time.perf_counter()
    metrics = run(pairs, cfg, rejected_path)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics.update(progress.rates(metrics["records_in"], metrics["seconds"]))
    failed = records.success_floor(metrics, metrics["kept"], metrics["records_in"], cfg["min_success"], "clean kept")
    io.write_json(metrics_path, metrics)
    log.info(
        "%d records in, %d kept, %d rejected in %.1f s; by rule: %s",
        metrics["records_in"],
        metrics["kept"],
        metrics["rejected"],
        metrics["seconds"],
        ", ".join(f"{k} {v}" for k, v in metrics["rules"].items()),
    )
    if failed:
        raise click.ClickException(failed)


if __name__ == "__main__":
    main()

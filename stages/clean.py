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
fasttext, ngram, markers, lingua, none), rejected_by_reason and records_in == kept + rejected.
It streams (selfalign.executor): memory holds a window of records plus compact dedup state (a hash per record,
MinHash signatures on disk), so a million web segments fit in under 3 GB (bench/scale.py); metrics add
records_per_s and peak_rss_mb. clean.executor puts the per-record work on datatrove (local processes, a SLURM
array, a Ray cluster): the same outputs, byte for byte (README, "The data half on a cluster"). It takes minutes
at a million records and seconds on the sample; a killed run reruns whole (datatrove's tasks resume).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from selfalign import clean, cli, io, params, records
from selfalign.clean import CleanConfig

log = logging.getLogger("clean")
STAGE = "clean"
FILES = ("seed.jsonl", "preference.jsonl", "prompts.jsonl", "web.jsonl")  # dedup priority: first wins


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
    cli.setup_logging()
    cfg = params.resolve(CleanConfig, params_file, STAGE, overrides)
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
    enabled = [n for n in clean.RULES if getattr(cfg.rules, n).enabled]
    log.info(
        "executor %s, %d input files, %d workers; rules: %s; language gate %s; near-dup %s (threshold %s, "
        "%d perms, %d-word shingles)",
        cfg.executor,
        len(pairs),
        cfg.workers,
        ", ".join(enabled),
        "on" if cfg.langs.enabled else "off",
        "on" if cfg.near_dup.enabled else "off",
        cfg.near_dup.threshold,
        cfg.near_dup.num_perm,
        cfg.near_dup.shingle,
    )
    metrics = clean.run(pairs, cfg, rejected_path)
    failed = records.success_floor(metrics, metrics["kept"], metrics["records_in"], cfg.min_success, "clean kept")
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

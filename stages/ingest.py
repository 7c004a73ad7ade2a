"""Convert every raw source params lists into canonical JSON Lines, one file per role.

    python stages/ingest.py --params params.yaml --output-dir data/ingest --metrics metrics/ingest.json

writes data/ingest/{seed,web,preference,prompts}.jsonl (all four, empty when no source has that
role) and data/ingest/rejected.jsonl. By hand, on one file of any format the readers know:

    python stages/ingest.py --input FILE --format alpaca --output OUT.jsonl --rejected REJ.jsonl
    python stages/ingest.py --input FILE --format text --lang ms --output OUT.jsonl

Every reader streams (memory holds one input unit, whatever the file's size); progress (records/s) is shown
on a TTY and logged otherwise, and the metrics add seconds, records_per_s and peak_rss_mb.
Each input unit becomes records (one, or several: RM pairs, seed-task instances, web segments)
or one rejected record naming file, line and reason; per source, records_in = kept + rejected.
The config and the per-source pass live in selfalign/ingest.py; this script wires the files.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

import click

from selfalign import cli, io, params, progress, readers
from selfalign.ingest import IngestConfig, SourceSpec, check_paths, ingest_source, role_error, success, summary

log = logging.getLogger("ingest")


@click.command(
    epilog="Formats: " + ", ".join(f"{name} ({r.role or 'any'})" for name, r in sorted(readers.READERS.items())) + "."
)
@params.params_option
@params.set_option
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    help="Pipeline mode: write <role>.jsonl and rejected.jsonl here for every source in ingest.sources.",
)
@click.option("--metrics", "metrics_path", type=click.Path(dir_okay=False), help="Per-source counts as JSON.")
@click.option("--input", "input_path", type=click.Path(exists=True, dir_okay=False), help="By hand: one file.")
@click.option("--format", "fmt", type=click.Choice(sorted(readers.READERS)), help="By hand: the file's format.")
@click.option("--output", type=click.Path(dir_okay=False), help="By hand: records go here.")
@click.option(
    "--rejected",
    "rejected_path",
    type=click.Path(dir_okay=False),
    help="By hand: rejected records go here (default: OUTPUT with .rejected.jsonl).",
)
@click.option("--role", type=click.Choice(list(readers.ROLE_KIND)), help="By hand: default per format.")
@click.option("--lang", help="By hand: the file's language (default ingest.lang, else en).")
@click.option("--name", help="By hand: the records' source name (default: the file name up to its first dot).")
def main(params_file, overrides, output_dir, metrics_path, input_path, fmt, output, rejected_path, role, lang, name):
    cfg = params.resolve(IngestConfig, params_file, "ingest", overrides)
    cli.setup_logging()
    options = cfg.reader_options()
    t0 = time.perf_counter()
    log.info(
        "segments of %d-%d chars, multi_turn %s, text documents %s",
        cfg.segment.min_chars,
        cfg.segment.max_chars,
        cfg.multi_turn,
        cfg.text_documents,
    )

    if input_path:
        if output_dir or not fmt or not output:
            raise click.UsageError("by hand, give --input, --format and --output (and no --output-dir)")
        why = role_error(fmt, role)
        if why:
            raise click.UsageError(f"--role {role}: {why}")
        src = SourceSpec(input_path, fmt, role, lang, name).resolved(cfg.lang)
        rejected_path = rejected_path or str(Path(output).with_suffix("")) + ".rejected.jsonl"
        with io.jsonl_writer(output) as write, io.jsonl_writer(rejected_path) as write_rej:
            sources = [ingest_source(src, options, write, write_rej)]
    else:
        if not output_dir:
            raise click.UsageError("give --output-dir (pipeline mode, sources from params) or --input (by hand)")
        if not cfg.sources:
            raise click.UsageError(f"{params_file or 'code defaults'}: ingest.sources is empty")
        resolved = cfg.resolved_sources()
        check_paths(resolved, str(params_file or "code defaults"))
        with ExitStack() as stack:
            writers = {
                r: stack.enter_context(io.jsonl_writer(Path(output_dir) / f"{r}.jsonl")) for r in readers.ROLE_KIND
            }
            write_rej = stack.enter_context(io.jsonl_writer(Path(output_dir) / "rejected.jsonl"))
            sources = [ingest_source(src, options, writers[src.role], write_rej) for src in resolved]

    metrics = summary(sources)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics.update(progress.rates(metrics["records_in"], metrics["seconds"]))
    log.info("total: %d records in, %d kept, %d rejected", metrics["records_in"], metrics["kept"], metrics["rejected"])
    failed = success(metrics, cfg.min_success)
    if metrics_path:
        io.write_json(metrics_path, metrics)
    if failed:
        raise click.ClickException(failed)


if __name__ == "__main__":
    main()

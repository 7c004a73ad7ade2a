"""Convert every raw source params lists into canonical JSON Lines, one file per role.

    python stages/ingest.py --params params.yaml --output-dir data/ingest --metrics metrics/ingest.json

writes data/ingest/{seed,web,preference,prompts}.jsonl (all four, empty when no source has that
role) and data/ingest/rejected.jsonl. By hand, on one file of any format the readers know:

    python stages/ingest.py --input FILE --format alpaca --output OUT.jsonl --rejected REJ.jsonl
    python stages/ingest.py --input FILE --format text --lang ms --output OUT.jsonl

Every reader streams (memory holds one input unit, whatever the file's size); progress (records/s) is shown
on a TTY and logged otherwise, and the metrics add seconds, records_per_s and peak_rss_mb.
Each input unit becomes records (one, or several: RM pairs, seed-task instances, web segments)
or one rejected record naming file, line and reason; per source, records_in = written + rejected.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import click

from selfalign import io, params, progress, readers, records

DEFAULTS = {
    "lang": "en",
    "multi_turn": False,
    "text_documents": "auto",
    "segment": {"min_chars": 200, "max_chars": 1500},
    "sources": [],
    "min_success": 0.5,
}
SOURCE_KEYS = ("path", "format", "role", "lang", "name")

log = logging.getLogger("ingest")


def check_source(i: int, src, default_lang: str, where: str) -> dict:
    """A params source entry with its defaults filled in; any bad key or value is a ParamsError naming it."""
    at = f"{where}: ingest.sources[{i}]"
    if not isinstance(src, dict):
        raise params.ParamsError(f"{at}: expected a mapping with keys {', '.join(SOURCE_KEYS)}")
    unknown = sorted(set(src) - set(SOURCE_KEYS))
    if unknown:
        raise params.ParamsError(f"{at}: unknown key {unknown[0]!r}; known keys: {', '.join(SOURCE_KEYS)}")
    for key in ("path", "format"):
        if not src.get(key):
            raise params.ParamsError(f"{at}: {key!r} is required")
    fmt = src["format"]
    if fmt not in readers.READERS:
        raise params.ParamsError(f"{at}: unknown format {fmt!r}; known formats: {', '.join(sorted(readers.READERS))}")
    role = src.get("role") or readers.READERS[fmt].role
    if role not in readers.ROLE_KIND:
        raise params.ParamsError(
            f"{at}: role {role!r} is not one of {', '.join(readers.ROLE_KIND)}"
            + (" (format canonical needs a role)" if role is None else "")
        )
    kind = readers.READERS[fmt].kind
    if kind is not None and readers.ROLE_KIND[role] != kind:
        raise params.ParamsError(
            f"{at}: format {fmt} makes {kind} records, but role {role} takes {readers.ROLE_KIND[role]} records"
        )
    path = str(src["path"])
    return {
        "path": path,
        "format": fmt,
        "role": role,
        "lang": src.get("lang") or default_lang,
        "name": src.get("name") or Path(path).name.split(".")[0],
    }


def resolve_params(params_file, overrides=()) -> dict:
    cfg = params.resolve(DEFAULTS, params_file, "ingest", overrides)
    if not isinstance(cfg["sources"], list):
        raise params.ParamsError(f"{params_file}: ingest.sources must be a list")
    cfg["sources"] = [check_source(i, s, cfg["lang"], str(params_file)) for i, s in enumerate(cfg["sources"])]
    return cfg


def reader_options(cfg: dict) -> dict:
    return {"multi_turn": cfg["multi_turn"], "documents": cfg["text_documents"], **cfg["segment"]}


def ingest_source(src: dict, options: dict, write_record, write_rejected) -> dict:
    """Read one source, write its records and rejects, return its metrics."""
    want = readers.ROLE_KIND.get(src["role"])
    written, rejected = 0, Counter()
    items = readers.read(src["format"], src["path"], src["lang"], src["name"], **options)
    for item in progress.track(items, desc=f"ingest {src['name']}"):
        if not readers.is_rejected(item) and want and item["kind"] != want:
            item = records.rejected(
                item,
                "wrong_kind",
                readers.STAGE,
                file=src["path"],
                line=item["meta"].get("line"),
                detail=f"a {item['kind']} record in a {src['role']} source",
            )
        if readers.is_rejected(item):
            item["source"] = src["name"]
            write_rejected(item)
            rejected[item["reason"]] += 1
        else:
            write_record(item)
            written += 1
    with open(src["path"], "rb") as f:
        lines = sum(1 for _ in f)
    n_rej = sum(rejected.values())
    log.info(
        "%s (%s, %s): %d lines -> %d records, %d rejected%s",
        src["path"],
        src["format"],
        src["role"],
        lines,
        written,
        n_rej,
        f" {dict(rejected)}" if rejected else "",
    )
    return {
        **src,
        "lines_read": lines,
        "records_in": written + n_rej,
        "records_written": written,
        "rejected": n_rej,
        "rejected_by_reason": dict(sorted(rejected.items())),
    }


def totals(sources: list[dict]) -> dict:
    reasons = Counter()
    for s in sources:
        reasons.update(s["rejected_by_reason"])
    written = sum(s["records_written"] for s in sources)
    return {
        "records_in": written + sum(reasons.values()),
        "records_written": written,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_params(params_file, overrides)
    options = reader_options(cfg)
    t0 = time.perf_counter()
    log.info(
        "segments of %d-%d chars, multi_turn %s, text documents %s",
        options["min_chars"],
        options["max_chars"],
        options["multi_turn"],
        options["documents"],
    )

    if input_path:
        if output_dir or not fmt or not output:
            raise click.UsageError("by hand, give --input, --format and --output (and no --output-dir)")
        kind = readers.READERS[fmt].kind
        if role and kind and readers.ROLE_KIND[role] != kind:
            raise click.UsageError(
                f"--format {fmt} makes {kind} records; --role {role} takes {readers.ROLE_KIND[role]}"
            )
        src = {
            "path": input_path,
            "format": fmt,
            "role": role or readers.READERS[fmt].role,
            "lang": lang or cfg["lang"],
            "name": name or Path(input_path).name.split(".")[0],
        }
        rejected_path = rejected_path or str(Path(output).with_suffix("")) + ".rejected.jsonl"
        with io.jsonl_writer(output) as write, io.jsonl_writer(rejected_path) as write_rej:
            sources = [ingest_source(src, options, write, write_rej)]
    else:
        if not output_dir:
            raise click.UsageError("give --output-dir (pipeline mode, sources from params) or --input (by hand)")
        if not cfg["sources"]:
            raise click.UsageError(f"{params_file or 'code defaults'}: ingest.sources is empty")
        for src in cfg["sources"]:
            if not Path(src["path"]).is_file():
                what = "is a directory, not a file" if Path(src["path"]).is_dir() else "does not exist"
                raise click.UsageError(f"{params_file}: ingest source {src['path']} {what}")
        with ExitStack() as stack:
            writers = {
                r: stack.enter_context(io.jsonl_writer(Path(output_dir) / f"{r}.jsonl")) for r in readers.ROLE_KIND
            }
            write_rej = stack.enter_context(io.jsonl_writer(Path(output_dir) / "rejected.jsonl"))
            sources = [ingest_source(src, options, writers[src["role"]], write_rej) for src in cfg["sources"]]

    metrics = {
        "sources": sources,
        **totals(sources),
        "outputs": {r: sum(s["records_written"] for s in sources if s["role"] == r) for r in readers.ROLE_KIND},
    }
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    metrics.update(progress.rates(metrics["records_in"], metrics["seconds"]))
    log.info(
        "total: %d records in, %d written, %d rejected",
        metrics["records_in"],
        metrics["records_written"],
        metrics["rejected"],
    )
    # Per source: one file read with the wrong format (all rejects) must stop the stage even when the others are fine.
    failed = [
        records.success_floor(
            {}, s["records_written"], s["records_in"], cfg["min_success"], f"ingest {s['path']} ({s['format']})"
        )
        for s in sources
    ]
    records.success_floor(metrics, metrics["records_written"], metrics["records_in"], cfg["min_success"], "ingest")
    metrics["success"]["sources_below"] = sum(f is not None for f in failed)
    if metrics_path:
        io.write_json(metrics_path, metrics)
    if any(failed):
        raise click.ClickException(next(f for f in failed if f))


if __name__ == "__main__":
    main()

"""Human review: export a seeded sample of a stage's kept and rejected records for Label Studio and Argilla,
and apply the annotators' verdicts (a Label Studio JSON export, or Argilla records) over the automatic ones.

    python stages/review.py --params params.yaml --input data/curate --annotations data/review/annotations.json \
        --output-dir data/review --export-dir data/review/export --metrics metrics/review.json

review.source names whose verdicts are reviewed: curate (the last round of --input data/curate), verify or
localise (--input data/<source> with kept.jsonl and rejected.jsonl). Writes to --export-dir
label_studio_tasks.json and label_studio_config.xml (a Label Studio project: its import and its labeling
config), argilla_settings.json and argilla_records.json (an Argilla 2.x dataset); and to --output-dir
kept.jsonl (kept + human-accepted rejected - human-rejected kept: what sft@final trains on) and
rejected.jsonl (the source's rejected records and the human_rejected ones). With no annotations, kept.jsonl
is the source's kept.jsonl byte for byte.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, io, params, review
from selfalign.review import ReviewConfig

log = logging.getLogger("review")
STAGE = "review"


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True),
    required=True,
    help="The reviewed stage's output: data/curate (its last round) or a dir with kept/rejected.jsonl.",
)
@click.option(
    "--annotations",
    type=click.Path(dir_okay=False),
    required=True,
    help="The annotators' export: Label Studio's JSON export or Argilla records; absent or empty: no overrides.",
)
@click.option("--output-dir", type=click.Path(file_okay=False), required=True)
@click.option("--export-dir", type=click.Path(file_okay=False), required=True)
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
def main(params_file, overrides, input_path, annotations, output_dir, export_dir, metrics):
    cfg = params.resolve(ReviewConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    source = cfg.source
    try:
        kept_path, rejected_path = review.source_files(source, input_path, params_file)
        items = review.load_source(kept_path, rejected_path)
        verdicts = review.read_annotations(annotations)
    except (review.ReviewError, OSError) as e:
        raise click.ClickException(str(e)) from e
    log.info(
        "%s: %d records from %s and %s; %d annotated in %s",
        source,
        len(items),
        kept_path,
        rejected_path,
        len(verdicts),
        annotations,
    )

    chosen = review.sample(items, cfg.sample.kept, cfg.sample.rejected, cfg.seed)
    out = Path(export_dir)
    io.write_json(out / "label_studio_tasks.json", review.label_studio_tasks(chosen, source))
    with io.atomic_path(out / "label_studio_config.xml") as tmp:
        tmp.write_text(review.label_studio_config(source), encoding="utf-8")
    io.write_json(out / "argilla_settings.json", review.argilla_settings(source))
    io.write_json(out / "argilla_records.json", review.argilla_records(chosen, source))

    kept, rejected, counts = review.apply(items, verdicts)
    review.write_lines(Path(output_dir) / "kept.jsonl", kept)
    review.write_lines(Path(output_dir) / "rejected.jsonl", rejected)

    n_kept_in = sum(it["auto"] == "accept" for it in items)
    m = {
        "source": source,
        "kept_file": str(kept_path),
        "rejected_file": str(rejected_path),
        "records_in": len(items),
        "source_kept": n_kept_in,
        "source_rejected": len(items) - n_kept_in,
        "exported": len(chosen),
        "exported_kept": sum(it["auto"] == "accept" for it in chosen),
        "annotations_file": str(annotations),
        "annotated_tasks": len(verdicts),
        "annotated": counts.get("annotated", 0),
        "agreed": counts.get("agreed", 0),
        "conflicts": counts.get("conflicts", 0),
        "stale": counts["stale"],
        "human_accepted": counts.get("human_accepted", 0),
        "human_rejected": counts.get("human_rejected", 0),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(
            sorted(Counter(json.loads(line).get("reason") for line in rejected).items(), key=lambda kv: str(kv[0]))
        ),
    }
    decided = m["annotated"] - m["conflicts"]
    m["agreement"] = round(m["agreed"] / decided, 4) if decided else None
    assert m["records_in"] == m["kept"] + m["rejected"], "review lost records"
    io.write_json(metrics, m)
    log.info(
        "kept %d (+%d human-accepted, -%d human-rejected), rejected %d; %d annotations (%d stale, %d conflicts), "
        "agreement with %s %s",
        len(kept),
        m["human_accepted"],
        m["human_rejected"],
        len(rejected),
        m["annotated"],
        m["stale"],
        m["conflicts"],
        source,
        m["agreement"],
    )


if __name__ == "__main__":
    main()

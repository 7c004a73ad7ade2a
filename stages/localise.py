"""Localise records in a target language: a teacher lists culture-bound details and their local equivalents.

    python stages/localise.py --params params.yaml --input data/clean/seed.jsonl --input data/repair/seed.jsonl \
        --model models/base --prompt prompts/localise.txt --output data/localise/seed.jsonl \
        --rejected data/localise/rejected.jsonl --cache cache/localise --metrics metrics/localise.json

Reads the chat records of every --input in order and writes them all to --output: records in a language of
localise.locales (ms -> Malaysia), at most localise.max_records of them, go to the teacher, which answers with
the changes to make ({"changes": [{"from", "to", "kind"}]}, prompts/localise.txt); selfalign.localise applies them
by exact replacement and keeps them in meta.localise (locale, changes, teacher). A record with nothing to
localise passes unchanged (counted, meta.localise.changes = []); records in other languages and over the cap pass
unchanged without a call (counted). An unparsable reply, a change naming text that is not in the record, or a
failed call rejects the record with that reason. records_in == kept (written) + rejected in the metrics; teacher
calls go through selfalign.teacher and selfalign.llm's cache, so a killed run resumes.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, io, params, records, teacher
from selfalign import localise as lc
from selfalign import translate as tr

log = logging.getLogger("localise")
STAGE = "localise"


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--input",
    "inputs",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Chat records (repeatable; written in this order).",
)
@click.option(
    "--model", "model_dir", default=None, help="Teacher model directory (local engine); engine.model otherwise."
)
@click.option(
    "--prompt",
    "prompt_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Template with {locale}, {language} and {text}; its hash is part of every cache key.",
)
@click.option("--output", type=click.Path(dir_okay=False), required=True)
@click.option("--rejected", "rejected_file", type=click.Path(dir_okay=False), required=True)
@click.option("--cache", type=click.Path(file_okay=False), required=True)
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
def main(params_file, overrides, inputs, model_dir, prompt_file, output, rejected_file, cache, metrics):
    cfg = params.resolve(lc.LocaliseConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    template = Path(prompt_file).read_text(encoding="utf-8")
    spec = cfg.engine.with_model(model_dir)
    rejected: list[dict] = []
    recs: list[tuple[dict, str, int]] = []  # (record, file, line)
    n_in = 0
    for path in inputs:
        good, bad, n = records.read(Path(path), STAGE, "chat")
        n_in += n
        rejected += bad
        recs += [(r, path, line) for r, line in good]
    chosen, passed = lc.choose([r for r, _, _ in recs], cfg.locales, cfg.max_records)
    log.info(
        "%d records in %d files (%d invalid): %d to localise (%s), %d pass without a call %s; teacher %s on %s",
        n_in,
        len(inputs),
        len(rejected),
        len(chosen),
        cfg.locales,
        sum(passed.values()),
        dict(passed),
        spec.kind,
        spec.model,
    )
    try:
        reqs = [
            teacher.request(
                lc.build_prompt(template, r, cfg.locales[r["lang"]], tr.lang_name(r["lang"])),
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.top_p,
                cfg.seed,
            )
            for r in (recs[i][0] for i in chosen)
        ]
    except ValueError as e:
        raise click.ClickException(f"{prompt_file}: {e}") from e
    results, stats = teacher.ask(spec, cache, STAGE, template, reqs)

    done = dict(zip(chosen, results, strict=True))
    out, counts, kinds = [], Counter(), Counter()
    for i, (r, path, line) in enumerate(recs):
        if i not in done:
            out.append(r)
            continue
        new, reason, detail = lc.localise_one(r, done[i], cfg.locales[r["lang"]], spec.model)
        if new is None:
            rejected.append(records.rejected(r, reason, STAGE, detail=detail, file=path, line=line))
            continue
        changes = new["meta"]["localise"]["changes"]
        counts["localised" if changes else "nothing_to_localise"] += 1
        kinds.update(c["kind"] for c in changes)
        out.append(new)
    if n_in != len(out) + len(rejected):  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"records_in {n_in} != written {len(out)} + rejected {len(rejected)}")
    io.write_jsonl(output, out)
    io.write_jsonl(rejected_file, rejected)
    m = {
        "records_in": n_in,
        "kept": len(out),
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "written": len(out),
        "asked": len(chosen),
        "localised": counts["localised"],
        "nothing_to_localise": counts["nothing_to_localise"],
        "changes": sum(kinds.values()),
        "changes_by_kind": dict(sorted(kinds.items())),
        "passed_without_call": dict(sorted(passed.items())),
        "locales": cfg.locales,
        "llm": stats,
        "engine": spec.kind,
        "model": spec.model,
    }
    io.write_json(metrics, m)
    log.info(
        "%d in: %d written (%d localised, %d with nothing to localise), %d rejected %s; llm %s",
        n_in,
        len(out),
        m["localised"],
        m["nothing_to_localise"],
        len(rejected),
        m["rejected_by_reason"],
        m["llm"],
    )


if __name__ == "__main__":
    main()

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
failed call rejects the record with that reason. records_in == written + rejected in the metrics; teacher calls
go through selfalign.llm's cache, so a killed run resumes.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import io, llm, params, records
from selfalign import localise as lc
from selfalign import translate as tr

log = logging.getLogger("localise")
STAGE = "localise"
DEFAULTS = {
    "locales": {},  # language: locale; {} = selfalign.localise.LOCALES (ms: Malaysia)
    "max_records": 12,
    "max_new_tokens": 128,
    "temperature": 0.0,
    "top_p": 1.0,
    "seed": 0,
    "engine": {},
}
ENGINE_DEFAULTS = {"kind": "local", "batch_size": 8, "dtype": "float32"}


def localise_one(record: dict, reply: llm.Result, locale: str, teacher: str) -> tuple[dict | None, str, str]:
    """(the record to write or None, reject reason, detail) for one teacher reply."""
    if not reply.ok:
        return None, "teacher_failed", reply.error or "unknown error"
    try:
        changes = lc.parse_changes(reply.text)
        out, done = lc.apply(record, changes)
    except lc.UnparsableChanges as e:
        return None, "unparsable_changes", f"{e}; reply {reply.text!r}"[:500]
    except lc.ChangeNotFound as e:
        return None, "change_not_found", f"{e}; reply {reply.text!r}"[:500]
    meta = {"locale": locale, "changes": [c.as_dict() for c in done], "teacher": teacher}
    return {**out, "meta": {**(record.get("meta") or {}), "localise": meta}}, "", ""


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
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = params.resolve(DEFAULTS, params_file, STAGE, overrides)
    if not isinstance(cfg["locales"], dict) or not all(isinstance(v, str) and v for v in cfg["locales"].values()):
        raise click.ClickException("localise.locales: expected a mapping of language code: locale name (ms: Malaysia)")
    cfg["locales"] = cfg["locales"] or dict(lc.LOCALES)
    template = Path(prompt_file).read_text(encoding="utf-8")
    spec = {**ENGINE_DEFAULTS, "model": model_dir or llm.SPEC_DEFAULTS["model"], **cfg["engine"]}
    try:
        engine = llm.make_engine(spec, cache_dir=cache)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from e
    rejected: list[dict] = []
    recs: list[tuple[dict, str, int]] = []  # (record, file, line)
    n_in = 0
    for path in inputs:
        good, bad, n = records.read(Path(path), STAGE, "chat")
        n_in += n
        rejected += bad
        recs += [(r, path, line) for r, line in good]
    chosen, passed = [], Counter()
    for i, (r, _, _) in enumerate(recs):
        if r["lang"] not in cfg["locales"]:
            passed["other_lang"] += 1
        elif cfg["max_records"] and len(chosen) >= cfg["max_records"]:
            passed["over_max_records"] += 1
        else:
            chosen.append(i)
    log.info(
        "%d records in %d files (%d invalid): %d to localise (%s), %d pass without a call %s; teacher %s on %s",
        n_in,
        len(inputs),
        len(rejected),
        len(chosen),
        cfg["locales"],
        sum(passed.values()),
        dict(passed),
        spec["kind"],
        spec["model"],
    )
    try:
        reqs = [
            llm.Request(
                messages=[
                    {
                        "role": "user",
                        "content": lc.build_prompt(
                            template, recs[i][0], cfg["locales"][recs[i][0]["lang"]], tr.lang_name(recs[i][0]["lang"])
                        ),
                    }
                ],
                max_tokens=cfg["max_new_tokens"],
                temperature=cfg["temperature"],
                top_p=cfg["top_p"],
                seed=cfg["seed"],
            )
            for i in chosen
        ]
    except ValueError as e:
        raise click.ClickException(f"{prompt_file}: {e}") from e
    template_id = "localise:" + hashlib.sha256(template.encode()).hexdigest()[:12]
    try:
        results = engine.complete(reqs, template_id=template_id, progress=True) if reqs else []
    finally:
        engine.close()

    done = dict(zip(chosen, results, strict=True))
    out, counts, kinds = [], Counter(), Counter()
    for i, (r, path, line) in enumerate(recs):
        if i not in done:
            out.append(r)
            continue
        new, reason, detail = localise_one(r, done[i], cfg["locales"][r["lang"]], spec["model"])
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
        "written": len(out),
        "rejected": len(rejected),
        "asked": len(chosen),
        "localised": counts["localised"],
        "nothing_to_localise": counts["nothing_to_localise"],
        "changes": sum(kinds.values()),
        "changes_by_kind": dict(sorted(kinds.items())),
        "passed_without_call": dict(sorted(passed.items())),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "locales": cfg["locales"],
        "llm": engine.stats,
        "engine": spec["kind"],
        "model": spec["model"],
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

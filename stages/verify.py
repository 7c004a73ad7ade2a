"""Ask a teacher whether each answer is correct for its instruction and input; reject the incorrect ones.

    python stages/verify.py --params params.yaml --input data/localise/seed.jsonl --model models/base \
        --prompt prompts/verify.txt --output-dir data/verify/seed --cache cache/verify/seed \
        --metrics metrics/verify/seed.json

dvc.yaml runs one verify@<key> per entry of params verify.inputs (key: the file it reads), so where the check
sits is params: after clean/localise for seed and translated data (the default, `seed`), after distill for
teacher answers (`distill: data/distill/distilled.jsonl`; sft then reads data/verify/distill/kept.jsonl).
Records in verify.langs ([] = every language) are judged, at most verify.max_records of them; the others pass
unjudged and are counted. The teacher's verdict (correct | incorrect, reason, confidence) goes to meta.verify;
`incorrect` is rejected with the teacher's reason, an unparsable reply or a failed call is rejected too
(unparsable_verdict, teacher_failed): nothing passes without a verdict it was asked for. Writes kept.jsonl and
rejected.jsonl; records_in == kept + rejected in the metrics. Teacher calls go through selfalign.llm and its
cache, so a killed run resumes.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import click

from selfalign import cli, io, params, records, teacher
from selfalign import verify as vf

log = logging.getLogger("verify")
STAGE = "verify"


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--input",
    "input_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Chat records whose answers are checked.",
)
@click.option(
    "--model", "model_dir", default=None, help="Teacher model directory (local engine); engine.model otherwise."
)
@click.option(
    "--prompt",
    "prompt_file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="Rubric with {instruction}, {output} (and {lang}); its hash is part of every cache key.",
)
@click.option(
    "--output-dir", type=click.Path(file_okay=False), required=True, help="Writes kept.jsonl, rejected.jsonl."
)
@click.option("--cache", type=click.Path(file_okay=False), required=True)
@click.option("--metrics", type=click.Path(dir_okay=False), required=True)
def main(params_file, overrides, input_file, model_dir, prompt_file, output_dir, cache, metrics):
    cfg = params.resolve(vf.VerifyConfig, params_file, STAGE, overrides)
    cli.setup_logging()
    template = Path(prompt_file).read_text(encoding="utf-8")
    spec = cfg.engine.with_model(model_dir)
    good, rejected, n_in = records.read(Path(input_file), STAGE, "chat")
    for r, line in good:  # nothing to judge without an answer: such a record is not a training example either
        if not any(m["role"] == "assistant" for m in r["messages"]):
            rejected.append(
                records.rejected(r, "no_answer", STAGE, detail="no assistant turn", file=input_file, line=line)
            )
    good = [(r, line) for r, line in good if any(m["role"] == "assistant" for m in r["messages"])]
    recs = [r for r, _ in good]
    lines = [line for _, line in good]
    chosen, unjudged = vf.choose(recs, cfg.langs, cfg.max_records)
    log.info(
        "%d records in %s (%d invalid): %d to judge (langs %s, max %s), %d pass unjudged %s; teacher %s on %s",
        n_in,
        input_file,
        len(rejected),
        len(chosen),
        cfg.langs or "all",
        cfg.max_records or "all",
        sum(unjudged.values()),
        dict(unjudged),
        spec.kind,
        spec.model,
    )
    try:
        reqs = [
            teacher.request(
                vf.build_prompt(template, recs[i]), cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.seed
            )
            for i in chosen
        ]
    except ValueError as e:
        raise click.ClickException(f"{prompt_file}: {e}") from e
    results, stats = teacher.ask(spec, cache, STAGE, template, reqs)
    verdicts = {i: vf.judge(res, cfg.min_confidence) for i, res in zip(chosen, results, strict=True)}
    kept, counts = [], Counter()
    for i, r in enumerate(recs):
        if i not in verdicts:
            kept.append(r)
            continue
        v, reason, detail = verdicts[i]
        meta = (
            {"verdict": v.verdict, "reason": v.reason, "confidence": v.confidence, "teacher": spec.model} if v else None
        )
        counts[v.verdict if v else "no_verdict"] += 1
        if reason:
            rec = {**r, "meta": {**(r.get("meta") or {}), "verify": meta}} if meta else r
            rejected.append(records.rejected(rec, reason, STAGE, detail=detail, file=input_file, line=lines[i]))
        else:
            kept.append({**r, "meta": {**(r.get("meta") or {}), "verify": meta}})
    if n_in != len(kept) + len(rejected):  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"records_in {n_in} != kept {len(kept)} + rejected {len(rejected)}")
    out = Path(output_dir)
    io.write_jsonl(out / "kept.jsonl", kept)
    io.write_jsonl(out / "rejected.jsonl", rejected)
    m = {
        "records_in": n_in,
        "kept": len(kept),
        "rejected": len(rejected),
        "invalid": n_in - len(recs) - sum(r["reason"] == "no_answer" for r in rejected),
        "judged": len(chosen),
        "verdicts": dict(sorted(counts.items())),
        "unjudged": dict(sorted(unjudged.items())),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "by_lang": {
            lang: sum(1 for i in chosen if recs[i]["lang"] == lang)
            for lang in sorted({recs[i]["lang"] for i in chosen})
        },
        "llm": stats,
        "engine": spec.kind,
        "model": spec.model,
    }
    io.write_json(metrics, m)
    log.info(
        "%d in: %d kept, %d rejected %s; verdicts %s; llm %s",
        n_in,
        len(kept),
        len(rejected),
        m["rejected_by_reason"],
        m["verdicts"],
        m["llm"],
    )


if __name__ == "__main__":
    main()

"""Does the backward model learn its job? Held-out instruction prediction (Humpback's Myx, measured).

For every seed pair the sft run held out (by id hash, `sft.heldout`), the backward model is
prompted exactly as augment prompts it (the response in prompts/backward.txt, greedy) and its reply,
read back with `augment.parse_instruction`, is scored against the true instruction with ROUGE-L F1
(rouge-score, Porter stemming). The base model gets the same prompts, so the difference is what
training on reversed pairs bought. Means come with a seeded percentile bootstrap 95% interval; the
difference is paired (the same held-out pairs resampled for both models).

Pure functions except `predict`, which runs a selfalign.llm engine; the sft stage wires it. Its settings are
sft.train.heldout_eval (sft.HeldoutEvalConfig).
"""

from __future__ import annotations

import random
import statistics

from selfalign import augment, records, sft


def heldout_pairs(paths_and_templates: list[tuple[str, str | None]], fraction: float, max_examples: int) -> list[dict]:
    """The held-out single-turn seed pairs of the reversed sources: {id, instruction, response, template}.

    Bad lines and multi-turn records are skipped here: the sft stage already counts them as rejected.
    """
    out: dict[str, dict] = {}
    for path, template_path in paths_and_templates:
        template = sft.load_template(template_path) if template_path else None
        good, _, _ = records.read(path, "sft", "chat")
        for rec, _line in good:
            msgs = rec["messages"]
            if [m["role"] for m in msgs] != ["user", "assistant"] or not sft.heldout(rec["id"], fraction):
                continue
            out.setdefault(
                f"{rec['id']}/{rec['lang']}",
                {
                    "id": rec["id"],
                    "instruction": msgs[0]["content"],
                    "response": msgs[1]["content"],
                    "user": augment.user_turn(template, msgs[1]["content"]),
                },
            )
    return [out[k] for k in sorted(out)][:max_examples]


def predict(
    model_dir: str,
    pairs: list[dict],
    max_new_tokens: int,
    batch_size: int,
    system: str | None = None,
    dtype: str = "fp32",
):
    """(parsed instruction, finish_reason) for each pair, greedy, from the model in `model_dir` (no cache)."""
    from selfalign import llm

    engine = llm.make_engine(llm.EngineSpec(kind="local", model=model_dir, batch_size=batch_size, dtype=dtype))
    reqs = [
        llm.Request(
            messages=records.with_system(system, [{"role": "user", "content": p["user"]}]), max_tokens=max_new_tokens
        )
        for p in pairs
    ]
    results = engine.complete(reqs) if reqs else []
    engine.close()
    return [(augment.parse_instruction(r.text) if r.ok else "", r.finish_reason if r.ok else "failed") for r in results]


def rouge_l(references: list[str], predictions: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (0 for an empty prediction)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for ref, pred in zip(references, predictions, strict=True)]


def bootstrap_ci(values: list[float], resamples: int, seed: int) -> list[float] | None:
    """Percentile 95% interval of the mean, from `resamples` seeded resamples with replacement."""
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return [round(means[int(0.025 * (resamples - 1))], 4), round(means[int(round(0.975 * (resamples - 1)))], 4)]


def summary(trained: list[float], base: list[float], resamples: int, seed: int) -> dict:
    """Means with intervals for both models and the paired difference (trained - base) with its interval."""
    diff = [t - b for t, b in zip(trained, base, strict=True)]

    def stat(xs: list[float]) -> dict:
        return {"rougeL": round(statistics.fmean(xs), 4) if xs else None, "ci95": bootstrap_ci(xs, resamples, seed)}

    return {
        "n": len(diff),
        "backward": stat(trained),
        "base": stat(base),
        "difference": {
            "mean": round(statistics.fmean(diff), 4) if diff else None,
            "ci95": bootstrap_ci(diff, resamples, seed),
            "backward_better": sum(d > 0 for d in diff),
            "base_better": sum(d < 0 for d in diff),
            "ties": sum(d == 0 for d in diff),
        },
    }


def reversed_sources(run_cfg: sft.RunConfig) -> list[tuple[str, str | None]]:
    """(path, template) of every reversed source of a run, in order, once each."""
    out: list[tuple[str, str | None]] = []
    for ph in run_cfg.phases:
        for s in ph.sources:
            key = (s.path, s.template or None)
            if s.reverse and key not in out:
                out.append(key)
    return out


def evaluate(
    run_cfg: sft.RunConfig, model_dir: str, fraction: float, cfg: sft.HeldoutEvalConfig, system: str | None = None
) -> tuple[dict, list]:
    """`heldout_instruction` metrics of a trained backward model against its base; and every scored example."""
    import time

    t0 = time.perf_counter()
    pairs = heldout_pairs(reversed_sources(run_cfg), fraction, cfg.max_examples)
    trained = predict(model_dir, pairs, cfg.max_new_tokens, cfg.batch_size, system, cfg.dtype)
    base = predict(run_cfg.base, pairs, cfg.max_new_tokens, cfg.batch_size, system, cfg.dtype)
    refs = [p["instruction"] for p in pairs]
    s_trained = rouge_l(refs, [t for t, _ in trained])
    s_base = rouge_l(refs, [b for b, _ in base])
    out = summary(s_trained, s_base, cfg.bootstrap, cfg.seed)
    out["backward"]["truncated"] = sum(f == "length" for _, f in trained)
    out["base"]["truncated"] = sum(f == "length" for _, f in base)
    out.update(max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype, seconds=round(time.perf_counter() - t0, 2))
    examples = [
        {
            "id": p["id"],
            "true": p["instruction"],
            "backward": t,
            "base": b,
            "rougeL_backward": round(st, 4),
            "rougeL_base": round(sb, 4),
        }
        for p, (t, _), (b, _), st, sb in zip(pairs, trained, base, s_trained, s_base, strict=True)
    ]
    return out, examples

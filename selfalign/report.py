"""The evaluation report: report.md (setup, summary with intervals, win rates with verdicts, per-category
tables, answers side by side) and its PNG plots, rendered from the metrics selfalign/evaluate.py computes.

Nothing here measures: every number comes from `metrics` (evaluate.model_metrics, evaluate.win_rates,
evaluate.perplexity) or the answer rows; this module only formats them. A value without an interval is
shown as "–" rather than invented.
"""

from __future__ import annotations

from pathlib import Path

from selfalign import io
from selfalign.evaluate import CATEGORIES, NO_DIFFERENCE, TITLES

PLUMBING_NOTE = (
    "**Read this first.** With the default base model (SmolLM2-135M-Instruct, 135M parameters, fine-tuned for "
    "minutes on a CPU from a few hundred examples) this report tests the plumbing: every stage ran, and every "
    "metric was computed for every model. The numbers say **nothing** about the quality of the method or of the "
    "models. Quality claims need a larger base model, the full data and a stronger judge than a 135M reward model. "
    "Every number carries its bootstrap 95% interval: where two models' intervals overlap, or a win rate's interval "
    "contains 50%, the data cannot tell them apart."
)


def setup(
    cfg,
    dirs: dict[str, str],
    *,
    reward_model: str,
    prompts_path: str,
    n_prompts: int,
    n_chosen: int,
    n_judged: int,
    judge_name: str,
    heldout_path: str,
    eval_fraction: float,
    n_references: int,
    teacher: str | None = None,
) -> dict[str, str]:
    """The report's Setup section, one line per item: what was evaluated, on what, judged how (cfg: EvaluateConfig)."""
    out = {
        "models": ", ".join(f"`{m}` ({d})" for m, d in dirs.items()),
        "reward model": f"{reward_model}: the reward model PPO optimised, so its scores are not independent of ppo",
        "prompts": f"{n_chosen} of {n_prompts} in {prompts_path} ({cfg.prompts_per_category} per "
        f"category and language: {', '.join(cfg.languages)}); {n_judged} judged",
        "generation": f"greedy, at most {cfg.max_new_tokens} new tokens",
        "judge": judge_name,
        "intervals": f"percentile bootstrap, 95%, {cfg.bootstrap_resamples} resamples, seed {cfg.seed}",
        "perplexity": f"last assistant turn of up to {cfg.heldout_max} held-out seed records "
        f"(eval_fraction {eval_fraction}) from {heldout_path}, and of the "
        f"{n_references} reference answers of the evaluated prompts",
    }
    if teacher:
        out["distillation teacher"] = teacher
    return out


def _fmt(x, pct=False):
    if x is None:
        return "–"
    return f"{100 * x:.0f}%" if pct else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _ci(e: dict | None, pct: bool = False, key: str = "mean") -> str:
    """ "value [low–high]" of an estimate (or a tally with key="win_rate")."""
    if not e or e.get(key) is None:
        return "–"
    ci = e.get("ci")
    return _fmt(e[key], pct) + (f" [{_fmt(ci[0], pct)}–{_fmt(ci[1], pct)}]" if ci else "")


def _quote(text: str) -> str:
    text = text.strip() or "(empty)"
    return "\n".join("> " + line if line.strip() else ">" for line in text.splitlines())


def _pair_words(pair: str, e: dict) -> str:
    b, _, a = pair.partition("_vs_")
    v = e.get("verdict")
    if v is None:
        return "not judged"
    return NO_DIFFERENCE if v == NO_DIFFERENCE else f"**{b} {v}** than {a}"


def render_report(metrics: dict, answers: list[dict], models: list[str], plots: list[str], setup: dict) -> str:
    """report.md: the caveat, a summary with intervals, win rates with verdicts, per-category tables, plots, answers."""
    M = metrics["models"]
    lines = ["# Evaluation report", "", PLUMBING_NOTE, "", "## Setup", ""]
    lines += [f"- {k}: {v}" for k, v in setup.items()]
    lines += [
        "",
        "## Summary",
        "",
        "Each cell is the value and its bootstrap 95% interval [low–high] over prompts (perplexity: over "
        "conversations). Reference-based and held out: answer-key match, ROUGE-L F1 against the reference "
        "answers, perplexity of the held-out seed responses and of the reference answers. `stops` is the share "
        "of answers that ended with the end-of-turn token rather than at the token cap; `loops` the share cut "
        "at the cap while repeating itself (no larger cap would let those stop).",
        "",
        "| model | params | stops | loops | answer match | ROUGE-L vs reference | perplexity (held-out seed) "
        "| perplexity (references) | reward | tokens | refusals (safety) | refusals (other) |",
        "|" + "---|" * 12,
    ]
    for m in models:
        mm = M[m]
        lines.append(
            f"| {m} | {_fmt(mm.get('params'))} | {_ci(mm['stop_rate']['all'], True)} "
            f"| {_ci(mm['loop_rate'], True)} "
            f"| {_ci(mm['answer_match'].get('all'), True)} | {_ci(mm['reference_rouge'].get('all'))} "
            f"| {_ci(mm['perplexity'], key='perplexity')} "
            f"| {_ci(mm.get('reference_perplexity'), key='perplexity')} | {_ci(mm['reward']['all'])} "
            f"| {_ci(mm['length_tokens']['all'])} | {_ci(mm['refusal_rate']['safety'], True)} "
            f"| {_ci(mm['refusal_rate']['other'], True)} |"
        )
    W = metrics["win_rate"]
    if W:
        lines += [
            "",
            "## Pairwise win rates",
            "",
            f"Judge: {setup.get('judge', '?')}. Each pair is judged on every prompt in both orders; ties count "
            "half. The interval resamples prompts. A pair whose interval contains 50% is marked "
            f"**{NO_DIFFERENCE}**: on these prompts the judge cannot tell the two models apart. `consistent` "
            "is the share of prompts where both orders agree.",
            "",
            "| pair | win rate | verdict | judged | unparsed | consistent |",
            "|---|---|---|---|---|---|",
        ]
        for pair, e in W.items():
            a = e["all"]
            lines.append(
                f"| {pair.replace('_vs_', ' vs ')} | {_ci(a, True, 'win_rate')} | {_pair_words(pair, a)} "
                f"| {a['judgments'] - a['unparsed']} of {a['judgments']} | {a['unparsed']} "
                f"| {_fmt(a['consistent'], True)} |"
            )
    cats = [c for c in CATEGORIES if any(a["category"] == c for a in answers)]
    for title, field, pct in (
        ("Stops at end-of-turn", "stop_rate", True),
        ("Answer match (prompts with an answer key)", "answer_match", True),
        ("ROUGE-L F1 against the reference answer", "reference_rouge", False),
        ("Reward-model score", "reward", False),
        ("Response length (tokens)", "length_tokens", False),
    ):
        langs = sorted({a["lang"] for a in answers})
        shown = [c for c in cats + langs if any(c in M[m][field] for m in models)]
        if not shown:
            continue
        lines += [
            "",
            f"### {title} by category and language",
            "",
            "| group | " + " | ".join(models) + " |",
            "|" + "---|" * (len(models) + 1),
        ]
        lines += [
            f"| {TITLES[c] + f' (`{c}`)' if c in TITLES else f'`{c}`'} | "
            + " | ".join(_ci(M[m][field].get(c), pct) for m in models)
            + " |"
            for c in shown
        ]
    if W:
        wcats = [c for c in cats if any(c in e for e in W.values())]
        lines += [
            "",
            "### Pairwise win rate by category",
            "",
            f"A cell marked ≈ is {NO_DIFFERENCE} (its interval contains 50%).",
            "",
            "| pair | " + " | ".join(wcats) + " |",
            "|" + "---|" * (len(wcats) + 1),
        ]
        for pair, e in W.items():
            lines.append(
                f"| {pair.replace('_vs_', ' vs ')} | "
                + " | ".join(
                    "–"
                    if c not in e
                    else _fmt(e[c]["win_rate"], True) + (" ≈" if e[c]["verdict"] == NO_DIFFERENCE else "")
                    for c in wcats
                )
                + " |"
            )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "## Answers side by side", ""]
    by_prompt: dict[str, dict[str, dict]] = {}
    for a in answers:
        by_prompt.setdefault(f"{a['id']}/{a['lang']}", {})[a["model"]] = a
    for c in cats:
        lines += [f"### {TITLES[c]} (`{c}`)", ""]
        for per_model in by_prompt.values():
            first = next(iter(per_model.values()))
            if first["category"] != c:
                continue
            lines += [f"***User*** ({first['lang']}):", "", _quote(first["prompt"]), ""]
            for m in models:
                a = per_model.get(m)
                if a is None:
                    continue
                if not a["ok"]:
                    lines += [f"***{m}***: generation failed: {a['error']}", ""]
                    continue
                tags = [
                    f"reward {_fmt(a['reward'])}",
                    f"{a['tokens']} tokens"
                    + ("" if a["stopped"] else (", looping at the cap" if a["loop"] else ", cut at the cap")),
                ]
                tags += [] if a["reference_rouge"] is None else [f"ROUGE-L {_fmt(a['reference_rouge'])}"]
                tags += ["refusal"] if a["refusal"] else []
                tags += [] if a["answer_match"] is None else ["answer ✓" if a["answer_match"] else "answer ✗"]
                lines += [f"***{m}*** ({', '.join(tags)}):", "", _quote(a["response"]), ""]
            lines += ["---", ""]
    return "\n".join(lines) + "\n"


def write_plots(out_dir: str | Path, metrics: dict, models: list[str]) -> list[str]:
    """Bar charts with 95% error bars: reward, ROUGE-L and length per category, stop rate, win rates; the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    M = metrics["models"]
    written = []

    def bars(name, title, ylabel, groups, series, key="mean", line=None):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(series)) / 2), 3.6))
        width = 0.8 / max(1, len(series))
        for i, (label, ests) in enumerate(series.items()):
            xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
            vals = [e[key] if e and e.get(key) is not None else 0.0 for e in ests]
            err = [
                [max(0.0, v - e["ci"][0]) if e and e.get("ci") else 0.0 for v, e in zip(vals, ests, strict=True)],
                [max(0.0, e["ci"][1] - v) if e and e.get("ci") else 0.0 for v, e in zip(vals, ests, strict=True)],
            ]
            ax.bar(xs, vals, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(range(len(groups)), groups, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.axhline(0, color="black", linewidth=0.5)
        if line is not None:
            ax.axhline(line, color="grey", linewidth=0.8, linestyle="--")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        written.append(str(path))

    def groups_of(field):
        return ["all"] + [c for c in CATEGORIES if any(c in M[m][field] for m in models)]

    for name, title, ylabel, field in (
        ("reward_by_category", "Reward-model score (mean, 95% CI)", "score", "reward"),
        ("rouge_by_category", "ROUGE-L F1 vs reference (mean, 95% CI)", "ROUGE-L", "reference_rouge"),
        ("length_by_category", "Response length (mean tokens, 95% CI)", "tokens", "length_tokens"),
        ("stop_rate_by_category", "Stops at end-of-turn (share, 95% CI)", "share", "stop_rate"),
    ):
        if any(M[m][field] for m in models):
            g = groups_of(field)
            bars(name, title, ylabel, g, {m: [M[m][field].get(x) for x in g] for m in models})
    if metrics["win_rate"]:
        wgroups = ["all"] + [c for c in CATEGORIES if any(c in e for e in metrics["win_rate"].values())]
        bars(
            "win_rate",
            "Pairwise win rate (both orders, ties half, 95% CI)",
            "win rate",
            wgroups,
            {p.replace("_vs_", " vs "): [e.get(g) for g in wgroups] for p, e in metrics["win_rate"].items()},
            key="win_rate",
            line=0.5,
        )
    return written

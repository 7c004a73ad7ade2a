"""The backward model's held-out instruction prediction: scoring, bootstrap intervals, and the sft stage's metric."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from stage_loader import load_stage

from selfalign import backward, sft

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures" / "sft"
SEED = str(FIX / "seed.jsonl")
TEMPLATE = str(ROOT / "prompts" / "backward.txt")


# ---------------------------------------------------------------- scoring


def test_rouge_l_is_the_f1_of_the_longest_common_subsequence():
    ref = "How many days until christmas?"
    scores = backward.rouge_l([ref, ref, ref, ref], [ref, "How many days are left until Christmas?", "Bake a cake", ""])
    assert scores[0] == 1.0
    # LCS "how many days until christmas" = 5 tokens; precision 5/7, recall 5/5 -> F1 = 2*5/(7+5)
    assert scores[1] == pytest.approx(10 / 12)
    assert scores[2] == 0.0 and scores[3] == 0.0
    # stemming: "asks" and "asked" count as the same word
    assert backward.rouge_l(["she asks"], ["she asked"]) == [1.0]


def test_bootstrap_interval_holds_the_mean_is_seeded_and_collapses_on_constant_values():
    xs = [0.1, 0.9, 0.3, 0.5, 0.2, 0.7, 0.4, 0.6]
    lo, hi = backward.bootstrap_ci(xs, 1000, seed=0)
    assert lo < statistics.fmean(xs) < hi and 0.1 <= lo and hi <= 0.9
    assert backward.bootstrap_ci(xs, 1000, seed=0) == [lo, hi]
    assert backward.bootstrap_ci([0.25] * 5, 200, seed=3) == [0.25, 0.25]
    assert backward.bootstrap_ci([], 100, seed=0) is None
    wide = backward.bootstrap_ci(xs[:3], 1000, seed=0)
    assert wide[1] - wide[0] > hi - lo  # fewer pairs, wider interval


def test_summary_difference_is_paired():
    trained = [0.5, 0.4, 0.3, 0.2]
    base = [0.4, 0.3, 0.2, 0.3]  # the trained model is ahead on three pairs by 0.1, behind on one by 0.1
    s = backward.summary(trained, base, 500, seed=0)
    assert s["n"] == 4
    assert s["backward"]["rougeL"] == pytest.approx(0.35) and s["base"]["rougeL"] == pytest.approx(0.3)
    assert s["difference"]["mean"] == pytest.approx(0.05)
    assert (s["difference"]["backward_better"], s["difference"]["base_better"], s["difference"]["ties"]) == (3, 1, 0)
    # the paired interval only sees the differences (+-0.1), much narrower than the spread of either model
    lo, hi = s["difference"]["ci95"]
    assert -0.1 <= lo <= 0.05 <= hi <= 0.1


# ---------------------------------------------------------------- held-out pairs


def test_heldout_pairs_are_the_pairs_sft_holds_out_in_the_backward_wording():
    pairs = backward.heldout_pairs([(SEED, TEMPLATE)], 0.2, max_examples=32)
    recs = [json.loads(line) for line in Path(SEED).read_text().splitlines()]
    held = sorted(r["id"] for r in recs if sft.heldout(r["id"], 0.2))
    assert held and [p["id"] for p in pairs] == held
    by_id = {r["id"]: r for r in recs}
    template = Path(TEMPLATE).read_text().strip()
    for p in pairs:
        r = by_id[p["id"]]
        assert p["instruction"] == r["messages"][0]["content"]
        assert p["user"] == template.replace("{response}", r["messages"][1]["content"])
    assert backward.heldout_pairs([(SEED, TEMPLATE)], 0.2, max_examples=1) == pairs[:1]
    assert backward.heldout_pairs([(SEED, None)], 0.2, 32)[0]["user"] == pairs[0]["response"]


def test_reversed_sources_names_each_reversed_file_once():
    run = sft.RunConfig.from_dict(
        {
            "phases": [
                {
                    "sources": [
                        {"path": "a", "reverse": True, "template": "t"},
                        {"path": "b", "reverse": False, "template": ""},
                    ]
                },
                {"sources": [{"path": "a", "reverse": True, "template": "t"}]},
            ]
        },
        "run",
    )
    assert backward.reversed_sources(run) == [("a", "t")]


# ---------------------------------------------------------------- the sft stage


def test_sft_backward_run_writes_heldout_instruction(tmp_path, tiny_model_copy, one_torch_thread):
    runs = {
        "backward": {
            "base": str(tiny_model_copy),
            "inference_tag": None,
            "phases": [{"sources": [{"path": SEED, "reverse": True, "template": TEMPLATE}], "max_steps": 2}],
        },
        "m0": {
            "base": str(tiny_model_copy),
            "inference_tag": None,
            "phases": [{"sources": [{"path": SEED}], "max_steps": 1}],
        },
    }
    train = {
        "max_len": 192,
        "batch_size": 2,
        "lr": 1.0e-3,
        "eval_steps": 100,
        "eval_fraction": 0.2,
        "eval_max_examples": 2,
        "precision": "fp32",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "heldout_eval": {"max_new_tokens": 8, "bootstrap": 200, "dtype": "fp32"},
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"sft": {"train": train, "system_tags": {}, "runs": runs}}))
    n_held = sum(sft.heldout(json.loads(x)["id"], 0.2) for x in Path(SEED).read_text().splitlines())
    metrics = {}
    for run in ("backward", "m0"):
        out = tmp_path / run
        args = [
            "--params",
            str(p),
            "--run",
            run,
            "--input",
            str(tiny_model_copy),
            "--input",
            SEED,
            "--input",
            TEMPLATE,
            "--output",
            str(out / "model"),
            "--checkpoints",
            str(out / "ckpt"),
            "--rejected",
            str(out / "rejected.jsonl"),
            "--metrics",
            str(out / "metrics.json"),
            "--plots",
            str(out / "plots"),
        ]
        res = CliRunner().invoke(load_stage("sft").main, args)
        assert res.exit_code == 0, res.output + repr(res.exception)
        metrics[run] = json.loads((out / "metrics.json").read_text())
    h = metrics["backward"]["heldout_instruction"]
    assert h["n"] == n_held > 0 and h["max_new_tokens"] == 8 and h["dtype"] == "fp32"
    for who in ("backward", "base"):
        assert 0.0 <= h[who]["rougeL"] <= 1.0 and 0 <= h[who]["truncated"] <= n_held
        lo, hi = h[who]["ci95"]
        assert lo <= h[who]["rougeL"] <= hi
    d = h["difference"]
    assert d["mean"] == pytest.approx(h["backward"]["rougeL"] - h["base"]["rougeL"], abs=2e-4)
    assert d["backward_better"] + d["base_better"] + d["ties"] == n_held
    assert "heldout_instruction" not in metrics["m0"]  # a forward run predicts no instructions

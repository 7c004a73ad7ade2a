"""Reward stage: pair building, the held-out split, scoring, and a CliRunner smoke test that learns."""

import json
import random
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import io, params, records
from selfalign import reward as rm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reward"

TOPICS = [
    "the sea",
    "bread",
    "rain",
    "a cat",
    "the moon",
    "tea",
    "a river",
    "winter",
    "a garden",
    "music",
    "a train",
    "mountains",
    "coffee",
    "the wind",
    "a library",
    "stars",
]


def obvious_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen answers are on topic; rejected answers are always the same off-topic sentence."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        q = f"Tell me something about {topic} ({i})."
        good = f"Here is a fact about {topic}: it is worth a closer look, number {i}."
        out.append(
            records.make(
                "preference",
                prompt=q,
                chosen=good,
                rejected="I like turtles.",
                lang="en",
                source=rng.choice(["kochatgpt-ranking", "orca-dpo"]),
            )
        )
    return out


def test_split_is_deterministic_and_near_the_fraction():
    ids = [records.make("web", text=str(i), lang="en", source="s")["id"] for i in range(2000)]
    first = [rm.in_fraction(i, 0.1, "x") for i in ids]
    assert first == [rm.in_fraction(i, 0.1, "x") for i in ids]
    assert 150 < sum(first) < 250
    assert first != [rm.in_fraction(i, 0.1, "y") for i in ids]  # salted: independent splits
    assert all(rm.in_fraction(i, 1.0, "x") for i in ids) and not any(rm.in_fraction(i, 0.0, "x") for i in ids)


def test_select_pairs_counts_every_record():
    pairs = obvious_pairs(10)
    same = records.make("preference", prompt="q", chosen="x", rejected="x", lang="en", source="orca-dpo")
    recs = pairs + [pairs[0], same]
    kept, dropped = rm.select_pairs(recs, ["orca*"])
    assert dropped["duplicate"] + dropped["no_preference"] + dropped["source_not_listed"] + len(kept) == len(recs)
    assert all(p["source"] == "orca-dpo" for p in kept) and dropped["no_preference"] == 1
    kept_all, dropped_all = rm.select_pairs(recs, "all")
    assert len(kept_all) == 10 and dropped_all == {"duplicate": 1, "no_preference": 1}


def french(pair: dict) -> dict:
    """A translation as selfalign.translate writes it: the original's id, another lang."""
    return {
        **pair,
        "prompt": "FR " + pair["prompt"],
        "chosen": "FR " + pair["chosen"],
        "rejected": "FR " + pair["rejected"],
        "lang": "fr",
        "meta": {"translated_from": "en"},
    }


def test_select_pairs_keys_on_id_and_lang():
    """A translation keeps its original's id; it is a pair of its own, not a duplicate."""
    pairs = obvious_pairs(6)
    recs = pairs + [french(p) for p in pairs[:4]] + [pairs[1], french(pairs[2])]
    kept, dropped = rm.select_pairs(recs, "all")
    assert len(kept) == 10 and dropped == {"duplicate": 2}
    assert sum(p["lang"] == "fr" for p in kept) == 4


def test_wilson_interval_matches_newcombe():
    """Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (score interval without correction)."""
    for (k, n), (lo, hi) in {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }.items():
        assert rm.wilson_interval(k, n) == pytest.approx((lo, hi), abs=6e-5)
    # on 64 held-out pairs the lower bound clears chance from 40 right (0.625) on, not at 39
    assert rm.wilson_interval(40, 64)[0] > 0.5 > rm.wilson_interval(39, 64)[0]
    m = rm.pairwise_metrics([1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 1.0, 5.0])  # 2 right, 1 wrong, 1 tie (not right)
    assert m["accuracy"] == 0.5 and m["pairs"] == 4 and m["ci95"] == pytest.approx(list(rm.wilson_interval(2, 4)))
    assert m["ci95"][0] < 0.5 < m["ci95"][1]


def test_split_holds_out_whole_ids_until_the_count():
    pairs = obvious_pairs(200)
    train, held = rm.split_heldout(pairs, 64)
    assert len(held) == 64 and len(train) == 136
    assert rm.split_heldout(list(reversed(pairs)), 64)[1] == list(reversed(held))  # the same ids, whatever the order
    assert {p["id"] for p in rm.split_heldout(pairs, 32)[1]} < {p["id"] for p in held}  # a smaller count: a subset
    # with translations every language of an id lands on one side, and the count is reached in pairs
    both = pairs + [french(p) for p in pairs[::2]]
    train2, held2 = rm.split_heldout(both, 64)
    assert not {p["id"] for p in train2} & {p["id"] for p in held2}
    assert 64 <= len(held2) <= 65 and len(train2) + len(held2) == len(both)
    assert {(p["id"], p["lang"]) for p in held2} >= {(p["id"], "fr") for p in held2 if p in pairs[::2]}
    # never more than half: training keeps the rest
    few_train, few_held = rm.split_heldout(pairs[:20], 64)
    assert len(few_held) == 10 and len(few_train) == 10
    assert rm.split_heldout(pairs, 0) == (pairs, [])


def test_length_baseline():
    def pair(chosen, rejected):
        return records.make("preference", prompt="q", chosen=chosen, rejected=rejected, lang="en", source="s")

    pairs = [
        pair("a longer answer", "short"),
        pair("short", "a longer answer"),
        pair("same", "size"),
        pair("much longer still", "no"),
    ]
    m = rm.length_baseline(pairs)
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4) and m["pairs"] == 4
    assert m["ci95"][0] < m["accuracy"] < m["ci95"][1]
    assert rm.length_baseline([])["accuracy"] is None


def test_curation_pairs_need_a_shared_instruction_and_a_margin():
    def cand(q, a, s):
        return records.chat(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            lang="en",
            source="curate",
            meta={"score": s},
        )

    scored = [
        cand("q1", "great", 5),
        cand("q1", "poor", 2),
        cand("q1", "okay", 4),  # 5-2 and 4-2 pair; 5-4 too close
        cand("q2", "alone", 5),  # nobody shares q2
        cand("q3", "a", 3),
        cand("q3", "b", 3),
    ]  # same score
    pairs, counts = rm.curation_pairs(scored, margin=2)
    got = sorted((p["chosen"], p["rejected"]) for p in pairs)
    assert got == [("great", "poor"), ("okay", "poor")]
    assert all(p["prompt"] == "q1" and p["kind"] == "preference" for p in pairs)
    assert counts == {"paired": 3, "no_shared_instruction": 1, "scores_too_close": 2}
    assert sum(counts.values()) == len(scored)


def test_score_is_batch_invariant(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from selfalign import chat

    tok = chat.load_tokenizer(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    convs = [list(rm.pair_messages(p)[k]) for p in obvious_pairs(5) for k in (0, 1)]
    one = rm.score(model, tok, convs, batch_size=1)
    many = rm.score(model, tok, convs, batch_size=4)
    assert len(one) == 10 and one == pytest.approx(many, abs=1e-5)
    assert len(set(round(x, 6) for x in one)) > 2  # the scores depend on the text
    rm.check_pooling(tok)


def test_encode_cuts_from_the_left(tiny_model_dir):
    from selfalign import chat

    tok = chat.load_tokenizer(tiny_model_dir)
    conv = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "the end"}]
    ids, cut = rm.encode(tok, conv, 32)
    assert cut and len(ids) == 32
    assert tok.decode(ids).endswith("the end<|im_end|>\n")


def test_reward_stage_learns_an_obvious_preference(tiny_model_dir, tmp_path):
    stage = load_stage("reward")
    pref = tmp_path / "preference.jsonl"
    real = io.load_jsonl(FIXTURES / "preference.jsonl")  # real MYChatGPT and Orca-style text, long and multilingual
    obvious = obvious_pairs(64)
    io.write_jsonl(pref, obvious + [french(p) for p in obvious[:8]] + real)
    out, metrics = tmp_path / "reward", tmp_path / "metrics" / "reward.json"
    args = [
        "--preference",
        str(pref),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(out),
        "--metrics",
        str(metrics),
        "--set",
        "sources=[kochatgpt*, orca*]",
        "--set",
        "heldout_pairs=20",
        "--set",
        "epochs=1",
        "--set",
        "lr=5e-3",
        "--set",
        "lora.r=0",
        "--set",
        "max_len=64",
        "--set",
        "batch_size=8",
        "--set",
        "backbone=tuned",
        "--set",
        "max_pairs=64",
    ]
    res = CliRunner().invoke(stage.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert m["pairs_in"] == m["pairs_train"] + m["pairs_heldout"] + m["pairs_capped"] + sum(m["pairs_dropped"].values())
    assert m["pairs_dropped"].get("source_not_listed", 0) == sum(r["source"] == "mychatgpt-ranking" for r in real)
    assert m["pairs_dropped"].get("duplicate", 0) == 0  # the French copies are pairs of their own
    # the keys every filtering stage writes: records in = kept (train + held out) + rejected, each under its reason
    assert m["records_in"] == m["pairs_in"] == m["kept"] + m["rejected"]
    assert m["kept"] == m["pairs_train"] + m["pairs_heldout"]
    assert m["rejected_by_reason"] == {
        k: v for k, v in sorted({**m["pairs_dropped"], "capped": m["pairs_capped"]}.items()) if v
    }
    assert 20 <= m["pairs_heldout"] <= 21
    assert m["heldout_accuracy"] >= 0.8, m  # chance is 0.5
    lo, hi = m["heldout_ci95"]
    assert lo < m["heldout_accuracy"] <= hi and (lo, hi) == pytest.approx(
        rm.wilson_interval(round(m["heldout_accuracy"] * m["pairs_heldout"]), m["pairs_heldout"])
    )
    # the length baseline is "the longer answer wins" on exactly the held-out pairs
    held = rm.split_heldout(rm.select_pairs(io.load_jsonl(pref), ["kochatgpt*", "orca*"])[0], 20)[1]
    assert m["heldout_length_baseline"] == rm.length_baseline(held)["accuracy"]
    assert m["heldout_margin"] > 0 and m["train_loss_last"] < m["train_loss_first"]

    # the output is a plain sequence-classification directory that ranks unseen pairs the same way
    model, tok = rm.load_reward_model(out)
    assert model.config.pad_token_id == tok.pad_token_id and model.config.num_labels == 1
    fresh = obvious_pairs(8, seed=99)
    good = rm.score(model, tok, [rm.pair_messages(p)[0] for p in fresh])
    bad = rm.score(model, tok, [rm.pair_messages(p)[1] for p in fresh])
    assert sum(g > b for g, b in zip(good, bad, strict=True)) >= 6


def test_reward_stage_errors_name_file_line_and_field(tiny_model_dir, tmp_path):
    stage = load_stage("reward")
    pref = tmp_path / "preference.jsonl"
    bad = obvious_pairs(3)
    del bad[1]["chosen"]
    io.write_jsonl(pref, bad)
    res = CliRunner().invoke(
        stage.main,
        [
            "--preference",
            str(pref),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(tmp_path / "o"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert res.exit_code != 0
    assert f"{pref}:2:" in res.output and "'chosen'" in res.output


def test_lora_reward_model_is_merged_with_its_head(tiny_model_dir, tmp_path):
    """The default path: LoRA adapter merged, trained score head kept, loads without peft."""
    cfg = rm.RewardConfig().replace(backbone="tuned", batch_size=4, lr=1e-2, max_len=64)
    model, tok, info = rm.train(tiny_model_dir, obvious_pairs(8), cfg, str(tmp_path / "work"))
    assert info["log"] and not hasattr(model, "peft_config")
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded, _ = rm.load_reward_model(tmp_path / "rm")
    convs = [rm.pair_messages(p)[0] for p in obvious_pairs(3)]
    assert rm.score(loaded, tok, convs) == pytest.approx(rm.score(model, tok, convs), abs=1e-5)


def test_frozen_backbone_fits_only_the_head(tiny_model_dir, tmp_path):
    """backbone: frozen: the network's weights stay as loaded, the score head learns the preference."""
    from safetensors.torch import load_file

    stage = load_stage("reward")
    pref = tmp_path / "preference.jsonl"
    io.write_jsonl(pref, obvious_pairs(48))
    out, metrics = tmp_path / "reward", tmp_path / "reward.json"
    res = CliRunner().invoke(
        stage.main,
        [
            "--preference",
            str(pref),
            "--model",
            str(tiny_model_dir),
            "--output",
            str(out),
            "--metrics",
            str(metrics),
            "--set",
            "backbone=frozen",
            "--set",
            "heldout_pairs=16",
            "--set",
            "max_len=64",
            "--set",
            "head_l2=0.01",
            "--set",
            "max_pairs=64",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert m["pairs_train"] == 32 and m["pairs_heldout"] == 16
    assert m["heldout_accuracy"] >= 0.8, m
    assert m["train_loss_last"] < m["train_loss_first"] == pytest.approx(0.693, abs=1e-3)  # log 2 at w = 0
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    tuned = load_file(out / "model.safetensors")
    same = [k for k in base if k in tuned and "embed" not in k]
    assert same and all((tuned[k] == base[k]).all() for k in same)
    assert (tuned["score.weight"] != 0).any()


def test_fit_head_is_bradley_terry():
    """On separable features the head ranks every pair; L2 keeps the weight finite; w = 0 costs log 2."""
    import torch

    g = torch.Generator().manual_seed(0)
    rejected = torch.randn(40, 6, generator=g)
    chosen = rejected + torch.tensor([1.0, 0, 0, 0, 0, 0])  # only dimension 0 tells them apart
    w, (first, last) = rm.fit_head(chosen, rejected, l2=0.01, center=0.0)
    assert first == pytest.approx(0.6931, abs=1e-4) and last < first
    assert ((chosen - rejected) @ w > 0).all() and abs(w[0]) > 5 * w[1:].abs().max()
    w_strong, _ = rm.fit_head(chosen, rejected, l2=1.0, center=0.0)
    assert w_strong.norm() < w.norm()


ROOT = Path(__file__).resolve().parent.parent


def test_reward_config_defaults_are_params_yaml():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["reward"]
    assert rm.RewardConfig.from_dict(section, "reward") == rm.RewardConfig()


def test_reward_lr_written_as_1e_4_is_a_float(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; the config reads it as the number it means."""
    p = tmp_path / "params.yaml"
    p.write_text("reward:\n  lr: 1e-4\n")
    cfg = params.resolve(rm.RewardConfig, p, "reward")
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)


@pytest.mark.parametrize(
    "setting, words",
    [
        ("max_len=0", ["1 <="]),
        ("backbone=half", ["frozen", "tuned"]),
        ("lora.r=-1", ["0 <="]),
        ("batch_size=two", ["an integer"]),
        ("precision=fp16", ["auto", "fp32", "bf16"]),
        ("sources=7", ["all", "list"]),
        ("max_length=64", ["unknown key", "max_len"]),  # renamed max_len (one name for a sequence cap)
    ],
)
def test_reward_rejects_a_bad_setting_before_any_work(tmp_path, setting, words):
    assert_rejected(load_stage("reward").main, bare_args(tmp_path), setting, *words)


def bare_args(tmp_path) -> list[str]:
    """The stage's required options over files that exist (nothing is read before the params are checked)."""
    pref = tmp_path / "preference.jsonl"
    io.write_jsonl(pref, obvious_pairs(2))
    model = tmp_path / "model"
    model.mkdir()
    return ["--preference", str(pref), "--model", str(model), "--output", str(tmp_path / "o"), "--metrics", "m.json"]

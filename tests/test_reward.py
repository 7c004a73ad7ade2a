"""Reward stage: pair building, the held-out split, scoring, and a CliRunner smoke test that learns."""

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from stage_loader import load_stage

from selfalign import io, records
from selfalign import reward as rm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reward"

TOPICS = ["the sea", "bread", "rain", "a cat", "the moon", "tea", "a river", "winter", "a garden", "music",
          "a train", "mountains", "coffee", "the wind", "a library", "stars"]


def obvious_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen answers are on topic; rejected answers are always the same off-topic sentence."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        q = f"Tell me something about {topic} ({i})."
        good = f"Here is a fact about {topic}: it is worth a closer look, number {i}."
        out.append(records.make("preference", prompt=q, chosen=good, rejected="I like turtles.", lang="en",
                                source=rng.choice(["kochatgpt-ranking", "orca-dpo"])))
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


def test_curation_pairs_need_a_shared_instruction_and_a_margin():
    def cand(q, a, s):
        return records.chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}], lang="en",
                            source="curate", meta={"score": s})
    scored = [cand("q1", "great", 5), cand("q1", "poor", 2), cand("q1", "okay", 4),  # 5-2 and 4-2 pair; 5-4 too close
              cand("q2", "alone", 5),                                               # nobody shares q2
              cand("q3", "a", 3), cand("q3", "b", 3)]                                # same score
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
    io.write_jsonl(pref, obvious_pairs(64) + real)
    out, metrics = tmp_path / "reward", tmp_path / "metrics" / "reward.json"
    args = ["--preference", str(pref), "--model", str(tiny_model_dir), "--output", str(out), "--metrics", str(metrics),
            "--set", "sources=[kochatgpt*, orca*]", "--set", "heldout_fraction=0.25", "--set", "epochs=1",
            "--set", "lr=5e-3", "--set", "lora.r=0", "--set", "max_length=64", "--set", "batch_size=8"]
    res = CliRunner().invoke(stage.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(metrics.read_text())
    assert m["pairs_in"] == m["pairs_train"] + m["pairs_heldout"] + m["pairs_capped"] + sum(m["pairs_dropped"].values())
    assert m["pairs_dropped"].get("source_not_listed", 0) == sum(r["source"] == "mychatgpt-ranking" for r in real)
    assert m["pairs_heldout"] >= 10
    assert m["heldout_accuracy"] >= 0.8, m          # chance is 0.5
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
    res = CliRunner().invoke(stage.main, ["--preference", str(pref), "--model", str(tiny_model_dir),
                                          "--output", str(tmp_path / "o"), "--metrics", str(tmp_path / "m.json")])
    assert res.exit_code != 0
    assert f"{pref}:2:" in res.output and "'chosen'" in res.output


def test_lora_reward_model_is_merged_with_its_head(tiny_model_dir, tmp_path):
    """The default path: LoRA adapter merged, trained score head kept, loads without peft."""
    cfg = {**load_stage("reward").DEFAULTS, "batch_size": 4, "lr": 1e-2, "max_length": 64}
    model, tok, info = rm.train(tiny_model_dir, obvious_pairs(8), cfg, str(tmp_path / "work"))
    assert info["log"] and not hasattr(model, "peft_config")
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded, _ = rm.load_reward_model(tmp_path / "rm")
    convs = [rm.pair_messages(p)[0] for p in obvious_pairs(3)]
    assert rm.score(loaded, tok, convs) == pytest.approx(rm.score(model, tok, convs), abs=1e-5)

"""selfalign.dpo and the dpo stage: self-rewarding pairs, tokens from the chat template, a real DPO run on
the tiny model with held-out implicit-reward accuracy, resume after a kill, and `prefer` reaching
evaluate and export."""

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import chat, io, params, records
from selfalign import dpo as D
from selfalign.params import ParamsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent


def scored(instruction, answer, score, system=None, lang="en"):
    return records.chat(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}],
        system=system,
        lang=lang,
        source="augment",
        meta={"score": score},
    )


# --- pairs -----------------------------------------------------------------------------------


def test_self_reward_pairs_take_best_and_worst_answer_of_one_instruction():
    recs = [
        scored("Name a fruit.", "Apple.", 4.5),
        scored("Name a fruit.", "Pear, a fruit.", 3.0),
        scored("Name a fruit.", "Car.", 1.2),  # 3 answers: best vs worst
        scored("Name a fruit.", "Une pomme.", 2.0, lang="fr"),  # another language: own group
        scored("Say hi.", "Hi!", 4.0),
        scored("Say hi.", "Hello!", 3.8),  # too close (gap 0.2 < 0.5)
        scored("Alone.", "Only answer.", 5.0),  # nobody shares its instruction
        scored("Be brief.", "Ok.", 5.0, system="S1"),
        scored("Be brief.", "No.", 1.0, system="S2"),
    ]
    unscored = scored("Name a fruit.", "Kiwi.", 3.0)
    unscored["meta"] = {}
    pairs, counts = D.self_reward_pairs(recs + [unscored], min_gap=0.5)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["prompt"], p["chosen"], p["rejected"]) == ("Name a fruit.", "Apple.", "Car.")
    assert p["kind"] == "preference" and p["source"] == D.SELF_REWARD_SOURCE and p["lang"] == "en"
    assert p["meta"]["scores"] == [4.5, 1.2] and p["meta"]["answers"] == 3
    records.validate(p)
    assert counts == {
        "paired": 2,
        "neither_best_nor_worst": 1,
        "scores_too_close": 2,
        "no_shared_instruction": 4,
        "no_score": 1,
    }
    assert sum(counts.values()) == len(recs) + 1  # every candidate is counted once


def test_self_reward_pairs_skip_equal_answers():
    pairs, counts = D.self_reward_pairs([scored("Q?", "Same.", 5.0), scored("Q?", "Same.", 1.0)], min_gap=0.5)
    assert pairs == [] and counts == {"same_answer": 2}


def test_encode_pair_uses_the_served_prompt_and_ends_answers_at_end_of_turn(tiny_model_dir):
    tok = chat.load_tokenizer(tiny_model_dir)
    pair = records.make(
        "preference", prompt="What is rain?", chosen="Water falling.", rejected="A fish.", lang="en", source="t"
    )
    row = D.encode_pair(tok, pair, "Be helpful.", 128, 128)
    served = chat.render(
        tok,
        [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "What is rain?"}],
        add_generation_prompt=True,
    )
    assert tok.decode(row["prompt_ids"]) == served
    eot = chat.end_of_turn(tok)
    assert tok.decode(row["chosen_ids"]) == "Water falling." + eot  # no trailing newline of the next turn
    assert tok.decode(row["rejected_ids"]) == "A fish." + eot
    assert not row["prompt_cut"] and not row["answer_cut"]
    # the record's own system prompt wins over the model's
    own = D.encode_pair(tok, {**pair, "system": "Mine."}, "Be helpful.", 128, 128)
    assert "Mine." in tok.decode(own["prompt_ids"]) and "Be helpful." not in tok.decode(own["prompt_ids"])
    # cuts: the prompt keeps its end (the assistant header), an answer its start
    cut = D.encode_pair(tok, pair, "Be helpful.", 6, 2)
    assert cut["prompt_ids"] == row["prompt_ids"][-6:] and cut["chosen_ids"] == row["chosen_ids"][:2]
    assert cut["prompt_cut"] and cut["answer_cut"]
    rows, rejected = D.encode_pairs(
        tok,
        [pair, {**pair, "id": "x", "rejected": "Water falling down."}],
        None,
        D.DPOConfig(max_prompt_len=64, max_answer_len=2),
    )
    assert len(rows) == 1 and [r["reason"] for r in rejected] == ["same_after_cut"]


# --- prefer ----------------------------------------------------------------------------------


def test_sequence_logps_equal_a_full_softmax_one_sequence_at_a_time(tiny_model_dir):
    """The batched, left-padded, answer-positions-only log-probs are the textbook sum over each answer's tokens
    of log_softmax(logits) of the unpadded sequence, with the LoRA adapter on and off."""
    import torch
    from peft import LoraConfig, get_peft_model

    from selfalign import models

    torch.manual_seed(0)
    tok = chat.load_tokenizer(tiny_model_dir)
    model = get_peft_model(
        models.load_model(tiny_model_dir, "float32"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for m in model.modules():  # a non-zero adapter, so switching it off changes the numbers
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                torch.nn.init.normal_(b.weight, std=0.5)
    pairs = [
        {"prompt": "Name a colour.", "chosen": "Blue, like the sky.", "rejected": "No."},
        {"prompt": "What is two plus two? Answer in one word.", "chosen": "Four.", "rejected": "It is five or so."},
        {"prompt": "Hi", "chosen": "Hello! How can I help you today?", "rejected": "Go away."},
    ]
    rows = [D.encode_pair(tok, p, None, 64, 64) for p in pairs]

    def textbook(r):
        out = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([r["prompt_ids"] + r[key]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            n = len(r["prompt_ids"])
            out.append(float(sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1]))))
        return tuple(out)

    for adapter_on in (True, False):
        with model.disable_adapter() if not adapter_on else contextlib.nullcontext():
            got = [x for pair in D.sequence_logps(model, rows, tok.pad_token_id, batch_size=4) for x in pair]
            want = [x for r in rows for x in textbook(r)]  # 6 sequences: batches of 4 and 2
        assert got == pytest.approx(want, abs=1e-3)
    on = [x for pair in D.sequence_logps(model, rows, tok.pad_token_id, 4) for x in pair]
    assert on != pytest.approx(got, abs=1e-3)  # got: the adapter off


def test_prefer_expands_for_evaluate_and_picks_for_export(tmp_path):
    assert D.expand_preferred(["base", "final", "preferred"], "dpo") == ["base", "final", "dpo"]
    assert D.expand_preferred(["base", "preferred"], "both") == ["base", "ppo", "dpo"]
    assert D.expand_preferred(["base", "ppo"], "dpo") == ["base", "ppo"]  # an explicit list is left alone
    assert D.exported_model("dpo", None)[0] == "dpo" and D.exported_model("ppo", None)[0] == "ppo"

    def rate(pair, lo, hi):
        return {"win_rate": {pair: {"all": {"win_rate": (lo + hi) / 2, "ci": [lo, hi]}}}}

    assert D.exported_model("both", rate("dpo_vs_ppo", 0.6, 0.9))[0] == "dpo"
    assert D.exported_model("both", rate("dpo_vs_ppo", 0.1, 0.4))[0] == "ppo"
    assert D.exported_model("both", rate("ppo_vs_dpo", 0.1, 0.3))[0] == "dpo"
    name, why = D.exported_model("both", rate("dpo_vs_ppo", 0.4, 0.7))
    assert name == "ppo" and "no measurable difference" in why
    assert D.exported_model("both", None)[0] == "ppo"
    p = tmp_path / "params.yaml"
    p.write_text("prefer: dpo\n")
    assert D.read_prefer(p) == "dpo" and D.read_prefer(None) == "ppo"
    p.write_text("prefer: grpo\n")
    with pytest.raises(ParamsError, match="prefer: 'grpo' is not one of ppo | dpo | both"):
        D.read_prefer(p)


def test_prefer_reaches_export(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    for name in ("ppo", "dpo"):
        shutil.copytree(tiny_model_dir, f"models/{name}")
        (Path("models") / name / "selfalign.json").write_text(json.dumps({"system": f"I am {name}."}))
    Path("params.yaml").write_text("prefer: dpo\nexport: {model: preferred}\n")
    args = [
        "--params",
        "params.yaml",
        "--model",
        "ppo=models/ppo",
        "--model",
        "dpo=models/dpo",
        "--output",
        "models/export",
        "--metrics",
        "m.json",
        "--lock",
        "none.lock",
    ]
    res = CliRunner().invoke(load_stage("export").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads(Path("m.json").read_text())
    assert m["model"] == "dpo" and m["source"] == "models/dpo" and m["model_choice"] == "prefer: dpo"
    assert json.loads(Path("models/export/selfalign.json").read_text())["system"] == "I am dpo."
    # both: the evaluation decides
    Path("params.yaml").write_text("prefer: both\nexport: {}\n")
    Path("evaluate.json").write_text(
        json.dumps({"win_rate": {"dpo_vs_ppo": {"all": {"win_rate": 0.2, "ci": [0.1, 0.3]}}}})
    )
    res = CliRunner().invoke(load_stage("export").main, args + ["--evaluation", "evaluate.json"])
    assert res.exit_code == 0, res.output
    assert json.loads(Path("m.json").read_text())["model"] == "ppo"
    # a preferred model that no --model gives is an error, not a silent fallback
    Path("params.yaml").write_text("prefer: dpo\nexport: {}\n")
    res = CliRunner().invoke(load_stage("export").main, args[:4] + args[6:])
    assert res.exit_code != 0 and "no --model dpo=DIR" in res.output


def test_prefer_reaches_evaluate(tmp_path, tiny_model_dir):
    p = tmp_path / "params.yaml"
    p.write_text("prefer: both\nevaluate: {}\nsft: {train: {eval_fraction: 0.1}}\n")
    given = [
        "--model",
        f"base={tiny_model_dir}",
        "--model",
        f"m0={tiny_model_dir}",
        "--model",
        f"final={tiny_model_dir}",
        "--model",
        f"ppo={tiny_model_dir}",
    ]
    common = [
        "--params",
        str(p),
        "--reward-model",
        str(tiny_model_dir),
        "--prompts",
        str(p),
        "--heldout",
        str(p),
        "--judge-prompt",
        str(p),
        "--cache",
        str(tmp_path / "c"),
        "--output-dir",
        str(tmp_path / "o"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]
    res = CliRunner().invoke(load_stage("evaluate").main, given + common)
    assert res.exit_code != 0 and "evaluate.models lists dpo but no --model NAME=DIR" in res.output
    stage = load_stage("evaluate")
    from selfalign.evaluate import EvaluateConfig

    wanted = D.expand_preferred(EvaluateConfig().models, D.read_prefer(p))
    dirs = stage.parse_models(tuple(given[1::2]) + (f"dpo={tiny_model_dir}",), wanted)
    assert list(dirs) == ["base", "final", "ppo", "dpo"]  # m0 given (as dvc.yaml does) but not in evaluate.models


# --- the stage -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """Preference pairs a tiny model can learn (a fixed good answer vs a fixed bad one), a broken one,
    and a scored curation round with two instructions answered twice."""
    d = tmp_path_factory.mktemp("dpo_inputs")
    prefs = [
        records.make(
            "preference",
            prompt=f"Question {i}?",
            chosen="Yes, gladly.",
            rejected="no no no no",
            lang="en",
            source="orca",
        )
        for i in range(24)
    ]
    prefs.append(records.make("preference", prompt="Same?", chosen="Same.", rejected="Same.", lang="en", source="orca"))
    prefs.append(dict(prefs[0]))  # the same (id, lang) again
    io.write_jsonl(d / "preference.jsonl", prefs)
    cands = [
        scored("Tell me a colour.", "Blue.", 4.0),
        scored("Tell me a colour.", "Dog dog.", 1.5),
        scored("Count to two.", "One, two.", 3.9),
        scored("Count to two.", "Five.", 2.0),
        scored("Alone here.", "Ok.", 3.0),
    ]
    (d / "curate" / "iter1").mkdir(parents=True)
    io.write_jsonl(d / "curate" / "iter1" / "scored.jsonl", cands)
    (d / "params.yaml").write_text("dpo: {}\ncurate: {iterations: {iter1: {scorer: m0, trains: m1}}}\n")
    return d


def stage_args(model_dir, inputs, out, *extra):
    return [
        "--params",
        str(inputs / "params.yaml"),
        "--policy",
        str(model_dir),
        "--preference",
        str(inputs / "preference.jsonl"),
        "--scored",
        str(inputs / "curate"),
        "--output",
        str(out / "dpo"),
        "--checkpoints",
        str(out / "ckpt"),
        "--rejected",
        str(out / "rejected.jsonl"),
        "--plots",
        str(out / "plots"),
        "--metrics",
        str(out / "metrics.json"),
        "--set",
        "heldout_pairs=6",
        "--set",
        "max_pairs=16",
        "--set",
        "batch_size=4",
        "--set",
        "lr=2e-3",
        "--set",
        "lora.r=4",
        "--set",
        "self_rewarding=true",
        "--set",
        "precision=fp32",  # the code default before issue 12 made params.yaml's auto the one default
        *extra,
    ]


def test_stage_trains_and_measures_heldout_implicit_reward_accuracy(tiny_model_dir, stage_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    args = stage_args(tiny_model_dir, stage_inputs, tmp_path, "--set", "epochs=2", "--set", "checkpoint_every=0")
    res = CliRunner().invoke(load_stage("dpo").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    # 24 good pairs + 2 self-rewarding; the broken and the repeated record rejected with their reasons
    assert m["pairs_rejected"] == {"no_preference": 1, "duplicate": 1}
    assert m["records_in"] == m["pairs_in"] == m["kept"] + m["rejected"]
    assert m["kept"] == m["pairs_train"] + m["pairs_heldout"]
    assert list(m["rejected_by_reason"]) == sorted(m["rejected_by_reason"])
    assert {k: v for k, v in m["rejected_by_reason"].items() if k != "capped"} == m["pairs_rejected"]
    assert m["pairs_in"] == 26 + 2 == m["pairs_train"] + m["pairs_heldout"] + m["pairs_capped"] + 2
    assert m["pairs_by_source"]["self_rewarding"] == 2 and m["self_rewarding"]["paired"] == 4
    assert m["self_rewarding"]["no_shared_instruction"] == 1 and m["self_rewarding"]["scored_answers"] == 5
    assert m["pairs_heldout"] >= 6 and m["pairs_train"] == 16 and m["steps"] == 8
    # the preference is learnable: held-out pairs (never trained on) are ranked right by the implicit reward
    assert m["heldout_accuracy"] >= 0.8 and m["heldout_margin"] > 0, m
    lo, hi = m["heldout_ci95"]
    assert 0 <= lo < m["heldout_accuracy"] <= hi + 1e-9 and hi <= 1
    assert m["train_loss_last"] < m["train_loss_first"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the start
    rejected = io.load_jsonl(tmp_path / "rejected.jsonl")
    assert sorted(r["reason"] for r in rejected) == ["duplicate", "no_preference"]
    with open(tmp_path / "plots" / "margin.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
    assert (tmp_path / "plots" / "loss.csv").is_file()
    # a merged plain model directory, loadable like models/ppo, with the tokenizer and chat template
    out = tmp_path / "dpo"
    assert not (out / "adapter_config.json").exists() and (out / "chat_template.jinja").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = chat.load_tokenizer(out, padding_side="left")
    ids = tok(chat.render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True), return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    assert json.loads((out / "selfalign.json").read_text())["dpo"]["steps"] == 8


def test_stage_without_scored_file_when_self_rewarding_says_so(tiny_model_dir, stage_inputs, tmp_path):
    args = stage_args(tiny_model_dir, stage_inputs, tmp_path)
    args[args.index("--scored") + 1] = str(tmp_path / "nowhere")
    res = CliRunner().invoke(load_stage("dpo").main, args)
    assert res.exit_code != 0 and "self_rewarding is on but --scored" in res.output


@pytest.mark.slow
def test_stage_killed_after_a_checkpoint_resumes(tiny_model_dir, stage_inputs, tmp_path):
    args = stage_args(tiny_model_dir, stage_inputs, tmp_path, "--set", "epochs=2", "--set", "checkpoint_every=2")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "dpo.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stderr:  # blocks until the stage logs its first checkpoint, then kill it hard
        seen.append(line)
        if "saved checkpoint at step 2" in line:
            proc.kill()
            break
    proc.wait()
    assert any("saved checkpoint at step 2" in s for s in seen), "".join(seen[-20:])
    assert not (tmp_path / "dpo").exists() and not (tmp_path / "metrics.json").exists()

    res = CliRunner().invoke(load_stage("dpo").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert 2 <= m["resumed_from_step"] < 8 and m["steps"] == 8
    with open(tmp_path / "plots" / "loss.csv") as f:  # the resumed run keeps the killed run's log history
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
    assert list((tmp_path / "ckpt").iterdir()) == []  # nothing left to resume after success


# --- params ----------------------------------------------------------------------------------


def test_dpo_config_defaults_are_params_yaml():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["dpo"]
    assert D.DPOConfig.from_dict(section, "dpo") == D.DPOConfig()


def test_dpo_lr_written_as_1e_4_is_a_float(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("dpo:\n  lr: 1e-4\n  beta: 5e-2\n")
    cfg = params.resolve(D.DPOConfig, p, "dpo")
    assert (cfg.lr, cfg.beta) == (1e-4, 5e-2) and isinstance(cfg.lr, float)


def bare_args(tmp_path) -> list[str]:
    """The stage's required options over paths that exist (nothing is read before the params are checked)."""
    pref, model = tmp_path / "preference.jsonl", tmp_path / "model"
    pref.write_text("")
    model.mkdir()
    return [
        *("--policy", str(model), "--preference", str(pref), "--output", "o", "--checkpoints", "c"),
        *("--rejected", "r.jsonl", "--plots", "p", "--metrics", "m.json"),
    ]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("beta=0", ["0 <"]),
        ("loss_type=7", ["sigmoid", "ipo"]),
        ("max_answer_len=0", ["1 <="]),
        ("warmup_ratio=5", ["<= 1"]),
        ("batch_size=four", ["an integer"]),
        ("precision=float32", ["auto", "fp32", "bf16"]),
        ("scheduler=cosine_annealing", ["constant"]),
        ("max_prompt_tokens=64", ["unknown key", "max_prompt_len"]),  # renamed (one name for a sequence cap)
        ("max_answer_tokens=64", ["unknown key", "max_answer_len"]),
    ],
)
def test_dpo_rejects_a_bad_setting_before_any_work(tmp_path, setting, words):
    assert_rejected(load_stage("dpo").main, bare_args(tmp_path), setting, *words)

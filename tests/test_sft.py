"""SFT: run params, reversal, packing, curriculum order, accounting, smoke runs (LoRA, full) and kill/resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import chat, io, models, params, records, sft

ROOT = Path(__file__).resolve().parent.parent
FIX = Path(__file__).resolve().parent / "fixtures" / "sft"
SEED, AUG = str(FIX / "seed.jsonl"), str(FIX / "augmented.jsonl")
TEMPLATE = str(ROOT / "prompts" / "backward.txt")
TAGS = {"seed": "Answer in the style of an AI Assistant.", "augmented": "Answer with knowledge from web search."}
# max_len 512: 11 of the 12 seed fixture lines fit whole; line 9 (1,785 tokens, a 1,047-token answer) is too_long.
TRAIN = {
    "max_len": 512,
    "batch_size": 2,
    "lr": 1.0e-3,
    "save_steps": 2,
    "eval_steps": 100,
    "eval_fraction": 0.2,
    "eval_max_examples": 2,
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}


def write_params(tmp: Path, base: Path, train: dict | None = None) -> Path:
    runs = {
        "m1": {
            "base": str(base),
            "inference_tag": "seed",
            "phases": [
                {"name": "seed", "sources": [{"path": SEED, "tag": "seed"}], "epochs": 1, "max_steps": 2},
                {
                    "name": "mix",
                    "sources": [{"path": AUG, "tag": "augmented"}, {"path": SEED, "tag": "seed"}],
                    "max_steps": 2,
                },
            ],
        },
        "backward": {
            "base": str(base),
            "inference_tag": None,
            "phases": [{"sources": [{"path": SEED, "reverse": True, "template": TEMPLATE}], "max_steps": 2}],
        },
        "long": {
            "base": str(base),
            "phases": [{"sources": [{"path": SEED, "tag": "seed"}], "epochs": 2, "max_steps": 4}],
        },
    }
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({"sft": {"train": {**TRAIN, **(train or {})}, "system_tags": TAGS, "runs": runs}}))
    return p


def cli_args(params_file: Path, run: str, base: Path, out: Path, inputs=(SEED, AUG, TEMPLATE)) -> list[str]:
    """Outputs go under out/: model, ckpt, rejected.jsonl, metrics.json, plots."""
    args = ["--params", str(params_file), "--run", run, "--input", str(base)]
    for i in inputs:
        args += ["--input", i]
    return args + [
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


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return chat.load_tokenizer(tiny_model_dir)


# ---------------------------------------------------------------- params


def test_run_params_fail_at_start_up(tmp_path, tiny_model_dir):
    p = write_params(tmp_path, tiny_model_dir)
    run = params.resolve(sft.SFTConfig, p, "sft").run("m1")
    assert [ph.name for ph in run.phases] == ["seed", "mix"]
    assert sft.run_inputs(run) == [str(tiny_model_dir), SEED, AUG]
    bad = yaml.safe_load(p.read_text())
    bad["sft"]["runs"]["m1"]["phases"][0]["sources"][0]["tga"] = "seed"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(params.ParamsError, match=r"runs\.m1\.phases\[0\]\.sources\[0\].*'tga'"):
        params.resolve(sft.SFTConfig, p, "sft").run("m1")
    bad["sft"]["runs"]["m1"]["phases"][0]["sources"][0] = {"path": SEED, "tag": "sede"}
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(params.ParamsError, match="'sede' is not in sft.system_tags"):
        params.resolve(sft.SFTConfig, p, "sft").run("m1")
    with pytest.raises(params.ParamsError, match="no run 'm9'"):
        params.resolve(sft.SFTConfig, write_params(tmp_path, tiny_model_dir), "sft").run("m9")


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("train.lr=abc", "a number"),
        ("train.warmup_ratio=5", "<= 1"),
        ("train.method=dpo", "lora | qlora | full"),
        ("train.max_len=0", "1 <="),
        ("train.precision=float32", "auto | fp32 | bf16"),
        ("train.eval_fraction=1", "< 1"),
        ("train.scheduler=cosine_annealing", "cosine"),
        ("train.lora.dropout=1.5", "< 1"),
        ("train.heldout_eval.max_examples=-1", "0 <="),
        ("runs.m0.phases=x", "a list"),
        ("runs.m0.phases=[]", "at least 1"),
        ("nope=1", "known keys: runs, system_tags, train"),
        ("train.lr_rate=1e-4", "sft.train: unknown key"),
        (
            "runs.m0.phases=[{sources: [{path: a.jsonl, tga: seed}]}]",
            "sft.runs.m0.phases[0].sources[0]: unknown key 'tga'",
        ),
    ],
)
def test_a_bad_setting_is_one_line_before_any_work(tmp_path, setting, allowed):
    assert_rejected(load_stage("sft").main, _stage_args(tmp_path), setting, allowed)
    assert not any(tmp_path.iterdir())


def _stage_args(tmp_path: Path) -> list[str]:
    args = ["--params", str(ROOT / "params.yaml"), "--run", "m0"]
    for opt in ("--output", "--checkpoints", "--rejected", "--metrics", "--plots"):
        args += [opt, str(tmp_path / opt.strip("-"))]
    return args


def test_a_bad_phase_entry_names_its_run_phase_and_source(tmp_path, tiny_model_dir):
    def source(run):
        run["phases"][0]["sources"][0]["reverse"] = "yes"

    def epochs(run):
        run["phases"][1]["epochs"] = 0

    def tag(run):
        run["inference_tag"] = "augmentd"

    for where, breaks in [
        ("runs.m1.phases[0].sources[0].reverse", source),
        ("runs.m1.phases[1].epochs", epochs),
        ("runs.m1.inference_tag", tag),
    ]:
        p = write_params(tmp_path, tiny_model_dir)
        bad = yaml.safe_load(p.read_text())
        breaks(bad["sft"]["runs"]["m1"])
        p.write_text(yaml.safe_dump(bad))
        with pytest.raises(params.ParamsError) as e:
            params.resolve(sft.SFTConfig, p, "sft")
        assert str(e.value).startswith(f"sft.{where}: "), (where, str(e.value))


def test_a_yaml_string_lr_is_read_as_a_number(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string: it must arrive as a float, not fail after the model loads."""
    p = tmp_path / "params.yaml"
    p.write_text("sft:\n  train:\n    lr: 1e-4\n    max_grad_norm: 1e0\n")
    assert yaml.safe_load(p.read_text())["sft"]["train"]["lr"] == "1e-4"
    cfg = params.resolve(sft.SFTConfig, p, "sft")
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.max_grad_norm == 1.0
    assert params.resolve(sft.SFTConfig, p, "sft", ["train.lr=3e-5"]).train.lr == 3e-5


def test_every_scheduler_choice_is_one_transformers_builds_without_extra_arguments():
    import typing

    import torch
    from transformers import SchedulerType, get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name in typing.get_args(sft.SCHEDULERS):
        assert get_scheduler(SchedulerType(name), opt, num_warmup_steps=1, num_training_steps=4) is not None


def test_code_defaults_are_the_repo_params():
    """One home per default: sft run by hand without --params trains what the pipeline trains."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["sft"]
    assert sft.SFTConfig.from_dict(data, "sft") == sft.SFTConfig()
    assert params.resolve(sft.SFTConfig, None, "sft") == params.resolve(sft.SFTConfig, ROOT / "params.yaml", "sft")


def test_repo_params_and_dvc_agree_on_every_runs_inputs():
    """Each sft@<run> and sft-iter@<round> stage depends on the files its params name and passes them as --input
    (or --curated, which a "{curated}" source path stands for)."""
    stage = load_stage("sft")
    params_file = ROOT / "params.yaml"
    cfg = params.resolve(sft.SFTConfig, params_file, "sft")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    block, per_round = stages["sft"], stages["sft-iter"]
    assert set(block["foreach"]) | {"iteration"} == set(cfg.runs)

    def covered(path: str, declared: set) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in declared)

    curated = block["do"]["cmd"].split("--curated ")[1].split()[0]  # data/review/kept.jsonl: the reviewed last round
    for run, item in block["foreach"].items():
        run_cfg = stage.fill_curated(cfg.run(run), curated, params_file, run)
        declared = {"models/base"} | {v for k, v in item.items() if k.startswith("in")}
        inputs = sft.run_inputs(run_cfg)
        # Only the run that reads "{curated}" (the last round) depends on the list of rounds.
        reads_curated = any(s.path == sft.CURATED for ph in cfg.run(run).phases for s in ph.sources)
        assert (item["rounds"] == "curate.iterations") == reads_curated, (run, item)
        assert all(covered(p, declared) for p in inputs), (run, inputs, declared)
        assert all(any(covered(p, {d}) for p in inputs) for d in declared), (run, inputs, declared)
        assert "sft.runs.${key}" in block["do"]["params"]
    rounds = yaml.safe_load(params_file.read_text())["curate"]["iterations"]
    assert per_round["foreach"] == "${curate.iterations}" and "sft.runs.iteration" in per_round["do"]["params"]
    for key in rounds:
        kept = f"data/curate/{key}/kept.jsonl"
        run_cfg = stage.fill_curated(cfg.run("iteration"), kept, params_file, key)
        deps = {d.replace("${key}", key) for d in per_round["do"]["deps"]}
        assert set(sft.run_inputs(run_cfg)) <= deps and kept in sft.run_inputs(run_cfg)


def test_undeclared_input_is_refused(tmp_path, tiny_model_dir):
    p = write_params(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(load_stage("sft").main, cli_args(p, "m1", tiny_model_dir, tmp_path, inputs=(SEED,)))
    assert res.exit_code == 2 and f"reads {AUG}" in res.output


# ---------------------------------------------------------------- examples


def test_backward_examples_are_reversed_and_clip_the_response_not_the_instruction(tok):
    rec = records.chat(
        [
            {"role": "user", "content": "Explain tides."},
            {"role": "assistant", "content": "Tides come from the moon. " * 60},
        ],
        lang="en",
        source="t",
    )
    wording = sft.load_template(TEMPLATE)
    msgs = sft.conversation(rec, None, reverse=True, template=wording)
    assert msgs[0]["role"] == "user" and msgs[0]["content"] == wording.replace(
        "{response}", rec["messages"][1]["content"]
    )
    assert msgs[1] == {"role": "assistant", "content": "Explain tides."}
    ex = sft.build_reversed(tok, rec, None, wording, max_len=96)
    assert len(ex["input_ids"]) <= 96 and ex["shortened"]
    target = tok.decode([x for x in ex["labels"] if x != sft.IGNORE])
    assert target == "Explain tides.<|im_end|>"
    assert wording.split("{response}")[0].strip() in tok.decode(ex["input_ids"])
    multi = records.chat(
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        lang="en",
        source="t",
    )
    with pytest.raises(sft.Reject) as e:
        sft.conversation(multi, None, reverse=True)
    assert e.value.reason == "not_single_turn"


def _target(tok, ex) -> str:
    return tok.decode([x for x in ex["labels"] if x != sft.IGNORE])


def test_a_long_conversation_loses_its_oldest_turns_then_the_start_of_its_prompt_never_its_end(tok):
    """The final answer and its <|im_end|> stay whole; the system prompt stays; the prompt side gives way."""
    background = "Some background that matters less than the question. " * 12
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "A helper. " * 20},
        {"role": "user", "content": background + "So: what colour is the sky?"},
        {"role": "assistant", "content": "Blue, on a clear day."},
    ]
    whole = sft.build_example(tok, msgs, 10**6)
    assert not whole["shortened"] and _target(tok, whole).count("<|im_end|>") == 2
    n_last_turn = len(sft.build_example(tok, msgs[:1] + msgs[3:], 10**6)["input_ids"])
    # Room for the last exchange only: the first exchange goes, nothing else changes.
    ex = sft.build_example(tok, msgs, n_last_turn)
    assert ex["shortened"] and ex["input_ids"] == sft.build_example(tok, msgs[:1] + msgs[3:], 10**6)["input_ids"]
    # Less room: the last user turn loses its start; its end (the question) and the answer stay.
    ex = sft.build_example(tok, msgs, n_last_turn - 40)
    text = tok.decode(ex["input_ids"])
    assert ex["shortened"] and len(ex["input_ids"]) <= n_last_turn - 40
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "what colour is the sky?<|im_end|>" in text and "Hello, who are you?" not in text
    assert _target(tok, ex) == "Blue, on a clear day.<|im_end|>"
    assert ex["input_ids"][-1] == ex["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    # No room for the answer with a minimal prompt: dropped with a reason, not cut.
    with pytest.raises(sft.Reject) as e:
        sft.build_example(tok, msgs, 25)
    assert e.value.reason == "too_long" and "max_len=25" in e.value.detail
    # A short prompt is not clipped below what it asks: the example is dropped instead.
    short_q = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because. " * 30}]
    with pytest.raises(sft.Reject, match="too_long"):
        sft.build_example(tok, short_q, len(sft.build_example(tok, short_q, 10**6)["input_ids"]) - 1)


def test_a_reversed_example_too_long_for_its_instruction_is_dropped(tok):
    rec = records.chat(
        [
            {"role": "user", "content": "Explain tides in detail, please. " * 20},
            {"role": "assistant", "content": "Tides come from the moon. " * 60},
        ],
        lang="en",
        source="t",
    )
    wording = sft.load_template(TEMPLATE)
    ex = sft.build_reversed(tok, rec, None, wording, max_len=256)
    assert ex["shortened"] and len(ex["input_ids"]) <= 256
    assert _target(tok, ex) == rec["messages"][0]["content"] + "<|im_end|>"
    with pytest.raises(sft.Reject) as e:
        sft.build_reversed(tok, rec, None, wording, max_len=150)
    assert e.value.reason == "too_long"


def test_no_fixture_example_loses_its_end_at_any_max_len(tok):
    """Every seed line, forward and reversed, at max_len from 64 to 1024: kept whole-ended or too_long, and
    the accounting holds."""
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    wording = sft.load_template(TEMPLATE)
    kept_by_len = {}
    for max_len in (64, 128, 256, 512, 1024):
        for reverse in (False, True):
            data = sft.read_source(tok, SEED, TAGS["seed"], max_len, 0.0, reverse, wording if reverse else None)
            assert data.records_in == 12 == len(data.train) + len(data.rejected)
            assert {r["reason"] for r in data.rejected} <= {"too_long"}
            for ex in data.train:
                assert len(ex["input_ids"]) <= max_len and ex["input_ids"][-1] == ex["labels"][-1] == eot
            kept_by_len[max_len, reverse] = len(data.train)
    assert kept_by_len[512, False] == 11 and kept_by_len[1024, False] == 11 and kept_by_len[64, False] == 0
    assert kept_by_len[256, True] > kept_by_len[256, False]  # a reversed example can give up part of its response


def test_every_line_is_trained_held_out_or_rejected_with_file_and_line(tmp_path, tok):
    lines = Path(SEED).read_text().splitlines()
    good = [json.loads(x) for x in lines[:4]]
    user_last = records.chat([{"role": "user", "content": "hi"}], lang="en", source="t")
    pref = records.make("preference", prompt="p", chosen="c", rejected="r", lang="en", source="t")
    f = tmp_path / "in.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps(good[0]),
                "{not json",
                json.dumps(pref),
                json.dumps(user_last),
                json.dumps({**good[1], "lang": 3}),
            ]
            + [json.dumps(g) for g in good[2:]]
            + [lines[8]]
        )
        + "\n"
    )
    data = sft.read_source(tok, str(f), "sys", max_len=512, eval_fraction=0.0)
    assert data.records_in == 8 == len(data.train) + len(data.eval) + len(data.rejected)
    assert {(r["line"], r["reason"]) for r in data.rejected} == {
        (2, "invalid_json"),
        (3, "not_chat"),
        (4, "no_final_assistant_turn"),
        (5, "invalid_record"),
        (8, "too_long"),
    }
    assert "max_len=512" in next(r["detail"] for r in data.rejected if r["line"] == 8)
    assert all(r["file"] == str(f) for r in data.rejected)
    assert "'lang'" in next(r["detail"] for r in data.rejected if r["line"] == 5)
    assert len(data.train) == 3 and data.shortened == sum(e["shortened"] for e in data.train)


# ---------------------------------------------------------------- packing and curriculum


def test_packed_examples_do_not_see_each_other(tiny_model_dir, tok):
    import torch

    model = models.load_model(tiny_model_dir, "float32").eval()
    a = sft.build_example(tok, [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"}], 128)
    b = sft.build_example(
        tok, [{"role": "user", "content": "Two, please?"}, {"role": "assistant", "content": "2"}], 128
    )
    [row] = sft.pack([a, b], max_len=128)
    assert row["n_examples"] == 2 and row["position_ids"][len(a["input_ids"])] == 0
    batch = sft.PackedCollator(tok.pad_token_id)([row, {**row, **sft.pack([a], 128)[0]}])
    assert batch["input_ids"].shape == (2, len(row["input_ids"]))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([b["input_ids"]])).logits[0]
    torch.testing.assert_close(packed[len(a["input_ids"]) :], alone, atol=1e-4, rtol=1e-4)


def test_target_only_loss_is_the_models_own_loss(tmp_path, tiny_model_dir, tok):
    import torch

    model = models.load_model(tiny_model_dir, "float32")
    model.config.use_cache = False
    exs = [
        sft.build_example(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 128)
        for q, a in [("One?", "1, and more."), ("Two, please?", "2"), ("Three?", "It is three.")]
    ]
    batch = sft.PackedCollator(tok.pad_token_id)(sft.pack(exs, 96))
    assert batch["input_ids"].shape[0] == 2  # two rows, one padded
    args = sft.training_args(sft.TrainConfig(precision="fp32"), tmp_path, 1, False, None)
    trainer = sft.trainer_class()(model=model, args=args, train_dataset=[], data_collator=None)
    ours = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        theirs = model(**batch).loss
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=1e-5)
    n = int((batch["labels"][:, 1:] != sft.IGNORE).sum())
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch), num_items_in_batch=2 * n).detach(), theirs / 2)


def test_curriculum_phases_run_in_order_shuffled_per_epoch_and_capped(tok):
    def ex(tag, i):
        return {"input_ids": [tag * 100 + i] * 10, "labels": [tag * 100 + i] * 10}

    phases = [sft.PhaseConfig("easy", epochs=2, max_steps=0), sft.PhaseConfig("hard", epochs=1, max_steps=1)]
    data = [[ex(1, i) for i in range(6)], [ex(2, i) for i in range(6)]]
    cfg = sft.TrainConfig(batch_size=2, grad_accum=1, seed=0, max_len=10, packing=True)
    rows, info = sft.schedule(phases, data, cfg)
    assert [r["phase"] for r in rows] == [0] * 12 + [1] * 2  # hard capped at 1 step x 2 rows
    first, second = [r["input_ids"][0] for r in rows[:6]], [r["input_ids"][0] for r in rows[6:12]]
    assert sorted(first) == sorted(second) == list(range(100, 106)) and first != second
    assert [i["rows"] for i in info] == [12, 2]
    assert sft.rows_fingerprint(rows) == sft.rows_fingerprint(sft.schedule(phases, data, cfg)[0])


def test_checkpoints_are_reused_only_by_the_same_run(tmp_path):
    ck = tmp_path / "ck"
    assert sft.prepare_checkpoints(ck, "a") is None
    (ck / "checkpoint-4").mkdir()
    (ck / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (ck / "checkpoint-6").mkdir()  # killed while saving: no trainer_state.json
    assert sft.prepare_checkpoints(ck, "a") == ck / "checkpoint-4"
    assert sft.prepare_checkpoints(ck, "b") is None and not (ck / "checkpoint-4").exists()


# ---------------------------------------------------------------- smoke runs


def check_outputs(out: Path, base: Path) -> dict:
    m = io.read_json(out / "metrics.json")
    assert m["records_in"] == m["train"] + m["eval"] + m["rejected"] == m["kept"] + m["rejected"]
    assert len(io.load_jsonl(out / "rejected.jsonl")) == m["rejected"]
    assert m["tokens_per_second"] > 0
    curve = (out / "plots" / "train.csv").read_text().splitlines()
    assert curve[0] == "step,loss,lr,phase" and len(curve) - 1 == m["steps"]
    phases = [int(line.split(",")[3]) for line in curve[1:]]
    assert phases == sorted(phases)
    assert list((out / "ckpt").iterdir()) == []
    model_dir = out / "model"
    assert (model_dir / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()
    tok = chat.load_tokenizer(model_dir)
    model = models.load_model(model_dir)
    assert isinstance(models.greedy_reply(model, tok, "Hi", 3), str)
    return m


def _weights(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / models.WEIGHTS))


def test_smoke_lora_curriculum(tmp_path, tiny_model_copy):
    import torch

    out = tmp_path / "out"
    p = write_params(tmp_path, tiny_model_copy)
    res = CliRunner().invoke(load_stage("sft").main, cli_args(p, "m1", tiny_model_copy, out))
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = check_outputs(out, tiny_model_copy)
    assert m["steps"] == 4 and [ph["rows"] for ph in m["phases"]] == [4, 4]
    # Seed line 9's answer alone is longer than max_len: dropped, counted for its source, never cut at its end.
    seed = m["sources"][f"{SEED}|seed|forward"]
    assert seed["rejected_by_reason"] == {"too_long": 1} and seed["shortened"] == 0
    assert seed["records_in"] == 12 == seed["train"] + seed["eval"] + seed["rejected"]
    [long_one] = [r for r in io.load_jsonl(out / "rejected.jsonl") if r["file"] == SEED]
    assert (long_one["line"], long_one["reason"]) == (9, "too_long")
    info = models.read_info(out / "model")
    assert info["system"] == TAGS["seed"] and info["global_step"] == 4
    assert (out / "model" / "adapter" / "adapter_config.json").is_file()
    before, after = _weights(tiny_model_copy), _weights(out / "model")
    key = next(k for k in before if "q_proj" in k)
    assert after[key].dtype == before[key].dtype == torch.float32
    assert not torch.equal(before[key], after[key])  # the adapter was merged into the weights
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_smoke_full_backward(tmp_path, tiny_model_copy):
    out = tmp_path / "out"
    p = write_params(tmp_path, tiny_model_copy, {"method": "full", "precision": "fp32"})
    res = CliRunner().invoke(load_stage("sft").main, cli_args(p, "backward", tiny_model_copy, out))
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = check_outputs(out, tiny_model_copy)
    assert m["steps"] == 2 and list(m["sources"]) == [f"{SEED}|None|reverse"]
    assert models.read_info(out / "model")["system"] is None
    assert not (out / "model" / "adapter").exists()
    before, after = _weights(tiny_model_copy), _weights(out / "model")
    assert any(not before[k].equal(after[k]) for k in before)


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model_copy):
    out = tmp_path / "out"
    p = write_params(tmp_path, tiny_model_copy, {"eval_fraction": 0.0})
    args = cli_args(p, "long", tiny_model_copy, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "sft.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # blocks until the stage reports its first checkpoint, then kill it hard
        seen.append(line)
        if "saved checkpoint at step" in line:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode != 0, "".join(seen[-20:])
    saved = sft.last_complete_checkpoint(out / "ckpt")
    assert saved is not None and not (out / "model").exists()
    saved_step = int(saved.name.split("-")[1])

    res = CliRunner().invoke(load_stage("sft").main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    m = check_outputs(out, tiny_model_copy)
    rows = m["rows"]
    assert m["steps"] == math.ceil(rows / TRAIN["batch_size"]) == 4
    assert m["resumed_from_step"] == saved_step >= 2
    assert m["tokens_trained_this_run"] < m["tokens"]
    # The loss curve is whole: the resumed run kept the killed run's log history.
    steps = [int(line.split(",")[0]) for line in (out / "plots" / "train.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, m["steps"] + 1))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_qlora_without_bitsandbytes_says_what_to_install(tiny_model_dir):
    with pytest.raises(models.ModelError, match=r"bitsandbytes.*pip install -e \.\[gpu\]"):
        models.load_for_training(tiny_model_dir, "qlora", TRAIN["lora"], "bf16")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_deepspeed_says_what_to_install():
    assert sft.setup_deepspeed(False, None) is None
    with pytest.raises(params.ParamsError, match=r"deepspeed is not installed.*pip install -e \.\[gpu\]"):
        sft.setup_deepspeed(True, str(ROOT / "configs" / "deepspeed_zero2.json"))


def test_precision_auto_resolves_to_what_the_hardware_computes_fast():
    assert sft.resolve_precision("fp32") == "fp32" and sft.resolve_precision("bf16") == "bf16"
    assert sft.resolve_precision("auto") in ("bf16", "fp32")
    with pytest.raises(params.ParamsError, match="expected auto, bf16 or fp32"):
        sft.resolve_precision("fp8")


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tiny_model_copy):
    """Recomputing activations in the backward pass changes memory, not the result (LoRA: frozen inputs)."""
    import torch

    weights = {}
    for flag in (False, True):
        out = tmp_path / f"gc_{flag}"
        (tmp_path / f"p_{flag}").mkdir()
        p = write_params(tmp_path / f"p_{flag}", tiny_model_copy, {"gradient_checkpointing": flag})
        res = CliRunner().invoke(load_stage("sft").main, cli_args(p, "backward", tiny_model_copy, out))
        assert res.exit_code == 0, res.output + repr(res.exception)
        weights[flag] = _weights(out / "model")
        assert io.read_json(out / "metrics.json")["gradient_checkpointing"] is flag
    base = _weights(tiny_model_copy)
    key = next(k for k in base if "q_proj" in k)
    assert not torch.equal(base[key], weights[True][key])
    assert all(torch.allclose(weights[False][k], weights[True][k], atol=1e-6) for k in base)


def test_saved_adapter_bytes_do_not_depend_on_the_hash_seed(tmp_path, tiny_model_dir):
    """peft keeps target_modules in a set; DVC hashes the bytes, so their order must not follow PYTHONHASHSEED."""
    script = (
        "import sys; from peft import LoraConfig, get_peft_model; from selfalign import models; "
        "m = get_peft_model(models.load_model(sys.argv[1], 'float32'), LoraConfig(r=4, target_modules="
        "['q_proj', 'v_proj', 'k_proj', 'o_proj'])); models.save_adapter(m, sys.argv[2])"
    )
    written = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"adapter{seed}"
        subprocess.run(
            [sys.executable, "-c", script, str(tiny_model_dir), str(out)],
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        written.append((out / "adapter_config.json").read_bytes())
    assert written[0] == written[1] == written[2]
    assert json.loads(written[0])["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]

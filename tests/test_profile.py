"""Params profiles: they validate against every stage that exists, land in params.yaml where DVC
tracks them, and the GPU profile's DeepSpeed, quantization and memory settings hold up without a GPU
(the launcher is not a param: tests/test_launch.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from selfalign import memory, params, profile

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
GPU_PROFILE = ROOT / "profiles" / "qwen2.5-7b-qlora.yaml"


def leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            yield from leaves(value, dotted)
        else:
            yield dotted


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_validates_against_every_stage(path):
    prof = profile.load(path)
    resolved, unchecked = profile.validate(prof, ROOT / "params.yaml", where=str(path))
    assert not unchecked, f"{path.name}: sections nobody reads: {unchecked}"
    for name in prof:  # what the stage itself will resolve once the profile is in params.yaml
        for dotted in leaves(prof[name]):
            node, want = resolved[name].to_dict(), prof[name]
            for part in dotted.split("."):
                node, want = node[part], want[part]
            assert node == want, f"{name}.{dotted}"


def test_an_unknown_key_fails_naming_profile_and_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("base:\n  sourse: hub\n")
    with pytest.raises(params.ParamsError, match=r"typo.yaml:base: unknown key 'sourse'"):
        profile.validate(profile.load(bad), ROOT / "params.yaml", where=str(bad))
    nested = tmp_path / "nested.yaml"
    nested.write_text("ingest:\n  segment:\n    max_chars: 900\n    maxchars: 2\n")
    with pytest.raises(params.ParamsError, match="unknown key 'maxchars'"):
        profile.validate(profile.load(nested), ROOT / "params.yaml", where=str(nested))


def test_apply_keeps_comments_and_changes_only_the_profiles_values():
    text = "# head comment\nbase:\n  source: gguf   # where from\n  dtype: float32\nother:\n  x: 1  # keep\n"
    out = profile.apply_text(
        text,
        {"base": {"source": "hub", "hub_id": "Qwen/Qwen2.5-7B-Instruct"}, "launch": {"train": "accelerate launch"}},
    )
    assert "# head comment" in out and "# where from" in out and "x: 1  # keep" in out
    data = yaml.safe_load(out)
    assert data["base"] == {"source": "hub", "dtype": "float32", "hub_id": "Qwen/Qwen2.5-7B-Instruct"}
    assert data["other"] == {"x": 1}
    assert data["launch"] == {"train": "accelerate launch"}
    floats = yaml.safe_load(
        profile.apply_text("x: {}\n", {"x": {"lr": 1e-05, "big": 3e20, "plain": 0.5, "inf": float("inf")}})
    )["x"]
    assert floats == {"lr": 1e-05, "big": 3e20, "plain": 0.5, "inf": float("inf")}  # floats, not strings


def _dvc_tracked() -> tuple[set[str], str, set[str]]:
    """(params entries the stages of dvc.yaml declare, all their commands joined, the stage names)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    tracked, cmds = set(), []
    for stage in stages.values():
        stage = stage.get("do", stage)
        for entry in stage.get("params", []):
            if isinstance(entry, dict):  # {file: [keys]}
                for keys in entry.values():
                    tracked.update(keys)
            else:
                tracked.add(entry)
        cmd = stage["cmd"]
        cmds.append(" ".join(cmd) if isinstance(cmd, list) else cmd)
    return tracked, "\n".join(cmds), set(stages)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_dvc_tracks_every_value_a_profile_changes(path):
    """Each value is in a `params:` section of a dvc.yaml stage, or interpolated into a command."""
    tracked, cmds, wired = _dvc_tracked()
    interpolated = set(re.findall(r"\$\{([\w.]+)\}", cmds))
    prof = profile.load(path)
    for name in prof:
        assert name in profile.NON_STAGE or name in wired, f"{path.name}: no dvc.yaml stage {name}"
        for dotted in leaves(prof[name], name):
            covered = any(dotted == t or dotted.startswith(t + ".") for t in tracked | interpolated)
            assert covered, f"{path.name}: {dotted} is not tracked by any dvc.yaml stage"


def test_cli_check_changes_nothing_and_apply_writes_params(tmp_path):
    params_yaml = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_yaml)
    before = params_yaml.read_text()
    runner = CliRunner()
    args = [str(GPU_PROFILE), "--params", str(params_yaml)]
    checked = runner.invoke(profile.cli, ["check", *args])
    assert checked.exit_code == 0, checked.output
    assert "base.source: 'gguf' -> 'hub'" in checked.output
    assert params_yaml.read_text() == before
    applied = runner.invoke(profile.cli, ["apply", *args])
    assert applied.exit_code == 0, applied.output
    data = yaml.safe_load(params_yaml.read_text())
    assert data["base"]["hub_id"] == "Qwen/Qwen2.5-7B-Instruct"
    assert data["sft"]["train"]["method"] == "qlora"
    # Applying again is a no-op: the profile is a state, not a delta.
    again = runner.invoke(profile.cli, ["apply", *args])
    assert again.exit_code == 0 and "0 value(s) changed" in again.output


def test_accelerate_configs_parse_and_point_at_the_deepspeed_config():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("accelerate_zero2.yaml", "accelerate_multi_node.yaml"):
        cfg = load_config_from_file(str(ROOT / "configs" / name))
        assert str(cfg.distributed_type) in ("DistributedType.DEEPSPEED", "DEEPSPEED")
        assert (ROOT / cfg.deepspeed_config["deepspeed_config_file"]).is_file()


def test_quantization_config_of_the_profile_constructs():
    """sft's QLoRA (selfalign.models.load_for_training) builds this BitsAndBytesConfig; it must construct."""
    import torch
    from transformers import BitsAndBytesConfig

    assert profile.load(GPU_PROFILE)["sft"]["train"]["method"] == "qlora"
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    assert cfg.load_in_4bit and cfg.quant_method.value == "bitsandbytes"
    assert cfg.to_dict()["bnb_4bit_quant_type"] == "nf4"


def test_deepspeed_accepts_the_zero2_config_with_the_profiles_batch(tmp_path):
    pytest.importorskip(
        "deepspeed",
        reason="deepspeed is in the gpu extra (pip install -e .[gpu]); "
        "its config parser is checked where it is installed",
    )
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    train = profile.load(GPU_PROFILE)["sft"]["train"]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=train["batch_size"],
        gradient_accumulation_steps=train["grad_accum"],
        learning_rate=train["lr"],
        bf16=True,
        use_cpu=True,
        report_to=[],
    )
    hf = HfTrainerDeepSpeedConfig(str(ROOT / "configs" / "deepspeed_zero2.json"))
    hf.trainer_config_process(args)
    ds = DeepSpeedConfig(hf.config)
    assert ds.zero_optimization_stage == 2
    assert ds.train_micro_batch_size_per_gpu == train["batch_size"]
    assert ds.gradient_accumulation_steps == train["grad_accum"]
    assert ds.bfloat16_config.enabled
    assert ds.train_batch_size == train["batch_size"] * train["grad_accum"]  # x world size 1 here


def test_the_gpu_profiles_sft_plan_fits_a_24_gib_card():
    prof = profile.load(GPU_PROFILE)
    train = prof["sft"]["train"]
    plan = memory.Plan(
        stage="sft",
        model=prof["base"]["hub_id"],
        method=train["method"],
        seq_len=train["max_len"],
        micro_batch=train["batch_size"],
        grad_accum=train["grad_accum"],
        gpus=8,
        zero_stage=2,
        gradient_checkpointing=False,
        weight_dtype="fp32",
        double_quant=False,
        gpu_gib=24,
    )
    assert memory.fits(memory.estimate(plan)["total"], 24)
    assert "fits a 24 GiB GPU" in memory.dry_run(plan)


def test_a_typo_inside_a_phase_entry_fails_at_check_time(tmp_path):
    """profile check runs each stage's own validation, nested entries included (not only top-level keys)."""
    bad = tmp_path / "phase.yaml"
    bad.write_text("sft:\n  runs:\n    m0:\n      phases:\n        - {name: seed, sorces: [], epochs: 1}\n")
    with pytest.raises(params.ParamsError, match=r"phase.yaml:sft.runs.m0.phases\[0\]: unknown key 'sorces'"):
        profile.validate(profile.load(bad), ROOT / "params.yaml", where=str(bad))
    wrong = tmp_path / "type.yaml"
    wrong.write_text("sft:\n  train:\n    lr: fast\n")
    with pytest.raises(params.ParamsError, match=r"sft.train.lr: 'fast' is not a number"):
        profile.validate(profile.load(wrong), ROOT / "params.yaml", where=str(wrong))

"""Typed stage configs (selfalign/config.py): one home per default, every value checked before any work.

The drift test keeps each stage's code defaults equal to params.yaml, so a stage run by hand without
--params behaves as the pipeline runs it; the layout tests keep the idioms the one-home pass removed
from coming back (DEFAULTS dicts in scripts, a stage reading another stage's section, sys.path hacks,
private logging setups)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml

from selfalign import config, llm, params
from selfalign.config import Config, LoraSpec, ParamsError, opt

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
SCRIPTS = sorted((ROOT / "stages").glob("*.py"))


@dataclasses.dataclass
class Round(Config):
    scorer: str = "m0"
    trains: str = "m1"


@dataclasses.dataclass
class Toy(Config):
    langs: list[str] = opt(["fr", "ms"], min_items=1)
    max_records: int = opt(6, lo=0)
    lr: float = opt(5e-4, lo=0, lo_open=True)
    mode: Literal["add", "replace"] = "add"
    flag: bool = True
    engine: llm.EngineSpec = opt(llm.EngineSpec(batch_size=8, dtype="bf16"))
    rounds: dict[str, Round] = opt({"iter1": Round(), "iter2": Round("m1", "m2")})
    locales: dict[str, str] = opt({"ms": "Malaysia"})
    lora: LoraSpec = opt(LoraSpec(r=8))
    kl_target: float | None = None

    def check(self, where: str) -> None:
        if self.mode == "replace" and len(self.langs) > 1:
            raise ParamsError(f"{where}.mode: replace takes one language, got {self.langs}")


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "toy:\n  lr: 1e-4\n  engine: {kind: openai}\n  rounds: {iter1: {scorer: m0, trains: m1}}\n"
        "  locales: {id: Indonesia}\n"
    )
    return path


def test_layers_params_replace_mappings_and_set_patches_them(params_file):
    cfg = params.resolve(Toy, params_file, "toy", ["engine.batch_size=4", "rounds.iter1.trains=mX", "lora.r=4"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert cfg.engine.kind == "openai" and cfg.engine.dtype == "bf16" and cfg.engine.batch_size == 4
    assert list(cfg.rounds) == ["iter1"] and cfg.rounds["iter1"] == Round("m0", "mX")  # iter2 removed by params
    assert cfg.locales == {"id": "Indonesia"}
    assert cfg.lora == LoraSpec(r=4)
    assert params.resolve(Toy, None, "toy") == Toy()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("langs=fr", "toy.langs: 'fr' is not a list of strings"),
        ("langs=[]", "toy.langs: [] needs at least 1 item(s)"),
        ("max_records=-3", "toy.max_records: -3 is outside 0 <= max_records"),
        ("lr=abc", "toy.lr: 'abc' is not a number"),
        ("lr=0", "toy.lr: 0.0 is outside 0 < lr"),
        ("mode=x", "toy.mode: 'x' is not one of add | replace"),
        ("flag=maybe", "toy.flag: 'maybe' is not true or false"),
        ("flag=1", "toy.flag: 1 is not true or false"),
        ("engine.kind=gpt5", "toy.engine.kind: 'gpt5' is not one of local | openai | vllm"),
        ("engine.batch_size=two", "toy.engine.batch_size: 'two' is not an integer"),
        ("rounds.iter1.foo=1", "toy.rounds.iter1: unknown key 'foo'"),
        ("nope=1", "toy: unknown key 'nope'; known keys:"),
        ("lora.dropout=1.5", "toy.lora.dropout: 1.5 is outside 0 <= dropout < 1"),
        ("kl_target=high", "toy.kl_target: 'high' is not a number or null"),
        ("mode=replace", "toy.mode: replace takes one language"),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_what_is_allowed(params_file, setting, message):
    with pytest.raises(ParamsError) as e:
        params.resolve(Toy, params_file, "toy", [setting])
    assert e.value.message.startswith(message), e.value.message
    assert "\n" not in e.value.message


def test_every_params_section_has_a_config_class_and_every_class_a_section():
    sections = {k for k, v in PARAMS.items() if isinstance(v, dict)}
    assert sections == set(config.STAGES), sections ^ set(config.STAGES)


@pytest.mark.parametrize("section", sorted(config.STAGES))
def test_code_defaults_equal_params_yaml(section):
    """One home per default: what a stage does without --params is what the pipeline does."""
    cls = config.stage_class(section)
    from_params = cls.from_dict(PARAMS[section], section)
    assert from_params == cls(), {
        k: (v, getattr(cls(), k)) for k, v in dataclasses.asdict(from_params).items() if v != getattr(cls(), k)
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stage_scripts_keep_no_second_home(script):
    text = script.read_text(encoding="utf-8")
    assert not re.search(r"^[A-Z_]*DEFAULTS\s*=", text, re.M), f"{script.name}: defaults belong in its Config class"
    assert "sys.path.insert" not in text, f"{script.name}: the package is installed; no sys.path hacks"
    assert "logging.basicConfig" not in text, f"{script.name}: use cli.setup_logging()"
    assert not re.search(r"params\.section\(", text), f"{script.name}: reads a params section by hand"

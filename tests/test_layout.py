"""dvc.yaml, params.yaml, stages/ and the front doors agree (STYLE principles 1, 3, 4, 14)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from stage_loader import load_stage

from selfalign import params

ROOT = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SCRIPTS = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))


def test_every_stage_is_its_script_and_its_params_section():
    for name, stage in DVC.items():
        body = stage.get("do", stage)
        cmd = body["cmd"] if isinstance(body["cmd"], str) else body["cmd"][0]
        assert cmd.startswith(f"python stages/{name}.py "), f"stage {name}: cmd must run stages/{name}.py"
        assert name in SCRIPTS, f"stage {name} has no stages/{name}.py"
        assert name in PARAMS, f"stage {name} has no params.yaml section"
        assert f"stages/{name}.py" in body["deps"], f"stage {name} must depend on its own script"
        for m in body.get("metrics", []):
            path = next(iter(m)) if isinstance(m, dict) else m
            assert re.match(rf"metrics/{name}[._/]", path), f"stage {name}: metrics file {path} not named after it"


def test_every_script_is_a_stage_and_every_section_is_used():
    assert set(SCRIPTS) == set(DVC), "stages/ and dvc.yaml disagree"
    assert set(PARAMS) <= set(DVC), f"params.yaml sections without a stage: {set(PARAMS) - set(DVC)}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_params_section_validates_against_code_defaults(name):
    mod = load_stage(name)
    assert isinstance(getattr(mod, "DEFAULTS", None), dict), f"stages/{name}.py must define DEFAULTS"
    check = getattr(mod, "resolve_params", None)
    if check is not None:
        check(ROOT / "params.yaml")
    else:
        params.resolve(mod.DEFAULTS, ROOT / "params.yaml", name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_stage_script_has_runnable_docstring(name):
    mod = load_stage(name)
    assert mod.__doc__ and f"python stages/{name}.py" in mod.__doc__, f"stages/{name}.py docstring must show its command"


def test_front_doors():
    readme = (ROOT / "README.md").read_text()
    first_code = readme[readme.index("```"):].split("```")[1]
    assert "make train" in first_code and "make test" in first_code, "README must lead with make train / make test"
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make (\w[\w-]*)", readme):
        assert re.search(rf"^{target}:", makefile, re.M), f"README mentions make {target}, Makefile lacks it"
    assert "make test" in (ROOT / ".ci" / "run").read_text()

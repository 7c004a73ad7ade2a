"""dvc.yaml, params.yaml, stages/ and the front doors agree (STYLE principles 1, 3, 4, 14)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from stage_loader import load_stage

from selfalign import config, params

ROOT = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SCRIPTS = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))


def script_of(stage: str) -> str:
    """A stage runs stages/<script>.py: its own name, or for a second group of the same script (sft-iter:
    Humpback's rounds, whose count comes from params) the name before the dash."""
    return stage.split("-")[0]


def test_every_stage_is_its_script_and_its_params_section():
    for stage_name, stage in DVC.items():
        name = script_of(stage_name)
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
    assert set(SCRIPTS) == {script_of(s) for s in DVC}, "stages/ and dvc.yaml disagree"
    # `prefer` is the one top-level key two stages read (evaluate compares, export ships the preferred model);
    # both list it in their dvc.yaml params.
    shared = {"prefer"}
    for key in shared:
        assert all(key in (DVC[s].get("do", DVC[s]).get("params") or []) for s in ("evaluate", "export")), key
    assert set(PARAMS) - shared <= set(DVC), f"params.yaml sections without a stage: {set(PARAMS) - set(DVC) - shared}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_params_section_validates_against_the_stage_config(name):
    """params.yaml's section resolves through the stage's Config class (tests/test_config.py: and equals its defaults)."""
    cls = config.stage_class(name)
    assert isinstance(params.resolve(cls, ROOT / "params.yaml", name), cls)


@pytest.mark.parametrize("name", SCRIPTS)
def test_stage_script_has_runnable_docstring(name):
    mod = load_stage(name)
    assert mod.__doc__ and f"python stages/{name}.py" in mod.__doc__, (
        f"stages/{name}.py docstring must show its command"
    )


def test_front_doors():
    readme = (ROOT / "README.md").read_text()
    first_code = readme[readme.index("```") :].split("```")[1]
    assert "make train" in first_code and "make test" in first_code, "README must lead with make train / make test"
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make (\w[\w-]*)", readme):
        assert re.search(rf"^{target}:", makefile, re.M), f"README mentions make {target}, Makefile lacks it"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def selfalign_imports(path: Path) -> set[str]:
    """selfalign modules a file imports (at top level or inside functions)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "selfalign":
            if node.module == "selfalign":
                out |= {a.name for a in node.names}
            else:
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("selfalign.")}
    return {m for m in out if (ROOT / "selfalign" / f"{m}.py").exists()}


def module_closure(script: Path) -> set[str]:
    """Every selfalign module a stage script runs, following the library's own imports."""
    todo, seen = list(selfalign_imports(script)), set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += selfalign_imports(ROOT / "selfalign" / f"{m}.py")
    return seen


@pytest.mark.parametrize("stage_name", sorted(DVC))
def test_stage_deps_cover_every_module_it_imports(stage_name):
    """A change to any code a stage runs reruns it: dvc.yaml's deps list every selfalign module the
    script imports, directly or through the library (or the whole selfalign/ dir), and the data files
    the library reads (selfalign/*.json)."""
    body = DVC[stage_name].get("do", DVC[stage_name])
    deps = set(body["deps"])
    if "selfalign" in deps:
        return
    script = ROOT / "stages" / f"{script_of(stage_name)}.py"
    missing = sorted(f"selfalign/{m}.py" for m in module_closure(script) if f"selfalign/{m}.py" not in deps)
    assert not missing, f"dvc.yaml stage {stage_name} runs {', '.join(missing)} but does not depend on it"
    if "langid" in module_closure(script):
        assert "selfalign/ms_id_markers.json" in deps, f"{stage_name}: langid reads selfalign/ms_id_markers.json"


def test_curate_rounds_depend_on_every_curate_key_but_the_list_of_rounds():
    """curate@<round> lists its params keys one by one so that adding a round (curate.iterations) reruns only the
    new round; a key added to the section must be added there too, or changing it would rerun nothing."""
    listed = {p.split(".", 1)[1] for p in DVC["curate"]["do"]["params"]}
    assert listed == set(PARAMS["curate"]) - {"iterations"}

"""Params profiles: a named overlay of params.yaml values, applied in one command.

    python -m selfalign.profile apply profiles/qwen2.5-7b-qlora.yaml       # or: make profile PROFILE=qwen2.5-7b-qlora
    python -m selfalign.profile check profiles/qwen2.5-7b-qlora.yaml       # validate only, change nothing

A profile is YAML shaped like params.yaml: sections named as stages, holding only the keys it
changes. `apply` writes those values into params.yaml itself (comments and order kept), so DVC
sees and tracks every value a profile changes, `dvc params diff` shows the switch, and `git
checkout params.yaml` undoes it. Before writing anything the profile is validated the way each
stage validates at start-up: code DEFAULTS < params.yaml section < profile, with an unknown key an
error naming the profile and the key. Sections of stages that do not exist yet are reported, not
guessed at; sections listed in NON_STAGE are launcher settings read by dvc.yaml, not by a stage.
"""

from __future__ import annotations

import copy
import importlib.util
import io as _io
import math
import sys
from pathlib import Path

import click
import yaml

from selfalign import params

# params.yaml sections that no stage script reads (none today; dvc.yaml templating could read one).
NON_STAGE: dict[str, dict] = {}


def load(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise params.ParamsError(f"{path}: a profile maps section names to mappings of values")
    return data


def stage_defaults(stages_dir: str | Path) -> dict[str, dict]:
    """DEFAULTS of every stages/<name>.py, keyed by name (imports the scripts, runs none)."""
    out = {}
    for script in sorted(Path(stages_dir).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_selfalign_stage_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if isinstance(getattr(module, "DEFAULTS", None), dict):
            out[script.stem] = module.DEFAULTS
    return out


def validate(
    profile: dict, params_file: str | Path | None, defaults: dict[str, dict], where: str = "profile"
) -> tuple[dict[str, dict], list[str]]:
    """({section: resolved values} for the sections checked, [sections with no stage to check against])."""
    known = {**NON_STAGE, **defaults}
    resolved, unchecked = {}, []
    for name, values in profile.items():
        if name not in known:
            unchecked.append(name)
            continue
        base = known[name]
        current = params.section(params_file, name) if params_file and _has_section(params_file, name) else {}
        merged = params._merge(base, current, f"{params_file}:{name}")
        resolved[name] = params._merge(merged, values, f"{where}:{name}")
    return resolved, unchecked


def _has_section(params_file: str | Path, name: str) -> bool:
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    return name in data


def changes(
    profile: dict, params_file: str | Path, defaults: dict[str, dict] | None = None
) -> list[tuple[str, object, object]]:
    """(dotted key, value now, value after) for every leaf the profile changes; `now` is what the
    stage resolves today (its DEFAULTS under params.yaml) where the stage is known."""
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    known = {**NON_STAGE, **(defaults or {})}
    for name in profile:
        if name in known:
            data[name] = params._merge(known[name], data.get(name) or {}, f"{params_file}:{name}")
    out = []

    def walk(prefix: str, node: dict, now) -> None:
        for key, value in node.items():
            before = now.get(key) if isinstance(now, dict) else None
            dotted = f"{prefix}.{key}"
            if isinstance(value, dict) and value and isinstance(before, dict):
                walk(dotted, value, before)
            elif before != value:
                out.append((dotted, before, value))

    for name, values in profile.items():
        walk(name, values, data.get(name) or {})
    return out


def apply_text(params_text: str, profile: dict) -> str:
    """params.yaml's text with the profile's values set, its comments and key order kept."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(float, _represent_float)
    doc = rt.load(params_text) or CommentedMap()

    def put(node: CommentedMap, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and value and isinstance(node.get(key), dict):
                put(node[key], value)
            else:
                node[key] = copy.deepcopy(value)

    for name, values in profile.items():
        if not isinstance(doc.get(name), dict):
            doc[name] = CommentedMap()
        put(doc[name], values)
    buf = _io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def _represent_float(representer, value: float):
    """A float as YAML 1.1 (PyYAML, which the stages read params.yaml with) reads back as a float:
    ruamel writes 1e-05, which PyYAML takes for a string; 1.0e-05 it does not."""
    if math.isnan(value):
        text = ".nan"
    elif math.isinf(value):
        text = ".inf" if value > 0 else "-.inf"
    else:
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


@click.group()
def cli():
    """Validate and apply params profiles (profiles/*.yaml)."""


def _check(profile_path: str, params_file: str, stages_dir: str) -> tuple[dict, dict]:
    profile = load(profile_path)
    defaults = stage_defaults(stages_dir)
    _, unchecked = validate(profile, params_file, defaults, where=profile_path)
    for name in unchecked:
        click.echo(f"{profile_path}: section {name!r} has no stages/{name}.py yet: not validated", err=True)
    return profile, defaults


@cli.command()
@click.argument("profile_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_file", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--stages", "stages_dir", default="stages", type=click.Path(exists=True, file_okay=False))
def check(profile_path, params_file, stages_dir):
    """Validate PROFILE_PATH against the stages' DEFAULTS and params.yaml; list what it would change."""
    profile, defaults = _check(profile_path, params_file, stages_dir)
    for key, before, after in changes(profile, params_file, defaults):
        click.echo(f"{key}: {before!r} -> {after!r}")


@cli.command()
@click.argument("profile_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_file", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--stages", "stages_dir", default="stages", type=click.Path(exists=True, file_okay=False))
def apply(profile_path, params_file, stages_dir):
    """Write PROFILE_PATH's values into params.yaml (validated first; `git checkout params.yaml` undoes it)."""
    profile, defaults = _check(profile_path, params_file, stages_dir)
    diff = changes(profile, params_file, defaults)
    text = apply_text(Path(params_file).read_text(encoding="utf-8"), profile)
    from selfalign import io

    with io.atomic_path(params_file) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    for key, before, after in diff:
        click.echo(f"{key}: {before!r} -> {after!r}")
    click.echo(f"{params_file}: {len(diff)} value(s) changed by {profile_path}")


if __name__ == "__main__":
    sys.exit(cli())

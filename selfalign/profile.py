"""Params profiles: a named overlay of params.yaml values, applied in one command.

    python -m selfalign.profile apply profiles/qwen2.5-7b-qlora.yaml       # or: make profile PROFILE=qwen2.5-7b-qlora
    python -m selfalign.profile check profiles/qwen2.5-7b-qlora.yaml       # validate only, change nothing

A profile is YAML shaped like params.yaml: sections named as stages, holding only the keys it
changes. `apply` writes those values into params.yaml itself (comments and order kept), so DVC
sees and tracks every value a profile changes, `dvc params diff` shows the switch, and `git
checkout params.yaml` undoes it. Before writing anything the profile is validated the way each
stage validates at start-up (its Config class, selfalign/config.py STAGES): code defaults < params.yaml
section < profile, every field typed and range-checked, a bad key or value an error naming the profile
and the key. A section no stage reads is reported, not guessed at; sections listed in NON_STAGE are
read by dvc.yaml, not by a stage.
"""

from __future__ import annotations

import copy
import io as _io
import math
import sys
from pathlib import Path

import click
import yaml

from selfalign import config, params

# params.yaml sections that no stage script reads (none today; dvc.yaml templating could read one).
NON_STAGE: dict[str, dict] = {}


def load(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise params.ParamsError(f"{path}: a profile maps section names to mappings of values")
    return data


def validate(profile: dict, params_file: str | Path | None, where: str = "profile") -> tuple[dict, list[str]]:
    """({section: the stage's resolved Config} for the stage sections, [sections no stage reads]).

    Each section is checked as its stage checks itself at start-up (config.STAGES names the class): code
    defaults < params.yaml section < the profile's values, every field typed and range-checked, so a typo
    inside a nested entry (a phase, an engine) fails here, naming the profile and the key."""
    resolved, unchecked = {}, []
    for name, values in profile.items():
        if name in NON_STAGE:
            continue
        if name not in config.STAGES:
            unchecked.append(name)
            continue
        cls = config.stage_class(name)
        try:
            now = params.resolve(cls, params_file, name) if _has_section(params_file, name) else cls()
            resolved[name] = config.layer(cls, now, values, name, replace_mappings=False)
        except params.ParamsError as e:
            raise params.ParamsError(f"{where}:{e.message}") from e
    return resolved, unchecked


def _has_section(params_file: str | Path | None, name: str) -> bool:
    if not params_file:
        return False
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    return name in data


def changes(profile: dict, params_file: str | Path) -> list[tuple[str, object, object]]:
    """(dotted key, value now, value after) for every leaf the profile changes; `now` is what the stage
    resolves today (its config under params.yaml) where a stage reads the section."""
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    for name in profile:
        if name in config.STAGES:
            cls = config.stage_class(name)
            data[name] = (params.resolve(cls, params_file, name) if name in data else cls()).to_dict()
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


def _check(profile_path: str, params_file: str) -> dict:
    profile = load(profile_path)
    _, unchecked = validate(profile, params_file, where=profile_path)
    for name in unchecked:
        click.echo(f"{profile_path}: section {name!r} is read by no stage: not validated", err=True)
    return profile


@cli.command()
@click.argument("profile_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_file", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def check(profile_path, params_file):
    """Validate PROFILE_PATH as each stage validates its params; list what it would change in params.yaml."""
    profile = _check(profile_path, params_file)
    for key, before, after in changes(profile, params_file):
        click.echo(f"{key}: {before!r} -> {after!r}")


@cli.command()
@click.argument("profile_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--params", "params_file", default="params.yaml", type=click.Path(exists=True, dir_okay=False))
def apply(profile_path, params_file):
    """Write PROFILE_PATH's values into params.yaml (validated first; `git checkout params.yaml` undoes it)."""
    profile = _check(profile_path, params_file)
    diff = changes(profile, params_file)
    text = apply_text(Path(params_file).read_text(encoding="utf-8"), profile)
    from selfalign import io

    with io.atomic_path(params_file) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    for key, before, after in diff:
        click.echo(f"{key}: {before!r} -> {after!r}")
    click.echo(f"{params_file}: {len(diff)} value(s) changed by {profile_path}")


if __name__ == "__main__":
    sys.exit(cli())

"""One override order for experiment values (STYLE principle 4).

    code default (the stage's Config class)  <  params.yaml section  <  --set key=value on the command line

`dvc exp run -S sft.lr=1e-4` edits params.yaml, so it lands in the middle layer. Every key must be a
field of the stage's Config class, with a value of its type and range: a typo or a bad value fails at
start-up in one line naming the key, instead of being silently ignored for an eight-hour run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from selfalign import config
from selfalign.config import ParamsError  # noqa: F401  (stages raise params.ParamsError)


def section(params_file: str | Path | None, name: str) -> dict:
    """The dotted section `name` of a params file; {} when no file is given."""
    if not params_file:
        return {}
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    node: Any = data
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"{params_file}: no section {name!r}")
        node = node[part]
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise ParamsError(f"{params_file}: section {name!r} is not a mapping")
    return node


def parse_set(items: tuple[str, ...] | list[str]) -> dict:
    """`a.b=3` → {"a": {"b": 3}}; values are parsed as YAML, so `x=true` and `lr=1e-4` are typed."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ParamsError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def resolve(
    defaults,
    params_file: str | Path | None,
    name: str,
    overrides: tuple[str, ...] | list[str] = (),
    *extra_sections: str,
):
    """Code defaults, then the params section(s) in order, then --set overrides; unknown keys raise.

    `defaults` is a stage's Config class (selfalign/config.py): the result is a validated instance of it,
    every field typed and range-checked.
    """
    if not (isinstance(defaults, type) and issubclass(defaults, config.Config)):
        raise TypeError(f"params.resolve takes a Config class, not {type(defaults).__name__}")
    cfg = defaults()
    for sec in (name, *extra_sections):
        cfg = config.layer(defaults, cfg, section(params_file, sec), name, replace_mappings=True)
    return config.layer(defaults, cfg, parse_set(overrides), name, replace_mappings=False)


params_option = click.option(
    "--params",
    "params_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="params.yaml to read this stage's section from (code defaults without it).",
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one param of this stage's section; repeatable.",
)

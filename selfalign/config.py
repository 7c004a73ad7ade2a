"""Typed stage configs: each stage's settings are one dataclass, and its defaults live there only.

    code default (the dataclass)  <  params.yaml section  <  --set key=value

A stage declares `class TranslateConfig(Config)` in its library module with a typed field per key,
`opt(default, lo=..., hi=...)` for ranges, `Literal[...]` for choices and `check()` for rules that
tie fields together. `params.resolve(TranslateConfig, params_file, "translate", overrides)` merges
the layers and validates every field before any work: a wrong key, type, choice or range is a
one-line `ParamsError` naming the key, the value and what is allowed.

Merging: params.yaml is a whole document, so a mapping there replaces the default mapping (removing
a curation round from params.yaml removes it); `--set` is a patch, so `--set runs.m0.epochs=3`
changes one value and keeps the rest. A nested Config merges key by key in both layers.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, Literal, Union

import click

Self = typing.TypeVar("Self", bound="Config")

# Inference weights' dtype, in every section that loads a model to generate or score with
# (auto: selfalign/device.py's rule; device.DTYPE_OF maps the values to torch's names).
Dtype = Literal["fp32", "bf16", "fp16", "auto"]

# The stage sections of params.yaml and the config class of each (module:Class), imported on demand:
# profile.py validates a profile's phase entries with them, tests/test_config.py keeps them equal to params.yaml.
STAGES: dict[str, str] = {
    "base": "selfalign.base:BaseConfig",
    "ingest": "selfalign.ingest:IngestConfig",
    "translate": "selfalign.translate:TranslateConfig",
    "clean": "selfalign.clean:CleanConfig",
    "repair": "selfalign.repair:RepairConfig",
    "localise": "selfalign.localise:LocaliseConfig",
    "verify": "selfalign.verify:VerifyConfig",
    "augment": "selfalign.augment:AugmentConfig",
    "curate": "selfalign.curate:CurateConfig",
    "review": "selfalign.review:ReviewConfig",
    "distill": "selfalign.distill:DistillConfig",
    "sft": "selfalign.sft:SFTConfig",
    "reward": "selfalign.reward:RewardConfig",
    "ppo": "selfalign.ppo:PPOConfig",
    "dpo": "selfalign.dpo:DPOConfig",
    "evaluate": "selfalign.evaluate:EvaluateConfig",
    "export": "selfalign.export:ExportConfig",
}


class ParamsError(click.UsageError):
    pass


def opt(
    default: Any = dataclasses.MISSING,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    min_items: int = 0,
    **_doc,
) -> Any:
    """A dataclass field with a range: lo <= value <= hi (lo_open/hi_open make a bound strict); lists: min_items."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "min_items": min_items}
    if isinstance(default, (list, dict, set, Config)):
        frozen = copy.deepcopy(default)
        return dataclasses.field(default_factory=lambda: copy.deepcopy(frozen), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def describe(tp: Any) -> str:
    """What a type allows, in words: `an integer`, `one of local | openai | vllm`, `a list of strings`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "anything"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + " | ".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin is dict:
        return f"a mapping of name: {describe(args[1])}" if args else "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if _is_config(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _plural(what: str) -> str:
    for one, many in (
        ("an integer", "integers"),
        ("a number", "numbers"),
        ("a string", "strings"),
        ("true or false", "booleans"),
    ):
        if what == one:
            return many
    return what


def _fail(key: str, value: Any, tp: Any) -> ParamsError:
    return ParamsError(f"{key}: {value!r} is not {describe(tp)}")


def coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """`value` checked against the type `tp` (and converted where YAML reads a number as a string)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, base)
            except ParamsError:
                continue
        raise _fail(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, tp)
    if origin is Literal:
        if value in args and type(value) is type(next(a for a in args if a == value)):
            return value
        raise _fail(key, value, tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, tp)
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(key, value, tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ParamsError(f"{key}: key {k!r} is not a string")
            prior = base.get(k) if isinstance(base, dict) else None
            out[k] = coerce(v, args[1], f"{key}.{k}", prior) if args else v
        return out
    if _is_config(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _fail(key, value, tp)
        return tp.from_dict(value, key, base=base if isinstance(base, tp) else None)
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    if isinstance(value, list):
        if len(value) < meta.get("min_items", 0):
            raise ParamsError(f"{key}: {value!r} needs at least {meta['min_items']} item(s)")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    bad_lo = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    bad_hi = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if bad_lo or bad_hi:
        left = "" if lo is None else f"{lo} {'<' if meta.get('lo_open') else '<='} "
        right = "" if hi is None else f" {'<' if meta.get('hi_open') else '<='} {hi}"
        raise ParamsError(f"{key}: {value!r} is outside {left}{key.rsplit('.', 1)[-1]}{right}")


@dataclasses.dataclass
class Config:
    """Base of every stage config: typed fields with defaults, validated by from_dict."""

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls, include_extras=False)

    @classmethod
    def from_dict(cls: type[Self], data: dict | None, where: str, base: Self | None = None) -> Self:
        """A validated config: `data` over `base` (the code defaults when None); unknown keys and bad values raise."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ParamsError(f"{where}: {data!r} is not a mapping")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ParamsError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names)) or '(none)'}")
        start = base if base is not None else cls()
        hints = cls.hints()
        kw = {}
        for f in dataclasses.fields(cls):
            prior = getattr(start, f.name)
            key = f"{where}.{f.name}" if where else f.name
            value = data[f.name] if f.name in data else copy.deepcopy(prior)
            value = coerce(value, hints[f.name], key, prior)
            _check_range(key, value, f.metadata)
            kw[f.name] = value
        obj = cls(**kw)
        obj.check(where)
        return obj

    def check(self, where: str) -> None:
        """Rules that tie fields together; raise ParamsError(f"{where}.key: ...")."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self: Self, **changes) -> Self:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _deep_merge(base: dict, patch: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def layer(cls: type[Config], start: Config, patch: dict, where: str, replace_mappings: bool) -> Config:
    """`patch` (a params section or --set overrides) over the config `start`, validated."""
    if not isinstance(patch, dict):
        raise ParamsError(f"{where}: {patch!r} is not a mapping")
    return cls.from_dict(_layer_dict(cls, start, patch, where, replace_mappings), where, base=start)


def _layer_dict(cls: type[Config], start: Config, patch: dict, where: str, replace_mappings: bool) -> dict:
    hints = cls.hints()
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in patch.items():
        if key not in names:
            raise ParamsError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names)) or '(none)'}")
        tp, prior = hints[key], getattr(start, key)
        if _is_config(tp) and isinstance(value, dict) and isinstance(prior, Config):
            out[key] = _layer_dict(tp, prior, value, f"{where}.{key}", replace_mappings)
        elif isinstance(value, dict) and isinstance(prior, dict) and not replace_mappings:
            out[key] = _patch_mapping(tp, prior, value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _patch_mapping(tp: Any, prior: dict, patch: dict, where: str) -> dict:
    """--set into a free-form mapping: entries merge key by key, new entries are added."""
    args = typing.get_args(tp)
    inner = args[1] if typing.get_origin(tp) is dict and len(args) == 2 else Any
    out = {k: _plain(v) for k, v in prior.items()}
    for k, v in patch.items():
        if k in prior and isinstance(v, dict):
            if _is_config(inner) and isinstance(prior[k], Config):
                out[k] = _plain(
                    prior[k].from_dict(
                        _layer_dict(inner, prior[k], v, f"{where}.{k}", False), f"{where}.{k}", base=prior[k]
                    )
                )
            elif isinstance(prior[k], dict):
                out[k] = _deep_merge(prior[k], v)
            else:
                out[k] = v
        else:
            out[k] = v
    return out


def stage_class(section: str) -> type[Config]:
    """The config class of a params section, from STAGES (imports its module)."""
    import importlib

    if section not in STAGES:
        raise ParamsError(f"no stage section {section!r}; known: {', '.join(sorted(STAGES))}")
    module, name = STAGES[section].split(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass
class LoraSpec(Config):
    """A LoRA adapter's shape, the same keys in sft, reward, ppo and dpo (models.lora_config builds peft's)."""

    r: int = opt(16, lo=0)  # 0 = no adapter: a full fine-tune (sft, reward)
    alpha: int = opt(32, lo=1)
    dropout: float = opt(0.0, lo=0, hi=1, hi_open=True)
    target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj"], min_items=1)

"""Export: a self-contained model directory and a model card whose lineage comes from dvc.lock.

The card records what produced the weights: every upstream stage of the exported model's
directory in dvc.lock (its command, the md5 of each dependency and output, and its params
values), the metrics those stages wrote, and the evaluate stage's numbers for this model. A
reader can check any input against the lock, and `dvc repro` at that commit gives the same
weights. Functions here are pure over the parsed lock and metrics, except `load_source` (loads, and
merges an adapter) and the file readers `read_lock`, `file_md5`, `file_table` and `stage_metrics`; the
export stage saves the directory. `ExportConfig` is the stage's params section.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Literal

import yaml

from selfalign import chat, device, io, models, records
from selfalign.config import Config

ADAPTER_CONFIG = "adapter_config.json"


@dataclasses.dataclass
class ExportConfig(Config):
    """params.yaml `export:` (the comments there say what each key is for)."""

    # the --model NAME=DIR shipped; preferred: the one params.yaml's top-level `prefer` names (dpo.exported_model)
    model: Literal["preferred", "ppo", "dpo", "final", "m0"] = "preferred"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # saved weights; auto keeps the source's
    base: str = ""  # a bare LoRA adapter's base model dir ("" = its adapter_config's path)


class ExportError(RuntimeError):
    """A source that cannot be exported; the message says what to change."""


# ---------------------------------------------------------------- the model directory


def is_adapter_dir(model_dir: str | Path) -> bool:
    """A peft adapter without merged weights (adapter_config.json, no config.json)."""
    d = Path(model_dir)
    return (d / ADAPTER_CONFIG).is_file() and not (d / "config.json").is_file()


def adapter_base(adapter_dir: str | Path, base_dir: str | None = None) -> Path:
    """The base model an adapter was trained on: `base_dir`, else its adapter_config's base path.

    A relative base path is tried from the working directory (how the pipeline writes it,
    e.g. models/base) and then from the adapter directory.
    """
    if base_dir:
        candidates = [Path(base_dir)]
    else:
        cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        name = cfg.get("base_model_name_or_path")
        if not name:
            raise ExportError(f"{adapter_dir}/{ADAPTER_CONFIG}: no base_model_name_or_path; set export.base")
        candidates = [Path(name), Path(adapter_dir) / name]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise ExportError(
        f"{adapter_dir}: base model {candidates[0]} is not a local model directory "
        "(no hub access at run time); set export.base to the base model directory"
    )


def load_source(model_dir: str | Path, dtype: str = "auto", base_dir: str | None = None):
    """(model, tokenizer, merged_from) for a model directory or an adapter (merged into its base), in `dtype`
    (auto | fp32 | bf16; auto keeps the source's)."""
    model_dir = Path(model_dir)
    merged_from = None
    if is_adapter_dir(model_dir):
        base = adapter_base(model_dir, base_dir)
        model = models.merge_adapter(base, model_dir)
        merged_from = str(base)
        tok_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else base
    elif (model_dir / "config.json").is_file():
        model = models.load_model(model_dir, None)
        tok_dir = model_dir
    else:
        raise ExportError(f"{model_dir}: neither a model directory (config.json) nor a LoRA adapter ({ADAPTER_CONFIG})")
    if dtype != "auto":  # the weights only: model.to(dtype) would also round buffers kept in fp32 (rotary
        # inv_freq), and the reload check would then compare a model unlike the one a reload gives
        target = models._torch_dtype(device.DTYPE_OF.get(dtype, dtype))
        for param in model.parameters():
            param.data = param.data.to(target)
    return model, chat.load_tokenizer(tok_dir), merged_from


def set_generation_config(model, tok) -> int:
    """Make generate() stop at the chat template's end-of-turn token (and at eos, if that differs)."""
    eot = tok.convert_tokens_to_ids(chat.end_of_turn(tok))
    if eot is None or eot == tok.unk_token_id:
        raise ExportError(f"the end-of-turn token {chat.end_of_turn(tok)!r} is not in the vocabulary")
    stops = [eot] + ([tok.eos_token_id] if tok.eos_token_id not in (None, eot) else [])
    gc = model.generation_config
    gc.eos_token_id = stops[0] if len(stops) == 1 else stops
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = eot
    return eot


def file_table(export_dir: str | Path) -> list[dict]:
    """Name, size and sha256 of every file in the export (the card lists them so a copy can be checked)."""
    out = []
    for p in sorted(Path(export_dir).rglob("*")):
        if p.is_file() and p.name != "README.md":
            out.append({"file": str(p.relative_to(export_dir)), "bytes": p.stat().st_size, "sha256": io.sha256_file(p)})
    return out


# ---------------------------------------------------------------- lineage from dvc.lock


def read_lock(path: str | Path) -> dict:
    """The `stages` mapping of a dvc.lock ({} when there is none: the stage ran outside `dvc repro`)."""
    p = Path(path)
    if not p.is_file():
        return {}
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    stages = data.get("stages")
    if not isinstance(stages, dict):
        raise ExportError(f"{path}: no 'stages' mapping; is this a dvc.lock?")
    return stages


def _norm(path: str) -> str:
    return str(Path(path)).rstrip("/")


def _under(path: str, out: str) -> bool:
    path, out = _norm(path), _norm(out)
    return path == out or path.startswith(out + "/")


def producer(lock: dict, path: str) -> str | None:
    """The stage whose outs contain `path` (the out itself or a directory holding it)."""
    for name, st in lock.items():
        if any(_under(path, o["path"]) for o in st.get("outs", [])):
            return name
    return None


def lineage(lock: dict, target: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Every stage upstream of `target` (its producer included), upstream first, in a stable order."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in exclude:
            return
        seen.add(name)
        for dep in lock[name].get("deps", []):
            up = producer(lock, dep["path"])
            if up is not None and up != name:
                visit(up)
        order.append(name)

    start = producer(lock, target)
    if start is not None:
        visit(start)
    return order


def _md5(entry: dict) -> str:
    return entry.get("md5") or entry.get("hash") or entry.get("checksum") or "?"


def lineage_entries(lock: dict, names: list[str]) -> list[dict]:
    """Per stage: command, deps and outs with md5 (data vs code told apart by producer), params values."""
    out = []
    for name in names:
        st = lock[name]
        deps = [{"path": d["path"], "md5": _md5(d), "from": producer(lock, d["path"])} for d in st.get("deps", [])]
        params = {}
        for values in (st.get("params") or {}).values():
            params.update(values)
        out.append(
            {
                "stage": name,
                "cmd": st.get("cmd", ""),
                "deps": deps,
                "outs": [{"path": o["path"], "md5": _md5(o)} for o in st.get("outs", [])],
                "params": params,
            }
        )
    return out


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_metrics(lock: dict, names: list[str], root: str | Path = ".") -> dict:
    """The JSON metrics files the given stages wrote, as recorded in dvc.lock and read from the workspace.

    `stale` says the workspace file no longer matches the lock's md5 (someone ran a stage by hand).
    """
    out = {}
    for name in names:
        for o in lock[name].get("outs", []):
            p = Path(root) / o["path"]
            if o["path"].startswith("metrics/") and o["path"].endswith(".json") and p.is_file():
                out[o["path"]] = {
                    "stage": name,
                    "values": json.loads(p.read_text(encoding="utf-8")),
                    "stale": file_md5(p) != o.get("md5"),
                }
    return out


def flat_numbers(obj, prefix: str = "") -> dict:
    """Numeric leaves of nested metrics as dotted keys, the way `dvc metrics show` lists them."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = obj
    return out


def base_model_id(lineage_rows: list[dict]) -> str | None:
    """The hub id of the base model when the lineage's `base` stage names one: source hub, or a GGUF of that model."""
    for e in lineage_rows:
        b = e["params"].get("base")
        if e["stage"] == "base" and isinstance(b, dict) and b.get("hub_id"):
            name = str(b["hub_id"]).rsplit("/", 1)[-1]
            if b.get("source") == "hub" or (b.get("source") == "gguf" and str(b.get("gguf_file", "")).startswith(name)):
                return str(b["hub_id"])
    return None


def distill_teacher(lock: dict) -> dict | None:
    """Which model distill asked for answers, and whether it is the base model the sft runs start from.

    The teacher is distill's `--teacher` (dvc.lock's cmd), unless its params' `engine` names another
    kind or model. The student's base is the `base` stage's output when an sft stage depends on it.
    They are the same model when the paths match or the lock gives both the same md5. None when the
    lock has no distill stage.
    """
    st = lock.get("distill")
    if not st:
        return None
    cmd = st.get("cmd", "")
    args = shlex.split(" ".join(cmd) if isinstance(cmd, list) else cmd)
    teacher = next(
        (
            a.split("=", 1)[1] if "=" in a else args[i + 1]
            for i, a in enumerate(args)
            if re.fullmatch(r"--teacher(=.*)?", a) and ("=" in a or i + 1 < len(args))
        ),
        None,
    )
    engine = ((st.get("params") or {}).get("params.yaml", {}).get("distill") or {}).get("engine") or {}
    kind = engine.get("kind", "local")
    if engine.get("model"):
        teacher = engine["model"]
    base_outs = [o for o in (lock.get("base") or {}).get("outs", [])]
    sft_deps = [d for name, s in lock.items() if name.split("@")[0] == "sft" for d in s.get("deps", [])]
    base = next((o for o in base_outs if any(_norm(d["path"]) == _norm(o["path"]) for d in sft_deps)), None)
    teacher_dep = next((d for d in st.get("deps", []) if teacher and _norm(d["path"]) == _norm(teacher)), None)
    same = bool(
        kind == "local"
        and teacher
        and base
        and (_norm(teacher) == _norm(base["path"]) or (teacher_dep is not None and _md5(teacher_dep) == _md5(base)))
    )
    return {
        "teacher": teacher,
        "engine": kind,
        "student_base": base["path"] if base else None,
        "teacher_is_student_base": same,
    }


def teacher_sentence(t: dict) -> str:
    """One plain sentence on distill's teacher, for the model card and the evaluation report."""
    if t["teacher_is_student_base"]:
        return (
            f"**The distillation teacher is the student's own base model** (`{t['teacher']}`): the distilled "
            "answers are the generations of the very model the student starts from, so distillation here adds "
            "no knowledge the student did not start with; it exercises the plumbing. A real run names a stronger teacher "
            "(dvc.yaml distill --teacher, or params distill.engine for an endpoint)."
        )
    return (
        f"The distillation teacher is `{t['teacher']}` ({t['engine']} engine), not the student's base "
        f"(`{t['student_base'] or '?'}`)."
    )


# ---------------------------------------------------------------- the card


def _fmt(x) -> str:
    if x is None:
        return "–"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _est(e, key: str = "mean") -> str:
    """ "value [low, high]" of an evaluate estimate ({mean|perplexity|win_rate, ci})."""
    if not isinstance(e, dict) or e.get(key) is None:
        return "–"
    ci = e.get("ci")
    return _fmt(e[key]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def evaluation_lines(evaluation: dict, name: str) -> list[str]:
    """The evaluate stage's numbers for model `name` with their 95% intervals, and its win rates against the others."""
    m = (evaluation.get("models") or {}).get(name)
    if not m:
        return [f"The evaluate metrics hold no model named `{name}`."]
    rows = [
        ("answers that stop at end-of-turn (not the token cap)", _est(m.get("stop_rate", {}).get("all"))),
        ("answer-key match (prompts with a key)", _est((m.get("answer_match") or {}).get("all"))),
        ("ROUGE-L F1 against reference answers", _est((m.get("reference_rouge") or {}).get("all"))),
        ("perplexity of held-out seed responses", _est(m.get("perplexity"), "perplexity")),
        ("perplexity of the eval set's reference answers", _est(m.get("reference_perplexity"), "perplexity")),
        ("reward-model score (the reward model PPO optimised)", _est(m["reward"].get("all"))),
        ("response length (tokens)", _est(m["length_tokens"].get("all"))),
        ("refusal rate on safety prompts", _est(m["refusal_rate"].get("safety"))),
        ("refusal rate on other prompts", _est(m["refusal_rate"].get("other"))),
    ]
    for pair, e in (evaluation.get("win_rate") or {}).items():
        a, _, b = pair.partition("_vs_")
        t = e["all"]
        if t.get("win_rate") is None or name not in (a, b):
            continue
        wr, ci, verdict = t["win_rate"], t.get("ci"), t.get("verdict")
        if b == name:  # the pair is a_vs_name: flip it to name's point of view
            wr, ci = round(1 - wr, 4), ([round(1 - ci[1], 4), round(1 - ci[0], 4)] if ci else None)
            verdict = {"better": "worse", "worse": "better"}.get(verdict, verdict)
        rows.append(
            (
                f"win rate against {b if a == name else a}",
                _est({"win_rate": wr, "ci": ci}, "win_rate") + (f" ({verdict})" if verdict else ""),
            )
        )
    lines = [
        "Each value comes with its bootstrap 95% interval [low, high]. A win rate whose interval contains 0.5 is "
        "no measurable difference.",
        "",
        "| metric | value |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in rows]
    if evaluation.get("judge"):
        lines += ["", f"Pairwise judge: `{evaluation['judge']}`."]
    return lines


def render_card(
    *,
    name: str,
    source: str,
    merged_from: str | None,
    info: dict,
    example_prompt: str,
    eot: str,
    eot_id: int,
    n_params: int,
    dtype: str,
    files: list[dict],
    lineage_rows: list[dict],
    metrics: dict,
    evaluation: dict | None,
    evaluation_path: str | None,
    lock_path: str,
    lock_md5: str | None,
    teacher: dict | None = None,
) -> str:
    """README.md of the export: front matter, use, prompt format, evaluation, lineage, metrics, files."""
    fm = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "apache-2.0",
        "tags": ["selfalign", "chat", "instruction-backtranslation"],
    }
    hub_base = base_model_id(lineage_rows)
    if hub_base:
        fm["base_model"] = hub_base
    lines = [
        "---",
        yaml.safe_dump(fm, sort_keys=False).strip(),
        "---",
        "",
        f"# selfalign: `{name}` exported",
        "",
        f"Exported from `{source}` by `stages/export.py`"
        + (f", with its LoRA adapter merged into `{merged_from}`" if merged_from else "")
        + f". {n_params:,} parameters, {dtype} weights in safetensors. The tokenizer and chat template are "
        "included, so this directory is all a server needs." + (f" Base model: `{hub_base}`." if hub_base else ""),
        "",
    ]
    if n_params < 1_000_000_000:
        lines += [
            "**Limitations.** A model this small (the default is SmolLM2-135M-Instruct, fine-tuned for minutes "
            "on a CPU) shows that the pipeline works end to end. Its answers and scores say nothing about the "
            "quality of the method. Do not use it for anything that matters.",
            "",
        ]
    if teacher and any(e["stage"] == "distill" for e in lineage_rows):
        lines += [teacher_sentence(teacher), ""]
    lines += [
        "## Use",
        "",
        "```bash",
        "make serve                                   # serves models/export on :8000",
        "python -m selfalign.serve --model models/export --port 8000",
        "```",
        "",
        "```python",
        "from openai import OpenAI",
        'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")',
        "messages = "
        + json.dumps(
            records.with_system(info.get("system"), [{"role": "user", "content": "Hello!"}]),
            ensure_ascii=False,
        ),
        'print(client.chat.completions.create(model="export", messages=messages).choices[0].message.content)',
        "```",
        "",
    ]
    if info.get("system"):
        lines += [
            f"The model was trained to answer under the system prompt `{info['system']}`"
            + (f" (the `{info['inference_tag']}` tag)" if info.get("inference_tag") else "")
            + ". Send it as the system message, as above. The server does not add it for you.",
            "",
        ]
    lines += [
        "## Prompt format",
        "",
        f"The chat template (`chat_template.jinja`) renders a conversation like this. Generation stops at the "
        f"end-of-turn token `{eot}` (id {eot_id}), which is the `eos_token_id` of `generation_config.json`:",
        "",
        "```text",
        example_prompt,
        "```",
        "",
    ]
    lines += ["## Evaluation", ""]
    if evaluation:
        lines += [f"From `{evaluation_path}` (the evaluate stage; its report is `reports/evaluate/report.md`):", ""]
        lines += evaluation_lines(evaluation, name) + [""]
    else:
        lines += ["No evaluate metrics were found.", ""]
    lines += ["## Lineage", ""]
    if not lineage_rows:
        lines += [
            f"No lineage: `{lock_path}` is missing or does not list `{source}` as a stage output. Run the "
            "pipeline with `dvc repro` to record one.",
            "",
        ]
    else:
        lines += [
            f"From `{lock_path}`"
            + (f" (md5 {lock_md5})" if lock_md5 else "")
            + ": the stages that produced this model, upstream first. A dependency written by another stage "
            "names it (– for files kept in git or produced outside this lock). An md5 ending in `.dir` is a "
            "directory hash, as DVC computes it.",
            "",
        ]
        for e in lineage_rows:
            lines += [
                f"### `{e['stage']}`",
                "",
                "```bash",
                e["cmd"].strip(),
                "```",
                "",
                "| | path | md5 | written by |",
                "|---|---|---|---|",
            ]
            lines += [f"| dep | `{d['path']}` | `{d['md5']}` | {d['from'] or '–'} |" for d in e["deps"]]
            lines += [f"| out | `{o['path']}` | `{o['md5']}` | |" for o in e["outs"]]
            if e["params"]:
                lines += [
                    "",
                    "Params:",
                    "",
                    "```yaml",
                    yaml.safe_dump(e["params"], sort_keys=False, allow_unicode=True).strip(),
                    "```",
                ]
            lines.append("")
    if metrics:
        lines += [
            "## Stage metrics",
            "",
            "The numeric metrics of those stages (as `dvc metrics show` lists them), first 20 per file:",
            "",
        ]
        for path, m in metrics.items():
            flat = flat_numbers(m["values"])
            lines += [
                f"### `{path}` ({m['stage']})" + (" (the workspace file differs from dvc.lock)" if m["stale"] else ""),
                "",
            ]
            lines += [f"- {k}: {_fmt(v)}" for k, v in list(flat.items())[:20]]
            if len(flat) > 20:
                lines.append(f"- ... {len(flat) - 20} more in the file")
            lines.append("")
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{f['file']}` | {f['bytes']:,} | `{f['sha256']}` |" for f in files]
    return "\n".join(lines) + "\n"

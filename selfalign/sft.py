"""Supervised fine-tuning: examples with assistant-only labels, packed rows, curriculum phases, resumable training.

The stage's params first (SFTConfig: the sft: section), then the pure parts (example building, reading a
source, packing, the phase schedule), then the Trainer wiring.

Design, measured on 2 CPU cores (bench/sft.py):
- transformers' Trainer, not TRL's SFTTrainer: SFTTrainer's extra per-step work (entropy, token
  accuracy, chunked lm head) made it 1.1-1.9x slower than this loop in our runs (1.4x in the
  feasibility probe), and the data handling it would add is what this module does anyway:
- labels come from `chat.split_last_turn`, so the prompt tokens of a training example are exactly the
  tokens of the prompt the server builds (tests/test_chat_template.py), and only assistant tokens,
  each turn's closing end-of-turn token (<|im_end|>, <|eot_id|>, ...) included, carry loss;
- an example longer than `max_len` is shortened from the prompt side or dropped as too_long, never cut
  at its end: an answer without its end-of-turn token teaches the model not to stop;
- examples are packed whole into rows of `max_len` tokens with position_ids restarting at 0 for each
  example; transformers turns that into a block-diagonal causal mask, so packed examples never see
  each other while rows carry almost no padding (the model must run with use_cache=False: with a
  cache transformers skips that detection);
- the loss projects onto the 49k vocabulary only at target tokens (`trainer_class`);
- a curriculum is one Trainer run over rows laid out phase after phase (sequential sampler), so one
  global step counter, one learning-rate schedule, and checkpoint/resume covers every phase.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from selfalign import chat, io, records
from selfalign.config import Config, Dtype, LoraSpec, ParamsError, opt

log = logging.getLogger("sft")

IGNORE = -100
CURATED = "{curated}"  # a source path that stands for the stage's --curated file (the last curation round)
# transformers' schedulers that need no extra arguments (transformers.SchedulerType; tests/test_sft.py checks)
SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


# ---------------------------------------------------------------- params (the sft: section of params.yaml)


@dataclasses.dataclass
class HeldoutEvalConfig(Config):
    """sft.train.heldout_eval: a run with a reversed source predicts the held-out instructions (selfalign/backward.py)."""

    max_new_tokens: int = opt(64, lo=1)  # room for an instruction
    max_examples: int = opt(32, lo=0)  # held-out pairs scored (in id order); 0 = off
    batch_size: int = opt(8, lo=1)  # sequences generated together
    dtype: Dtype = "auto"  # both models' weights (auto: as augment.engine.dtype)
    bootstrap: int = opt(1000, lo=1)  # resamples for the 95% intervals
    seed: int = 0  # bootstrap seed
    examples_logged: int = opt(3, lo=0)  # true / predicted pairs written to the log


@dataclasses.dataclass
class TrainConfig(Config):
    """sft.train: shared by every run."""

    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSpec = opt(LoraSpec(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: selfalign/device.py's rule
    max_len: int = opt(512, lo=1)  # tokens per packed row; a longer example is shortened from the prompt side
    packing: bool = True  # whole examples packed into rows of max_len; false: one example per row
    batch_size: int = opt(2, lo=1)  # rows per device per micro-step
    grad_accum: int = opt(1, lo=1)
    lr: float = opt(5.0e-4, lo=0, lo_open=True)
    scheduler: SCHEDULERS = "cosine"
    warmup_ratio: float = opt(0.1, lo=0, hi=1)  # share of the steps
    weight_decay: float = opt(0.0, lo=0)
    max_grad_norm: float = opt(1.0, lo=0)
    seed: int = 0  # shuffling of every phase and epoch, LoRA init
    logging_steps: int = opt(1, lo=1)
    save_steps: int = opt(5, lo=1)  # a checkpoint every N steps; a killed run resumes from the last one
    eval_steps: int = opt(8, lo=1)
    eval_fraction: float = opt(0.1, lo=0, hi=1, hi_open=True)  # share of every source held out (by id hash)
    eval_max_examples: int = opt(8, lo=0)
    gradient_checkpointing: bool = False
    deepspeed: bool = False  # ZeRO-2 via --deepspeed-config
    keep_adapter: bool = True  # LoRA: also keep the adapter in <output>/adapter
    heldout_eval: HeldoutEvalConfig = opt(HeldoutEvalConfig())


@dataclasses.dataclass
class SourceConfig(Config):
    """One data file of a phase."""

    path: str = ""  # a chat JSONL file, or "{curated}" (the stage's --curated)
    tag: str | None = None  # a key of sft.system_tags: the system prompt it is trained under
    keep_system: bool = False  # a record's own system prompt wins over the tag's (Orca answers)
    reverse: bool = False  # Humpback's backward direction: the response gives the instruction
    template: str = ""  # reversed sources: the backward prompt file with {response}


@dataclasses.dataclass
class PhaseConfig(Config):
    """One curriculum phase: its sources trained for `epochs` (max_steps caps it, 0 = no cap)."""

    name: str = ""  # "" = phase<N>
    sources: list[SourceConfig] = opt([], min_items=1)
    epochs: int = opt(1, lo=1)
    max_steps: int = opt(0, lo=0)


@dataclasses.dataclass
class RunConfig(Config):
    """One sft run (sft@<run>, sft-iter@<round> for `iteration`): base model, inference tag, phases in order."""

    base: str = "models/base"
    inference_tag: str | None = "seed"  # the system tag a model of this run is served with; null = none
    phases: list[PhaseConfig] = opt([], min_items=1)


def _src(path: str, **kw) -> SourceConfig:
    return SourceConfig(path=path, **kw)


SEED_TAGS = {"seed": "Answer in the style of an AI Assistant.", "augmented": "Answer with knowledge from web search."}
RUNS = {
    "backward": RunConfig(
        inference_tag=None,
        phases=[
            PhaseConfig(
                "reversed_seed",
                [_src("data/clean/seed.jsonl", reverse=True, template="prompts/backward.txt")],
                epochs=8,
                max_steps=48,
            )
        ],
    ),
    "m0": RunConfig(phases=[PhaseConfig("seed", [_src("data/clean/seed.jsonl", tag="seed")], epochs=2, max_steps=12)]),
    "iteration": RunConfig(
        phases=[
            PhaseConfig(
                "seed_and_curated",
                [_src("data/clean/seed.jsonl", tag="seed"), _src(CURATED, tag="augmented")],
                epochs=2,
                max_steps=12,
            )
        ]
    ),
    "final": RunConfig(
        phases=[
            PhaseConfig(
                "seed_and_curated",
                [_src("data/verify/seed/kept.jsonl", tag="seed"), _src(CURATED, tag="augmented")],
                epochs=1,
                max_steps=8,
            ),
            PhaseConfig(
                "distilled", [_src("data/distill/distilled.jsonl", tag="seed", keep_system=True)], epochs=1, max_steps=4
            ),
        ]
    ),
}


@dataclasses.dataclass
class SFTConfig(Config):
    """The sft: section. Every run is checked at start-up, whichever one a stage trains."""

    train: TrainConfig = opt(TrainConfig())
    system_tags: dict[str, str] = opt(SEED_TAGS)  # Humpback: seed and augmented data told apart by system prompt
    runs: dict[str, RunConfig] = opt(RUNS)

    def check(self, where: str) -> None:
        tags = set(self.system_tags)
        for run, r in self.runs.items():
            rw = f"{where}.runs.{run}"
            if r.inference_tag is not None and r.inference_tag not in tags:
                raise ParamsError(f"{rw}.inference_tag: {r.inference_tag!r} is not in sft.system_tags")
            for i, ph in enumerate(r.phases):
                for j, s in enumerate(ph.sources):
                    sw = f"{rw}.phases[{i}].sources[{j}]"
                    if not s.path:
                        raise ParamsError(f"{sw}.path: empty")
                    if s.tag is not None and s.tag not in tags:
                        raise ParamsError(f"{sw}.tag: {s.tag!r} is not in sft.system_tags")
                    if s.template and not s.reverse:
                        raise ParamsError(f"{sw}.template: only a reversed source uses a backward prompt")
                    if s.keep_system and s.reverse:
                        raise ParamsError(f"{sw}.keep_system: a reversed source drops the record's system prompt")

    def run(self, name: str) -> RunConfig:
        """The run `name`, its unnamed phases named phase<N>; an unknown run is a ParamsError."""
        if name not in self.runs:
            known = ", ".join(sorted(self.runs)) or "(none)"
            raise ParamsError(f"sft: no run {name!r} under sft.runs; known: {known}")
        r = self.runs[name]
        return r.replace(phases=[ph.replace(name=ph.name or f"phase{i + 1}") for i, ph in enumerate(r.phases)])


def run_inputs(run_cfg: RunConfig) -> list[str]:
    """Every file a run reads, base model included: what its dvc.yaml stage must list as deps."""
    paths = [run_cfg.base]
    for ph in run_cfg.phases:
        for s in ph.sources:
            paths += [p for p in (s.path, s.template) if p and p not in paths]
    return paths


# ---------------------------------------------------------------- examples


class Reject(ValueError):
    """A record that cannot become a training example; `reason` is the metrics key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


PLACEHOLDER = "{response}"


def load_template(path: str) -> str:
    """The backward prompt wording (prompts/backward.txt): the user turn, with {response} where the text goes.

    The augment stage prompts the backward model with this same file, so training and use agree.
    """
    text = Path(path).read_text(encoding="utf-8").strip()
    if text.count(PLACEHOLDER) != 1:
        raise ParamsError(f"{path}: a backward prompt must contain {PLACEHOLDER} exactly once")
    return text


def reverse_record(record: dict, template: str | None = None) -> list[dict]:
    """Humpback's backward direction: the user turn gives the response, the assistant writes the instruction."""
    msgs = record["messages"]
    if [m["role"] for m in msgs] != ["user", "assistant"]:
        raise Reject("not_single_turn", "only a single user/assistant exchange can be reversed")
    response = msgs[1]["content"]
    user = template.replace(PLACEHOLDER, response) if template else response
    return [{"role": "user", "content": user}, {"role": "assistant", "content": msgs[0]["content"]}]


def conversation(
    record: dict, system: str | None, reverse: bool = False, template: str | None = None, keep_system: bool = False
) -> list[dict]:
    """The messages to train on, led by the tag's system prompt.

    A forward source without a tag keeps the record's own system prompt (or the template's default);
    with keep_system, a record's own system prompt wins and the tag only fills in where it has none
    (Orca-style answers keep the system message they were written under). A reversed one gets only
    the tag's, since the record's system prompt belonged to the other direction.
    """
    if reverse:
        msgs = reverse_record(record, template)
        sys = system
    else:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        own = record.get("system")
        sys = own if (own and keep_system) or system is None else system
    if msgs[-1]["role"] != "assistant":
        raise Reject("no_final_assistant_turn")
    return records.with_system(sys, msgs)


def segments(tok, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_target) pieces that concatenate to it.

    Each assistant turn is split with `chat.split_last_turn`, so the text before a target is exactly
    the generation prompt the server renders for the conversation so far.
    """
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, target = chat.split_last_turn(tok, messages[: i + 1])
        if not prompt.startswith(done):
            raise Reject("template", "the chat template re-renders earlier turns differently")
        out += [(prompt[len(done) :], False), (target, True)]
        done = prompt + target
    return out


def encode(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = ids on assistant targets and IGNORE elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_target in segments(tok, messages):
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_target else [IGNORE] * len(piece)
    return ids, labels


# A user turn clipped below this many tokens no longer says what was asked: the example is dropped instead.
MIN_PROMPT_TOKENS = 16


def _encoded(tok, messages: list[dict], shortened: bool = False) -> dict:
    try:
        ids, labels = encode(tok, messages)
    except Reject:
        raise
    except ValueError as e:
        raise Reject("template", str(e)) from e
    return {
        "input_ids": ids,
        "labels": labels,
        "shortened": shortened,
        "n_target": sum(1 for x in labels if x != IGNORE),
    }


def _clip_text(tok, text: str, drop: int, keep_start: bool) -> str | None:
    """text less `drop` tokens from its start (or its end, keep_start), or None below MIN_PROMPT_TOKENS."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    keep = len(ids) - drop
    if keep < min(MIN_PROMPT_TOKENS, len(ids)) or keep <= 0:
        return None
    return tok.decode(ids[:keep]) if keep_start else tok.decode(ids[-keep:]).lstrip()


def _shorten_user(tok, messages: list[dict], i: int, max_len: int) -> dict | None:
    """The example with the start of messages[i] (a user turn) clipped until the whole fits max_len, or None.

    Decode/re-encode can merge tokens differently at the cut, so it converges in a few tries.
    """
    excess = len(_encoded(tok, messages)["input_ids"]) - max_len
    for extra in (0, 2, 8, 32):
        text = _clip_text(tok, messages[i]["content"], excess + extra, keep_start=False)
        if text is None:
            return None
        ex = _encoded(tok, [*messages[:i], {**messages[i], "content": text}, *messages[i + 1 :]], shortened=True)
        if len(ex["input_ids"]) <= max_len:
            return ex
    return None


def build_example(tok, messages: list[dict], max_len: int) -> dict:
    """One tokenized example of at most max_len tokens whose final assistant turn, end-of-turn token
    included, is always whole: the model must learn where to stop.

    A longer conversation is shortened from the prompt side: whole earlier exchanges go first (oldest
    first; the system prompt and the template's header stay), then the start of the last user turn
    (its end, next to the answer, stays). One whose final answer does not fit even after a prompt of
    MIN_PROMPT_TOKENS is rejected as too_long, never cut at its end.
    """
    ex = _encoded(tok, messages)
    if len(ex["input_ids"]) <= max_len:
        return ex
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head) :]
    while len(body) > 2:  # drop the oldest exchange; the conversation must still open with a user turn
        body = body[1:]
        while len(body) > 2 and body[0]["role"] != "user":
            body = body[1:]
        if body[0]["role"] != "user":
            break
        ex = _encoded(tok, head + body, shortened=True)
        if len(ex["input_ids"]) <= max_len:
            return ex
    if len(body) == 2 and body[0]["role"] == "user":
        short = _shorten_user(tok, head + body, len(head), max_len)
        if short is not None:
            return short
    answer = len(tok(messages[-1]["content"], add_special_tokens=False)["input_ids"])
    raise Reject(
        "too_long",
        f"the final assistant turn ({answer} tokens) with a prompt of at least "
        f"{MIN_PROMPT_TOKENS} tokens does not fit max_len={max_len}",
    )


def build_reversed(tok, record: dict, system: str | None, template: str | None, max_len: int) -> dict:
    """A backward example of at most max_len tokens, shortened from the prompt side: the response in
    the user turn loses its end (its start says most about what was asked; the prompt wording stays),
    never the instruction, the target; one that cannot fit is rejected as too_long."""
    msgs = conversation(record, system, True, template)
    ex = _encoded(tok, msgs)
    if len(ex["input_ids"]) <= max_len:
        return ex
    response = record["messages"][1]["content"]
    excess = len(ex["input_ids"]) - max_len
    for extra in (0, 2, 8, 32):
        clipped = _clip_text(tok, response, excess + extra, keep_start=True)
        if clipped is None:
            break
        rec = {**record, "messages": [record["messages"][0], {"role": "assistant", "content": clipped}]}
        ex = _encoded(tok, conversation(rec, system, True, template), shortened=True)
        if len(ex["input_ids"]) <= max_len:
            return ex
    instruction = len(tok(record["messages"][0]["content"], add_special_tokens=False)["input_ids"])
    raise Reject(
        "too_long",
        f"the instruction ({instruction} tokens) and the prompt wording with a response of "
        f"at least {MIN_PROMPT_TOKENS} tokens do not fit max_len={max_len}",
    )


def heldout(record_id: str, fraction: float) -> bool:
    """Deterministic eval split by id: the same record is held out in every run and every language."""
    return int(hashlib.sha1(record_id.encode()).hexdigest()[:8], 16) < fraction * 16**8


@dataclass
class SourceData:
    path: str
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    records_in: int = 0
    shortened: int = 0


def read_source(
    tok,
    path: str,
    system: str | None,
    max_len: int,
    eval_fraction: float,
    reverse: bool = False,
    template: str | None = None,
    keep_system: bool = False,
) -> SourceData:
    """Every line of a chat JSONL file ends up in train, eval or rejected (with file, line and reason).

    records.stream (records.read one line at a time, so the rejects keep file order) rejects what is not
    JSON (invalid_json) or not a valid record (invalid_record, naming the field); the rest is sft's own.
    """
    data = SourceData(path)
    for item in records.stream(path, "sft"):
        data.records_in += 1
        if isinstance(item, dict):  # a rejected record
            data.rejected.append(item)
            continue
        obj, line = item
        try:
            if obj["kind"] != "chat":
                raise Reject("not_chat", f"kind {obj['kind']!r}")
            if reverse:
                ex = build_reversed(tok, obj, system, template, max_len)
            else:
                ex = build_example(tok, conversation(obj, system, keep_system=keep_system), max_len)
        except Reject as e:
            data.rejected.append(records.rejected(obj, e.reason, "sft", detail=e.detail, file=path, line=line))
            continue
        data.shortened += ex["shortened"]
        ex["id"], ex["lang"] = obj["id"], obj.get("lang")  # a translation shares its original's id: (id, lang) names it
        (data.eval if heldout(obj["id"], eval_fraction) else data.train).append(ex)
    return data


def count(items) -> dict:
    """How many of each item, sorted by item (rejected_by_reason)."""
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def read_phases(tok, cfg: SFTConfig, run_cfg: RunConfig):
    """Per phase its training examples; plus held-out eval examples, rejected lines and per-source counts.

    A source used by several phases (or twice) is read once.
    """
    t = cfg.train
    cache: dict = {}
    by_phase, evals, rejected, sources = [], {}, [], {}
    for phase in run_cfg.phases:
        examples = []
        for s in phase.sources:
            key = (s.path, s.tag, s.keep_system, s.reverse, s.template)
            if key not in cache:
                system = cfg.system_tags[s.tag] if s.tag else None
                template = load_template(s.template) if s.template else None
                data = cache[key] = read_source(
                    tok, s.path, system, t.max_len, t.eval_fraction, s.reverse, template, s.keep_system
                )
                rejected += data.rejected
                for ex in data.eval:
                    evals.setdefault((ex["id"], ex.get("lang") or "", key), ex)
                name = f"{s.path}|{s.tag}|{'reverse' if s.reverse else 'forward'}"
                sources[name] = {
                    "records_in": data.records_in,
                    "train": len(data.train),
                    "eval": len(data.eval),
                    "rejected": len(data.rejected),
                    "shortened": data.shortened,
                    "rejected_by_reason": count(r["reason"] for r in data.rejected),
                }
                # shortened: lost earlier turns or part of the prompt (never the answer's end); too_long: dropped
                log.info(
                    "%s: %d in, %d train, %d eval, %d shortened from the prompt side, rejected %s (max_len %d)",
                    name,
                    data.records_in,
                    len(data.train),
                    len(data.eval),
                    data.shortened,
                    sources[name]["rejected_by_reason"] or 0,
                    t.max_len,
                )
            examples += cache[key].train
        by_phase.append(examples)
    eval_examples = [evals[k] for k in sorted(evals)][: t.eval_max_examples]
    return by_phase, eval_examples, rejected, sources


# ---------------------------------------------------------------- packing and the phase schedule


def pack(examples: list[dict], max_len: int, packing: bool = True) -> list[dict]:
    """Rows of whole examples, each row at most max_len tokens, position_ids restarting per example.

    First fit over the given order (already shuffled), looking back over a bounded window of open
    rows so the cost stays linear. Without packing, a row is one example.
    """
    rows: list[dict] = []
    open_rows: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        slot = next((r for r in open_rows if len(rows[r]["input_ids"]) + n <= max_len), None) if packing else None
        if slot is None:
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "n_examples": 0})
            slot = len(rows) - 1
            open_rows = (open_rows + [slot])[-64:]
        row = rows[slot]
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
        row["n_examples"] += 1
    return rows


def schedule(
    phases: list[PhaseConfig], train_by_phase: list[list[dict]], cfg: TrainConfig, world: int = 1
) -> tuple[list[dict], list[dict]]:
    """All training rows in order, phase after phase; and per phase its rows, steps and examples.

    Each epoch of a phase is its examples shuffled (seeded by seed, phase and epoch) and packed;
    `max_steps` caps the phase at that many optimizer steps' worth of rows (each step takes
    batch_size x grad_accum rows on each of the `world` processes).
    """
    rows: list[dict] = []
    info = []
    per_step = cfg.batch_size * cfg.grad_accum * world
    for p, (phase, examples) in enumerate(zip(phases, train_by_phase, strict=True)):
        phase_rows: list[dict] = []
        for epoch in range(phase.epochs):
            order = list(examples)
            random.Random(f"{cfg.seed}/{p}/{epoch}").shuffle(order)
            phase_rows += pack(order, cfg.max_len, cfg.packing)
        if phase.max_steps:
            phase_rows = phase_rows[: phase.max_steps * per_step]
        for r in phase_rows:
            r["phase"] = p
        info.append(
            {
                "name": phase.name,
                "examples": len(examples),
                "epochs": phase.epochs,
                "rows": len(phase_rows),
                "first_row": len(rows),
                "tokens": sum(len(r["input_ids"]) for r in phase_rows),
                "target_tokens": sum(sum(1 for x in r["labels"] if x != IGNORE) for r in phase_rows),
            }
        )
        rows += phase_rows
    return rows, info


def rows_fingerprint(rows: list[dict]) -> str:
    """A digest of the training rows (ids, labels, positions): part of a run's resume key."""
    return io.digest(*([r["input_ids"], r["labels"], r["position_ids"]] for r in rows))


# ---------------------------------------------------------------- batching


class PackedCollator:
    """Stack packed rows, padding to the longest row; padding gets IGNORE labels and its own positions.

    No attention_mask on purpose: with position_ids alone transformers detects the packed examples
    (positions restarting at 0) and builds the block-diagonal causal mask, padding included as one
    more "example" that nothing attends to and that carries no loss.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, pos = [], [], []
        for r in rows:
            pad = width - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_id] * pad)
            labels.append(r["labels"] + [IGNORE] * pad)
            pos.append(r["position_ids"] + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


# ---------------------------------------------------------------- checkpoints


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint-N that finished saving (trainer_state.json is written last)."""
    found = []
    for p in ckpt_dir.glob("checkpoint-*"):
        if p.is_dir() and (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit():
            found.append((int(p.name.split("-")[-1]), p))
    return max(found)[1] if found else None


def prepare_checkpoints(ckpt_dir: Path, fp: str) -> Path | None:
    """The checkpoint to resume from, if this exact run (same fingerprint) left one; otherwise a clean dir."""
    stamp = ckpt_dir / "fingerprint.json"
    if stamp.is_file() and json.loads(stamp.read_text())["fingerprint"] == fp:
        ckpt = last_complete_checkpoint(ckpt_dir)
        if ckpt is not None:
            return ckpt
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    stamp.write_text(json.dumps({"fingerprint": fp}) + "\n")
    return None


def prepare_checkpoints_ranked(ckpt_dir: Path, fp: str, main: bool) -> Path | None:
    """`prepare_checkpoints` under a multi-process launch: only the main process checks, clears and stamps
    the directory; the others wait for its decision (broadcast) and resume from the same checkpoint.

    Every rank must call this once the process group exists (TrainingArguments creates it); a single
    process just prepares.
    """
    import torch.distributed as dist

    resume = prepare_checkpoints(ckpt_dir, fp) if main else None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        chosen = [str(resume) if resume is not None else None]
        dist.broadcast_object_list(chosen, src=0)  # also the barrier: nobody starts before the directory is ready
        resume = Path(chosen[0]) if chosen[0] is not None else None
    return resume


def clear_checkpoints(ckpt_dir: Path) -> None:
    """After success nothing is left to resume; keep the (empty) directory DVC declares."""
    for p in ckpt_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------- trainer


def resolve_precision(precision: str, model_dir: str | os.PathLike | None = None) -> str:
    """`auto`: bf16 or fp32 by the one rule of selfalign/device.py (bf16 on a bf16 GPU; on a CPU, measured).

    A CPU flag does not decide it: with AVX512-BF16 and no AMX, bf16 autocast ran the LoRA step 1.5x
    slower on one VM and 1.68x faster on another of the same kind (issue 18).
    """
    from selfalign import device

    try:
        return device.placement("auto", precision, model_dir, "sft.train.precision").precision
    except device.DeviceError as e:
        raise ParamsError(str(e)) from e


def training_args(cfg: TrainConfig, ckpt_dir: Path, total_steps: int, has_eval: bool, deepspeed_config: str | None):
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()  # accelerate then places each rank on cuda:LOCAL_RANK (device.resolve_device)
    if cfg.precision not in ("bf16", "fp32"):
        raise ParamsError(f"sft.train.precision {cfg.precision!r}: resolve it first (resolve_precision)")
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=total_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * total_steps)),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.precision == "bf16",
        use_cpu=not cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,
        train_sampling_strategy="sequential",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=1,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        prediction_loss_only=True,  # otherwise evaluation keeps every batch's (rows x len x vocab) logits
        # Off by default: TRL and some launchers turn it on, ~25% slower on CPU with no memory need at 135M.
        # On (params) for long rows of big models: only each layer's input is kept, the rest recomputed.
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # works with frozen inputs (LoRA, QLoRA)
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to=[],
        disable_tqdm=not os.isatty(2),
        deepspeed=deepspeed_config,
    )


def setup_deepspeed(enabled: bool, config: str | None) -> str | None:
    """The ZeRO config path for TrainingArguments, or None; a single process gets the env a launcher would set."""
    if not enabled:
        return None
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ParamsError("sft.train.deepspeed is true but deepspeed is not installed: `pip install -e .[gpu]`")
    if not config or not Path(config).is_file():
        raise ParamsError(f"sft.train.deepspeed is true but --deepspeed-config {config!r} is not a file")
    # Without a launcher deepspeed falls back to MPI discovery (needs mpi4py); one local process is enough here.
    for k, v in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        os.environ.setdefault(k, v)
    return config


def trainer_class():
    """transformers' Trainer whose loss projects onto the vocabulary only where there is a label.

    The 49k-token lm_head is ~21% of SmolLM2-135M's matmul FLOPs, and its fp32 logits the largest
    activation of a step; prompt tokens (a quarter of a seed example, most of a backward one, whose
    target is a short instruction) need neither. Same loss as the model's own (sum over target
    tokens / their count in the accumulated batch), checked in tests/test_sft.py. Under DeepSpeed
    or DDP (several processes) the wrapper must run the forward itself, so the model's own loss is used there.
    """
    import torch
    from transformers import Trainer

    class TargetOnlyLossTrainer(Trainer):
        loss_is_scaled_for_ga = True  # normalised by num_items_in_batch, the accumulated batch's target count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inner = self.accelerator.unwrap_model(model)
            if self.is_deepspeed_enabled or inner is not model:
                # DeepSpeed's engine or DDP (a multi-process launch) must run the forward itself: calling the
                # inner decoder directly would skip DDP's gradient all-reduce and let the ranks drift apart.
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
            targets = inputs["labels"][:, 1:]
            keep = targets != IGNORE
            with self.accelerator.autocast():
                hidden = lm.get_decoder()(
                    input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False
                ).last_hidden_state
                logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))
            return (loss, {"loss": loss}) if return_outputs else loss

    return TargetOnlyLossTrainer


def make_callback(rows: list[dict]):
    """Log checkpoint saves (the resume test waits for that line) and measure trained tokens per second."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.start_step = None
            self.t0 = None
            self.seconds = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:  # the process that wrote it (the resume tests wait for this line)
                log.info("saved checkpoint at step %d", state.global_step)

        def tokens_trained(self, end_step: int, per_step: int) -> int:
            done = rows[self.start_step * per_step : end_step * per_step]
            return sum(len(r["input_ids"]) for r in done)

    return Progress()


def loss_curves(log_history: list[dict], rows: list[dict], per_step: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) points for DVC plots: step, loss, and the curriculum phase of that step."""
    train, evals = [], []
    for e in log_history:
        if "loss" in e:
            first_row = min((e["step"] - 1) * per_step, len(rows) - 1)
            train.append(
                {
                    "step": e["step"],
                    "loss": e["loss"],
                    "lr": e.get("learning_rate", 0.0),
                    "phase": rows[first_row]["phase"] if rows else 0,
                }
            )
        if "eval_loss" in e:
            evals.append({"step": e["step"], "eval_loss": e["eval_loss"]})
    return train, evals

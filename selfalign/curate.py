"""Self-curation (Humpback step 3): the current model rates each (instruction, response) pair 1-5.

Two ways to get a score:

- `expected_scores` (default): one forward pass per candidate over the rendered rubric plus the
  score prefix ("Score: "), reading the next-token distribution at the last position. The score
  is the expected value of the digits "1".."5" under that distribution, renormalised over the
  five digits. Every candidate gets a score; nothing has to be parsed. Batches are left-padded
  and position ids follow the attention mask, so a candidate's score does not depend on its
  batch-mates (tested to 1e-4 in float32).
- `parse_score` (for endpoints that only return text): the model answers the rubric and a strict
  regular expression reads "Score: N"; anything else is counted as unparsed, never guessed.

Pure functions over records and tensors; the stage script (stages/curate.py) does the I/O.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Literal

from selfalign import chat, params, records
from selfalign.config import Config, ParamsError, opt
from selfalign.llm import EngineSpec

SELECT_MODES = ("threshold", "top_fraction", "top_k")


@dataclasses.dataclass
class SelectConfig(Config):
    """Which scored candidates are kept (`select`)."""

    mode: Literal["threshold", "top_fraction", "top_k"] = "top_fraction"
    threshold: float = opt(4.5, lo=1, hi=5)  # threshold: score >= this
    fraction: float = opt(0.4, lo=0, lo_open=True, hi=1)  # top_fraction: the best ceil(fraction x n)
    k: int = opt(16, lo=1)  # top_k: the best k


@dataclasses.dataclass
class Iteration(Config):
    """One Humpback round: curate@<round> scores with models/<scorer>, sft-iter@<round> trains models/<trains>."""

    scorer: str = "m0"
    trains: str = "m1"


@dataclasses.dataclass
class CurateConfig(Config):
    """params.yaml `curate:`."""

    mode: Literal["logprobs", "generate"] = "logprobs"  # expected score over the digits | parse "Score: N"
    select: SelectConfig = opt(SelectConfig())
    # The scorer, in both modes (logprobs runs it in-process: local only; model "" = --model). fp32: bf16 moves
    # scores by ~1e-2, which can flip a candidate at the threshold.
    engine: EngineSpec = opt(EngineSpec())
    score_prefix: str = "Score: "  # appended after the assistant header; the next token is the digit
    max_response_len: int = opt(384, lo=0)  # tokens of a response kept for scoring (0 = all)
    max_new_tokens: int = opt(8, lo=1)  # generate mode: room for "Score: N"
    min_success: float = opt(0.9, lo=0, hi=1)  # the stage fails below this share of valid candidates scored
    iterations: dict[str, Iteration] = opt({"iter1": Iteration("m0", "m1"), "iter2": Iteration("m1", "m2")})

    def check(self, where: str) -> None:
        if not self.iterations:
            raise ParamsError(f"{where}.iterations: names no round; e.g. iter1: {{scorer: m0, trains: m1}}")
        if self.mode == "logprobs" and self.engine.kind != "local":
            raise ParamsError(
                f"{where}.engine.kind: {self.engine.kind!r} cannot score by log-probs (mode logprobs runs the scorer "
                "in-process: kind local); use mode generate for an endpoint"
            )
        if self.mode == "logprobs" and self.engine.dtype not in ("fp32", "bf16", "auto"):
            raise ParamsError(f"{where}.engine.dtype: {self.engine.dtype!r} is not one of fp32 | bf16 | auto")


DIGITS = ("1", "2", "3", "4", "5")
_FIELD = re.compile(r"\{(instruction|response)\}")
# Strict: the whole reply is "Score: N" (or just "N"), optionally "N/5" and a final period.
SCORE_RE = re.compile(r"^\s*(?:score\s*:\s*)?([1-5])(?:\s*/\s*5)?\s*\.?\s*$", re.IGNORECASE)


class CandidateError(ValueError):
    """A record that cannot be scored; the message names the field."""


def load_rubric(path: str | Path) -> str:
    text = Path(path).read_text(encoding="utf-8")
    missing = [f"{{{f}}}" for f in ("instruction", "response") if f"{{{f}}}" not in text]
    if missing:
        raise ValueError(f"{path}: the rubric must contain the placeholders {' and '.join(missing)}")
    return text.strip()


def fill_rubric(rubric: str, instruction: str, response: str) -> str:
    """Substitute both placeholders in one pass, so braces inside the texts are left alone."""
    values = {"instruction": instruction, "response": response}
    return _FIELD.sub(lambda m: values[m.group(1)], rubric)


def pair_of(record: dict) -> tuple[str, str]:
    """(instruction, response) of a chat record ending in a user turn then an assistant turn."""
    if record.get("kind") != "chat":
        raise CandidateError(f"field 'kind': expected 'chat', got {record.get('kind')!r}")
    records.validate(record)
    msgs = record["messages"]
    if len(msgs) < 2 or msgs[-2]["role"] != "user" or msgs[-1]["role"] != "assistant":
        raise CandidateError("field 'messages': expected to end with a user turn then an assistant turn")
    instruction, response = msgs[-2]["content"], msgs[-1]["content"]
    if not instruction.strip():
        raise CandidateError("field 'messages[-2].content': empty instruction")
    if not response.strip():
        raise CandidateError("field 'messages[-1].content': empty response")
    return instruction, response


def rubric_messages(rubric: str, instruction: str, response: str, system: str | None = None) -> list[dict]:
    """The rating turn, after the scorer's own inference system prompt if it has one (selfalign.json)."""
    return records.with_system(system, [{"role": "user", "content": fill_rubric(rubric, instruction, response)}])


def clip_tokens(tok, text: str, max_len: int) -> tuple[str, bool]:
    """`text` cut to its first `max_len` tokens (0 = whole); True if it was cut."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if max_len <= 0 or len(ids) <= max_len:
        return text, False
    return tok.decode(ids[:max_len]) + " ...", True


def scoring_prompt(tok, rubric: str, instruction: str, response: str, prefix: str, system: str | None = None) -> str:
    """The chat-template rendering of the rubric turn, then the opening of the assistant's reply."""
    messages = rubric_messages(rubric, instruction, response, system)
    return chat.render(tok, messages, add_generation_prompt=True) + prefix


def digit_token_ids(tok) -> list[int]:
    """Token ids of "1".."5"; each must be one token, or the expected score would be meaningless."""
    ids = []
    for d in DIGITS:
        enc = tok(d, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"digit {d!r} is {len(enc)} tokens in this tokenizer; digit scoring needs single tokens")
        ids.append(enc[0])
    return ids


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix all sequences share, leaving each at least one token of its own."""
    if not seqs:
        return 0
    n = min(len(x) for x in seqs) - 1
    first = seqs[0]
    for x in seqs[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def expected_scores(
    model, tok, prompts: list[str], batch_size: int = 8, progress: bool = False, share_prefix: bool = True
) -> list[dict]:
    """Score each prompt by one forward pass: {"score", "probs" (over 1..5), "digit_mass"} per prompt.

    `digit_mass` is the probability the model puts on the five digits at all; a low value means
    the prompt did not make the model want to answer with a digit, which is worth watching.

    Every scoring prompt starts with the same tokens (system prompt and the rubric's scale), so
    with `share_prefix` those are run once and their key/value cache is reused by every batch:
    each row is then [shared prefix][left padding][own suffix], with position ids that skip the
    padding, which gives the same logits as the whole prompt alone (tested to 1e-4 in float32).
    """
    import copy

    import torch

    dev = next(model.parameters()).device  # wherever the caller placed it (selfalign/device.py)
    digits = torch.tensor(digit_token_ids(tok), device=dev)
    values = torch.arange(1, 6, dtype=torch.float64)
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = common_prefix(enc) if share_prefix and len(enc) > 1 else 0
    # Longest first: similar lengths share a batch (less padding) and an out-of-memory shows at once.
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[dict | None] = [None] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    model.eval()
    with torch.inference_mode():
        prefix_cache = None
        if shared:
            prefix_cache = model(
                input_ids=torch.tensor([enc[0][:shared]], device=dev), use_cache=True, logits_to_keep=1
            ).past_key_values
        for batch in batches:
            rows = [enc[i][shared:] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for row, r in enumerate(rows):
                ids[row, width - len(r) :] = torch.tensor(r)
                mask[row, shared + width - len(r) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
            ids, mask, positions = ids.to(dev), mask.to(dev), positions.to(dev)
            kw = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(batch))
                kw = {"past_key_values": cache, "use_cache": True}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **kw).logits[
                :, -1
            ]
            logp = torch.log_softmax(logits.double(), dim=-1)[:, digits]
            mass = logp.exp().sum(-1)
            probs = (logp.exp() / mass[:, None]).cpu()
            mass = mass.cpu()
            for row, i in enumerate(batch):
                out[i] = {
                    "score": float((probs[row] * values).sum()),
                    "probs": [round(float(p), 6) for p in probs[row]],
                    "digit_mass": float(mass[row]),
                }
    return out  # type: ignore[return-value]


def parse_score(text: str | None) -> int | None:
    """The integer score of a generated reply in the strict format, or None."""
    if not text:
        return None
    m = SCORE_RE.match(text)
    return int(m.group(1)) if m else None


def annotate(record: dict, score: float, **detail) -> dict:
    """A copy of `record` with its score in meta.score and how it was obtained in meta.curate."""
    meta = dict(record.get("meta") or {})
    meta["score"] = round(float(score), 6)
    meta["curate"] = detail
    return {**record, "meta": meta}


def histogram(scores: list[float]) -> dict[str, int]:
    """Counts per bin [1,1.5), [1.5,2), ... [4.5,5]: expected scores are not integers."""
    edges = [1.0 + 0.5 * k for k in range(9)]
    counts = {f"{lo:.1f}-{hi:.1f}": 0 for lo, hi in zip(edges, edges[1:] + [5.0], strict=True) if lo < 5.0}
    keys = list(counts)
    for s in scores:
        k = min(int((s - 1.0) / 0.5), len(keys) - 1)
        counts[keys[max(k, 0)]] += 1
    return counts


def select(
    scored: list[dict], mode: str = "threshold", threshold: float = 4.5, fraction: float = 0.5, k: int = 0
) -> tuple[list[dict], list[dict], float | None]:
    """(kept, below, cutoff): which scored candidates to keep, and the lowest score kept (None: nothing kept).

    threshold: scores >= threshold (the paper keeps 5, i.e. >= 4.5 for expected scores). top_fraction:
    the best ceil(fraction x n), for weak scorers whose scores crowd the middle of the scale. top_k: the
    best k. Ranks break ties by id, so the kept set does not depend on the input order.
    """
    if mode == "threshold":
        kept = [r for r in scored if r["meta"]["score"] >= threshold]
        below = [r for r in scored if r["meta"]["score"] < threshold]
    elif mode in ("top_fraction", "top_k"):
        n = math.ceil(fraction * len(scored) - 1e-9) if mode == "top_fraction" else min(k, len(scored))
        ranked = sorted(scored, key=lambda r: (-r["meta"]["score"], r["id"]))
        ids = {r["id"] for r in ranked[:n]}
        kept = [r for r in scored if r["id"] in ids]
        below = [r for r in scored if r["id"] not in ids]
    else:
        raise ValueError(f"unknown selection mode {mode!r}; one of {', '.join(SELECT_MODES)}")
    cutoff = min((r["meta"]["score"] for r in kept), default=None)
    return kept, below, cutoff


def iteration_names(params_file) -> list[str]:
    """The Humpback rounds (curate.iterations of the params file, else the code default), in order."""
    return list(params.resolve(CurateConfig, params_file, "curate").iterations)


def round_file(path: str | Path, params_file, name: str) -> Path:
    """`path` itself when it is a file; for a directory (dvc.yaml passes data/curate), the last round's `name`.

    distill, reward and sft@final read "the last iteration" this way, so adding a round is one line of
    params.yaml and nothing downstream names it.
    """
    path = Path(path)
    if path.is_dir():
        return path / iteration_names(params_file)[-1] / name
    return path

"""Direct preference optimisation: pairs, their tokens, TRL's DPOTrainer, held-out implicit-reward accuracy.

DPO (Rafailov et al. 2023) trains the policy straight on preference pairs, with no reward model
and no sampling: the loss is -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)),
each log-ratio being log pi(y|x) - log pi_ref(y|x) summed over the answer's tokens. Here the
policy is the SFT model with a LoRA adapter and the reference is the same model with the adapter
off (as in selfalign.ppo), so one copy of the weights serves both.

Pairs (STYLE principle 7: every candidate is used or counted with a reason):
  - preference records (`prompt`, `chosen`, `rejected`), chosen as the reward stage chooses them
    (selfalign.reward.select_pairs: each (id, lang) once);
  - self-rewarding pairs from curation scores (`self_reward_pairs`): for an instruction the
    scorer rated two or more answers to, the best and the worst scored answer.

Tokens come from the model's own chat template exactly as SFT's (selfalign.sft.segments):
the prompt is what the server renders for the conversation (`chat.split_last_turn`), an answer is
its text up to and including the end-of-turn token, each tokenised on its own. TRL is handed these
ids, so what DPO trains on is what serve will show the model.

`prefer` (a top-level key of params.yaml: ppo | dpo | both) says which preference-tuned model(s)
evaluate compares and export ships; `expand_preferred` and `exported_model` apply it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import yaml

from selfalign import chat, records
from selfalign.config import Config, LoraSpec, opt
from selfalign.params import ParamsError

PREFER = ("ppo", "dpo", "both")
SELF_REWARD_SOURCE = "self-rewarding"
# transformers' schedulers that need no extra arguments: sft.SCHEDULERS' list, repeated so that evaluate and export,
# which import this module for `prefer`, do not run (and rerun on) selfalign/sft.py
SCHEDULERS = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]
# TRL 1.16's DPOConfig.loss_type values
LOSS_TYPES = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


@dataclasses.dataclass
class DPOConfig(Config):
    """The `dpo:` section of params.yaml (its comments are the user-facing doc)."""

    sources: Literal["all"] | list[str] = "all"  # or shell patterns matched against a record's source
    self_rewarding: bool = False  # also pair the last curation round's best and worst scored answers
    self_reward_min_gap: float = opt(0.5, lo=0)  # ...when their scores differ by at least this
    heldout_pairs: int = opt(32, lo=1)  # held out as the reward stage holds out (same ids)
    max_pairs: int = opt(16, lo=1)  # training pairs, a seeded sample
    max_prompt_len: int = opt(128, lo=1)  # tokens; a longer prompt loses its start
    max_answer_len: int = opt(128, lo=1)  # tokens; a longer answer loses its end (answers_cut)
    beta: float = opt(0.1, lo=0, lo_open=True)  # strength of the implicit KL to the reference
    loss_type: LOSS_TYPES = "sigmoid"
    epochs: int = opt(1, lo=1)
    max_steps: int = opt(0, lo=0)  # 0 = epochs decide
    batch_size: int = opt(4, lo=1)  # pairs per step
    grad_accum: int = opt(1, lo=1)
    lr: float = opt(5.0e-4, lo=0, lo_open=True)
    scheduler: SCHEDULERS = "constant"
    warmup_ratio: float = opt(0.0, lo=0, hi=1)
    max_grad_norm: float = opt(1.0, lo=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: selfalign/device.py's rule
    lora: LoraSpec = opt(LoraSpec())
    eval_batch_size: int = opt(8, lo=1)  # sequences per forward pass for the held-out implicit rewards
    checkpoint_every: int = opt(4, lo=0)  # steps between checkpoints; 0 = none
    threads: int = opt(0, lo=0)  # torch threads; 0 = torch's default
    seed: int = opt(0, lo=0)  # LoRA init, pair sample, batch order


# ---------------------------------------------------------------- prefer: ppo | dpo | both


def read_prefer(params_file) -> str:
    """The top-level `prefer` of params.yaml (ppo when no file is given or the key is absent)."""
    if not params_file:
        return "ppo"
    data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    value = data.get("prefer", "ppo")
    if value not in PREFER:
        raise ParamsError(f"{params_file}: prefer: {value!r} is not one of {' | '.join(PREFER)}")
    return value


def preferred(prefer: str) -> list[str]:
    if prefer not in PREFER:
        raise ParamsError(f"prefer: {prefer!r} is not one of {' | '.join(PREFER)}")
    return ["ppo", "dpo"] if prefer == "both" else [prefer]


def expand_preferred(names: list[str], prefer: str) -> list[str]:
    """evaluate.models with its `preferred` entry replaced by the model(s) `prefer` names, in place."""
    out: list[str] = []
    for n in names:
        out += preferred(prefer) if n == "preferred" else [n]
    return out


def exported_model(prefer: str, evaluation: dict | None) -> tuple[str, str]:
    """(model name, why) export ships for `export.model: preferred`.

    ppo or dpo: that one. both: the one evaluate judged better head to head (its win rate's 95%
    interval above one half); without such a verdict ppo, the pipeline's established model.
    """
    if prefer != "both":
        return preferred(prefer)[0], f"prefer: {prefer}"
    rates = (evaluation or {}).get("win_rate", {})
    for pair, name in (("dpo_vs_ppo", "dpo"), ("ppo_vs_dpo", "ppo")):
        entry = (rates.get(pair) or {}).get("all")
        if entry and entry.get("ci"):
            lo, hi = entry["ci"]
            if lo > 0.5:
                return (
                    name,
                    f"prefer: both; evaluate judged {name} better ({pair} win rate {entry['win_rate']:.3f}, "
                    f"95% {lo:.3f}-{hi:.3f})",
                )
            if hi < 0.5:
                other = "ppo" if name == "dpo" else "dpo"
                return (
                    other,
                    f"prefer: both; evaluate judged {other} better ({pair} win rate "
                    f"{entry['win_rate']:.3f}, 95% {lo:.3f}-{hi:.3f})",
                )
            return (
                "ppo",
                f"prefer: both; no measurable difference between ppo and dpo ({pair} win rate "
                f"{entry['win_rate']:.3f}, 95% {lo:.3f}-{hi:.3f}): ppo, the established model",
            )
    return "ppo", "prefer: both; the evaluation has no ppo-dpo comparison: ppo, the established model"


# ---------------------------------------------------------------- pairs


def self_reward_pairs(scored: list[dict], min_gap: float) -> tuple[list[dict], Counter]:
    """Best vs worst scored answer to each instruction that has at least two scored answers.

    Candidates sharing their instruction (system prompt and every turn before the answer) form a
    group; its highest and lowest `meta.score` make one pair when they differ by at least
    `min_gap` and their texts differ. Counts are per candidate: in = paired + every other reason.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    counts: Counter = Counter()
    for r in scored:
        score = (r.get("meta") or {}).get("score")
        msgs = r.get("messages") or []
        if (
            not isinstance(score, (int, float))
            or isinstance(score, bool)
            or len(msgs) < 2
            or msgs[-1]["role"] != "assistant"
            or msgs[-2]["role"] != "user"
        ):
            counts["no_score"] += 1
            continue
        key = repr([r.get("system") or "", r.get("lang"), [[m["role"], m["content"]] for m in msgs[:-1]]])
        groups[key].append(r)
    pairs = []
    for group in groups.values():
        if len(group) < 2:
            counts["no_shared_instruction"] += 1
            continue
        ranked = sorted(group, key=lambda r: (-r["meta"]["score"], r["id"]))
        best, worst = ranked[0], ranked[-1]
        if best["meta"]["score"] - worst["meta"]["score"] < min_gap:
            counts["scores_too_close"] += len(group)
            continue
        if best["messages"][-1]["content"] == worst["messages"][-1]["content"]:
            counts["same_answer"] += len(group)
            continue
        counts["paired"] += 2
        counts["neither_best_nor_worst"] += len(group) - 2
        pairs.append(
            records.make(
                "preference",
                prompt=best["messages"][-2]["content"],
                chosen=best["messages"][-1]["content"],
                rejected=worst["messages"][-1]["content"],
                system=best.get("system"),
                lang=best["lang"],
                source=SELF_REWARD_SOURCE,
                meta={
                    "scores": [best["meta"]["score"], worst["meta"]["score"]],
                    "from": [best["id"], worst["id"]],
                    "answers": len(group),
                },
            )
        )
    return pairs, counts


def pair_conversation(pair: dict, system: str | None) -> list[dict]:
    """The prompt turns of a preference record; a record without its own system prompt gets `system`
    (the policy's inference one, selfalign.json), as ppo and evaluate give it."""
    return records.with_system(pair.get("system") or system, [{"role": "user", "content": pair["prompt"]}])


def encode_pair(tok, pair: dict, system: str | None, max_prompt_len: int, max_answer_len: int) -> dict:
    """{prompt_ids, chosen_ids, rejected_ids, prompt_cut, answer_cut} for TRL's preference collator.

    A prompt longer than `max_prompt_len` tokens loses its start (the question's end and the assistant
    header stay); an answer longer than `max_answer_len` loses its end, end-of-turn included, as
    TRL's own keep_start truncation would (counted: such a pair no longer teaches where to stop).
    Raises ValueError when the chat template cannot split the conversation.
    """
    head = pair_conversation(pair, system)
    prompt, chosen = chat.split_last_turn(tok, head + [{"role": "assistant", "content": pair["chosen"]}])
    prompt2, rejected = chat.split_last_turn(tok, head + [{"role": "assistant", "content": pair["rejected"]}])
    if prompt != prompt2:
        raise ValueError("the chat template renders the prompt differently for the two answers")

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    p, c, r = ids(prompt), ids(chosen), ids(rejected)
    return {
        "prompt_ids": p[-max_prompt_len:],
        "chosen_ids": c[:max_answer_len],
        "rejected_ids": r[:max_answer_len],
        "prompt_cut": len(p) > max_prompt_len,
        "answer_cut": len(c) > max_answer_len or len(r) > max_answer_len,
    }


def encode_pairs(tok, pairs: list[dict], system: str | None, cfg: DPOConfig) -> tuple[list[dict], list[dict]]:
    """(rows, rejected records): every pair becomes a row or a rejected record with its reason."""
    rows, rejected = [], []
    for p in pairs:
        try:
            row = encode_pair(tok, p, system, cfg.max_prompt_len, cfg.max_answer_len)
        except ValueError as e:
            rejected.append(records.rejected(p, "template", "dpo", detail=str(e)))
            continue
        if row["chosen_ids"] == row["rejected_ids"]:
            rejected.append(
                records.rejected(
                    p, "same_after_cut", "dpo", detail=f"the answers' first {cfg.max_answer_len} tokens are equal"
                )
            )
            continue
        rows.append(row | {"id": p["id"], "lang": p["lang"], "source": p["source"]})
    return rows, rejected


# ---------------------------------------------------------------- training and held-out margins


def sequence_logps(model, rows: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) per row, summed over the answer's tokens.

    Left-padded batches with position ids that skip the padding (selfalign/logprobs.py, as PPO scores), so every
    answer ends at the last position and the model computes logits for the answer positions only
    (`logits_to_keep`): the vocabulary-wide head and softmax never see the prompt tokens."""
    import torch

    from selfalign.logprobs import left_pad, positions, token_logprobs

    seqs, answer_lens = [], []
    for r in rows:
        for key in ("chosen_ids", "rejected_ids"):
            seqs.append(r["prompt_ids"] + r[key])
            answer_lens.append(len(r[key]))
    out = [0.0] * len(seqs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            idx = list(range(start, min(start + batch_size, len(seqs))))
            keep = max(answer_lens[i] for i in idx) + 1  # the logits at t predict token t+1
            ids, mask = left_pad([seqs[i] for i in idx], pad_id, device)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, logits_to_keep=keep
            ).logits[:, :-1]  # they predict the last keep-1 tokens
            logp = token_logprobs(logits, ids[:, ids.shape[1] - keep + 1 :])
            for row, i in enumerate(idx):
                out[i] = float(logp[row, keep - 1 - answer_lens[i] :].sum())
    model.train(was_training)
    return [(out[2 * k], out[2 * k + 1]) for k in range(len(rows))]


def implicit_rewards(model, rows: list[dict], beta: float, pad_id: int, batch_size: int) -> list[dict]:
    """DPO's implicit rewards beta * (log pi - log pi_ref) of both answers, the reference being the
    policy with its LoRA adapter disabled; margin > 0 means the pair is ranked right (accuracy and its
    Wilson interval: selfalign.reward.pairwise_metrics over the chosen and rejected rewards)."""
    policy = sequence_logps(model, rows, pad_id, batch_size)
    with model.disable_adapter():
        ref = sequence_logps(model, rows, pad_id, batch_size)
    out = []
    for (pc, pr), (rc, rr) in zip(policy, ref, strict=True):
        c, r = beta * (pc - rc), beta * (pr - rr)
        out.append({"chosen": c, "rejected": r, "margin": c - r})
    return out


def trainer_class():
    """TRL's DPOTrainer, handed rows we tokenised ourselves (encode_pair): its own tokenisation would
    render prompt + answer in one go and train the newline after ChatML's <|im_end|> as answer."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise ValueError(
                    f"{dataset_name} rows lack {sorted(missing)}: build them with selfalign.dpo.encode_pair"
                )
            return dataset

    return PretokenizedDPOTrainer


def dpo_config(cfg: DPOConfig, ckpt_dir: Path, total_steps: int):
    import torch
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(ckpt_dir),
        max_steps=total_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * total_steps)),
        max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        max_length=None,  # encode_pair already cut prompts and answers
        precompute_ref_log_probs=False,  # the reference is the adapter-off policy: computed per batch, no copy
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.precision == "bf16",
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=False,
        logging_steps=1,
        logging_first_step=True,
        save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=cfg.checkpoint_every or 1,
        save_total_limit=1,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=True,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def total_steps(n_rows: int, cfg: DPOConfig) -> int:
    per_step = cfg.batch_size * cfg.grad_accum
    steps = math.ceil(n_rows * cfg.epochs / per_step)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def curves(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Training curves from the trainer's log: loss and DPO's reward statistics, per logged step."""
    keys = {
        "loss": "loss",
        "rewards/margins": "margin",
        "rewards/accuracies": "accuracy",
        "rewards/chosen": "reward_chosen",
        "rewards/rejected": "reward_rejected",
    }
    out: dict[str, list[tuple[int, float]]] = {v: [] for v in keys.values()}
    for e in log_history:
        if "loss" not in e:
            continue
        for k, v in keys.items():
            if k in e:
                out[v].append((e["step"], float(e[k])))
    return out

"""Compact PPO for chat models: the one RL module selfalign owns (TRL removed PPO in 1.13).

The recipe is InstructGPT's (Ouyang et al. 2022, after Ziegler et al. 2019), as MYChatGPT uses it:
maximise a reward model's score while a per-token KL penalty keeps the policy near the frozen
SFT model. One step:

  1. rollout     sample a response to each of B prompts (one batched, left-padded `generate`);
                 cut each response after its first end-of-turn token.
  2. experience  without gradients: the policy's log-probs, the reference's log-probs, the values,
                 and the score of each finished conversation (reward model or any Python callable);
                 a response that never emitted end-of-turn loses `missing_eos_penalty`.
                 Per-token reward r_t = -beta * (logp_t - ref_logp_t), plus the score on the last token.
  3. GAE         advantages and returns (gamma, lambda), advantages whitened over the batch.
  4. update      `ppo_epochs` passes over shuffled minibatches: clipped policy loss, clipped value
                 loss, gradient clipping.

Memory choices. The policy is the SFT model with a LoRA adapter, and the reference is the same
weights with the adapter switched off (`PeftModel.disable_adapter`), so there is one copy of the
base weights; `reference="copy"` keeps a separate frozen copy instead (bench/ppo.py compares them).
The value function is a linear head on the policy's last hidden state (shared trunk, like TRL's
old AutoModelForCausalLMWithValueHead), so it costs hidden_size + 1 parameters, not a second model;
its loss also trains the shared LoRA trunk, weighted by `vf_coef`.

Tensor shapes: B sequences, P prompt tokens (left-padded), R response tokens (right-padded after
the first end-of-turn). The log-prob of response token t comes from the logits at position P-1+t,
so a forward pass keeps only the last R+1 positions (`logits_to_keep`) and drops the final one.

Everything runs under accelerate's Accelerator: on this CPU a single process; under
`accelerate launch` each process rolls out its own slice of prompts and gradients are averaged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from selfalign import records
from selfalign.config import Config, LoraSpec, ParamsError, opt
from selfalign.logprobs import left_pad, positions, token_logprobs

log = logging.getLogger(__name__)

# reward_fn(conversations, response_ids) -> one float per sample; conversations end with the
# assistant's decoded response, response_ids are its token ids (without padding).
RewardFn = Callable[[list[list[dict]], list[list[int]]], list[float]]


@dataclasses.dataclass
class PPOConfig(Config):
    """The `ppo:` section of params.yaml: the algorithm's fields, then the stage's (its comments are the user doc)."""

    steps: int = opt(6, lo=1)  # PPO steps (rollout + update)
    batch_size: int = opt(8, lo=1)  # prompts per rollout, per process
    minibatch_size: int = opt(4, lo=1)  # sequences per gradient step
    ppo_epochs: int = opt(1, lo=1)  # passes over each rollout
    max_new_tokens: int = opt(32, lo=1)  # per response
    temperature: float = opt(1.0, lo=0, lo_open=True)  # sampling temperature; log-probs use the same
    lr: float = opt(1e-4, lo=0, lo_open=True)
    kl_coef: float = opt(0.05, lo=0)  # beta, initial value when adaptive
    kl_target: float | None = opt(None, lo=0, lo_open=True)  # nats per sequence; set it to adapt beta (Ziegler et al.)
    kl_horizon: int = opt(10000, lo=1)
    gamma: float = opt(1.0, lo=0, hi=1)
    lam: float = opt(0.95, lo=0, hi=1)
    clip_range: float = opt(0.2, lo=0, lo_open=True)
    clip_range_value: float = opt(0.2, lo=0, lo_open=True)
    vf_coef: float = opt(0.1, lo=0)
    missing_eos_penalty: float = opt(1.0, lo=0)
    max_grad_norm: float = opt(1.0, lo=0)  # 0 = no clipping
    seed: int = opt(0, lo=0)
    # the stage (stages/ppo.py)
    reference: Literal["adapter", "copy"] = "adapter"  # KL reference: the adapter switched off, or a frozen copy
    lora: LoraSpec = opt(LoraSpec())  # the policy's adapter (r >= 1)
    use_prompt_files: bool = True  # prompt records
    use_seed_heldout: bool = True  # instructions of the seed records sft held out (--eval-fraction)
    max_prompt_len: int = opt(128, lo=1)  # tokens of a rendered prompt; longer ones are dropped (counted)
    reward_fn: str | None = None  # module:function or path/to/file.py:function instead of the reward model
    reward_batch_size: int = opt(16, lo=1)  # conversations per reward-model forward pass
    reward_max_len: int = opt(512, lo=1)  # tokens of a scored conversation (cut from the left)
    checkpoint_every: int = opt(4, lo=0)  # steps between checkpoints; 0 = none
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # accelerate's autocast; auto: selfalign/device.py's rule
    threads: int = opt(0, lo=0)  # torch threads; 0 = torch's default

    def check(self, where: str) -> None:
        if self.lora.r < 1:
            raise ParamsError(f"{where}.lora.r: {self.lora.r!r}: the policy is a LoRA adapter, r must be at least 1")
        if not (self.use_prompt_files or self.use_seed_heldout):
            raise ParamsError(f"{where}.use_prompt_files: false with use_seed_heldout false leaves no prompts")


# --- the arithmetic --------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over right-padded sequences; returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; past the last real
    token reward and value are zero, so the episode ends there.
    """
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """Clipped surrogate (Schulman et al. 2017); returns (loss, fraction of tokens where the clip binds)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def value_loss(values, old_values, returns, mask, clip_range: float):
    """Clipped value loss: the new value may not move more than clip_range from the rollout's."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class FixedKL:
    def __init__(self, value: float):
        self.value = value

    def update(self, kl: float, n: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKL(FixedKL):
    """Ziegler et al. 2019: move beta so the KL drifts toward `target`, by at most 20% per horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n: int) -> None:
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


def kl_controller(cfg: PPOConfig) -> FixedKL:
    return FixedKL(cfg.kl_coef) if cfg.kl_target is None else AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)


# --- the models ------------------------------------------------------------------------------


class PolicyWithValue(nn.Module):
    """The LoRA policy and a linear value head on its last hidden state (shared trunk)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0; no value gradient into the trunk at step 1
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, keep: int):
        """(logits, values) at the last `keep` positions."""
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=keep,
        )
        values = self.value_head(out.hidden_states[-1][:, -keep:].float()).squeeze(-1)
        return out.logits[:, -keep:], values


def with_lora(model, lora: LoraSpec | dict, seed: int = 0):
    """The policy: `model` with a fresh LoRA adapter (B = 0, so it starts equal to the reference).
    A's random init is seeded, so two runs with the same params start from the same adapter."""
    from peft import get_peft_model

    from selfalign.models import lora_config

    config = lora_config(lora, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def reference_logits(policy: PolicyWithValue, ref_model, input_ids, attention_mask, keep: int) -> torch.Tensor:
    """Logits of the frozen SFT model: the policy with its adapter off, or a separate frozen copy."""
    kw = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions(attention_mask),
        "use_cache": False,
        "logits_to_keep": keep,
    }
    if ref_model is not None:
        return ref_model(**kw).logits[:, -keep:]
    with policy.lm.disable_adapter():
        return policy.lm(**kw).logits[:, -keep:]


def reward_model_fn(model, tok, batch_size: int = 16, max_length: int = 1024) -> RewardFn:
    """A RewardFn that scores the finished conversations with a reward model (selfalign.reward.score)."""
    from selfalign import reward

    def fn(conversations, response_ids):
        return reward.score(model, tok, conversations, batch_size=batch_size, max_length=max_length)

    return fn


# --- prompts ---------------------------------------------------------------------------------


def gather_prompts(
    prompt_recs: list[dict], seed_recs: list[dict], fraction: float, system: str | None, tok, max_len: int
) -> tuple[list[dict], dict]:
    """PPO prompts as {id, messages, ids}: every prompt record, and the instructions of the seed records
    sft held out of training (selfalign.sft.heldout at `fraction`, sft.train.eval_fraction). A record
    without its own system prompt gets `system` (the policy's inference one). Every input record is
    used or counted under a reason: seed_not_heldout, seed_without_user_turn, duplicate (the same
    rendered prompt), too_long (over `max_len` tokens)."""
    from selfalign import chat
    from selfalign.sft import heldout

    counts = {
        "in": len(prompt_recs) + len(seed_recs),
        "used": 0,
        "seed_not_heldout": 0,
        "seed_without_user_turn": 0,
        "duplicate": 0,
        "too_long": 0,
    }
    candidates = [
        (r["id"], records.with_system(r.get("system") or system, [{"role": "user", "content": r["prompt"]}]))
        for r in prompt_recs
    ]
    for r in seed_recs:
        if not heldout(r["id"], fraction):
            counts["seed_not_heldout"] += 1
            continue
        msgs = records.to_messages(r, system=r.get("system") or system)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs or msgs[-1]["role"] != "user":
            counts["seed_without_user_turn"] += 1
            continue
        candidates.append((r["id"], msgs))
    out, seen = [], set()
    for rid, msgs in candidates:
        text = chat.render(tok, msgs, add_generation_prompt=True)
        if text in seen:
            counts["duplicate"] += 1
            continue
        seen.add(text)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_len:
            counts["too_long"] += 1
            continue
        out.append({"id": rid, "messages": msgs, "ids": ids})
    counts["used"] = len(out)
    return out, counts


def prompt_metrics(counts: dict) -> dict:
    """gather_prompts' counts in the metrics keys every filtering stage writes (records_in = kept + rejected)."""
    reasons = {k: v for k, v in sorted(counts.items()) if k not in ("in", "used") and v}
    return {
        "records_in": counts["in"],
        "kept": counts["used"],
        "rejected": sum(reasons.values()),
        "rejected_by_reason": reasons,
    }


# --- one step --------------------------------------------------------------------------------


def generate(lm, query, query_mask, cfg: PPOConfig, eos_id: int, pad_id: int):
    """Sample responses; returns (response ids [B, R], response mask [B, R], ended [B]).

    A fresh GenerationConfig, not the model's: plain sampling at `temperature` with no top-k/top-p
    or repetition penalty, so the sampling distribution is exactly the one the log-probs describe.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    out = lm.generate(input_ids=query, attention_mask=query_mask, generation_config=gen)
    response = out[:, query.shape[1] :]
    if response.shape[1] < cfg.max_new_tokens:  # every sequence finished early
        fill = torch.full(
            (response.shape[0], cfg.max_new_tokens - response.shape[1]),
            pad_id,
            dtype=response.dtype,
            device=response.device,
        )
        response = torch.cat([response, fill], dim=1)
    is_eos = response == eos_id
    ended = is_eos.any(1)
    first = torch.where(
        ended, is_eos.float().argmax(1), torch.full_like(ended, response.shape[1] - 1, dtype=torch.long)
    )
    mask = (torch.arange(response.shape[1], device=response.device)[None] <= first[:, None]).long()
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_id))
    return response, mask, ended


def penalise_missing_eos(scores: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """A response cut off by the length limit loses `penalty`: otherwise the reward model, which
    sees it rendered as a finished turn, would pay for rambling past the end."""
    return scores - penalty * (~ended).float()


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, lengths: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL_t everywhere, plus the sequence's score on its last token."""
    rewards = -kl_coef * kl
    rewards[torch.arange(len(scores), device=rewards.device), lengths - 1] += scores
    return rewards


def step_indices(n_prompts: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Which prompts step `step` uses on process `rank`: epochs of seeded shuffles, stateless so a
    resumed run picks the same prompts as an uninterrupted one."""
    out, perms = [], {}
    start = (step * world + rank) * batch_size
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n_prompts)
        if epoch not in perms:
            perms[epoch] = list(range(n_prompts))
            random.Random(seed * 1_000_003 + epoch).shuffle(perms[epoch])
        out.append(perms[epoch][pos])
    return out


def ppo_step(
    policy,
    ref_model,
    tok,
    prompts: list[dict],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    kl_ctl: FixedKL,
    optimizer,
    accelerator,
) -> dict:
    """One rollout and update on `prompts` (dicts with `messages` and token `ids`); returns its metrics."""
    unwrapped = accelerator.unwrap_model(policy)
    device = accelerator.device
    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    times = {}

    t = time.perf_counter()
    query, query_mask = left_pad([p["ids"] for p in prompts], pad_id, device)
    with torch.no_grad():
        response, mask, ended = generate(unwrapped.lm, query, query_mask, cfg, eos_id, pad_id)
    times["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    seqs = torch.cat([query, response], 1)
    attn = torch.cat([query_mask, mask], 1)
    keep = cfg.max_new_tokens + 1
    fmask = mask.float()
    with torch.no_grad():
        logits, values = unwrapped(seqs, attn, keep)
        logits = logits[:, :-1] / cfg.temperature
        old_logprobs = token_logprobs(logits, response)
        ent = masked_mean(entropy(logits), fmask)
        del logits
        ref_logprobs = token_logprobs(
            reference_logits(unwrapped, ref_model, seqs, attn, keep)[:, :-1] / cfg.temperature, response
        )
        old_values = values[:, :-1]
    times["logprobs"] = time.perf_counter() - t

    t = time.perf_counter()
    lengths = mask.sum(1)
    response_ids = [r[:n].tolist() for r, n in zip(response.cpu(), lengths.cpu(), strict=True)]
    texts = tok.batch_decode(
        [ids[:-1] if e else ids for ids, e in zip(response_ids, ended.tolist(), strict=True)], skip_special_tokens=True
    )
    conversations = [
        p["messages"] + [{"role": "assistant", "content": text}] for p, text in zip(prompts, texts, strict=True)
    ]
    scores = torch.tensor(reward_fn(conversations, response_ids), dtype=torch.float, device=device)
    rewarded = penalise_missing_eos(scores, ended, cfg.missing_eos_penalty)
    times["score"] = time.perf_counter() - t

    t = time.perf_counter()
    kl = (old_logprobs - ref_logprobs) * fmask
    rewards = token_rewards(rewarded, kl, lengths, kl_ctl.value)
    advantages, returns = gae(rewards, old_values, fmask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, fmask)

    stats = {"policy_loss": [], "value_loss": [], "clip_frac": [], "value_clip_frac": [], "approx_kl": []}
    policy.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(prompts))
        for start in range(0, len(prompts), cfg.minibatch_size):
            mb = order[start : start + cfg.minibatch_size].to(device)
            new_logits, new_values = policy(seqs[mb], attn[mb], keep)
            new_logprobs = token_logprobs(new_logits[:, :-1] / cfg.temperature, response[mb])
            pg, clip_frac = policy_loss(new_logprobs, old_logprobs[mb], advantages[mb], fmask[mb], cfg.clip_range)
            vf, vclip = value_loss(new_values[:, :-1], old_values[mb], returns[mb], fmask[mb], cfg.clip_range_value)
            loss = pg + cfg.vf_coef * vf
            pg, vf = pg.detach(), vf.detach()
            accelerator.backward(loss)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                approx = 0.5 * masked_mean((new_logprobs - old_logprobs[mb]) ** 2, fmask[mb])
            for k, v in zip(stats, (pg, vf, clip_frac, vclip, approx), strict=True):
                stats[k].append(float(v))
    policy.eval()
    times["optimise"] = time.perf_counter() - t

    seq_kl = kl.sum(1)
    local = {
        "reward_mean": float(rewarded.mean()),
        "score_mean": float(scores.mean()),
        "kl": float(seq_kl.mean()),
        "kl_coef": kl_ctl.value,
        "non_score_reward": float((-kl_ctl.value * seq_kl).mean()),
        "entropy": float(ent),
        "response_length": float(lengths.float().mean()),
        "eos_frac": float(ended.float().mean()),
        **{k: sum(v) / len(v) for k, v in stats.items()},
        **{f"time_{k}": v for k, v in times.items()},
    }
    names = list(local)
    reduced = accelerator.reduce(torch.tensor([local[k] for k in names], device=device), reduction="mean")
    metrics = dict(zip(names, reduced.tolist(), strict=True))
    kl_ctl.update(metrics["kl"], cfg.batch_size * accelerator.num_processes)
    return metrics


# --- checkpoints -----------------------------------------------------------------------------


def trainable_state(policy) -> dict:
    return {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad}


def save_checkpoint(directory, *, step, policy, optimizer, kl_ctl, history, fingerprint, accelerator) -> Path:
    """Adapter + value head + optimizer + step + RNG + KL controller + history, written atomically.

    One file per process holds its RNG state (each process samples its own rollouts); the shared
    state is written by the main process. The old checkpoint is replaced, never half-overwritten.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _atomic_save(rng, directory / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "trainable": trainable_state(accelerator.unwrap_model(policy)),
            "optimizer": optimizer.state_dict(),
            "kl_ctl": kl_ctl.state_dict(),
            "history": history,
            "fingerprint": fingerprint,
            "world": accelerator.num_processes,
        }
        _atomic_save(state, directory / "state.pt")
    accelerator.wait_for_everyone()
    return directory / "state.pt"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(directory, fingerprint: str, steps: int, accelerator) -> dict | None:
    """The checkpoint to resume from, or None when there is none or it belongs to other inputs/params."""
    path = Path(directory) / "state.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s was made from other inputs or params; starting from step 0", path)
        return None
    if state["world"] != accelerator.num_processes or state["step"] > steps:
        log.info(
            "checkpoint %s (step %d, %d processes) does not fit this run; starting from step 0",
            path,
            state["step"],
            state["world"],
        )
        return None
    state["rng"] = torch.load(Path(directory) / f"rng-{accelerator.process_index}.pt", weights_only=True)
    return state


def restore(state: dict, policy, optimizer, kl_ctl, accelerator) -> None:
    missing = set(trainable_state(accelerator.unwrap_model(policy))) - set(state["trainable"])
    if missing:
        raise ValueError(f"checkpoint lacks trainable tensors: {sorted(missing)[:3]}")
    accelerator.unwrap_model(policy).load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


# --- the loop --------------------------------------------------------------------------------


def train(
    policy: PolicyWithValue,
    ref_model,
    tok,
    prompts: list[dict],
    reward_fn: RewardFn,
    cfg: PPOConfig,
    *,
    accelerator=None,
    checkpoint_dir=None,
    checkpoint_every: int = 0,
    fingerprint: str = "",
    on_step: Callable[[dict, list[dict]], None] | None = None,
) -> dict:
    """Run PPO to `cfg.steps`, resuming from `checkpoint_dir` when it holds this run's checkpoint.

    Returns {"history": per-step metrics, "resumed_from": step or 0, "policy": the trained policy}.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    torch.manual_seed(cfg.seed + accelerator.process_index)
    random.seed(cfg.seed + accelerator.process_index)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-5)
    if ref_model is not None:
        ref_model.requires_grad_(False).eval().to(accelerator.device)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    policy.eval()  # no dropout in rollouts; ppo_step switches to train() only around the update
    kl_ctl = kl_controller(cfg)
    history: list[dict] = []
    start = 0
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, fingerprint, cfg.steps, accelerator)
        if state is not None:
            restore(state, policy, optimizer, kl_ctl, accelerator)
            start, history = state["step"], state["history"]
            log.info("resuming from checkpoint at step %d of %d", start, cfg.steps)
    for step in range(start, cfg.steps):
        batch = [
            prompts[i]
            for i in step_indices(
                len(prompts), step, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes
            )
        ]
        metrics = {
            "step": step + 1,
            **ppo_step(policy, ref_model, tok, batch, reward_fn, cfg, kl_ctl, optimizer, accelerator),
        }
        history.append(metrics)
        log.info(
            "step %d/%d reward %.3f kl %.4f clip %.3f entropy %.2f len %.1f | gen %.1fs score %.1fs "
            "logprobs %.1fs optimise %.1fs",
            step + 1,
            cfg.steps,
            metrics["reward_mean"],
            metrics["kl"],
            metrics["clip_frac"],
            metrics["entropy"],
            metrics["response_length"],
            metrics["time_generate"],
            metrics["time_score"],
            metrics["time_logprobs"],
            metrics["time_optimise"],
        )
        if on_step is not None and accelerator.is_main_process:
            on_step(metrics, history)
        if (
            checkpoint_dir is not None
            and checkpoint_every
            and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps)
        ):
            save_checkpoint(
                checkpoint_dir,
                step=step + 1,
                policy=policy,
                optimizer=optimizer,
                kl_ctl=kl_ctl,
                history=history,
                fingerprint=fingerprint,
                accelerator=accelerator,
            )
            log.info("checkpoint saved at step %d", step + 1)
    return {"history": history, "resumed_from": start, "policy": accelerator.unwrap_model(policy)}

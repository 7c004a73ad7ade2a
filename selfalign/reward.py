"""Reward modelling: preference pairs from every source, the held-out split, and scoring.

A reward model here is a sequence-classification model with one output: it reads a whole
conversation rendered by the model's own chat template (selfalign.chat.render) and gives the
score at the last non-padding token. With ChatML that token is the newline after the closing
`<|im_end|>`, so the score sees the end-of-turn marker; `check_pooling` refuses a template whose
render ends in the padding token, where the pooling would silently read the wrong position.

Two ways to train it: `tuned` (TRL's RewardTrainer, LoRA or full) and `frozen` (fit_head: the
same Bradley-Terry loss on the frozen network's last-token states, for a CPU that can afford
forward passes over ~120 pairs but backward passes over ~50). The held-out split (split_heldout)
takes whole ids, so translations of a held-out pair are held out too.

Pair sources (STYLE principle 7: every candidate pair is used or counted with a reason):
  - preference records (`prompt`, `chosen`, `rejected`): ingest already expanded KoChatGPT and
    MYChatGPT ranking files into all ordered pairs and read chosen/rejected files (Orca style);
  - curation scores (`meta.score` 1-5 of chat records): candidates that share an instruction
    and whose scores differ by at least a margin; the higher one is chosen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections import Counter, defaultdict
from fnmatch import fnmatch
from typing import Literal

from selfalign import records
from selfalign.config import Config, LoraSpec, opt


@dataclasses.dataclass
class RewardConfig(Config):
    """The `reward:` section of params.yaml (its comments are the user-facing doc)."""

    init: Literal["base", "final"] = "base"  # the weights dvc.yaml passes as --model (a label in metrics here)
    sources: Literal["all"] | list[str] = "all"  # or shell patterns matched against a record's source
    curation_pairs: bool = False  # also pair curation-scored candidates that share an instruction
    curation_margin: float = opt(2, lo=0)  # ...whose scores differ by at least this
    heldout_pairs: int = opt(64, lo=1)  # whole ids held out until at least this many pairs (at most half)
    max_pairs: int = opt(120, lo=1)  # training pairs, a seeded sample
    max_len: int = opt(192, lo=1)  # tokens per rendered conversation, cut from the left
    epochs: int = opt(1, lo=1)  # backbone tuned
    batch_size: int = opt(8, lo=1)  # pairs per step (backbone tuned)
    lr: float = opt(2.0e-4, lo=0, lo_open=True)  # backbone tuned
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # backbone tuned; frozen runs fp32
    center_rewards: float = opt(0.01, lo=0)  # TRL's center_rewards_coefficient
    backbone: Literal["frozen", "tuned"] = "frozen"  # frozen: fit only the score head; tuned: RewardTrainer
    head_l2: float = opt(1.0, lo=0)  # backbone frozen: L2 weight on the head
    lora: LoraSpec = opt(LoraSpec(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]))  # r 0: full
    score_batch_size: int = opt(16, lo=1)  # conversations per forward pass when scoring
    threads: int = opt(0, lo=0)  # torch threads; 0 = torch's default
    seed: int = opt(0, lo=0)


def in_fraction(record_id: str, fraction: float, salt: str) -> bool:
    """Deterministic split by id hash: the same id lands on the same side in every run and stage.

    `salt` names the split, so different uses of it are independent draws. (Seed records held
    out of SFT, which ppo uses as prompts and evaluate for perplexity, are selfalign.sft.heldout.)
    """
    if fraction <= 0:
        return False
    h = int(hashlib.sha1(f"{salt}:{record_id}".encode()).hexdigest()[:12], 16)
    return h / 16**12 < fraction


def pair_messages(pair: dict) -> tuple[list[dict], list[dict]]:
    """(chosen conversation, rejected conversation) of a preference record."""
    head = records.with_system(pair.get("system"), [{"role": "user", "content": pair["prompt"]}])
    return (
        head + [{"role": "assistant", "content": pair["chosen"]}],
        head + [{"role": "assistant", "content": pair["rejected"]}],
    )


def source_listed(source: str, patterns: list[str] | str) -> bool:
    """`patterns` is "all" or a list of shell patterns matched against a record's `source`."""
    if patterns == "all":
        return True
    return any(fnmatch(source, p) for p in patterns)


def select_pairs(records: list[dict], sources: list[str] | str) -> tuple[list[dict], Counter]:
    """Preference records whose source is listed, each (id, lang) once; the rest counted by reason.

    A translation keeps its original's id (selfalign.translate), so the key is (id, lang): the
    French copy of a pair is a pair of its own, not a duplicate of the English one.
    """
    kept, dropped, seen = [], Counter(), set()
    for r in records:
        if not source_listed(r.get("source", ""), sources):
            dropped["source_not_listed"] += 1
        elif r["prompt"] == "" or r["chosen"] == r["rejected"]:
            dropped["no_preference"] += 1
        elif (r["id"], r["lang"]) in seen:
            dropped["duplicate"] += 1
        else:
            seen.add((r["id"], r["lang"]))
            kept.append(r)
    return kept, dropped


def selection_metrics(records_in: int, kept: int, capped: int, reasons: dict) -> dict:
    """The metrics keys every filtering stage writes, for the pairs of reward and dpo: records_in = kept
    (trained on or held out) + rejected, by reason, `capped` being the pairs left out of max_pairs' sample."""
    by_reason = Counter(reasons)
    by_reason["capped"] += capped
    by_reason = {k: v for k, v in sorted(by_reason.items()) if v}
    return {
        "records_in": records_in,
        "kept": kept,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": by_reason,
    }


def split_heldout(pairs: list[dict], n_heldout: int, salt: str = "reward-heldout") -> tuple[list[dict], list[dict]]:
    """(train, heldout): whole ids held out, in the order of their salted hash, until at least
    `n_heldout` pairs are out, but never more than half of the pairs (training keeps the rest).

    Every language of an id lands on the same side, so a translation of a held-out pair never
    trains the model that is then tested on it. The hash order is in_fraction's: holding out the
    first k ids is holding out a fraction just above the k-th id's hash, the same ids in every run.
    """

    def rank(record_id: str) -> int:
        return int(hashlib.sha1(f"{salt}:{record_id}".encode()).hexdigest()[:12], 16)

    per_id = Counter(p["id"] for p in pairs)
    out, n = set(), 0
    for record_id in sorted(per_id, key=lambda i: (rank(i), i)):
        if n >= n_heldout or n + per_id[record_id] > len(pairs) // 2:
            break
        out.add(record_id)
        n += per_id[record_id]
    return [p for p in pairs if p["id"] not in out], [p for p in pairs if p["id"] in out]


def curation_pairs(scored: list[dict], margin: float) -> tuple[list[dict], Counter]:
    """Pairs from curation scores: candidates sharing an instruction, scores apart by >= margin.

    In Humpback each candidate has its own backtranslated instruction, so most candidates share
    it with nobody; they are counted as `no_shared_instruction`, not silently skipped. Counts
    are per candidate, so candidates in = used in some pair + the counted reasons.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    counts: Counter = Counter()
    for r in scored:
        score = (r.get("meta") or {}).get("score")
        if not isinstance(score, (int, float)) or r["messages"][-1]["role"] != "assistant":
            counts["no_score"] += 1
            continue
        key = repr([r.get("system") or "", [[m["role"], m["content"]] for m in r["messages"][:-1]]])
        groups[key].append(r)
    pairs = []
    for group in groups.values():
        if len(group) < 2:
            counts["no_shared_instruction"] += len(group)
            continue
        used = set()
        for a, b in itertools.combinations(group, 2):
            hi, lo = (a, b) if a["meta"]["score"] >= b["meta"]["score"] else (b, a)
            if hi["meta"]["score"] - lo["meta"]["score"] < margin:
                continue
            if hi["messages"][-1]["content"] == lo["messages"][-1]["content"]:
                continue
            prompt = hi["messages"][-2]["content"] if len(hi["messages"]) >= 2 else ""
            pairs.append(
                records.make(
                    "preference",
                    prompt=prompt,
                    chosen=hi["messages"][-1]["content"],
                    rejected=lo["messages"][-1]["content"],
                    system=hi.get("system"),
                    lang=hi["lang"],
                    source="curation-scores",
                    meta={"scores": [hi["meta"]["score"], lo["meta"]["score"]], "from": [hi["id"], lo["id"]]},
                )
            )
            used.update((hi["id"], lo["id"]))
        counts["paired"] += sum(r["id"] in used for r in group)
        counts["scores_too_close"] += sum(r["id"] not in used for r in group)
    return pairs, counts


def check_pooling(tok) -> None:
    """A sequence-classification model scores the last token that is not padding; make sure that is
    the end of the conversation and not a token before it."""
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    from selfalign import chat

    ids = tok(chat.render(tok, conv), add_special_tokens=False)["input_ids"]
    if ids[-1] == tok.pad_token_id:
        raise ValueError(
            f"the chat template's render ends in the padding token {tok.pad_token!r}: a sequence "
            "classification model would read its score one token early; set a distinct pad token"
        )


def encode(tok, conversation: list[dict], max_length: int) -> tuple[list[int], bool]:
    """Token ids of a rendered conversation, cut from the left to `max_length` so the end (the
    response and its end-of-turn, where the score is read) always survives. Returns (ids, cut)."""
    from selfalign import chat

    ids = tok(chat.render(tok, conversation), add_special_tokens=False)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


def _last_token(model, tok, conversations: list[list[dict]], batch_size: int, max_length: int, features: bool):
    """Per conversation: the score (features=False) or the final hidden state the score head reads
    (features=True), at the last non-padding token, in batches of similar length."""
    import torch

    encoded = [encode(tok, c, max_length)[0] for c in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    pad = tok.pad_token_id
    out: list = [None] * len(encoded)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            if features:
                hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                for row, i in enumerate(idx):
                    out[i] = hidden[row, len(encoded[i]) - 1].float().cpu()
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, 0]
                for row, i in enumerate(idx):
                    out[i] = float(logits[row])
    model.train(was_training)
    return out


def score(model, tok, conversations: list[list[dict]], batch_size: int = 8, max_length: int = 1024) -> list[float]:
    """Reward of each conversation (a message list ending with the assistant's answer)."""
    return _last_token(model, tok, conversations, batch_size, max_length, features=False)


def fit_head(chosen, rejected, l2: float, center: float):
    """Bradley-Terry on fixed features: the weight w (no bias) minimising
    mean softplus(-(c - r)·w) + center * mean((c·w + r·w)^2) + l2 * |w|^2, by L-BFGS.

    The same loss as TRL's RewardTrainer with center_rewards_coefficient, on a frozen backbone's
    last-token states: convex, so one deterministic answer; the L2 term keeps a few hundred pairs
    from memorising 576 dimensions. Returns (w, losses): the loss at w = 0 (log 2) and at the end.
    """
    import torch

    c, r = chosen.double(), rejected.double()
    w = torch.zeros(c.shape[1], dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss_fn():
        rc, rr = c @ w, r @ w
        return torch.nn.functional.softplus(rr - rc).mean() + center * ((rc + rr) ** 2).mean() + l2 * (w @ w)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.no_grad():
        first = float(loss_fn())
    opt.step(closure)
    with torch.no_grad():
        return w.detach().float(), [first, float(loss_fn())]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (z = 1.96: 95%).

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage at the small n
    and the accuracies near 0.5 or 1 that a held-out set of a few dozen pairs gives.
    """
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def pairwise_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Accuracy (chosen scored strictly higher) with its 95% Wilson interval, and mean margin."""
    n = len(chosen)
    if n == 0:
        return {"accuracy": None, "ci95": None, "margin": None, "pairs": 0}
    diffs = [c - r for c, r in zip(chosen, rejected, strict=True)]
    wins = sum(d > 0 for d in diffs)
    return {"accuracy": wins / n, "ci95": list(wilson_interval(wins, n)), "margin": sum(diffs) / n, "pairs": n}


def length_baseline(pairs: list[dict]) -> dict:
    """The reward "the longer answer wins" (in characters; a tie is half right) on the same pairs.

    A reward model that only learned length scores about this; one that learned more beats it.
    """
    n = len(pairs)
    if n == 0:
        return {"accuracy": None, "ci95": None, "pairs": 0}
    wins = sum((len(p["chosen"]) > len(p["rejected"])) + 0.5 * (len(p["chosen"]) == len(p["rejected"])) for p in pairs)
    return {"accuracy": wins / n, "ci95": list(wilson_interval(wins, n)), "pairs": n}


def load_reward_model(model_dir, device: str = "auto"):
    """(model, tokenizer) of a reward model directory written by the reward stage, on `device` (auto: the
    process's accelerator, else the CPU: selfalign/device.py)."""
    from transformers import AutoModelForSequenceClassification

    from selfalign import chat
    from selfalign.device import resolve_device

    tok = chat.load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).to(resolve_device(device))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.eval()
    return model, tok


def train(model_dir, train_pairs: list[dict], cfg: RewardConfig, workdir: str):
    """Train a reward model initialised from `model_dir` on preference records; returns (model, tok, log).

    TRL's RewardTrainer does the Bradley-Terry loss; we hand it token ids we rendered ourselves,
    so the training text is exactly what `score` sees. With LoRA the adapter is merged afterwards
    and the score head (trained in full, peft's modules_to_save) is kept.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from selfalign import chat

    torch.manual_seed(cfg.seed)
    tok = chat.load_tokenizer(model_dir)
    check_pooling(tok)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    if cfg.backbone == "frozen":  # forward passes only, on the process's device (RewardTrainer places its own)
        from selfalign.device import resolve_device

        return _train_head(model.to(resolve_device("auto")), tok, train_pairs, cfg)
    rows, cut = [], 0
    for p in train_pairs:
        good, bad = pair_messages(p)
        (c_ids, c_cut), (r_ids, r_cut) = encode(tok, good, cfg.max_len), encode(tok, bad, cfg.max_len)
        cut += c_cut or r_cut
        rows.append({"chosen_ids": c_ids, "rejected_ids": r_ids})
    peft_config = None
    if cfg.lora.r:
        from selfalign.models import lora_config

        peft_config = lora_config(cfg.lora, task_type="SEQ_CLS")
    args = RewardConfig(
        output_dir=workdir,
        per_device_train_batch_size=cfg.batch_size,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        max_length=None,
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=cfg.precision == "bf16",
        lr_scheduler_type="constant",
        center_rewards_coefficient=cfg.center_rewards or None,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config
    )
    trainer.train()
    model = trainer.model
    if peft_config is not None:
        model = model.merge_and_unload()
    model.config.pad_token_id = tok.pad_token_id
    log = [h for h in trainer.state.log_history if "loss" in h]
    return model.eval(), tok, {"truncated_pairs": cut, "log": log}


def _train_head(model, tok, train_pairs: list[dict], cfg: RewardConfig):
    """backbone: frozen. Only the score head learns, from last-token states computed once (forward
    passes only, no backward through the network): the cheap way to use more pairs on a CPU."""
    import torch

    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1 or head.bias is not None:
        raise ValueError(
            f"backbone: frozen needs a bias-free one-output `score` head; {type(model).__name__} has {head!r}"
        )
    convs = [pair_messages(p) for p in train_pairs]
    cut = sum(encode(tok, c, cfg.max_len)[1] or encode(tok, r, cfg.max_len)[1] for c, r in convs)
    kw = {"batch_size": cfg.score_batch_size, "max_length": cfg.max_len, "features": True}
    chosen = torch.stack(_last_token(model, tok, [c for c, _ in convs], **kw))
    rejected = torch.stack(_last_token(model, tok, [r for _, r in convs], **kw))
    w, losses = fit_head(chosen, rejected, cfg.head_l2, cfg.center_rewards)
    with torch.no_grad():
        head.weight.copy_(w[None, :].to(head.weight.dtype))
    return model.eval(), tok, {"truncated_pairs": cut, "log": [{"step": i, "loss": v} for i, v in enumerate(losses)]}

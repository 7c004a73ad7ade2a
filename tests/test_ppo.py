"""selfalign.ppo and the ppo stage: the arithmetic by hand, the reference, learning a toy reward,
exact resume, and a stage run killed after a checkpoint that resumes through CliRunner."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from config_checks import assert_rejected
from stage_loader import load_stage

from selfalign import chat, io, params, records
from selfalign import ppo as P

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def make_prompts(tok, n):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i}: say something."}]
        out.append(
            {
                "messages": msgs,
                "ids": tok(chat.render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"],
            }
        )
    return out


def policy_from(model_dir, boost_token=None, boost=8.0):
    """The tiny policy; with `boost_token`, its (untied) head gives that token a logit of about `boost`.

    The random tiny model's next-token distribution is nearly uniform over 49k tokens, so no token
    is ever sampled twice and no reward on tokens could be learned. Pointing one head row along the
    mean last hidden state makes the token common (~20%), which PPO can then push up.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if boost_token is not None:
        tok = chat.load_tokenizer(model_dir, padding_side="left")
        q, qm = P.left_pad([p["ids"] for p in make_prompts(tok, 16)], tok.pad_token_id, "cpu")
        noise = torch.randint(0, model.config.vocab_size, (16, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            h = (
                model(
                    input_ids=torch.cat([q, noise], 1),
                    attention_mask=torch.cat([qm, torch.ones_like(noise)], 1),
                    output_hidden_states=True,
                )
                .hidden_states[-1][:, -8:]
                .reshape(-1, model.config.hidden_size)
            )
            mean = h.mean(0)
            head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
            head.weight.copy_(model.get_input_embeddings().weight)
            head.weight[boost_token] = mean / mean.norm() ** 2 * boost
        model.lm_head = head
        model.config.tie_word_embeddings = False
    return P.PolicyWithValue(P.with_lora(model, LORA))


# --- arithmetic ------------------------------------------------------------------------------


def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = P.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # delta = [0, 0, 0.5]; A2 = 0.5, A1 = 0 + 0.5 * 0.5, A0 = 0 + 0.5 * 0.25
    assert adv.tolist() == [[0.125, 0.25, 0.5]]
    assert ret.tolist() == [[0.625, 0.75, 1.0]]
    # gamma < 1, and a sequence that ended at t=1: nothing after the mask leaks back
    rewards = torch.tensor([[0.2, 1.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 7.0]])
    adv, ret = P.gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8)
    a1 = 1.0 - 2.0  # last real token: no next value
    a0 = 0.2 + 0.9 * 2.0 - 1.0 + 0.9 * 0.8 * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 1.0, a1 + 2.0, 0.0])


def test_clipped_policy_loss_is_pessimistic():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clip_frac = P.policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    # per token max(-A r, -A clip(r)): [-1.2 (clipped), 1.5, -0.5, 0.8 (clipped)]
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert float(clip_frac) == pytest.approx(0.5)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0  # clipped tokens pass no gradient
    assert new.grad[0, 1] != 0 and new.grad[0, 2] != 0
    # masked tokens do not count
    loss2, _ = P.policy_loss(new.detach(), old, adv, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 0.2)
    assert float(loss2) == pytest.approx(-1.2)


def test_clipped_value_loss():
    values = torch.tensor([[2.0, 0.1]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[3.0, 1.0]])
    loss, frac = P.value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: max((2-3)^2, (0.2-3)^2) = 7.84 ; token 1: max(0.81, 0.81) = 0.81 (inside the clip)
    assert float(loss) == pytest.approx(0.5 * (7.84 + 0.81) / 2)
    assert float(frac) == pytest.approx(0.5)


def test_token_rewards_and_missing_eos_penalty():
    scores = P.penalise_missing_eos(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), penalty=0.7)
    assert scores.tolist() == pytest.approx([1.0, 0.3])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.5, 0.5, 0.5]])
    r = P.token_rewards(scores, kl, torch.tensor([2, 3]), kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.01, -0.02 + 1.0, 0.0], [-0.05, -0.05, -0.05 + 0.3]]))


def test_adaptive_kl_moves_toward_its_target():
    ctl = P.AdaptiveKL(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, n=100)
    assert ctl.value == pytest.approx(0.1 * 1.02)  # error clipped at +0.2
    ctl.update(3.0, n=100)
    assert ctl.value < 0.1 * 1.02
    fixed = P.FixedKL(0.1)
    fixed.update(100.0, 100)
    assert fixed.value == 0.1
    assert P.kl_controller(P.PPOConfig(kl_target=6.0)).__class__ is P.AdaptiveKL


def test_step_indices_cover_each_epoch_and_split_processes():
    n = 10
    got = [i for step in range(5) for i in P.step_indices(n, step, 4, seed=3)]  # 20 = two epochs
    assert sorted(got[:10]) == list(range(10)) and sorted(got[10:]) == list(range(10))
    assert got == [i for step in range(5) for i in P.step_indices(n, step, 4, seed=3)]
    r0, r1 = P.step_indices(n, 0, 4, 3, rank=0, world=2), P.step_indices(n, 0, 4, 3, rank=1, world=2)
    assert not set(r0) & set(r1)


def test_generate_cuts_each_response_after_its_first_end_of_turn():
    class Scripted:
        def generate(self, input_ids, attention_mask, generation_config):
            assert generation_config.top_k == 0 and generation_config.do_sample
            resp = torch.tensor([[5, 2, 7, 2], [6, 6, 6, 6], [2, 9, 9, 9]])
            return torch.cat([input_ids, resp], 1)

    q = torch.ones(3, 2, dtype=torch.long)
    resp, mask, ended = P.generate(Scripted(), q, torch.ones_like(q), P.PPOConfig(max_new_tokens=4), 2, 0)
    assert ended.tolist() == [True, False, True]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert resp.tolist() == [[5, 2, 0, 0], [6, 6, 6, 6], [2, 0, 0, 0]]


# --- models ----------------------------------------------------------------------------------


def test_adapter_disabled_reference_is_the_base_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = chat.load_tokenizer(tiny_model_dir, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = policy_from(tiny_model_dir).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: the policy now differs from the base
    ids, mask = P.left_pad([p["ids"] for p in make_prompts(tok, 3)], tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref = P.reference_logits(policy, None, ids, mask, keep=5)
        want = base(input_ids=ids, attention_mask=mask, position_ids=P.positions(mask)).logits[:, -5:]
        pol, values = policy(ids, mask, keep=5)
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(pol, want, atol=1e-3)
    assert values.shape == (3, 5)


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_first_step_kl_to_the_reference_is_zero(tiny_model_dir, reference):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    tok = chat.load_tokenizer(tiny_model_dir, padding_side="left")
    policy = policy_from(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval() if reference == "copy" else None
    cfg = P.PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, lr=1e-3)
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    calls = []

    def reward(convs, ids):
        calls.append((convs, ids))
        return [0.5] * len(ids)

    m = P.ppo_step(policy, ref, tok, make_prompts(tok, 4), reward, cfg, P.FixedKL(0.1), opt, acc)
    assert abs(m["kl"]) < 1e-6 and m["non_score_reward"] == 0
    # the reward saw decoded conversations ending with the assistant's turn; 4 tokens never reach EOS here
    convs, ids = calls[0]
    assert convs[0][-1]["role"] == "assistant" and len(ids[0]) == 4
    assert m["reward_mean"] == pytest.approx(0.5 - cfg.missing_eos_penalty * (1 - m["eos_frac"]))
    assert m["time_generate"] > 0 and m["entropy"] > 0


def test_ppo_learns_a_toy_reward_with_bounded_kl(tiny_model_dir):
    tok = chat.load_tokenizer(tiny_model_dir, padding_side="left")
    target = tok.convert_tokens_to_ids("Ġyes")
    policy = policy_from(tiny_model_dir, boost_token=target)

    def share_of_target(convs, ids):
        return [sum(t == target for t in r) / len(r) for r in ids]

    cfg = P.PPOConfig(
        steps=8,
        batch_size=8,
        minibatch_size=4,
        ppo_epochs=2,
        max_new_tokens=8,
        lr=3e-3,
        kl_coef=0.05,
        missing_eos_penalty=0.0,
        seed=1,
    )
    hist = P.train(policy, None, tok, make_prompts(tok, 16), share_of_target, cfg)["history"]
    rewards = [h["reward_mean"] for h in hist]
    assert len(hist) == 8 and abs(hist[0]["kl"]) < 1e-6
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.3, rewards  # measured: ~0.15 -> ~0.9
    assert all(math.isfinite(h["kl"]) and h["kl"] < 12 for h in hist), [h["kl"] for h in hist]  # 8 tokens


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tiny_model_dir, tmp_path):
    tok = chat.load_tokenizer(tiny_model_dir, padding_side="left")
    prompts = make_prompts(tok, 6)

    def length_reward(convs, ids):
        return [len(c[-1]["content"]) / 20 for c in convs]

    cfg = P.PPOConfig(steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=4, lr=1e-3)
    ckpt = tmp_path / "ckpt"
    P.train(
        policy_from(tiny_model_dir),
        None,
        tok,
        prompts,
        length_reward,
        cfg,
        checkpoint_dir=ckpt,
        checkpoint_every=1,
        fingerprint="f",
    )
    cfg2 = P.PPOConfig(**{**cfg.__dict__, "steps": 2})
    resumed = P.train(
        policy_from(tiny_model_dir),
        None,
        tok,
        prompts,
        length_reward,
        cfg2,
        checkpoint_dir=ckpt,
        checkpoint_every=1,
        fingerprint="f",
    )
    fresh = P.train(policy_from(tiny_model_dir), None, tok, prompts, length_reward, cfg2)
    assert resumed["resumed_from"] == 1 and fresh["resumed_from"] == 0
    for a, b in zip(resumed["history"], fresh["history"], strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"]) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    sa, sb = P.trainable_state(resumed["policy"]), P.trainable_state(fresh["policy"])
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sb)
    # a checkpoint made from other inputs is not resumed
    other = P.train(
        policy_from(tiny_model_dir),
        None,
        tok,
        prompts,
        length_reward,
        cfg2,
        checkpoint_dir=ckpt,
        checkpoint_every=0,
        fingerprint="other",
    )
    assert other["resumed_from"] == 0


# --- the stage -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_inputs(tiny_model_dir, tmp_path_factory):
    """A tiny reward model (random score head) and prompt and seed files."""
    from transformers import AutoModelForSequenceClassification

    d = tmp_path_factory.mktemp("ppo_inputs")
    tok = chat.load_tokenizer(tiny_model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(d / "reward")
    tok.save_pretrained(d / "reward")
    prompts = [records.make("prompt", prompt=f"Name a colour ({i}).", lang="en", source="ppo") for i in range(5)]
    prompts.append(
        records.make("prompt", prompt="Be brief: what is rain?", system="Answer briefly.", lang="en", source="ppo")
    )
    prompts.append(records.make("prompt", prompt="word " * 400, lang="en", source="ppo"))  # too long
    seed = [
        records.chat(
            [{"role": "user", "content": f"Seed question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}],
            lang="en",
            source="seed",
        )
        for i in range(8)
    ]
    io.write_jsonl(d / "prompts.jsonl", prompts)
    io.write_jsonl(d / "seed.jsonl", seed)
    return d


def stage_args(model_dir, inputs, out):
    return [
        "--policy",
        str(model_dir),
        "--reward-model",
        str(inputs / "reward"),
        "--prompts",
        str(inputs / "prompts.jsonl"),
        "--seed-file",
        str(inputs / "seed.jsonl"),
        "--eval-fraction",
        "0.5",
        "--output",
        str(out / "ppo"),
        "--checkpoints",
        str(out / "ckpt"),
        "--plots",
        str(out / "plots"),
        "--metrics",
        str(out / "metrics.json"),
        "--set",
        "steps=6",
        "--set",
        "checkpoint_every=2",
        "--set",
        "batch_size=4",
        "--set",
        "minibatch_size=2",
        "--set",
        "ppo_epochs=1",
        "--set",
        "max_new_tokens=4",
        "--set",
        "max_prompt_len=64",
        "--set",
        "lora.r=4",
    ]


def test_stage_killed_after_a_checkpoint_resumes_and_writes_a_servable_model(tiny_model_dir, stage_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    args = stage_args(tiny_model_dir, stage_inputs, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "ppo.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in proc.stderr:  # blocks until the stage logs; no sleeping
        seen.append(line)
        if "checkpoint saved at step 2" in line:
            proc.kill()
            break
    proc.wait()
    assert any("checkpoint saved at step 2" in s for s in seen), "".join(seen[-20:])
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "metrics.json").exists()

    res = CliRunner().invoke(load_stage("ppo").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert 2 <= m["resumed_from"] < 6 and m["steps"] == 6
    with open(tmp_path / "plots" / "reward_mean.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    p = m["prompts"]
    assert p["in"] == 7 + 8 and p["too_long"] == 1
    assert p["in"] == p["used"] + p["seed_not_heldout"] + p["seed_without_user_turn"] + p["duplicate"] + p["too_long"]
    assert 0 < p["seed_not_heldout"] < 8
    # the keys every filtering stage writes: records in = kept + rejected, each rejection under its reason
    assert m["records_in"] == p["in"] and m["kept"] == p["used"] == m["records_in"] - m["rejected"]
    assert m["rejected_by_reason"]["too_long"] == 1 and sum(m["rejected_by_reason"].values()) == m["rejected"]
    assert set(m["time_share"]) == {"generate", "score", "logprobs", "optimise"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo")  # merged: no adapter files, loads plainly
    assert not (tmp_path / "ppo" / "adapter_config.json").exists()
    tok = chat.load_tokenizer(tmp_path / "ppo", padding_side="left")
    ids = tok(chat.render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True), return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_stage_errors_name_file_line_and_field(tiny_model_dir, stage_inputs, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    recs = io.load_jsonl(stage_inputs / "prompts.jsonl")[:3]
    recs[2]["prompt"] = 7
    io.write_jsonl(bad, recs)
    args = stage_args(tiny_model_dir, stage_inputs, tmp_path)
    args[args.index("--prompts") + 1] = str(bad)
    res = CliRunner().invoke(load_stage("ppo").main, args)
    assert res.exit_code != 0 and f"{bad}:3:" in res.output and "'prompt'" in res.output


def test_stage_takes_a_python_reward_instead_of_the_reward_model(tiny_model_dir, stage_inputs, tmp_path):
    fn = tmp_path / "toy_reward.py"
    fn.write_text("def short(conversations, response_ids):\n    return [-len(r) / 10 for r in response_ids]\n")
    args = stage_args(tiny_model_dir, stage_inputs, tmp_path)
    i = args.index("--reward-model")
    del args[i : i + 2]
    args += [
        "--set",
        f"reward_fn={fn}:short",
        "--set",
        "steps=2",
        "--set",
        "checkpoint_every=0",
        "--set",
        "max_new_tokens=3",
    ]
    res = CliRunner().invoke(load_stage("ppo").main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["steps"] == 2 and m["resumed_from"] == 0
    with open(tmp_path / "plots" / "score_mean.csv") as f:
        scores = [float(r["score_mean"]) for r in csv.DictReader(f)]
    assert all(-0.3 <= s <= -0.1 for s in scores)  # -len/10 for 1..3 tokens: the callable was used


def test_stage_needs_the_sft_split_to_take_seed_prompts(tiny_model_dir, stage_inputs, tmp_path):
    """The held-out seed instructions are sft's split: without --eval-fraction the stage refuses, before any work."""
    args = stage_args(tiny_model_dir, stage_inputs, tmp_path)
    i = args.index("--eval-fraction")
    del args[i : i + 2]
    res = CliRunner().invoke(load_stage("ppo").main, args)
    assert res.exit_code == 2 and "--eval-fraction is required" in res.output
    args += ["--set", "use_seed_heldout=false", "--dry-run"]  # no seed prompts: no split needed
    assert CliRunner().invoke(load_stage("ppo").main, args).exit_code == 0


# --- params ----------------------------------------------------------------------------------


def test_ppo_config_defaults_are_params_yaml():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["ppo"]
    assert P.PPOConfig.from_dict(section, "ppo") == P.PPOConfig()


def test_ppo_floats_written_without_a_dot_are_floats(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("ppo:\n  lr: 1e-4\n  kl_target: 6e0\n")
    cfg = params.resolve(P.PPOConfig, p, "ppo")
    assert (cfg.lr, cfg.kl_target) == (1e-4, 6.0) and isinstance(cfg.lr, float)
    assert P.kl_controller(cfg).__class__ is P.AdaptiveKL


def bare_args(tmp_path) -> list[str]:
    """The stage's required options over paths that exist (nothing is read before the params are checked)."""
    model = tmp_path / "model"
    model.mkdir()
    return ["--policy", str(model), "--output", "o", "--checkpoints", "c", "--plots", "p", "--metrics", "m.json"]


@pytest.mark.parametrize(
    "setting, words",
    [
        ("kl_coef=abc", ["a number"]),
        ("precision=no", ["fp32", "bf16", "auto"]),
        ("reference=ema", ["adapter", "copy"]),
        ("clip_range=-1", ["0 <"]),
        ("max_new_tokens=0", ["1 <="]),
        ("steps=1.5", ["an integer"]),
        ("kl_target=-2", ["0 <"]),
        ("lora.r=0", ["at least 1"]),
        # renamed keys (one vocabulary) are unknown, not ignored; seed_heldout_fraction is gone (--eval-fraction)
        ("response_length=8", ["unknown key", "max_new_tokens"]),
        ("max_prompt_tokens=64", ["unknown key", "max_prompt_len"]),
        ("reward_max_length=64", ["unknown key", "reward_max_len"]),
        ("mixed_precision=bf16", ["unknown key", "precision"]),
        ("seed_heldout_fraction=0.1", ["unknown key"]),
    ],
)
def test_ppo_rejects_a_bad_setting_before_any_work(tmp_path, setting, words):
    assert_rejected(load_stage("ppo").main, bare_args(tmp_path), setting, *words)

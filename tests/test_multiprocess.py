"""Multi-process training for real, on CPU: sft, reward and ppo under `torchrun --nproc_per_node 2` (gloo),
DeepSpeed ZeRO-2 with 2 processes, a 2-node launch simulated on localhost, and QLoRA where bitsandbytes is.

The launcher comes from SELFALIGN_LAUNCHER (selfalign/launch.py), as on a cluster: the stage is started
as `python stages/<x>.py ...` and re-executes itself under torchrun. (`accelerate launch --cpu
--num_processes 2` starts a single process on a CPU machine, so these tests use torchrun and check the
world size the stage saw.) An audit hook (sitecustomize on PYTHONPATH, Python's sys.addaudithook) logs
every file each rank opens for writing, renames, replaces or removes under the run's output directory;
the tests check that each such path is touched by one rank only, and outputs, metrics and plots by rank 0.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from selfalign import io, launch, models, records, sft

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SEED = str(ROOT / "tests" / "fixtures" / "sft" / "seed.jsonl")
# DeepSpeed JIT-compiles its CPU ops on first use (~1 min); once per machine, outside any clone, so CI reuses it.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", "/var/tmp/selfalign-torch-extensions")

AUDIT = """
import os, sys
_log, _dir = os.environ.get("SELFALIGN_AUDIT_LOG"), os.environ.get("SELFALIGN_AUDIT_DIR")
if _log and _dir:
    _fd = []
    def _paths(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else \\
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            return [path] if writes else []
        if event in ("os.rename", "os.replace"):
            return [args[0], args[1]]
        if event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            return [args[0]]
        return []
    def _hook(event, args):
        for p in _paths(event, args):
            if isinstance(p, int) or p is None:
                continue
            p = os.path.abspath(os.fsdecode(os.fspath(p)))
            if p.startswith(_dir + os.sep):
                if not _fd:
                    _fd.append(os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
                os.write(_fd[0], f"{os.environ.get('RANK', '-')}\\t{event}\\t{p}\\n".encode())
    sys.addaudithook(_hook)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp: Path, out: Path, launcher: str | None, **extra) -> dict:
    """The environment of a launched stage: the launcher, the audit hook, one torch thread per rank."""
    hook = tmp / "audit"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (launch.MARKER, "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(launch.ENV)
    }
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)]),
            "SELFALIGN_AUDIT_LOG": str(tmp / "audit.log"),
            "SELFALIGN_AUDIT_DIR": str(out),
            "TORCH_EXTENSIONS_DIR": EXTENSIONS,
            **extra,
        }
    )
    if launcher:
        env[launch.ENV] = launcher
    return env


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc), children before grandchildren."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill_launch(pid: int) -> None:
    """SIGKILL the launcher and every rank, as a scheduler killing the job's cgroup would. torchrun starts each
    rank in a session of its own, so killing the launcher's process group alone would leave the ranks running."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_stage(stage: str, args: list[str], env: dict, kill_on: str | None = None, timeout: float = 420):
    """Run `python stages/<stage>.py args` in its own session; with kill_on, SIGKILL the whole launch
    (launcher and every rank, as a scheduler would) once a line contains it. Returns (returncode, output)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:  # blocks until the stage logs; no sleeping
            lines.append(line)
            if kill_on and kill_on in line:
                kill_launch(proc.pid)
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_launch(proc.pid)
            proc.wait()
        proc.stdout.close()
    return proc.returncode, "".join(lines)


def audit(tmp: Path) -> dict[str, set[str]]:
    """{path: ranks that wrote, renamed or removed it} from the audit log of every launched process."""
    by_path = defaultdict(set)
    log = tmp / "audit.log"
    for line in log.read_text().splitlines() if log.is_file() else []:
        rank, _, path = line.split("\t")
        by_path[path].add(rank)
    return by_path


def assert_one_writer(tmp: Path, out: Path, rank0: list[Path]) -> dict[str, set[str]]:
    """Every audited path has a single writing rank; each path in rank0 (or under it) was written by rank 0."""
    by_path = audit(tmp)
    shared = {p: r for p, r in by_path.items() if len(r) > 1}
    assert not shared, f"written by several ranks: {shared}"
    for want in rank0:
        mine = {
            p: r
            for p, r in by_path.items()
            if p == str(want) or p.startswith(str(want) + os.sep) or Path(p).name.startswith(want.name + ".")
        }  # atomic writes go through a sibling temp name
        assert mine, f"nobody wrote {want}"
        assert all(r == {"0"} for r in mine.values()), {p: r for p, r in mine.items() if r != {"0"}}
    return by_path


# ---------------------------------------------------------------- sft


def sft_params(tmp: Path, base: Path, **train) -> Path:
    t = {
        "max_len": 512,
        "batch_size": 2,
        "lr": 1.0e-3,
        "save_steps": 1,
        "eval_steps": 100,
        "eval_fraction": 0.0,
        "precision": "fp32",
        "heldout_eval": {"max_examples": 0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        **train,
    }
    runs = {
        "long": {
            "base": str(base),
            "phases": [{"sources": [{"path": SEED, "tag": "seed"}], "epochs": 4, "max_steps": 4}],
        }
    }
    p = tmp / "params.yaml"
    p.write_text(yaml.safe_dump({"sft": {"train": t, "system_tags": {"seed": "Be helpful."}, "runs": runs}}))
    return p


def sft_args(params_file: Path, base: Path, out: Path, *extra) -> list[str]:
    return [
        "--params",
        str(params_file),
        "--run",
        "long",
        "--input",
        str(base),
        "--input",
        SEED,
        "--output",
        str(out / "model"),
        "--checkpoints",
        str(out / "ckpt"),
        "--rejected",
        str(out / "rejected.jsonl"),
        "--metrics",
        str(out / "metrics.json"),
        "--plots",
        str(out / "plots"),
        *extra,
    ]


def sft_outputs(out: Path) -> list[Path]:
    return [out / "model", out / "metrics.json", out / "rejected.jsonl", out / "plots" / "train.csv"]


def check_sft(out: Path, world: int, batch: int = 2) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == world and m["global_batch"] == batch * world
    # max_steps 4 of the phase are optimizer steps, whatever the world size: world x batch rows each
    assert m["steps"] == 4 and m["rows"] == 4 * batch * world
    model = models.load_model(out / "model")
    assert model.config.num_hidden_layers == 2
    assert list((out / "ckpt").iterdir()) == []  # cleared by rank 0 after success; the (empty) dir DVC declares
    return m


def test_sft_two_processes_one_writer_and_resume_after_a_kill(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    args = sft_args(sft_params(tmp_path, tiny_model_dir), tiny_model_dir, out)
    env = launch_env(tmp_path, out, f"torchrun --nproc_per_node 2 --master_port {free_port()}")
    rc, log = run_stage("sft", args, env, kill_on="saved checkpoint at step 2")
    assert rc != 0 and "saved checkpoint at step 2" in log, log[-3000:]
    assert not (out / "model").exists() and sft.last_complete_checkpoint(out / "ckpt") is not None

    rc, log = run_stage("sft", args, env)
    assert rc == 0, log[-5000:]
    assert log.count("rank 0 of 2") == 1 and log.count("rank 1 of 2") == 1, log[-3000:]
    assert "rank 1: trained" in log and log.count("wrote " + str(out / "model")) == 1
    m = check_sft(out, world=2)
    assert m["resumed_from_step"] == 2, m
    with open(out / "plots" / "train.csv") as f:  # the killed run's log history is kept: the curve is whole
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    by_path = assert_one_writer(tmp_path, out, sft_outputs(out) + [out / "ckpt" / "fingerprint.json"])
    # each rank saved its own RNG state into the checkpoints, and nothing else
    assert {p.rsplit("/", 1)[1] for p, r in by_path.items() if r == {"1"}} <= {"rng_state_1.pth"}


def test_sft_deepspeed_zero2_two_processes(tmp_path, tiny_model_dir):
    pytest.importorskip("deepspeed", reason="the gpu extra (make setup installs it)")
    out = tmp_path / "out"
    args = sft_args(
        sft_params(tmp_path, tiny_model_dir, deepspeed=True, save_steps=100),
        tiny_model_dir,
        out,
        "--deepspeed-config",
        str(ROOT / "configs" / "deepspeed_zero2.json"),
    )
    env = launch_env(tmp_path, out, f"torchrun --nproc_per_node 2 --master_port {free_port()}")
    rc, log = run_stage("sft", args, env)
    assert rc == 0, log[-5000:]
    assert check_sft(out, world=2)["zero_stage"] == 2
    assert_one_writer(tmp_path, out, sft_outputs(out))


def test_sft_two_nodes_simulated_on_localhost(tmp_path, tiny_model_dir):
    """Two launches, node ranks 0 and 1, one process each, meeting at one master address and port, with the
    multi-node config's settings (DeepSpeed ZeRO-2 from its deepspeed_config_file, static rendezvous)."""
    pytest.importorskip("deepspeed", reason="the gpu extra (make setup installs it)")
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate_multi_node.yaml").read_text())
    assert cfg["num_machines"] == 2 and cfg["rdzv_backend"] == "static"
    out = tmp_path / "out"
    args = sft_args(
        sft_params(tmp_path, tiny_model_dir, deepspeed=True, save_steps=100),
        tiny_model_dir,
        out,
        "--deepspeed-config",
        str(ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]),
    )
    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = (
            f"torchrun --nnodes 2 --node_rank {node} --nproc_per_node 1 --rdzv_backend static "
            f"--master_addr 127.0.0.1 --master_port {port}"
        )
        env = launch_env(tmp_path, out, launcher)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "stages" / "sft.py"), *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                kill_launch(p.pid)
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(x[-3000:] for x in logs)
    assert "rank 0 of 2" in logs[0] and "rank 1 of 2" in logs[1]
    m = check_sft(out, world=2)
    assert m["nodes"] == 2 and m["zero_stage"] == 2
    assert_one_writer(tmp_path, out, sft_outputs(out))


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is in the gpu extra (make setup installs it)"
)
def test_qlora_trains_for_real(tmp_path, tiny_model_dir):
    """QLoRA: a 4-bit NF4 base (bitsandbytes, on the CPU here) with LoRA adapters that learn, merged on save."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = sft_args(
        sft_params(
            tmp_path,
            tiny_model_dir,
            method="qlora",
            save_steps=100,
            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        ),
        tiny_model_dir,
        out,
    )
    rc, log = run_stage("sft", args, launch_env(tmp_path, out, None))
    assert rc == 0, log[-5000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "qlora" and m["world_size"] == 1 and m["steps"] == 4 and m["rows"] == 8
    assert m["final_train_loss"] is not None
    adapter = load_file(str(out / "model" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: it learned
    before, after = load_file(str(tiny_model_dir / models.WEIGHTS)), load_file(str(out / "model" / models.WEIGHTS))
    key = next(k for k in before if "q_proj" in k)
    assert after[key].dtype == before[key].dtype and not before[key].equal(after[key])  # merged, full precision


# ---------------------------------------------------------------- reward


def test_reward_two_processes_split_each_batch_and_rank0_writes(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    pairs = []
    for i in range(48):
        topic = rng.choice(["the sea", "bread", "rain", "a cat", "tea", "music"])
        pairs.append(
            records.make(
                "preference",
                prompt=f"Tell me about {topic} ({i}).",
                lang="en",
                chosen=f"A fact about {topic}, number {i}.",
                rejected="I like turtles.",
                source="orca-dpo",
            )
        )
    pref = tmp_path / "preference.jsonl"
    io.write_jsonl(pref, pairs)
    out = tmp_path / "out"
    args = [
        "--preference",
        str(pref),
        "--model",
        str(tiny_model_dir),
        "--output",
        str(out / "reward"),
        "--metrics",
        str(out / "metrics.json"),
        "--set",
        "backbone=tuned",
        "--set",
        "heldout_pairs=8",
        "--set",
        "max_pairs=40",
        "--set",
        "batch_size=4",
        "--set",
        "lr=1e-2",
        "--set",
        "max_len=64",
        "--set",
        "lora.r=4",
        "--set",
        "precision=fp32",
    ]
    env = launch_env(tmp_path, out, f"torchrun --nproc_per_node 2 --master_port {free_port()}")
    rc, log = run_stage("reward", args, env)
    assert rc == 0, log[-5000:]
    assert "rank 1 of 2: trained" in log
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch"] == 8
    assert m["train_steps"] == -(-m["pairs_train"] // 8)  # each step took 4 pairs on each of the 2 ranks
    assert m["heldout_accuracy"] is not None
    assert_one_writer(tmp_path, out, [out / "reward", out / "metrics.json"])


# ---------------------------------------------------------------- ppo


@pytest.fixture
def ppo_inputs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from selfalign import chat

    d = tmp_path / "inputs"
    tok = chat.load_tokenizer(tiny_model_dir)
    rmodel = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rmodel.config.pad_token_id = tok.pad_token_id
    rmodel.save_pretrained(d / "reward")
    tok.save_pretrained(d / "reward")
    io.write_jsonl(
        d / "prompts.jsonl",
        [records.make("prompt", prompt=f"Name a colour ({i}).", lang="en", source="ppo") for i in range(8)],
    )
    return d


def test_ppo_two_processes_resume_after_a_kill(tmp_path, tiny_model_dir, ppo_inputs):
    out = tmp_path / "out"
    args = [
        "--policy",
        str(tiny_model_dir),
        "--reward-model",
        str(ppo_inputs / "reward"),
        "--prompts",
        str(ppo_inputs / "prompts.jsonl"),
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
        "batch_size=2",
        "--set",
        "minibatch_size=2",
        "--set",
        "ppo_epochs=1",
        "--set",
        "max_new_tokens=4",
        "--set",
        "use_seed_heldout=false",
        "--set",
        "max_prompt_len=64",
        "--set",
        "lora.r=4",
    ]
    env = launch_env(tmp_path, out, f"torchrun --nproc_per_node 2 --master_port {free_port()}")
    rc, log = run_stage("ppo", args, env, kill_on="checkpoint saved at step 2")
    assert rc != 0 and "checkpoint saved at step 2" in log, log[-3000:]
    assert not (out / "ppo").exists() and not (out / "metrics.json").exists()

    rc, log = run_stage("ppo", args, env)
    assert rc == 0, log[-5000:]
    m = json.loads((out / "metrics.json").read_text())
    # the kill lands after the step-2 checkpoint, possibly after the step-4 one too (the steps are short)
    assert m["world_size"] == 2 and m["global_batch"] == 4 and m["steps"] == 6 and 2 <= m["resumed_from"] < 6, m
    with open(out / "plots" / "reward_mean.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    by_path = assert_one_writer(tmp_path, out, [out / "ppo", out / "metrics.json", out / "plots"])
    # rank 1 wrote only its own RNG state into the checkpoints
    assert {Path(p).name for p, r in by_path.items() if r == {"1"}} <= {"rng-1.pt", ".rng-1.pt.tmp"}

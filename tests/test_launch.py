"""The launcher is the machine's choice (selfalign/launch.py): environment or a git-ignored local file, never
params.yaml or dvc.yaml, so switching it reruns no stage; and a launched rank runs on instead of relaunching."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfalign import launch

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ("sft", "reward", "ppo")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in [v for v in os.environ if v.startswith(launch.ENV)] + [
        launch.CONFIG_ENV,
        launch.MARKER,
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
    ]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_launcher_comes_from_stage_env_then_env_then_local_file_then_python(clean_env, monkeypatch):
    assert launch.chosen("sft") == ("python", "default")
    (clean_env / launch.LOCAL_CONFIG).write_text("default: torchrun --nproc_per_node 2\nppo: accelerate launch\n")
    assert launch.chosen("sft") == ("torchrun --nproc_per_node 2", f"{launch.LOCAL_CONFIG}:default")
    assert launch.chosen("ppo") == ("accelerate launch", f"{launch.LOCAL_CONFIG}:ppo")
    monkeypatch.setenv(launch.ENV, "srun torchrun --nproc_per_node {gpus}")
    assert launch.chosen("ppo") == ("srun torchrun --nproc_per_node {gpus}", f"${launch.ENV}")
    monkeypatch.setenv(f"{launch.ENV}_PPO", "python")
    assert launch.chosen("ppo") == ("python", f"${launch.ENV}_PPO")
    assert launch.chosen("reward")[0] == "srun torchrun --nproc_per_node {gpus}"


def test_a_bad_launch_setting_names_its_file_and_key(clean_env, monkeypatch):
    (clean_env / launch.LOCAL_CONFIG).write_text("sfft: torchrun\n")
    with pytest.raises(launch.LaunchError, match=r"launch.local.yaml: unknown key 'sfft'"):
        launch.chosen("sft")
    (clean_env / launch.LOCAL_CONFIG).write_text("sft: ''\n")
    with pytest.raises(launch.LaunchError, match=r"launch.local.yaml: sft: expected a launcher command"):
        launch.chosen("sft")
    monkeypatch.setenv(launch.CONFIG_ENV, str(clean_env / "missing.yaml"))
    with pytest.raises(launch.LaunchError, match=r"missing.yaml, which is not a file"):
        launch.chosen("sft")
    with pytest.raises(launch.LaunchError, match=r"stage 'curate'"):
        launch.chosen("curate")


def test_launcher_reexecutes_the_stage_once_and_ranks_run_on(clean_env, monkeypatch):
    argv = ["stages/sft.py", "--run", "m0"]
    assert launch.command("python", argv, 0) is None
    cmd = launch.command(
        "accelerate launch --config_file configs/accelerate_zero2.yaml --num_processes {gpus}", argv, 8
    )
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # "--": the launchers' argparse would take the stage's --run for an abbreviation of their --run-path
    assert cmd == [
        accelerate,
        "launch",
        "--config_file",
        "configs/accelerate_zero2.yaml",
        "--num_processes",
        "8",
        "--",
        *argv,
    ]
    assert launch.command("srun --ntasks 2 python", argv, 0) == ["srun", "--ntasks", "2", "python", *argv]
    calls = []
    monkeypatch.setattr(launch.os, "execvpe", lambda f, a, env: calls.append((f, a, env[launch.MARKER])))
    monkeypatch.setenv(f"{launch.ENV}_SFT", "torchrun --nproc_per_node 2")
    assert launch.relaunch("sft", argv) == "torchrun --nproc_per_node 2"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    assert calls == [(torchrun, [torchrun, "--nproc_per_node", "2", "--", *argv], "1")]
    monkeypatch.setenv("LOCAL_RANK", "0")  # a rank the launcher started: it trains, it does not relaunch
    launch.relaunch("sft", argv)
    assert len(calls) == 1


def test_world_size_nodes_and_global_batch_come_from_the_launch(clean_env, monkeypatch):
    assert launch.summary("python", 4) == {"world_size": 1, "nodes": 1, "launcher": "python", "global_batch": 4}
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "9")
    assert launch.summary("torchrun", 2) == {"world_size": 16, "nodes": 2, "launcher": "torchrun", "global_batch": 32}
    assert not launch.is_main() and launch.rank() == 9


def test_no_launcher_in_params_profiles_or_dvc_commands():
    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    for f in [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]:
        assert "launcher" not in set(keys(yaml.safe_load(f.read_text()))), f
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if name.split("@")[0].split("-")[0] in TRAINING:
            cmd = stage["do"]["cmd"] if "do" in stage else stage["cmd"]
            assert cmd.startswith("python stages/"), (name, cmd)
    assert "/launch.local.yaml" in (ROOT / ".gitignore").read_text().splitlines()


STAGE = """
import json, sys
from selfalign import launch
launcher = launch.relaunch("sft")
if launch.is_main():
    import torch.distributed as dist
    if launch.world_size() > 1:
        dist.init_process_group("gloo")
        seen = [None] * launch.world_size()
        dist.all_gather_object(seen, launch.rank())
    else:
        seen = [0]
    open(sys.argv[1], "w").write(json.dumps({"world": launch.world_size(), "ranks": sorted(seen)}))
elif launch.world_size() > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.all_gather_object([None] * launch.world_size(), launch.rank())
"""


@pytest.mark.slow
def test_switching_the_launcher_reruns_nothing(tmp_path):
    """A tiny DVC graph whose stage relaunches itself: run once with python, then with torchrun (env) and with
    a local launch file, `dvc status` stays clean and `dvc repro` skips; forced, the launcher really runs."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    (repo / "stages" / "train.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "train": {
                        "cmd": "python stages/train.py out.json",
                        "deps": ["stages/train.py"],
                        "outs": ["out.json"],
                    }
                }
            }
        )
    )
    (repo / ".gitignore").write_text("/launch.local.yaml\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(launch.ENV)
        and k not in (launch.MARKER, "RANK", "LOCAL_RANK", "WORLD_SIZE", launch.CONFIG_ENV)
    }
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )

    def run(*cmd, **extra):
        res = subprocess.run(cmd, cwd=repo, env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout + res.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run(dvc, "repro")
    assert json.loads((repo / "out.json").read_text()) == {"world": 1, "ranks": [0]}
    lock = (repo / "dvc.lock").read_text()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = {launch.ENV: f"torchrun --nproc_per_node 2 --master_port {port}"}
    assert "up to date" in run(dvc, "status", **torchrun)
    assert "didn't change, skipping" in run(dvc, "repro", **torchrun)
    (repo / launch.LOCAL_CONFIG).write_text(f"sft: torchrun --nproc_per_node 2 --master_port {port}\n")
    assert "up to date" in run(dvc, "status")
    assert "didn't change, skipping" in run(dvc, "repro")
    assert (repo / "dvc.lock").read_text() == lock
    assert json.loads((repo / "out.json").read_text()) == {"world": 1, "ranks": [0]}

    run(dvc, "repro", "--force")  # the launcher is used: two ranks met, rank 0 wrote
    assert json.loads((repo / "out.json").read_text()) == {"world": 2, "ranks": [0, 1]}
    lock_after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    assert lock_after["cmd"] == yaml.safe_load(lock)["stages"]["train"]["cmd"] == "python stages/train.py out.json"


def test_slurm_template_runs_dvc_with_a_launcher_selfalign_accepts(tmp_path):
    """The sbatch script as SLURM would run it on the first node; scontrol and dvc (a whole pipeline run) are
    stand-ins that answer the node list and record what dvc was asked and which launcher it would see."""
    sbatch = ROOT / "scripts" / "slurm" / "selfalign.sbatch"
    text = sbatch.read_text()
    assert "#SBATCH --nodes=" in text and "sbatch -W" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a01\\ngpu-a02\\n'\n")
    (bin_dir / "dvc").write_text('#!/bin/sh\necho "$* | $SELFALIGN_LAUNCHER" >> "$DVC_CALLS"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "DVC_CALLS": str(calls),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu-a[01-02]",
        "SLURM_JOB_ID": "77",
        "SELFALIGN_DVC": "exp",
    }
    res = subprocess.run(["bash", str(sbatch), "-S", "sft.train.lr=1e-4"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = calls.read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["exp run --pull -S sft.train.lr=1e-4", "push --run-cache"]
    launcher = lines[0].split(" | ")[1]
    cmd = launch.command(launcher, ["stages/sft.py", "--run", "m0"], 8)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8" and cmd[cmd.index("--rdzv_endpoint") + 1] == "gpu-a01:29500"
    assert cmd[-4:] == ["--", "stages/sft.py", "--run", "m0"]
    env["SELFALIGN_DVC"] = "repro"
    calls.unlink()
    assert subprocess.run(["bash", str(sbatch)], env=env, capture_output=True).returncode == 0
    assert calls.read_text().splitlines()[0].startswith("repro --pull --allow-missing | srun ")


def test_skypilot_task_has_what_sky_reads():
    task = yaml.safe_load((ROOT / "scripts" / "skypilot.yaml").read_text())
    assert {"name", "resources", "num_nodes", "workdir", "envs", "setup", "run"} <= set(task)
    assert task["resources"]["accelerators"] and task["num_nodes"] == 1
    for script in (task["setup"], task["run"]):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "dvc repro --pull" in task["run"] and "dvc exp run --pull" in task["run"]
    cmd = launch.command(task["envs"]["SELFALIGN_LAUNCHER"], ["stages/ppo.py"], 8)
    assert cmd[1:] == ["--nproc_per_node", "8", "--", "stages/ppo.py"]

"""Start a training stage under a multi-process launcher chosen by the machine, not by params or dvc.yaml.

dvc.yaml runs every stage as `python stages/<name>.py ...` and params.yaml says nothing about
processes, so dvc.lock never sees the launcher: moving from a laptop (one process) to a node of
GPUs (torchrun, accelerate launch) or a SLURM allocation (srun ... torchrun) reruns no stage.
The launcher of a training stage (sft, reward, ppo) comes from, first found:

1. the environment variable SELFALIGN_LAUNCHER_<STAGE> (SELFALIGN_LAUNCHER_SFT, ..._REWARD, ..._PPO);
2. the environment variable SELFALIGN_LAUNCHER (every training stage);
3. the machine-local, git-ignored file launch.local.yaml in the working directory (or the file
   SELFALIGN_LAUNCH_CONFIG names): `sft: ...`, `reward: ...`, `ppo: ...`, `default: ...`;
4. `python`: one process.

For example

    SELFALIGN_LAUNCHER="torchrun --nproc_per_node {gpus}" dvc repro
    SELFALIGN_LAUNCHER_SFT="accelerate launch --config_file configs/accelerate_zero2.yaml --num_processes {gpus}"

The stage, first thing after resolving its params, calls `relaunch(stage)`: the process replaces
itself with the launcher running the same script and arguments. The ranks it starts see
LOCAL_RANK (and our marker) and go on normally. `{gpus}` is the number of visible CUDA devices;
`python`, `torchrun`, `accelerate` and `deepspeed` resolve to the ones next to this interpreter
(the same virtual environment) when they are there.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "SELFALIGN_LAUNCHED"
ENV = "SELFALIGN_LAUNCHER"
CONFIG_ENV = "SELFALIGN_LAUNCH_CONFIG"
LOCAL_CONFIG = "launch.local.yaml"
STAGES = ("sft", "reward", "ppo")
SAME_VENV = ("python", "torchrun", "accelerate", "deepspeed")
ARGPARSE_LAUNCHERS = ("torchrun", "accelerate", "deepspeed", "torch.distributed.run")


class LaunchError(ValueError):
    """A launcher setting that cannot be used; the message names where it came from."""


def chosen(stage: str, environ=None, cwd: str | os.PathLike | None = None) -> tuple[str, str]:
    """(launcher, where it came from) for a training stage; ("python", "default") when nothing is set."""
    if stage not in STAGES:
        raise LaunchError(f"no launcher setting for stage {stage!r}; training stages: {', '.join(STAGES)}")
    env = os.environ if environ is None else environ
    for var in (f"{ENV}_{stage.upper()}", ENV):
        if env.get(var, "").strip():
            return env[var].strip(), f"${var}"
    path = Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else Path(cwd or ".") / LOCAL_CONFIG
    if env.get(CONFIG_ENV) and not path.is_file():
        raise LaunchError(f"${CONFIG_ENV} names {path}, which is not a file")
    if path.is_file():
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise LaunchError(f"{path}: expected a mapping of stage name (or default) to launcher command")
        unknown = set(data) - {*STAGES, "default"}
        if unknown:
            raise LaunchError(f"{path}: unknown key {sorted(unknown)[0]!r}; known: {', '.join((*STAGES, 'default'))}")
        for key in (stage, "default"):
            if key in data:
                if not isinstance(data[key], str) or not data[key].strip():
                    raise LaunchError(f"{path}: {key}: expected a launcher command (a non-empty string)")
                return data[key].strip(), f"{path}:{key}"
    return "python", "default"


def _resolve(program: str) -> str:
    """`python` is this interpreter; torchrun, accelerate, deepspeed the ones beside it when present."""
    if program == "python":
        return sys.executable
    if program in SAME_VENV:
        beside = Path(sys.executable).parent / program
        if beside.is_file():
            return str(beside)
    return program


def command(launcher: str, argv: list[str], gpus: int) -> list[str] | None:
    """The command to exec, or None when this process should just run (default launcher, or a rank)."""
    if not launcher.strip() or shlex.split(launcher) == ["python"]:
        return None
    if os.environ.get(MARKER) or "LOCAL_RANK" in os.environ:
        return None
    parts = [part.replace("{gpus}", str(gpus)) for part in shlex.split(launcher)]
    if any(Path(part).name in ARGPARSE_LAUNCHERS for part in parts) and "--" not in parts:
        # Their argparse would take the stage's own options for abbreviations of theirs (--run: --run-path).
        parts.append("--")
    return [_resolve(parts[0]), *parts[1:], *argv]


def relaunch(stage: str, argv: list[str] | None = None) -> str:
    """Exec `launcher script args...` unless this process already is a launched rank; returns the launcher."""
    launcher, where = chosen(stage)
    gpus = 0
    if "{gpus}" in launcher and command(launcher, ["-"], 0) is not None:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise LaunchError(f"launcher {launcher!r} ({where}) wants {{gpus}} but no CUDA device is visible")
    cmd = command(launcher, argv if argv is not None else sys.argv, gpus)
    if cmd is None:
        if world_size() > 1:
            # A gloo/nccl group still alive at interpreter exit can abort the rank ("terminate called without an
            # active exception", SIGABRT) after its work is done, and the launcher then fails the stage.
            atexit.register(_destroy_process_group)
            log.info(
                "rank %d of %d (local rank %d), launched by %s (%s)",
                rank(),
                world_size(),
                local_rank(),
                launcher,
                where,
            )
        return launcher
    log.info("relaunching under %s (%s): %s", launcher, where, shlex.join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, {**os.environ, MARKER: "1"})
    return launcher  # not reached


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- this process in the launch


def world_size() -> int:
    """Processes in the launch (torchrun, accelerate launch, deepspeed and srun+torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """The one process that prepares directories and writes outputs, metrics and plots."""
    return rank() == 0


def nodes() -> int:
    """Nodes in the launch: WORLD_SIZE over the processes on this node (LOCAL_WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or world_size()
    return max(1, world_size() // local)


def set_cuda_device() -> int | None:
    """Bind this process to its GPU (LOCAL_RANK) before any model is loaded; None without CUDA.

    transformers' 4-bit loader places the quantized weights on the current CUDA device when no
    device_map is given: without this every rank's copy of a QLoRA base would land on cuda:0.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    index = local_rank() % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


def barrier() -> None:
    """Wait for every rank (a no-op for a single process or before the process group exists)."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def summary(launcher: str, per_process_batch: int | None) -> dict:
    """What the metrics record about the launch: world size, nodes, global batch, the launcher used."""
    return {
        "world_size": world_size(),
        "nodes": nodes(),
        "launcher": launcher,
        "global_batch": per_process_batch * world_size() if per_process_batch is not None else None,
    }

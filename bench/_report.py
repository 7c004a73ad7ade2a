"""What every benchmark writes beside its numbers (the machine and how busy it was, in bench/results/<name>.json),
and the model the generation benchmarks run on.

A ratio measured on a loaded machine says less than one measured idle, so the 1-minute load
average at the end of the run is part of every result.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write(name: str, result: dict) -> Path:
    """bench/results/<name>.json with the machine added; prints and returns its path."""
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "machine": machine()}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT)}")
    return out


def base_model_dir(tmp: str) -> str:
    """models/base if the base stage has run, else the packaged GGUF converted into `tmp`."""
    if (ROOT / "models" / "base" / "config.json").is_file():
        return str(ROOT / "models" / "base")
    from selfalign import models

    model, tok = models.load_source("gguf")
    return str(models.save_model_dir(model, tok, Path(tmp) / "base"))

"""Stage scripts are files under stages/, not a package: a test loads one by name as a fresh module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

STAGES = Path(__file__).resolve().parent.parent / "stages"


def load_stage(name: str) -> ModuleType:
    """stages/<name>.py executed as module `stage_<name>` (a new module object on every call)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

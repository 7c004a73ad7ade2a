"""Where and in what precision a model runs: the one rule every stage that loads a model follows.

- device `auto`: the process's accelerator when there is one (`cuda:LOCAL_RANK`, so each rank of a
  launch gets its own GPU), else the CPU. `cpu`, `cuda`, `cuda:N` are taken as given.
- precision `auto`: on a CUDA GPU, bf16 where it supports it (no probe), else fp32. On a CPU the
  answer depends on the host, not on its flags: the same AVX512-BF16 CPU without AMX ran the LoRA
  step 1.5x slower in bf16 on one VM and 1.68x faster on another (issue 18). So `auto` measures: a
  forward/backward of one MLP block of the model's shapes (hidden x intermediate, 256 rows) in fp32
  and in bf16 autocast with bf16 frozen weights (how models.load_for_training computes under bf16),
  best of 7 interleaved after a warm-up, ~0.2-0.5 s on 2 cores. bf16 wins when it is at least BF16_MARGIN
  faster (it costs precision, so a tie goes to fp32).
- the probe's result is cached per machine in `$SELFALIGN_CACHE_DIR` (default
  `~/.cache/selfalign`, or `$XDG_CACHE_HOME/selfalign`), keyed by CPU model, core count, torch
  version and the probed shapes, so a pipeline run probes once. Delete the file to probe again.

`placement(...)` returns the choice with its figures; `metrics(...)` is what a stage records.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
DTYPE_OF = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}  # the params vocabulary -> torch dtype names
PRECISION_OF = {v: k for k, v in DTYPE_OF.items()}
BF16_MARGIN = 1.1  # bf16 must run the probe at least 10% faster than fp32 to be chosen
PROBE_ROWS = 256
PROBE_REPS = 7
PROBE_BUDGET_S = 0.6
DEFAULT_SHAPES = (576, 1536)  # SmolLM2-135M's hidden and intermediate sizes
CACHE_ENV = "SELFALIGN_CACHE_DIR"
CACHE_FILE = "precision_probe.json"
PROBE_VERSION = 2  # in the cache key: a changed probe measures again (v2: CPU time of one thread, not wall time)


class DeviceError(ValueError):
    pass


@dataclass
class Placement:
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "bf16" | "fp32"
    reason: str  # why: "asked", "cuda bf16 supported", "probe: bf16 1.42x fp32", ...
    probe: dict | None = field(default=None)  # the probe's figures where one decided (cached or not)

    @property
    def dtype(self) -> str:
        return DTYPE_OF[self.precision]

    def metrics(self) -> dict:
        return {
            "device": self.device,
            "precision": self.precision,
            "precision_reason": self.reason,
            "precision_probe": self.probe,
        }

    def describe(self) -> str:
        return f"device {self.device}, precision {self.precision} ({self.reason})"


def resolve_device(device: str = "auto") -> str:
    """`auto`: cuda:LOCAL_RANK when a CUDA device is visible, else cpu; anything else as given (checked)."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
        return "cpu"
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from e
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: no CUDA device is visible to this process")
    return device


def machine_key(shapes: tuple[int, int] = DEFAULT_SHAPES) -> str:
    """CPU model | core count | torch version | probed shapes | probe version: a result holds for exactly these."""
    import torch

    return (
        f"{cpu_model()}|{os.cpu_count()} cores|torch {torch.__version__}|{shapes[0]}x{shapes[1]}|probe v{PROBE_VERSION}"
    )


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_flags(names=("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")) -> list[str]:
    """The bf16-relevant flags the CPU reports (for logs and benchmarks; the choice does not read them)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return [n for n in names if n in flags]


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfalign"
    return Path(root) / CACHE_FILE


def model_shapes(model_dir: str | os.PathLike | None) -> tuple[int, int]:
    """(hidden, intermediate) from a model dir's config.json; the default model's where there is none."""
    if model_dir is None:
        return DEFAULT_SHAPES
    p = Path(model_dir, "config.json")
    if not p.is_file():
        return DEFAULT_SHAPES
    cfg = json.loads(p.read_text(encoding="utf-8"))
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or (4 * hidden if hidden else None)
    return (int(hidden), int(inter)) if hidden and inter else DEFAULT_SHAPES


def probe(shapes: tuple[int, int] = DEFAULT_SHAPES, rows: int = PROBE_ROWS, reps: int = PROBE_REPS) -> dict:
    """Seconds of one forward/backward of an MLP block (rows x hidden -> intermediate -> hidden), fp32 vs bf16.

    Frozen weights, input gradients only (a LoRA step's bulk); in bf16 the weights are stored in bf16
    and run under autocast, as models.load_for_training sets up. Best of `reps` after one warm-up,
    the two precisions interleaved. Timed in CPU time of one torch thread: on a machine shared with
    other jobs wall time measured the scheduler (at load 17 on 2 cores a fp32 step took 0.8 s of wall
    time against 0.02 s idle, and the ratio came out 0.8-0.95 on a CPU where bf16 is 2x faster); CPU
    time measures the kernels, which is what the choice is about.
    """
    import torch

    hidden, inter = shapes
    gen = torch.Generator().manual_seed(0)
    w_up = torch.randn(inter, hidden, generator=gen) * hidden**-0.5
    w_down = torch.randn(hidden, inter, generator=gen) * inter**-0.5
    x0 = torch.randn(rows, hidden, generator=gen)

    def step(up, down, bf16: bool) -> float:
        x = x0.clone().requires_grad_(True)
        t = time.thread_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = torch.nn.functional.linear(torch.nn.functional.silu(torch.nn.functional.linear(x, up)), down)
        y.float().square().mean().backward()
        return time.thread_time() - t

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work then runs on this thread, and thread_time sees all of it
    runs = {"fp32": (w_up, w_down, False), "bf16": (w_up.bfloat16(), w_down.bfloat16(), True)}
    best = {name: float("inf") for name in runs}
    t0, done = time.perf_counter(), 0
    # interleaved, best of reps; a loaded machine stops after PROBE_BUDGET_S of wall time (2 rounds at
    # least) so that a stage never waits long for its answer
    try:
        for args in runs.values():
            step(*args)  # warm-up: oneDNN picks and JITs its kernels on the first call
        while done < reps and (done < 2 or time.perf_counter() - t0 < PROBE_BUDGET_S):
            for name, args in runs.items():
                best[name] = min(best[name], step(*args))
            done += 1
    finally:
        torch.set_num_threads(threads)
    out = {f"{name}_s": round(t, 5) for name, t in best.items()}
    out["bf16_speedup"] = round(out["fp32_s"] / max(out["bf16_s"], 1e-9), 3)
    out.update(
        {
            "shapes": list(shapes),
            "rows": rows,
            "rounds": done,
            "clock": "CPU time of 1 thread",
            "wall_s": round(time.perf_counter() - t0, 3),
            "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        }
    )
    return out


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or half-written by a killed process: probe again


def cached_probe(shapes: tuple[int, int] = DEFAULT_SHAPES) -> dict:
    """The probe's figures for this machine and shapes: from the cache, or measured once and stored."""
    path, key = cache_path(), machine_key(shapes)
    entry = _read_cache(path).get(key)
    if entry is not None:
        return {**entry, "cached": True}
    entry = {**probe(shapes), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)  # re-read: another stage may have written its own key meanwhile
        data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a run: it probes again next time
        log.warning("precision probe: could not write %s (%s)", path, e)
    return {**entry, "cached": False}


def resolve_precision(
    precision: str, device: str, shapes: tuple[int, int] = DEFAULT_SHAPES, what: str = "precision"
) -> tuple[str, str, dict | None]:
    """(bf16 | fp32, reason, probe figures or None) for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise DeviceError(f"{what} {precision!r}: expected auto, bf16 or fp32")
    if precision != "auto":
        return precision, "asked", None
    if device.startswith("cuda"):
        import torch

        ok = torch.cuda.is_bf16_supported()
        return ("bf16" if ok else "fp32"), f"cuda {'supports' if ok else 'lacks'} bf16", None
    if device != "cpu":
        return "fp32", f"auto on {device}: fp32", None
    figures = cached_probe(shapes)
    pick = "bf16" if figures["bf16_speedup"] >= BF16_MARGIN else "fp32"
    return (
        pick,
        (
            f"probe{' (cached)' if figures['cached'] else ''}: bf16 {figures['bf16_speedup']}x fp32, "
            f"bf16 needs {BF16_MARGIN}x"
        ),
        figures,
    )


def placement(
    device: str = "auto", precision: str = "auto", model_dir: str | os.PathLike | None = None, what: str = "precision"
) -> Placement:
    """The device and precision a stage runs a model in; logs the choice. `model_dir` gives the probe's shapes."""
    dev = resolve_device(device)
    prec, reason, figures = resolve_precision(precision, dev, model_shapes(model_dir), what)
    p = Placement(dev, prec, reason, figures)
    if figures is not None:
        log.info(
            "%s auto on %s: %s; probe fp32 %.4fs, bf16 %.4fs for %d rows of %dx%d",
            what,
            cpu_model(),
            p.describe(),
            figures["fp32_s"],
            figures["bf16_s"],
            figures["rows"],
            *figures["shapes"],
        )
    else:
        log.info("%s: %s", what, p.describe())
    return p


def resolve_dtype(
    dtype: str, device: str, model_dir: str | os.PathLike | None = None, what: str = "dtype"
) -> tuple[str, Placement]:
    """(torch dtype name, placement) for an inference dtype: fp32 | bf16 | fp16 (or torch's float32 | bfloat16 |
    float16) as given, `auto` by the precision rule."""
    if dtype == "auto":
        p = placement(device, "auto", model_dir, what)
        return p.dtype, p
    precision = dtype if dtype in DTYPE_OF else PRECISION_OF.get(dtype)
    if precision is None:
        raise DeviceError(f"{what} {dtype!r}: expected auto, fp32, bf16 or fp16")
    return DTYPE_OF[precision], Placement(resolve_device(device), precision, "asked")

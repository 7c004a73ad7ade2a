"""Progress you can watch for long stages: records/s and ETA on a TTY, a log line otherwise; and peak RSS.

    for record in progress.track(records, total=n, desc="clean"):
        ...
    metrics.update(progress.rates(n, seconds))   # {"records_per_s": ..., "peak_rss_mb": ...}

On a terminal (stderr is a TTY) one line is redrawn in place at most `every_s` seconds apart; in a
log (DVC, CI, a SLURM job) a `log.info` line is written every `log_every_s` seconds instead, so a
job's output shows how far it is without a wall of carriage returns.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("progress")


def _own_peak_bytes() -> int:
    """This process's peak RSS since it started running its program: /proc's VmHWM where there is one (ru_maxrss
    carries over exec, so a stage started by a big process, DVC or pytest, would report its parent's peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished, waited-for children (worker pools), in MB.

    The larger of the two, not the sum: children started by fork share the parent's pages."""
    scale = 1 if sys.platform == "darwin" else 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return round(max(_own_peak_bytes(), kids) / 1e6, 1)


def rates(n: int, seconds: float) -> dict:
    """The throughput figures a data stage puts in its metrics."""
    return {"records_per_s": round(n / seconds, 1) if seconds > 0 else None, "peak_rss_mb": peak_rss_mb()}


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Tracker:
    """Counts items; `update(k)` after each k, `close()` at the end (it logs the total)."""

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        *,
        every_s: float = 0.5,
        log_every_s: float = 30.0,
        tty: bool | None = None,
        stream=None,
    ):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s if self.tty else log_every_s
        self.t0 = self.last = time.perf_counter()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
        eta = f", ETA {_eta((self.total - self.n) / rate)}" if self.total and rate > 0 and self.n < self.total else ""
        return f"{self.desc}: {done} records, {rate:,.0f} records/s{eta}, peak RSS {peak_rss_mb():,.0f} MB"

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.show()

    def show(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
        else:
            log.info("%s", self.line())

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()
        else:
            log.info("%s (done in %.1f s)", self.line(), time.perf_counter() - self.t0)


def track(iterable: Iterable[T], total: int | None = None, desc: str = "", **kw) -> Iterator[T]:
    """Yield from `iterable`, showing progress (see the module docstring); the tracker closes at the end."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    t = Tracker(total, desc, **kw)
    try:
        for item in iterable:
            yield item
            t.update()
    finally:
        t.close()

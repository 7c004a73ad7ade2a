"""Generation in shards: N workers each answer a slice, then one merge run writes what a single run writes.

    python stages/augment.py ... --shard 0/3 --metrics metrics/augment-0-of-3.json     # worker 0 (and 1/3, 2/3)
    python stages/augment.py ... --merge-shards 3 --metrics metrics/augment.json       # after all three

Every worker reads the whole input and makes the same deterministic choices a single run makes
(validation, seeded sampling, request building): that part is cheap. Only the expensive part, the
engine's answers (or curate's scores), is split: work item j goes to shard
`bucket(key_j, N)`, a stable hash of its record's id and language, so a record lands in the same
shard on every machine and every rerun. A worker writes its answers, each with its index in the
full work list, to `<shard-dir>/<stage>-<i>-of-<N>.jsonl`, and its own metrics; it writes none of
the stage's outputs.

The merge is the stage itself run with `--merge-shards N`: it rebuilds the same work list, takes
every answer from the shard files instead of an engine (checking that each index is answered once,
by the shard its key hashes to, from the same input), and goes on down the single-run code path, so
its outputs are the single run's, byte for byte and in the same order, and global steps (curate's
top fraction, translate's file layout) see every answer. The engine counts in its metrics are the
sums of the shards' counts.

The llm cache stays the resume mechanism: with a cache directory shared by the workers, a killed
worker, or a rerun with another N, asks nothing that any earlier shard already has.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import click

from selfalign import io, progress, records

log = logging.getLogger(__name__)
COUNTS = ("requests", "calls", "cache_hits", "failures", "retries", "prompt_tokens", "completion_tokens", "cost_usd")


class ShardError(click.ClickException):
    """A bad shard spec, or shard files that cannot be merged; the message names the file and what is wrong."""


def parse(spec: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N."""
    i, sep, n = spec.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise ShardError(f"--shard {spec!r}: expected i/N with 0 <= i < N, e.g. 0/3")
    return i, n


def bucket(key: str, n: int) -> int:
    """The shard of a work item: sha256 of its key, mod n (the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % n


def record_key(record: dict) -> str:
    """A record's shard key: records.key, (id, lang), as one string."""
    return "\t".join(records.key(record))


def keys_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:16]


def options(f: Callable) -> Callable:
    """The three click options every sharded stage takes."""
    f = click.option(
        "--shard-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Where shard answers are written and merged from (default: the output path + '.shards').",
    )(f)
    f = click.option(
        "--merge-shards",
        type=click.IntRange(min=1),
        default=None,
        help="Merge the answers of N shard runs and write the single run's outputs.",
    )(f)
    return click.option(
        "--shard",
        "shard_spec",
        default=None,
        metavar="i/N",
        help="Answer only shard i of N (by a hash of record id and language); write shard answers "
        "and metrics, not the outputs.",
    )(f)


class Sharding:
    """What --shard / --merge-shards asked of one stage run; with neither, every call passes straight through."""

    def __init__(self, stage: str, spec: str | None, merge: int | None, directory: str | Path | None, default_dir):
        if spec and merge:
            raise ShardError("--shard and --merge-shards exclude each other: run the shards first, then the merge")
        self.stage, self.start = stage, time.monotonic()
        self.index, self.count = parse(spec) if spec else (None, merge)
        self.dir = Path(directory or f"{default_dir}.shards")
        self._header: dict[str, dict] = {}
        self._rows: list[dict] = []
        self._merged: dict[str, dict[int, dict]] = {}
        if merge:
            self._load()

    @property
    def is_shard(self) -> bool:
        return self.index is not None

    @property
    def is_merge(self) -> bool:
        return self.index is None and self.count is not None

    def path(self, i: int) -> Path:
        return self.dir / f"{self.stage}-{i}-of-{self.count}.jsonl"

    def mine(self, keys: Sequence[str]) -> list[int]:
        return [j for j, k in enumerate(keys) if bucket(k, self.count) == self.index]

    def map(
        self,
        call: str,
        keys: Sequence[str],
        work: Callable[[list[int]], list],
        encode: Callable = lambda r: r,
        decode: Callable = lambda d: d,
    ) -> list:
        """work(indices) over every item (single run), this shard's items (others are None), or none (merge)."""
        if self.is_merge:
            return [decode(d) for d in self._take(call, keys)]
        if not self.is_shard:
            return work(list(range(len(keys))))
        if call in self._header:
            raise ValueError(f"shard call {call!r} made twice in one run")
        idx = self.mine(keys)
        got = work(idx) if idx else []
        out: list = [None] * len(keys)
        for j, r in zip(idx, got, strict=True):
            out[j] = r
            self._rows.append({"call": call, "index": j, "result": encode(r)})
        self._header[call] = {"n": len(keys), "keys": keys_digest(keys), "mine": len(idx), "stats": {}}
        log.info("shard %d/%d: %s: %d of %d items", self.index, self.count, call, len(idx), len(keys))
        return out

    def complete(
        self, engine, reqs: list, keys: Sequence[str], template_id: str, call: str | None = None, progress: bool = True
    ) -> list:
        """engine.complete over the work this run owns; in a merge, the shards' answers and their engine counts."""
        from selfalign import llm

        call = call or template_id
        before = engine.stats

        def work(idx: list[int]) -> list:
            return engine.complete([reqs[j] for j in idx], template_id=template_id, progress=progress)

        out = self.map(call, keys, work, encode=asdict, decode=lambda d: llm.Result(**d))
        if self.is_shard:
            after = engine.stats
            self._header[call]["stats"] = {k: after[k] - before[k] for k in COUNTS}
        elif self.is_merge:  # the merged metrics count what the shards asked, as a single run would have
            engine._count(**{k: sum(s.get(k, 0) for s in self._stats[call]) for k in COUNTS})
        return out

    def finish(self, metrics_path: str | Path) -> None:
        """A shard run's end: its answers to the shard file, its counts to its metrics (records_per_s: answers/s)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        head = {"stage": self.stage, "shard": self.index, "of": self.count, "calls": self._header}
        io.write_jsonl(self.path(self.index), [head, *self._rows])
        engine = {k: sum(h["stats"].get(k, 0) for h in self._header.values()) for k in COUNTS}
        m = {
            "stage": self.stage,
            "shard": f"{self.index}/{self.count}",
            "shard_file": str(self.path(self.index)),
            "calls": {c: {"items": h["n"], "mine": h["mine"]} for c, h in self._header.items()},
            "answered": len(self._rows),
            "engine": {**engine, "cost_usd": round(engine["cost_usd"], 6)},
            **self.throughput(len(self._rows)),
        }
        io.write_json(metrics_path, m)
        log.info("shard %d/%d: %d answers to %s", self.index, self.count, len(self._rows), self.path(self.index))

    def throughput(self, records: int) -> dict:
        """records_per_s over this run's wall time so far, and peak RSS."""
        secs = time.monotonic() - self.start
        return {
            "seconds": round(secs, 2),
            "records_per_s": round(records / secs, 3) if secs > 0 else None,
            "peak_rss_mb": progress.peak_rss_mb(),
        }

    def _load(self) -> None:
        self._stats: dict[str, list[dict]] = {}
        for i in range(self.count):
            p = self.path(i)
            if not p.is_file():
                raise ShardError(f"{p}: shard {i}/{self.count} has not been written (run --shard {i}/{self.count})")
            rows = io.load_jsonl(p)
            head = rows[0] if rows else {}
            if head.get("stage") != self.stage or head.get("shard") != i or head.get("of") != self.count:
                raise ShardError(
                    f"{p}:1: expected the header of {self.stage} shard {i}/{self.count}, got {head!r}"[:300]
                )
            for call, h in head["calls"].items():
                prev = self._header.setdefault(call, h)
                if (prev["n"], prev["keys"]) != (h["n"], h["keys"]):
                    raise ShardError(
                        f"{p}: {call}: made from another input than shard 0 ({h['n']} items, keys "
                        f"{h['keys']} vs {prev['n']}, {prev['keys']})"
                    )
                self._stats.setdefault(call, []).append(h["stats"])
            for line, r in enumerate(rows[1:], start=2):
                got = self._merged.setdefault(r["call"], {})
                if r["index"] in got:
                    raise ShardError(f"{p}:{line}: {r['call']} item {r['index']} answered twice")
                got[r["index"]] = {"shard": i, "result": r["result"]}

    def _take(self, call: str, keys: Sequence[str]) -> list[dict]:
        h = self._header.get(call)
        if h is None:
            raise ShardError(f"{self.dir}: no shard answered {call!r}")
        if (h["n"], h["keys"]) != (len(keys), keys_digest(keys)):
            raise ShardError(
                f"{self.dir}: {call}: the shards were made from another input ({h['n']} items, keys "
                f"{h['keys']}; this run has {len(keys)}, {keys_digest(keys)})"
            )
        got = self._merged.get(call, {})
        out = []
        for j, k in enumerate(keys):
            if j not in got:
                raise ShardError(f"{self.path(bucket(k, self.count))}: {call} item {j} (key {k!r}) is missing")
            if got[j]["shard"] != bucket(k, self.count):
                raise ShardError(
                    f"{self.path(got[j]['shard'])}: {call} item {j} belongs to shard {bucket(k, self.count)}"
                )
            out.append(got[j]["result"])
        return out

"""The ingest stage's library: its config (the sources and the readers' options) and the pass over one source.

stages/ingest.py wires the files: in pipeline mode every source in `ingest.sources` goes to the file of its
role, by hand one file goes to --output. A source is read by its format's reader (selfalign/readers.py);
each input unit becomes records or one rejected record naming file, line and reason, so per source
records_in = kept + rejected.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Literal

from selfalign import progress, readers, records
from selfalign.config import Config, ParamsError, opt

log = logging.getLogger("ingest")

FORMATS = tuple(sorted(readers.READERS))
Format = Literal[FORMATS]  # the formats the readers register (`python stages/ingest.py --help` lists them)
Role = Literal["seed", "web", "preference", "prompts"]  # readers.ROLE_KIND's roles: one output file each


def role_error(fmt: str, role: str | None) -> str | None:
    """Why a source of format `fmt` cannot go to `role` (None when it can): its reader makes another kind."""
    kind = readers.READERS[fmt].kind
    if role is not None and kind is not None and readers.ROLE_KIND[role] != kind:
        return f"format {fmt} makes {kind} records, but role {role} takes {readers.ROLE_KIND[role]} records"
    return None


@dataclasses.dataclass
class SourceSpec(Config):
    """One raw file to read: an entry of ingest.sources."""

    path: str = ""  # required: the file
    format: Format = ""  # required: its reader
    role: Role | None = None  # None: the format's role (canonical has none: name one)
    lang: str | None = None  # None: ingest.lang
    name: str | None = None  # the records' `source`; None: the file name up to its first dot

    REQUIRED = ("path", "format")

    @classmethod
    def from_dict(cls, data, where, base=None):
        if isinstance(data, dict) and base is None:
            for key in cls.REQUIRED:
                if not data.get(key):
                    raise ParamsError(f"{where}.{key}: required (a source needs {' and '.join(cls.REQUIRED)})")
        return super().from_dict(data, where, base)

    def check(self, where: str) -> None:
        if not self.path:
            raise ParamsError(f"{where}.path: required (the file to read)")
        why = role_error(self.format, self.role)
        if why:
            raise ParamsError(f"{where}.role: {why}")

    def resolved(self, default_lang: str) -> SourceSpec:
        """This source with its defaults filled in: role from the format, lang, name from the file name."""
        return self.replace(
            role=self.role or readers.READERS[self.format].role,
            lang=self.lang or default_lang,
            name=self.name or Path(self.path).name.split(".")[0],
        )


@dataclasses.dataclass
class Segment(Config):
    """How web documents are cut into segments (readers.segment)."""

    min_chars: int = opt(200, lo=0)  # a segment still shorter after merging is rejected (segment_too_short)
    max_chars: int = opt(1500, lo=1)  # no segment is longer

    def check(self, where: str) -> None:
        if self.min_chars > self.max_chars:
            raise ParamsError(f"{where}.min_chars: {self.min_chars} is above max_chars {self.max_chars}")


@dataclasses.dataclass
class IngestConfig(Config):
    """The `ingest:` section of params.yaml (its comments are the user-facing documentation)."""

    lang: str = "en"  # of a source that names none (and of --input by hand)
    multi_turn: bool = False  # guanaco: also keep multi-turn lines
    text_documents: Literal["line", "blank", "auto"] = "auto"  # text format: how a file splits into documents
    segment: Segment = opt(Segment())
    sources: list[SourceSpec] = opt(
        [
            SourceSpec("data/sample/oasst_seed.guanaco.jsonl", "guanaco", "seed", "en"),
            SourceSpec("data/sample/c4_web.jsonl", "c4", "web", "en"),
            SourceSpec("data/sample/orca_dpo_pairs.json", "sharegpt_preference", "preference", "en"),
            SourceSpec("data/sample/oasst_ppo_prompts.json", "ppo", "prompts", "en"),
        ]
    )
    min_success: float = opt(0.5, lo=0, hi=1)  # a source with a smaller share of its records kept fails the stage

    def check(self, where: str) -> None:
        for i, src in enumerate(self.sources):
            if src.role is None and readers.READERS[src.format].role is None:
                raise ParamsError(
                    f"{where}.sources[{i}].role: format {src.format} makes records of any kind; "
                    f"name the role (one of {', '.join(readers.ROLE_KIND)}) whose file they go to"
                )

    def reader_options(self) -> dict:
        """The keyword options readers.read passes on to the readers that take them."""
        return {
            "multi_turn": self.multi_turn,
            "documents": self.text_documents,
            "min_chars": self.segment.min_chars,
            "max_chars": self.segment.max_chars,
        }

    def resolved_sources(self) -> list[SourceSpec]:
        return [src.resolved(self.lang) for src in self.sources]


def check_paths(sources: list[SourceSpec], where: str) -> None:
    """Every source is a readable file, checked before any output is opened."""
    for src in sources:
        path = Path(src.path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ParamsError(f"{where}: ingest source {src.path} {what}")


def ingest_source(src: SourceSpec, options: dict, write_record, write_rejected) -> dict:
    """Read one (resolved) source, write its records and rejects, return its metrics."""
    want = readers.ROLE_KIND.get(src.role)
    kept, rejected = 0, Counter()
    items = readers.read(src.format, src.path, src.lang, src.name, **options)
    for item in progress.track(items, desc=f"ingest {src.name}"):
        if not readers.is_rejected(item) and want and item["kind"] != want:
            item = records.rejected(
                item,
                "wrong_kind",
                readers.STAGE,
                file=src.path,
                line=item["meta"].get("line"),
                detail=f"a {item['kind']} record in a {src.role} source",
            )
        if readers.is_rejected(item):
            item["source"] = src.name
            write_rejected(item)
            rejected[item["reason"]] += 1
        else:
            write_record(item)
            kept += 1
    with open(src.path, "rb") as f:
        lines = sum(1 for _ in f)
    n_rej = sum(rejected.values())
    log.info(
        "%s (%s, %s): %d lines -> %d records, %d rejected%s",
        src.path,
        src.format,
        src.role,
        lines,
        kept,
        n_rej,
        f" {dict(rejected)}" if rejected else "",
    )
    return {
        **src.to_dict(),
        "lines_read": lines,
        "records_in": kept + n_rej,
        "kept": kept,
        "rejected": n_rej,
        "rejected_by_reason": dict(sorted(rejected.items())),
    }


def summary(sources: list[dict]) -> dict:
    """The stage's metrics from its per-source metrics: totals over the sources and records per role file."""
    reasons = Counter()
    for s in sources:
        reasons.update(s["rejected_by_reason"])
    kept = sum(s["kept"] for s in sources)
    return {
        "sources": sources,
        "records_in": kept + sum(reasons.values()),
        "kept": kept,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "outputs": {r: sum(s["kept"] for s in sources if s["role"] == r) for r in readers.ROLE_KIND},
    }


def success(metrics: dict, min_success: float) -> str | None:
    """Records metrics["success"] for the whole stage; the message to fail with when any one source kept less than
    `min_success` of its records: one file read with the wrong format (all rejects) must stop the stage even when
    the others are fine."""
    failed = [
        records.success_floor({}, s["kept"], s["records_in"], min_success, f"ingest {s['path']} ({s['format']})")
        for s in metrics["sources"]
    ]
    records.success_floor(metrics, metrics["kept"], metrics["records_in"], min_success, "ingest")
    metrics["success"]["sources_below"] = sum(f is not None for f in failed)
    return next((f for f in failed if f), None)

"""The clean stage as a stream: rules, language gate and dedup over records that are never all in memory.

Per record (pure, in any process: `clean_item`): the rules and the gate (selfalign.clean), then for a
survivor its dedup key's hash and MinHash signature (selfalign.dedup). Global, and compact: the set of
key hashes (exact duplicates), the signatures in a file beside the outputs, and a few ints per record.

    pass 1  read every input in order; the rules run on `workers` processes over a bounded window of chunks;
            read rejects, rule/gate rejects, survivors and signatures go to temporary files as they come
    dedup   exact duplicates were decided in pass 1 (first copy wins); near duplicates are decided from the
            signatures alone (dedup.near_duplicates_of), in input order, as the old in-memory pass did
    pass 2  stream the survivors: kept ones to their output, duplicates to the rejects

The outputs are byte-identical to the two-pass in-memory stage (tests/test_stream_clean.py): the rejected file
holds read rejects, then rule and gate rejects, then duplicates, each group in input order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

from selfalign import clean, dedup, io, progress, records
from selfalign.config import Config

STAGE = "clean"
CHUNK = 512  # records per task sent to a worker
EXTRA_RULES = ["invalid_json", "invalid_utf8", "json_array", "invalid_record", "lang", "duplicate", "near_duplicate"]


def settings(cfg: clean.CleanConfig) -> tuple[dict, clean.langid.LangGate | None, dedup.NearDup | None]:
    """(each rule's settings, the language gate's or None, near-dup's or None): the per-record work's arguments."""
    return cfg.rule_settings(), cfg.gate(), cfg.near_dup if cfg.near_dup.enabled else None


def clean_items(recs: list[dict], rules: dict, gate, nd: dedup.NearDup | None) -> list[tuple]:
    """Per record: (clean_record's 5-tuple, key hash or None, signature or None). Pure; the unit of work a worker or a
    datatrove task runs."""
    results = [clean.clean_record(r, rules, gate) for r in recs]
    live = [i for i, res in enumerate(results) if res[0] is not None]
    keys = [dedup.key_text(results[i][0]) for i in live]
    sigs = dedup.signatures(keys, num_perm=nd.num_perm, shingle=nd.shingle, seed=nd.seed) if nd else None
    out = [(res, None, None) for res in results]
    for n, i in enumerate(live):
        out[i] = (results[i], dedup.key_hash(keys[n]), sigs[n].tobytes() if nd else None)
    return out


_ARGS: tuple = ()


def _init(*args) -> None:
    global _ARGS
    _ARGS = args


def _work(recs: list[dict]) -> list[tuple]:
    return clean_items(recs, *_ARGS)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def map_ordered(recs: Iterable[dict], args: tuple, workers: int, min_parallel: int = 2000) -> Iterator[tuple]:
    """clean_items over a stream, results in input order, at most 4 x workers chunks in flight. Below `min_parallel`
    records in all no process is started (starting one costs more than it saves)."""
    stream = iter(recs)
    head = [r for _, r in zip(range(min_parallel), stream, strict=False)]
    if workers <= 1 or len(head) < min_parallel:
        for chunk in _chunks(head, CHUNK):
            yield from clean_items(chunk, *args)
        for chunk in _chunks(stream, CHUNK):
            yield from clean_items(chunk, *args)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init, initargs=args) as pool:
        window: deque = deque()
        for chunk in _chunks(itertools.chain(head, stream), CHUNK):
            window.append(pool.apply_async(_work, (chunk,)))
            if len(window) >= 4 * workers:
                yield from window.popleft().get()
        while window:
            yield from window.popleft().get()


def local_results(pairs, args: tuple, workers: int, on_bad) -> Iterator[tuple]:
    """(pair index, record, line, clean_items result) per valid record of every input in order; invalid lines go
    to on_bad(pair index, rejected) as they are read."""
    todo: deque = deque()  # (pair, record, line) sent to the rules, awaiting their result

    def feed() -> Iterator[dict]:
        for p, (src, _) in enumerate(pairs):
            for item in records.stream(src, STAGE):
                if isinstance(item, dict):
                    on_bad(p, item)
                    continue
                todo.append((p, *item))
                yield item[0]

    for result in map_ordered(feed(), args, workers):
        yield (*todo.popleft(), result)


# ---------------------------------------------------------------- datatrove: the same work as sharded tasks


def shard_task(data, rank: int = 0, world_size: int = 1, *, pairs, args: tuple, out_dir: str):
    """One datatrove task: clean_items over every world_size-th line of the inputs (line k of the whole input goes
    to task k % world_size), written to out_dir/shard-<rank>.jsonl in order. The file appears whole or not at all,
    so a task datatrove re-runs after a kill starts clean, and one it marked completed is skipped on resume."""
    out = Path(out_dir) / f"shard-{rank:05d}.jsonl"
    with io.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        batch: list[tuple[int, dict, int]] = []

        def flush() -> None:
            for (p, rec, line), ((res_out, fixed, reason, detail, verdict), key, sig) in zip(
                batch, clean_items([b[1] for b in batch], *args), strict=True
            ):
                f.write(
                    json.dumps(
                        {
                            "p": p,
                            "line": line,
                            "rec": rec,
                            "res": [res_out, fixed, reason, detail, verdict],
                            "key": key.hex() if key else None,
                            "sig": sig.hex() if sig else None,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
            batch.clear()

        k = -1
        for p, (src, _) in enumerate(pairs):
            for item in records.stream(src, STAGE):
                k += 1
                if k % world_size != rank:
                    continue
                if isinstance(item, dict):
                    flush()
                    f.write(json.dumps({"p": p, "bad": item}, ensure_ascii=False) + "\n")
                else:
                    batch.append((p, *item))
                    if len(batch) >= CHUNK:
                        flush()
        flush()
    return data


def datatrove_executor(engine: dict, pipeline: list, logs: Path):
    """The datatrove executor that `engine` names, running `pipeline` as engine["workers"] tasks."""
    tasks = int(engine["workers"])
    if engine["executor"] == "datatrove":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=str(logs), start_method="fork")
    if engine["executor"] == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        slurm = engine["slurm"]  # a clean.Slurm
        return SlurmPipelineExecutor(
            pipeline,
            tasks=tasks,
            logging_dir=str(logs),
            time=slurm.time,
            partition=slurm.partition,
            cpus_per_task=slurm.cpus_per_task,
            mem_per_cpu_gb=slurm.mem_per_cpu_gb,
            job_name="selfalign-clean",
            venv_path=slurm.venv_path or None,
        )
    if engine["executor"] == "ray":
        import ray  # not a dependency of this project: the cluster's
        from datatrove.executor import RayPipelineExecutor

        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS, or the cluster `ray start` made on this node, else a local one
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=tasks, logging_dir=str(logs))
    raise ValueError(f"clean.executor: {engine['executor']!r} is not local | datatrove | slurm | ray")


def _wait_for_shards(executor, tasks: int, poll_s: float = 30.0) -> None:
    """SLURM's executor submits an array job and returns: wait until datatrove has marked every task completed."""
    import time

    while incomplete := executor.get_incomplete_ranks(range(tasks), skip_completed=True):
        progress.log.info("clean: waiting for %d of %d datatrove tasks", len(incomplete), tasks)
        time.sleep(poll_s)


def datatrove_results(pairs, args: tuple, engine: dict, work: Path, on_bad) -> Iterator[tuple]:
    """local_results, computed by datatrove tasks (shard_task) and merged back in input order."""
    import functools

    shards = work / "shards"
    shards.mkdir(exist_ok=True)
    task = functools.partial(shard_task, pairs=[(str(a), str(b)) for a, b in pairs], args=args, out_dir=str(shards))
    executor = datatrove_executor(engine, [task], work / "datatrove")
    executor.run()
    tasks = int(engine["workers"])
    if engine["executor"] == "slurm":
        _wait_for_shards(executor, tasks)
    with ExitStack() as stack:
        readers = [stack.enter_context(open(shards / f"shard-{r:05d}.jsonl", encoding="utf-8")) for r in range(tasks)]
        for k in itertools.count():
            text = readers[k % tasks].readline()
            if not text:
                break
            row = json.loads(text)
            if "bad" in row:
                on_bad(row["p"], row["bad"])
                continue
            result = (
                tuple(row["res"]),
                bytes.fromhex(row["key"]) if row["key"] else None,
                bytes.fromhex(row["sig"]) if row["sig"] else None,
            )
            yield row["p"], row["rec"], row["line"], result


def fresh(work: Path, what) -> None:
    """Make `work` hold only what a run of `what` (params, engine, inputs' sizes and times) wrote: a killed run's
    datatrove shards are reused when the same run is started again (datatrove skips the completed tasks), any
    other leftovers are removed."""
    stamp = hashlib.sha1(json.dumps(what, sort_keys=True, default=_plain).encode()).hexdigest()
    if (work / "run.sha1").exists() and (work / "run.sha1").read_text() != stamp:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.sha1").write_text(stamp)


def _plain(value):
    return value.to_dict() if isinstance(value, Config) else str(value)


def _concat(parts: list[Path], dst: Path) -> None:
    with io.atomic_path(dst) as tmp, open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def run(
    pairs: list[tuple[Path, Path]],
    cfg: clean.CleanConfig,
    rejected_path: Path,
    workers: int | None = None,
    engine: dict | None = None,
) -> dict:
    """Clean the files of `pairs` together and write the outputs and `rejected_path`; return the metrics.

    `engine` (default: cfg's) picks who runs the per-record work: this process and a worker pool (`local`), or
    datatrove's executors (`datatrove`: local processes, `slurm`, `ray`), sharded by line and merged back in input
    order. The decisions after it (dedup, what goes where) are the same code either way, so the outputs are too.
    """
    import numpy as np

    rules, gate, nd = settings(cfg)
    workers = cfg.workers if workers is None else workers
    engine = engine if engine is not None else {"executor": cfg.executor, "workers": workers, "slurm": cfg.slurm}
    counts: dict[str, Counter] = defaultdict(Counter)
    files = {str(src): Counter() for src, _ in pairs}
    gate_by_lang: dict[str, Counter] = defaultdict(Counter)
    gate_by_detector: dict[str, Counter] = defaultdict(Counter)
    work = Path(rejected_path).parent / f".{Path(rejected_path).name}.parts"
    fresh(work, [cfg, engine, [(str(s), os.stat(s).st_size, os.stat(s).st_mtime_ns) for s, _ in pairs]])
    parts = [work / "read.jsonl", work / "rules.jsonl", work / "dups.jsonl"]
    where: list[tuple[int, int]] = []  # per survivor: (pair index, line)
    ids: list[str] = []  # per survivor: its id, for the duplicates' detail
    exact_first: dict[bytes, int] = {}
    exact: dict[int, int] = {}  # survivor -> the first survivor with its key
    sig_rows: list[int] = []  # signature row -> survivor
    try:
        with ExitStack() as stack:
            read_rej, rule_rej = (stack.enter_context(open(p, "w", encoding="utf-8")) for p in parts[:2])
            surv = stack.enter_context(open(work / "survivors.jsonl", "w", encoding="utf-8"))
            sig_file = stack.enter_context(open(work / "signatures.u32", "wb"))

            def on_bad(p: int, item: dict) -> None:  # a line that is not a valid record
                files[str(pairs[p][0])]["records_in"] += 1
                files[str(pairs[p][0])]["rejected"] += 1
                counts[item["reason"]]["dropped"] += 1
                read_rej.write(json.dumps(item, ensure_ascii=False) + "\n")

            args = (rules, gate, nd)
            if engine is None or engine["executor"] == "local":
                results = local_results(pairs, args, workers, on_bad)
            else:
                results = datatrove_results(pairs, args, engine, work, on_bad)
            tracker = progress.Tracker(desc="clean")
            for p, record, line, ((out, fixed, reason, detail, verdict), key, sig) in results:
                files[str(pairs[p][0])]["records_in"] += 1
                src = str(pairs[p][0])
                tracker.update()
                for name in fixed:
                    counts[name]["fixed"] += 1
                gate_by_lang[record["lang"]]["records"] += 1
                if verdict:
                    verdict, detector = verdict.split("/")
                    counts["lang"][verdict] += 1
                    gate_by_lang[record["lang"]][verdict] += 1
                    gate_by_detector[detector][verdict] += 1
                if out is None:
                    counts[reason]["dropped"] += 1
                    files[src]["rejected"] += 1
                    rule_rej.write(
                        json.dumps(
                            records.rejected(record, reason, STAGE, detail=detail, file=src, line=line),
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
                    continue
                if fixed:
                    out = {**out, "meta": {**out.get("meta", {}), "clean_fixed": fixed}}
                i = len(ids)
                ids.append(out["id"])
                where.append((p, line))
                surv.write(json.dumps(out, ensure_ascii=False) + "\n")
                if cfg.exact_dup:
                    j = exact_first.setdefault(key, i)
                    if j != i:
                        exact[i] = j
                        continue
                if nd:
                    sig_file.write(sig)
                    sig_rows.append(i)
            tracker.close()
        del exact_first

        gone: dict[int, tuple[str, str]] = {}
        for i, j in exact.items():
            gone[i] = ("duplicate", f"same text as {ids[j]} ({pairs[where[j][0]][0]}:{where[j][1]})")
        if nd and sig_rows:
            sigs = np.memmap(work / "signatures.u32", dtype=np.uint32, mode="r", shape=(len(sig_rows), nd.num_perm))
            for a, b, sim in dedup.near_duplicates_of(sigs, threshold=nd.threshold, num_perm=nd.num_perm):
                i, j = sig_rows[a], sig_rows[b]
                first = f"{ids[j]} ({pairs[where[j][0]][0]}:{where[j][1]})"
                gone[i] = ("near_duplicate", f"Jaccard ~{sim:.2f} with {first}")
            del sigs

        with ExitStack() as stack:
            writers = [stack.enter_context(io.atomic_path(dst)) for _, dst in pairs]
            outs = [stack.enter_context(open(w, "w", encoding="utf-8")) for w in writers]
            dups = stack.enter_context(open(parts[2], "w", encoding="utf-8"))
            with open(work / "survivors.jsonl", encoding="utf-8") as surv:
                for i, text in enumerate(surv):
                    p, line = where[i]
                    src = str(pairs[p][0])
                    if i in gone:
                        reason, detail = gone[i]
                        counts[reason]["dropped"] += 1
                        files[src]["rejected"] += 1
                        rej = records.rejected(json.loads(text), reason, STAGE, detail=detail, file=src, line=line)
                        dups.write(json.dumps(rej, ensure_ascii=False) + "\n")
                    else:
                        outs[p].write(text)
                        files[src]["kept"] += 1
            dups.close()
            _concat(parts, Path(rejected_path))
    except BaseException:
        if engine["executor"] == "local":  # datatrove's finished tasks stay for a rerun to skip (`fresh`)
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)

    n_in = sum(f["records_in"] for f in files.values())
    n_kept = sum(f["kept"] for f in files.values())
    n_rej = sum(f["rejected"] for f in files.values())
    if n_in != n_kept + n_rej:  # the audit promise; a bug here must not pass silently
        raise RuntimeError(f"records_in {n_in} != kept {n_kept} + rejected {n_rej}")
    by_reason = {name: counts[name]["dropped"] for name in sorted(counts) if counts[name]["dropped"]}
    if sum(by_reason.values()) != n_rej:
        raise RuntimeError(f"rejected {n_rej} != the sum of rejected_by_reason {by_reason}")
    return {
        "records_in": n_in,
        "kept": n_kept,
        "rejected": n_rej,
        "rejected_by_reason": by_reason,
        "rules": {name: dict(counts[name]) for name in [*clean.RULES, *EXTRA_RULES] if counts[name]},
        "gate_by_lang": {
            lang: {k: c[k] for k in ("records", "ok", "undetermined", "mismatch")}
            for lang, c in sorted(gate_by_lang.items())
        }
        if gate is not None
        else {},
        "gate_by_detector": {
            det: {k: c[k] for k in ("ok", "undetermined", "mismatch")} for det, c in sorted(gate_by_detector.items())
        },
        "files": {
            name: {"records_in": c["records_in"], "kept": c["kept"], "rejected": c["rejected"]}
            for name, c in files.items()
        },
    }

"""The streaming clean stage writes byte for byte what the in-memory stage wrote: golden digests of its outputs and
its metrics (tests/fixtures/clean/stream_golden.json, from the code that matched the in-memory stage of b6ab84d byte
for byte) on the embedded default and on a generated corpus with duplicates, bad lines and fixable records, in one
process and on 2 workers; the near-duplicates found from signatures alone are the ones the datasketch LSH index
found; datatrove's executors write what one process writes."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from stage_loader import load_stage

from selfalign import clean, dedup, executor, params
from selfalign.clean import CleanConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import scale  # noqa: E402

clean_stage = load_stage("clean")
ingest_stage = load_stage("ingest")
FILES = clean_stage.FILES
GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "clean" / "stream_golden.json").read_text(encoding="utf-8"))


def cfg(*overrides: str) -> CleanConfig:
    return params.resolve(CleanConfig, None, "clean", overrides)


def ingest(args: list[str]) -> None:
    res = CliRunner().invoke(ingest_stage.main, args)
    assert res.exit_code == 0, res.output


def ingest_sample(dst: Path, monkeypatch) -> None:
    """data/sample through the ingest stage as params.yaml lists it (the embedded default)."""
    monkeypatch.chdir(ROOT)  # params.yaml names the sample by paths relative to the repository
    ingest(["--params", "params.yaml", "--output-dir", str(dst), "--metrics", str(dst.parent / "ingest.json")])
    (dst / "rejected.jsonl").unlink()


def sha256(path: Path, inputs: Path | None = None) -> str:
    """The file's digest; with `inputs`, of its text with that folder's name taken out (rejects name their file)."""
    data = path.read_bytes()
    return hashlib.sha256(data.replace(str(inputs).encode() + b"/", b"") if inputs else data).hexdigest()


def matches_golden(tmp: Path, inputs: Path, conf: CleanConfig, workers: int, case: str) -> dict:
    """Run the streaming stage; its outputs and metrics must be the golden ones. Returns the metrics."""
    golden = GOLDEN[case]
    got_inputs = {p.name: sha256(p) for p in sorted(inputs.iterdir())}
    assert got_inputs == golden["inputs"], "the inputs changed (ingest's output or bench/scale.py's generator)"
    out = tmp / "out"
    out.mkdir()
    pairs = [(inputs / f, out / f) for f in FILES if (inputs / f).exists()]
    metrics = clean.run(pairs, conf, out / "rejected.jsonl", workers=workers)  # the stage's run
    assert metrics.pop("seconds") >= 0 and metrics.pop("records_per_s") > 0 and metrics.pop("peak_rss_mb") > 0
    assert not list(out.glob(".*")), "temporary files left behind"
    assert {p.name: sha256(p, inputs) for p in sorted(out.iterdir())} == golden["outputs"]
    by_reason = metrics.pop("rejected_by_reason")
    assert json.loads(json.dumps(metrics).replace(str(inputs) + "/", "")) == golden["metrics"]
    assert by_reason == {r: c["dropped"] for r, c in sorted(metrics["rules"].items()) if c.get("dropped")}
    assert sum(by_reason.values()) == metrics["rejected"] and list(by_reason) == sorted(by_reason)
    return metrics


def test_embedded_default_is_byte_identical(tmp_path, monkeypatch):
    ingest_sample(tmp_path / "in", monkeypatch)
    m = matches_golden(tmp_path, tmp_path / "in", cfg(), 1, "embedded")
    assert m["kept"] > 100


def generated(d: Path, docs: int) -> None:
    """A web corpus from bench/scale.py's generator with 10% exact and near copies, through the ingest stage, plus
    a seed file with lines the reader rejects, fixable records and copies of web text."""
    d.mkdir(parents=True)
    scale.write_corpus(d / "c4.jsonl", docs, seed=3, dup_rate=0.1)
    ingest(
        [
            "--input",
            str(d / "c4.jsonl"),
            "--format",
            "c4",
            "--role",
            "web",
            "--lang",
            "en",
            "--name",
            "c4",
            "--output",
            str(d / "web.jsonl"),
            "--rejected",
            str(d.parent / "ingest_rejected.jsonl"),
        ]
    )
    web = [json.loads(line) for line in (d / "web.jsonl").read_text(encoding="utf-8").splitlines()]
    rng = random.Random(5)
    seed_lines = []
    for i, w in enumerate(rng.sample(web, 40)):
        chat = {
            "id": f"s{i}",
            "kind": "chat",
            "lang": "en",
            "source": "seed",
            "meta": {},
            "messages": [
                {"role": "user", "content": f"Summarise this text:\n\n{w['text']}"},
                {"role": "assistant", "content": w["text"][:300] + (" cafÃ© \x07" if i % 3 else "")},
            ],
        }
        seed_lines.append(json.dumps(chat, ensure_ascii=False))
        if i % 10 == 0:
            seed_lines += ["{not json", json.dumps({"id": "x", "kind": "chat", "lang": "en"}), ""]
        if i % 7 == 0:
            seed_lines.append(json.dumps(chat, ensure_ascii=False))  # an exact copy in the seed file
    (d / "seed.jsonl").write_text("\n".join(seed_lines) + "\n", encoding="utf-8")
    (d / "c4.jsonl").unlink()


@pytest.mark.slow
def test_generated_corpus_is_byte_identical_on_two_workers(tmp_path):
    generated(tmp_path / "in", 1800)  # > 2,000 records: the worker pool runs
    m = matches_golden(tmp_path, tmp_path / "in", cfg(), 2, "generated_1800_two_workers")
    assert m["records_in"] > 2000 and m["rules"]["duplicate"]["dropped"] > 50
    assert m["rules"]["near_duplicate"]["dropped"] > 50 and m["rules"]["invalid_json"]["dropped"] == 4


def test_generated_corpus_is_byte_identical_without_the_gate_and_exact_dedup(tmp_path):
    generated(tmp_path / "in", 300)
    conf = cfg(
        "exact_dup=false", "langs.enabled=false", "near_dup.threshold=0.6", "near_dup.num_perm=64", "near_dup.shingle=2"
    )
    m = matches_golden(tmp_path, tmp_path / "in", conf, 1, "generated_300_no_gate_no_exact")
    assert m["rules"]["near_duplicate"]["dropped"] > 10


@pytest.mark.parametrize("threshold,num_perm,shingle", [(0.8, 128, 3), (0.5, 64, 2), (0.9, 32, 1)])
def test_near_duplicates_from_signatures_match_the_lsh_index(threshold, num_perm, shingle):
    docs = [d["text"] for d in scale.documents(400, seed=1, dup_rate=0.3)]
    rng = random.Random(2)
    for _ in range(60):  # chains: copies of copies with a few words changed, so some are near only to a dropped one
        ws = rng.choice(docs).split()
        for _ in range(rng.randint(1, 12)):
            ws[rng.randrange(len(ws))] = "changed"
        docs.append(" ".join(ws))
    keys = [dedup.key_text({"kind": "web", "text": t}) for t in docs]
    want = list(dedup.near_duplicates(keys, threshold=threshold, num_perm=num_perm, shingle=shingle))
    sigs = dedup.signatures(keys, num_perm=num_perm, shingle=shingle)
    got = list(dedup.near_duplicates_of(sigs, threshold=threshold, num_perm=num_perm))
    assert len(want) > 20
    assert got == want


def test_datatrove_two_tasks_write_what_one_process_writes(tmp_path):
    """clean.executor datatrove: datatrove's LocalPipelineExecutor runs the per-record work as 2 tasks (every other
    line each, so near-copies land in different shards), the merge puts it back in input order: the same bytes as
    one process, the same near-duplicates found."""
    generated(tmp_path / "in", 400)
    conf = cfg()
    got = {}
    for name, engine in (
        ("one", {"executor": "local", "workers": 1}),
        ("dt", {"executor": "datatrove", "workers": 2, "slurm": conf.slurm}),
    ):
        out = tmp_path / name
        out.mkdir()
        pairs = [(tmp_path / "in" / f, out / f) for f in FILES if (tmp_path / "in" / f).exists()]
        metrics = executor.run(pairs, conf, out / "rejected.jsonl", engine=engine)
        got[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        got[name]["metrics"] = json.dumps(metrics, sort_keys=True).encode()
    m = json.loads(got["one"]["metrics"])
    assert m["rules"]["near_duplicate"]["dropped"] > 10 and m["rules"]["duplicate"]["dropped"] > 10
    assert got["dt"] == got["one"]


def test_the_stage_runs_on_datatrove_from_params_and_reports_rate_and_memory(tmp_path):
    from click.testing import CliRunner

    generated(tmp_path / "in", 60)
    out = {}
    for name in ("local", "datatrove"):
        res = CliRunner().invoke(
            clean_stage.main,
            [
                "--input-dir",
                str(tmp_path / "in"),
                "--output-dir",
                str(tmp_path / name),
                "--metrics",
                str(tmp_path / f"{name}.json"),
                "--set",
                f"executor={name}",
            ],
        )
        assert res.exit_code == 0, res.output
        out[name] = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
        m = json.loads((tmp_path / f"{name}.json").read_text())
        assert m["records_per_s"] > 0 and m["peak_rss_mb"] > 20
    assert out["local"] == out["datatrove"]
    res = CliRunner().invoke(
        clean_stage.main,
        [
            "--input-dir",
            str(tmp_path / "in"),
            "--output-dir",
            str(tmp_path / "x"),
            "--metrics",
            str(tmp_path / "x.json"),
            "--set",
            "executor=spark",
        ],
    )
    assert res.exit_code == 2 and "one of local | datatrove | slurm | ray" in res.output


FAKE_SBATCH = r"""#!/bin/bash
# A stand-in scheduler: runs the array job's tasks one after another, here, then answers as sbatch does.
script="${@: -1}"
range=$(sed -n 's/^#SBATCH --array=\([0-9]*-[0-9]*\).*/\1/p' "$script")
for i in $(seq "${range%-*}" "${range#*-}"); do
  SLURM_ARRAY_TASK_ID=$i SLURM_NODELIST=localhost SLURM_JOB_ID=4242 RUN_OFFSET=0 bash "$script" \
    >> "$FAKE_SLURM_LOG" 2>&1 || exit 1
done
echo "Submitted batch job 4242"
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do if [[ "$1" == -n ]]; then shift 2; else shift; fi; done
exec "$@"
"""


@pytest.mark.slow
def test_slurm_executor_through_a_stand_in_sbatch_writes_what_one_process_writes(tmp_path, monkeypatch):
    """clean.executor slurm: datatrove pickles the pipeline, writes its sbatch array script and launches it; the
    scheduler (sbatch, srun: what cannot exist here) is a stand-in that runs the array's tasks on this machine via
    datatrove's own launch_pickled_pipeline. The merge waits for datatrove's completion markers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", "#!/bin/bash\necho localhost\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "slurm.log"))
    generated(tmp_path / "in", 120)
    conf = cfg()
    got = {}
    for name, engine in (
        ("one", {"executor": "local", "workers": 1}),
        ("slurm", {"executor": "slurm", "workers": 3, "slurm": conf.slurm.replace(partition="cpu")}),
    ):
        out = tmp_path / name
        out.mkdir()
        pairs = [(tmp_path / "in" / f, out / f) for f in FILES if (tmp_path / "in" / f).exists()]
        metrics = executor.run(pairs, conf, out / "rejected.jsonl", engine=engine)
        got[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
        got[name]["metrics"] = json.dumps(metrics, sort_keys=True).encode()
    log = (tmp_path / "slurm.log").read_text()
    assert log.count("Processing done for rank=") == 3, log[-3000:]
    assert got["slurm"] == got["one"]

"""Generation in shards: N shard runs + a merge write what one run writes, byte for byte; endpoints share the load."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from stage_loader import load_stage

from selfalign import io, llm, shard

TIMING = ("seconds", "records_per_s", "peak_rss_mb")


def test_shard_spec_and_buckets():
    assert shard.parse("0/3") == (0, 3) and shard.parse("2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(shard.ShardError, match="expected i/N"):
            shard.parse(bad)
    # a stable hash, not Python's salted hash(): the same bucket on every machine and every run
    assert shard.bucket("abc\ten", 3) == int(hashlib.sha256(b"abc\ten").hexdigest()[:16], 16) % 3
    keys = [shard.record_key({"id": f"r{i}", "lang": "en"}) for i in range(300)]
    sizes = [sum(shard.bucket(k, 3) == i for k in keys) for i in range(3)]
    assert sum(sizes) == 300 and min(sizes) > 70, sizes
    assert shard.record_key({"id": "x", "lang": "fr"}) != shard.record_key({"id": "x", "lang": "en"})


def test_map_splits_and_merge_checks_every_answer(tmp_path):
    keys = [f"k{i}" for i in range(10)]
    for i in range(3):
        sh = shard.Sharding("t", f"{i}/3", None, tmp_path / "s", None)
        got = sh.map("call", keys, lambda idx: [f"answer {j}" for j in idx])
        assert [j for j, g in enumerate(got) if g is not None] == sh.mine(keys)
        sh.finish(tmp_path / f"m{i}.json")
        assert io.read_json(tmp_path / f"m{i}.json")["answered"] == len(sh.mine(keys))
    merged = shard.Sharding("t", None, 3, tmp_path / "s", None)
    assert merged.map("call", keys, lambda idx: pytest.fail("a merge asks nothing")) == [
        f"answer {j}" for j in range(10)
    ]
    with pytest.raises(shard.ShardError, match="another input"):
        merged.map("call", keys[:-1], None)
    with pytest.raises(shard.ShardError, match=r"t-1-of-3.jsonl: shard 1/3 has not been written"):
        (tmp_path / "s" / "t-1-of-3.jsonl").unlink()
        shard.Sharding("t", None, 3, tmp_path / "s", None)
    with pytest.raises(shard.ShardError, match="exclude each other"):
        shard.Sharding("t", "0/3", 3, tmp_path / "s", None)


def invoke(stage: str, args: list[str]) -> None:
    res = CliRunner().invoke(load_stage(stage).main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output


def counts(m: dict) -> dict:
    """Metrics without wall time and memory, which differ between any two runs."""
    return {k: v for k, v in m.items() if k not in TIMING}


def single_vs_shards(tmp_path: Path, stage: str, args, outputs: list[str], n: int = 3) -> tuple[dict, list[dict]]:
    """Run `stage` once, then in n shards and a merge (a fresh cache, so every shard asks its own engine); check
    that the merge wrote the single run's files byte for byte and the same counts. Returns (merged, shard metrics)."""
    invoke(stage, args(tmp_path / "single", tmp_path / "cache1", tmp_path / "single.json"))
    for i in range(n):
        invoke(
            stage, args(tmp_path / "sharded", tmp_path / "cache2", tmp_path / f"s{i}.json") + ["--shard", f"{i}/{n}"]
        )
    assert not (tmp_path / "sharded" / outputs[0]).exists(), "a shard writes its answers, not the outputs"
    invoke(
        stage, args(tmp_path / "sharded", tmp_path / "cache2", tmp_path / "merged.json") + ["--merge-shards", str(n)]
    )
    for name in outputs:
        a, b = (tmp_path / "single" / name).read_bytes(), (tmp_path / "sharded" / name).read_bytes()
        assert a == b, f"{stage}: {name} differs between one run and {n} shards + merge"
    single, merged = io.read_json(tmp_path / "single.json"), io.read_json(tmp_path / "merged.json")
    assert counts(single) == counts(merged)
    assert merged["records_per_s"] is not None and merged["peak_rss_mb"] > 0
    shards = [io.read_json(tmp_path / f"s{i}.json") for i in range(n)]
    assert sum(s["answered"] for s in shards) == sum(c["items"] for c in shards[0]["calls"].values())
    assert sum(s["answered"] > 0 for s in shards) >= 2, "the work was really split"
    assert all(s["records_per_s"] is not None and s["peak_rss_mb"] > 0 for s in shards)
    return merged, shards


def augment_case(tmp_path: Path, varied: Path, tiny: Path):
    from test_augment import write_web

    write_web(tmp_path / "web.jsonl")
    (tmp_path / "backward.txt").write_text("Write the request that this text answers.\n\n{response}\n")
    inputs = ["--web", str(tmp_path / "web.jsonl"), "--model", str(varied), "--prompt", str(tmp_path / "backward.txt")]
    sets = ["max_new_tokens=8", "min_instruction_words=1", "engine={kind: local, batch_size: 4, dtype: fp32}"]
    sets += ["temperature=0", "min_success=0"]  # greedy, as this test was written

    def check(merged, shards, args):
        assert merged["engine"]["calls"] == merged["sampled"] == sum(s["engine"]["calls"] for s in shards) > 0
        assert io.load_jsonl(tmp_path / "sharded" / "candidates.jsonl"), "some candidates, not only rejects"
        # Re-sharded over the same cache: nothing is asked twice, and the merge is still the single run's.
        for i in range(2):
            invoke(
                "augment", args(tmp_path / "re", tmp_path / "cache2", tmp_path / f"r{i}.json") + ["--shard", f"{i}/2"]
            )
            r = io.read_json(tmp_path / f"r{i}.json")
            assert r["engine"]["calls"] == 0 and r["engine"]["cache_hits"] == r["answered"]
        invoke("augment", args(tmp_path / "re", tmp_path / "cache2", tmp_path / "r.json") + ["--merge-shards", "2"])
        for name in ("candidates.jsonl", "rejected.jsonl"):
            assert (tmp_path / "re" / name).read_bytes() == (tmp_path / "single" / name).read_bytes()
        # A shard file from another input is refused, naming it.
        res = CliRunner().invoke(
            load_stage("augment").main,
            args(tmp_path / "re", tmp_path / "cache2", tmp_path / "x.json")
            + ["--merge-shards", "2", "--set", "max_segments=3"],
        )
        assert res.exit_code != 0 and "made from another input" in res.output

    return inputs, sets, ["candidates.jsonl", "rejected.jsonl"], check


def distill_case(tmp_path: Path, varied: Path, tiny: Path):
    from test_distill import SCORED, SEEDS, SYSTEMS, write

    seed, scored = write(tmp_path / "seed.jsonl", SEEDS), write(tmp_path / "scored.jsonl", SCORED)
    inputs = ["--seed-file", str(seed), "--scored", str(scored), "--teacher", str(varied), "--systems", str(SYSTEMS)]
    sets = ["max_new_tokens=8", "reject_truncated=false", "min_response_words=1", "orca.n=3", "min_success=0"]
    sets += ["engine={kind: local, batch_size: 4, dtype: fp32}"]

    def check(merged, shards, args):
        assert merged["teacher_requests"] == 7 and merged["distilled"] > 0

    return inputs, sets, ["distilled.jsonl", "rejected.jsonl"], check


def translate_case(tmp_path: Path, varied: Path, tiny: Path):
    from test_translate import FIX, PROMPT

    inputs = ["--input-dir", str(FIX), "--model", str(varied), "--prompt", str(PROMPT)]
    sets = ["engine.dtype=fp32", "max_new_tokens=24", "kinds=[chat, prompt, preference]", "max_chars=0"]
    sets += ["langs=[fr, ms]", "min_success=0"]
    sets += [
        "max_records=12",
        "max_spans=-1",
        "tokens_per_char=0.75",
        "temperature=0",
    ]  # the code defaults it was written on

    def check(merged, shards, args):
        assert merged["translated"] >= 1 and merged["translations_asked"] == 19

    return inputs, sets, ["seed.jsonl", "web.jsonl", "preference.jsonl", "prompts.jsonl", "failed.jsonl"], check


def curate_generate_case(tmp_path: Path, varied: Path, tiny: Path):
    from test_curate import RUBRIC, write_candidates

    write_candidates(tmp_path / "candidates.jsonl")
    inputs = ["--iteration", "iter1", "--candidates", str(tmp_path / "candidates.jsonl"), "--model", str(varied)]
    inputs += ["--rubric", str(RUBRIC)]
    sets = ["mode=generate", "max_new_tokens=4", "min_success=0", "select.mode=threshold", "select.threshold=1.0"]

    def check(merged, shards, args):
        assert merged["engine"]["calls"] == 5

    return inputs, sets, ["scored.jsonl", "kept.jsonl", "rejected.jsonl"], check


def evaluate_case(tmp_path: Path, varied: Path, tiny: Path):
    """Only the answering is sharded (two models, one call each); perplexity, reward and judging run in the merge."""
    from test_evaluate import PROMPTS, ROOT, _seed_records, _tiny_reward_model

    rm_dir = _tiny_reward_model(tmp_path / "rm", tiny)
    io.write_jsonl(tmp_path / "seed.jsonl", _seed_records(4))
    inputs = ["--model", f"base={tiny}", "--model", f"tuned={varied}", "--reward-model", str(rm_dir)]
    inputs += ["--prompts", str(PROMPTS), "--heldout", str(tmp_path / "seed.jsonl"), "--eval-fraction", "1.0"]
    inputs += ["--judge-prompt", str(ROOT / "prompts" / "evaluate.txt")]
    sets = ["models=[base, tuned]", "prompts_per_category=1", "max_new_tokens=8", "heldout_max=2"]
    sets += ["engine.dtype=fp32", "bootstrap_resamples=50"]

    def check(merged, shards, args):
        assert all(set(s["calls"]) == {"evaluate:base", "evaluate:tuned"} for s in shards)
        assert sum(s["answered"] for s in shards) == 2 * 18

    return inputs, sets, ["answers.jsonl", "judgments.jsonl", "report.md"], check


# One run against 3 shard runs + a merge, per sharded stage: (stage, how its inputs and params are made).
SHARDED = [
    ("augment", augment_case),
    ("distill", distill_case),
    ("translate", translate_case),
    ("curate", curate_generate_case),
    ("evaluate", evaluate_case),
]


@pytest.mark.slow
@pytest.mark.parametrize("stage, case", SHARDED, ids=[c.__name__.removesuffix("_case") for _, c in SHARDED])
def test_three_shards_and_a_merge_write_what_one_run_writes(stage, case, varied_model_dir, tiny_model_dir, tmp_path):
    inputs, sets, outputs, check = case(tmp_path, varied_model_dir, tiny_model_dir)

    def args(out, cache, metrics):
        flags = ["--output-dir", str(out), "--cache", str(cache), "--metrics", str(metrics)]
        return [*inputs, *flags, *[a for s in sets for a in ("--set", s)]]

    merged, shards = single_vs_shards(tmp_path, stage, args, outputs)
    check(merged, shards, args)


@pytest.mark.slow
def test_curate_logprobs_mode_in_three_shards_keeps_the_global_cut(tiny_model_dir, tmp_path):
    """Scores come from batched forward passes, so a shard's batch-mates differ from a single run's: the scores
    agree to float noise (1e-4, as batched vs unbatched in test_curate), and the top-fraction cut is taken
    over every shard's scores in the merge."""
    from test_curate import RUBRIC, write_candidates

    write_candidates(tmp_path / "candidates.jsonl")

    def args(out, cache, metrics):
        return [
            "--iteration",
            "iter1",
            "--candidates",
            str(tmp_path / "candidates.jsonl"),
            "--model",
            str(tiny_model_dir),
            "--rubric",
            str(RUBRIC),
            "--output-dir",
            str(out),
            "--cache",
            str(cache),
            "--metrics",
            str(metrics),
            "--set",
            "engine.batch_size=2",
        ]

    invoke("curate", args(tmp_path / "single", tmp_path / "c1", tmp_path / "single.json"))
    for i in range(3):
        invoke("curate", args(tmp_path / "sharded", tmp_path / "c2", tmp_path / f"s{i}.json") + ["--shard", f"{i}/3"])
    invoke("curate", args(tmp_path / "sharded", tmp_path / "c2", tmp_path / "merged.json") + ["--merge-shards", "3"])
    one = io.load_jsonl(tmp_path / "single" / "scored.jsonl")
    many = io.load_jsonl(tmp_path / "sharded" / "scored.jsonl")
    assert [r["id"] for r in one] == [r["id"] for r in many]
    assert all(abs(a["meta"]["score"] - b["meta"]["score"]) < 1e-4 for a, b in zip(one, many, strict=True))
    m = io.read_json(tmp_path / "merged.json")
    assert m["kept"] == 2 and m["records_in"] == 7 == m["kept"] + m["rejected"], "the cut is over all 5 scores"


class EchoServer:
    """A real HTTP OpenAI-compatible endpoint whose reply depends only on the request; counts what it is sent."""

    def __init__(self):
        self.seen: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = body["messages"][-1]["content"]
                outer.seen.append(text)
                reply = f"What does item {hashlib.sha256(text.encode()).hexdigest()[:6]} say about this topic?"
                data = json.dumps(
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 9},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_list_of_endpoints_shares_the_load_and_is_one_cache_identity(tmp_path):
    a, b = EchoServer(), EchoServer()
    try:
        spec = {"kind": "openai", "model": "m", "api_key_env": "", "concurrency": 3, "max_retries": 0}
        eng = llm.make_engine({**spec, "base_url": [a.url, b.url]}, tmp_path / "cache")
        reqs = [llm.Request(messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8) for i in range(10)]
        res = eng.complete(reqs, template_id="t")
        assert all(r.ok for r in res) and len(a.seen) == len(b.seen) == 5, "round-robin: 5 each"
        assert sorted(a.seen + b.seen) == sorted(f"q{i}" for i in range(10)), "each request asked once"
        # the same pool listed in another order is the same engine to the cache: nothing asked again
        again = llm.make_engine({**spec, "base_url": [b.url, a.url]}, tmp_path / "cache").complete(
            reqs, template_id="t"
        )
        assert [r.text for r in again] == [r.text for r in res] and all(r.cached for r in again)
        assert len(a.seen) + len(b.seen) == 10
        one = llm.make_engine({**spec, "base_url": a.url}, None)
        assert one.identity == {"kind": "openai", "base_url": a.url, "model": "m"}, "one URL keys the cache as before"
        with pytest.raises(ValueError, match="base_url must be a URL or a non-empty list"):
            llm.make_engine({**spec, "base_url": []})
    finally:
        a.close()
        b.close()


def test_a_dead_endpoint_in_the_list_is_retried_on_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(llm, "_sleep", lambda s: None)
    live = EchoServer()
    try:
        spec = {
            "kind": "openai",
            "model": "m",
            "api_key_env": "",
            "concurrency": 1,
            "max_retries": 1,
            "timeout": 5,
            "base_url": ["http://127.0.0.1:9/v1", live.url],
        }
        eng = llm.make_engine(spec, None)
        res = eng.complete([llm.Request(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(4)])
        assert all(r.ok for r in res) and len(live.seen) == 4 and eng.stats["retries"] >= 1
    finally:
        live.close()


@pytest.mark.slow
def test_augment_shards_over_two_endpoints_share_one_cache(tiny_model_dir, tmp_path):
    """Three workers, each given both servers: a merge equals one run, and a 2-shard rerun sends nothing."""
    from test_augment import write_web

    write_web(tmp_path / "web.jsonl")
    a, b = EchoServer(), EchoServer()
    try:

        def args(out, cache, metrics):
            return [
                "--web",
                str(tmp_path / "web.jsonl"),
                "--model",
                str(tiny_model_dir),
                "--output-dir",
                str(out),
                "--cache",
                str(cache),
                "--metrics",
                str(metrics),
                "--set",
                "min_success=0",
                "--set",
                f"engine={{kind: openai, model: m, api_key_env: '', base_url: [{a.url}, {b.url}]}}",
            ]

        merged, shards = single_vs_shards(tmp_path, "augment", args, ["candidates.jsonl", "rejected.jsonl"])
        assert merged["candidates"] > 0 and merged["engine"]["calls"] == merged["sampled"]
        assert len(a.seen) > 0 and len(b.seen) > 0
        sent = len(a.seen) + len(b.seen)
        assert sent == 2 * merged["sampled"], "the single run and the shards each asked every segment once"
        for i in range(2):
            invoke(
                "augment", args(tmp_path / "re", tmp_path / "cache2", tmp_path / f"r{i}.json") + ["--shard", f"{i}/2"]
            )
        assert len(a.seen) + len(b.seen) == sent, "re-sharded over the same cache: no request sent"
    finally:
        a.close()
        b.close()

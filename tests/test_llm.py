"""selfalign.llm: the cache, the local engine on a tiny model, the OpenAI engine's retries against a scripted endpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from selfalign import llm
from selfalign.config import ParamsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ask(text: str, **kw) -> llm.Request:
    return llm.Request(messages=[{"role": "user", "content": text}], **{"max_tokens": 12, **kw})


# ---------------------------------------------------------------------------------------- cache


def test_cache_survives_a_torn_last_line(tmp_path):
    c = llm.Cache(tmp_path)
    c.put("ab" + "0" * 62, {"text": "one"})
    shard = tmp_path / "ab.jsonl"
    with open(shard, "a", encoding="utf-8") as f:  # a kill -9 in the middle of a write
        f.write('{"key": "ab11", "text": "half')
    c2 = llm.Cache(tmp_path)
    assert c2.get("ab" + "0" * 62)["text"] == "one"
    assert c2.get("ab11") is None and c2.corrupt_lines == 1
    c2.put("ab" + "2" * 62, {"text": "two"})  # the next append starts on a fresh line
    c3 = llm.Cache(tmp_path)
    assert c3.get("ab" + "2" * 62)["text"] == "two" and c3.get("ab" + "0" * 62)["text"] == "one"
    assert c3.corrupt_lines == 1
    assert all(json.loads(line) for line in shard.read_text().splitlines()[-1:])


def test_request_and_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        llm.Request(messages=[{"role": "user", "content": "x"}], prompt="y")
    with pytest.raises(ValueError, match="max_tokens"):
        llm.Request(prompt="x", max_tokens=0)
    with pytest.raises(ValueError, match="unknown key.*batchsize"):
        llm.make_engine({"kind": "local", "batchsize": 4})
    with pytest.raises(ValueError, match="engine.kind: 'gpt'"):
        llm.make_engine({"kind": "gpt"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llm.make_engine({"kind": "local", "model": str(tmp_path)})
    with pytest.raises(RuntimeError, match="GPU-only"):
        llm.make_engine({"kind": "vllm", "model": str(tmp_path)})
    # greedy settings ignore seed and top_p, so they do not split the cache
    assert ask("x", seed=1, top_p=0.5).settings() == ask("x").settings()
    assert ask("x", temperature=0.7, seed=1).settings() != ask("x", temperature=0.7, seed=2).settings()


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"kind": "gpt5"}, ["engine.kind", "'gpt5'", "local | openai | vllm"]),
        ({"batch_size": "two"}, ["engine.batch_size", "'two'", "an integer"]),
        ({"batch_size": 0}, ["engine.batch_size", "0", "1 <= batch_size"]),
        ({"dtype": "float64"}, ["engine.dtype", "'float64'", "fp32 | bf16 | fp16 | auto"]),
        ({"timeout": 0}, ["engine.timeout", "0 < timeout"]),
        ({"kind": "openai", "base_url": "localhost:8000"}, ["engine.base_url", "'localhost:8000'", "http"]),
        ({"batchsize": 4}, ["engine", "unknown key 'batchsize'", "batch_size"]),
    ],
)
def test_make_engine_rejects_a_bad_spec_in_one_line_before_any_work(spec, words):
    with pytest.raises(ParamsError) as e:  # a stage exits 2 with this line (click), no traceback
        llm.make_engine(spec)
    message = e.value.format_message()
    assert "\n" not in message and all(w in message for w in words), message
    assert isinstance(e.value, ValueError)  # callers that catch a failed engine start as a ValueError still do


def test_a_spec_is_an_engine_spec_or_a_mapping_in_either_dtype_spelling(tmp_path):
    spec = llm.EngineSpec(kind="openai", base_url="http://127.0.0.1:9/v1", model="m", concurrency=2)
    assert llm.engine_spec(spec) == spec == llm.engine_spec(spec.to_dict())
    with pytest.raises(ParamsError, match="engine.batch_size: 'two' is not an integer"):  # built by hand: checked too
        llm.make_engine(llm.EngineSpec(batch_size="two"))
    assert llm.engine_spec({}).model == "models/base" == llm.EngineSpec().with_model(None).model
    # torch's names, from callers written before the one vocabulary, read as the params names
    assert (
        llm.engine_spec({"dtype": "bfloat16"}).dtype == "bf16" and llm.engine_spec({"dtype": "float32"}).dtype == "fp32"
    )
    eng = llm.make_engine(spec, tmp_path)
    assert (eng.concurrency, eng.model_name, eng.base_url) == (2, "m", "http://127.0.0.1:9/v1")


# ---------------------------------------------------------------------------------- local engine


def test_local_engine_batches_caches_and_resumes(varied_model_dir, tmp_path):
    reqs = [
        ask("Name a colour."),
        ask("What is two plus two? Answer briefly please."),
        ask("Hi", max_tokens=3),
        llm.Request(prompt="Once upon a time", max_tokens=8),
        ask("Name a colour."),
    ]
    one = llm.make_engine({"kind": "local", "model": str(varied_model_dir), "batch_size": 1}, tmp_path / "c1")
    batched = llm.make_engine({"kind": "local", "model": str(varied_model_dir), "batch_size": 4}, tmp_path / "c4")
    r1, r4 = one.complete(reqs, template_id="t"), batched.complete(reqs, template_id="t")
    assert [r.text for r in r1] == [r.text for r in r4]  # left-padded batches change nothing greedy
    assert all(r.ok and isinstance(r.text, str) for r in r4)
    assert len({r.text for r in r4}) >= 3  # distinct prompts, distinct replies
    assert r4[2].usage["completion_tokens"] <= 3
    assert r4[2].finish_reason == "length" or r4[2].usage["completion_tokens"] < 3
    assert r4[0].text == r4[4].text
    s = batched.stats
    assert s["requests"] == 5 and s["calls"] == 4 and s["cache_hits"] == 0  # the duplicate is asked once
    assert s["prompt_tokens"] > 0 and s["completion_tokens"] > 0

    again = llm.make_engine({"kind": "local", "model": str(varied_model_dir), "batch_size": 4}, tmp_path / "c4")
    r = again.complete(reqs, template_id="t")
    assert [x.text for x in r] == [x.text for x in r4] and all(x.cached for x in r)
    assert again.stats["calls"] == 0 and again.stats["cache_hits"] == 5
    assert again._model is None  # everything came from the cache
    other = again.complete(reqs[:1], template_id="t2")  # another prompt template is another key
    assert not other[0].cached and again.stats["calls"] == 1


def test_sampling_is_seeded_per_request_not_per_batch(varied_model_dir):
    eng = llm.make_engine({"kind": "local", "model": str(varied_model_dir), "batch_size": 4}, None)
    s = ask("Tell me a story.", temperature=1.0, seed=3, max_tokens=10)
    alone = eng.complete([s])[0].text
    mixed = eng.complete([ask("Other prompt here."), s, ask("A third", temperature=0.9, seed=5)])[1].text
    assert alone == mixed
    seeds = eng.complete([ask("Tell me a story.", temperature=1.0, seed=k, max_tokens=10) for k in range(4)])
    assert len({r.text for r in seeds}) > 1 and seeds[3].text == alone


def test_stop_strings_and_failures_are_not_cached(varied_model_dir, tmp_path):
    eng = llm.make_engine({"kind": "local", "model": str(varied_model_dir)}, tmp_path)
    full = eng.complete([ask("Count for me.", max_tokens=10)])[0]
    words = full.text.split()
    assert len(words) >= 2
    cut = eng.complete([ask("Count for me.", max_tokens=10, stop=[words[1]])])[0]
    assert cut.text == full.text[: full.text.index(words[1])] and cut.finish_reason == "stop"

    too_long = ask("word " * 1200, max_tokens=8)  # the tiny model has 1024 positions
    bad = eng.complete([too_long])[0]
    assert not bad.ok and bad.text is None and "positions" in bad.error
    eng.complete([too_long])
    assert eng.stats["failures"] == 2 and eng.stats["cache_hits"] == 0  # asked again, never cached


# --------------------------------------------------------------------------------- openai engine


class Scripted:
    """A stand-in endpoint answering call i with script[i], a (status, headers, body), or an echo when
    the step is None or the script has run out."""

    def __init__(self, script):
        self.script, self.seen, self.lock = list(script), [], threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.seen.append((self.headers.get("Authorization"), body))
                    step = outer.script.pop(0) if outer.script else None
                    status, headers, payload = step or ok(body)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def ok(body):
    text = "echo: " + body["messages"][-1]["content"]
    return (
        200,
        {},
        {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        },
    )


@pytest.fixture
def slept(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(llm, "_sleep", waits.append)
    return waits


def openai_spec(url, **kw):
    return {
        "kind": "openai",
        "base_url": url,
        "model": "m",
        "api_key_env": "SELFALIGN_TEST_KEY",
        "concurrency": 1,
        "max_retries": 2,
        "timeout": 5,
        "backoff_base": 0.25,
        **kw,
    }


def test_openai_engine_retries_honours_retry_after_and_keeps_the_key_secret(tmp_path, slept, monkeypatch):
    monkeypatch.setenv("SELFALIGN_TEST_KEY", "sekrit-123")
    err = {"error": {"message": "boom"}}
    stub = Scripted(
        [
            (429, {"Retry-After": "7"}, err),
            None,  # request a: 429, then ok
            (500, {}, err),
            (200, {}, b'{"choices": [{"mess'),
            None,
        ]
    )  # request b: 500, garbled, ok
    eng = llm.make_engine(openai_spec(stub.url, price_per_1k_input=2.0, price_per_1k_output=4.0), tmp_path)
    res = eng.complete([ask("a"), ask("b")], template_id="t")
    assert [r.text for r in res] == ["echo: a", "echo: b"] and all(r.ok for r in res)
    assert slept[0] == 7.0 and len(slept) == 3  # Retry-After honoured, then backoff
    assert 0.25 * 0.75 <= slept[1] <= 0.25 and 0.5 * 0.75 <= slept[2] <= 0.5
    s = eng.stats
    assert (s["calls"], s["retries"], s["failures"], s["prompt_tokens"], s["completion_tokens"]) == (2, 3, 0, 20, 10)
    assert s["cost_usd"] == pytest.approx((20 * 2.0 + 10 * 4.0) / 1000)
    assert {auth for auth, _ in stub.seen} == {"Bearer sekrit-123"}
    assert all("sekrit" not in p.read_text() for p in tmp_path.iterdir())
    assert "sekrit" not in json.dumps(s)
    n = len(stub.seen)
    again = llm.make_engine(openai_spec(stub.url), tmp_path).complete([ask("a"), ask("b")], template_id="t")
    assert all(r.cached for r in again) and len(stub.seen) == n


def test_openai_engine_gives_up_explicitly(tmp_path, slept):
    err = {"error": {"message": "down"}}
    stub = Scripted([(503, {}, err)] * 3 + [(400, {}, {"error": {"message": "bad role"}})])
    eng = llm.make_engine(openai_spec(stub.url), tmp_path)
    down, bad = eng.complete([ask("a"), ask("b")])
    assert not down.ok and down.text is None and "gave up after 3 attempts" in down.error and "503" in down.error
    assert not bad.ok and "HTTP 400" in bad.error and "bad role" in bad.error  # a 400 is not retried
    assert len(stub.seen) == 4 and eng.stats["failures"] == 2 and eng.stats["retries"] == 2
    assert not any(p.stat().st_size for p in tmp_path.iterdir())  # failures never cached
    retry = llm.make_engine(openai_spec(stub.url), tmp_path).complete([ask("a")])[0]
    assert retry.ok and retry.text == "echo: a"


def test_openai_engine_keeps_order_under_concurrency(tmp_path):
    stub = Scripted([])
    eng = llm.make_engine(openai_spec(stub.url, concurrency=4), None)
    res = eng.complete([ask(str(i)) for i in range(12)])
    assert [r.text for r in res] == [f"echo: {i}" for i in range(12)]
    assert len(stub.seen) == 12


def test_the_cache_identity_keeps_torch_dtype_names_so_old_caches_still_hit(tiny_model_dir):
    new = llm.make_engine({"model": str(tiny_model_dir), "dtype": "fp32"})
    old = llm.make_engine({"model": str(tiny_model_dir), "dtype": "float32"})
    assert new.identity == old.identity and new.identity["dtype"] == "float32" and new._model is None
    assert new.key(ask("x"), "t") == old.key(ask("x"), "t")


def test_generation_dtypes_read_the_params_vocabulary_and_torch_names():
    from selfalign import generate

    assert [generate.torch_dtype_name(d) for d in ("fp32", "bf16", "fp16", "auto")] == [
        "float32",
        "bfloat16",
        "float16",
        "auto",
    ]
    assert generate.torch_dtype_name("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="'int8': expected one of fp32, bf16, fp16, auto"):
        generate.torch_dtype_name("int8")

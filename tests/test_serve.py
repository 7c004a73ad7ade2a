"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the real openai client and a tiny model."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from selfalign import chat, serve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(varied_model_dir):
    app = serve.create_app(varied_model_dir, api_key=KEY, limits=serve.Limits(max_prompt_tokens=200, max_tokens=64))
    running = serve.start_in_thread(app)
    yield running, app
    running.stop()
    app.state.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url, api_key=KEY, max_retries=0, timeout=60)


def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def user(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["model"]
    with urllib.request.urlopen(server[0].url.removesuffix("/v1") + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_chat_plain_uses_the_training_prompt(server, client, varied_model_dir):
    tok = chat.load_tokenizer(varied_model_dir)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    prompt, _ = chat.split_last_turn(tok, msgs)
    assert serve.prompt_for(tok, msgs[:-1]) == prompt
    r = client.chat.completions.create(model="model", messages=msgs[:-1], max_tokens=10, temperature=0)
    text = r.choices[0].message.content
    assert isinstance(text, str) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert 0 < r.usage.completion_tokens <= 10
    assert "<|im_end|>" not in text
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 10


def test_streaming_equals_plain(client):
    kw = dict(model="model", messages=user("Tell me about the sea."), max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"model": "model"}).encode(), "'messages' is required"),
        (json.dumps({"messages": []}).encode(), "non-empty list"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages[0].role"),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0].content"),
        (json.dumps({"messages": user("hi"), "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"messages": user("hi"), "max_tokens": 65}).encode(), "max_tokens"),
        (json.dumps({"messages": user("hi"), "max_tokens": "5"}).encode(), "max_tokens"),
        (json.dumps({"messages": user("hi"), "temperature": -1}).encode(), "temperature"),
        (json.dumps({"messages": user("word " * 300)}).encode(), "limit is 200"),
    ],
)
def test_malformed_requests_get_400(server, body, needle):
    status, payload = post(server[0].url, body)
    assert status == 400 and needle in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


def test_api_key_is_enforced(server, client):
    for key in (None, "wrong"):
        status, payload = post(server[0].url, json.dumps({"messages": user("hi")}).encode(), key=key)
        assert status == 401 and "API key" in payload["error"]["message"]
    bad = openai.OpenAI(base_url=server[0].url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert client.chat.completions.create(model="model", messages=user("hi"), max_tokens=2).choices


def test_raw_completions(client):
    r = client.completions.create(model="model", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert isinstance(r.choices[0].text, str) and r.usage.prompt_tokens == 4


def test_concurrent_requests_are_batched_without_changing_answers(varied_model_dir, client):
    prompts = ["Name a fruit.", "What is the capital of France?", "Say hi.", "Count to three."]
    kw = dict(model="model", max_tokens=8)
    greedy = [
        client.chat.completions.create(messages=user(p), temperature=0, **kw).choices[0].message.content
        for p in prompts
    ]
    sampled = client.chat.completions.create(messages=user(prompts[0]), temperature=1.0, seed=7, **kw)
    # a long wait and room for exactly 5: the 5 concurrent requests become one batch, deterministically
    app = serve.create_app(varied_model_dir, max_batch_size=5, batch_wait_ms=30_000)
    running = serve.start_in_thread(app)
    try:
        c = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=120)
        jobs = [dict(messages=user(p), temperature=0, **kw) for p in prompts]
        jobs.append(dict(messages=user(prompts[0]), temperature=1.0, seed=7, **kw))
        with ThreadPoolExecutor(5) as pool:
            got = list(pool.map(lambda j: c.chat.completions.create(**j).choices[0].message.content, jobs))
        stats = app.state.stats
    finally:
        running.stop()
        app.state.close()
    assert got[:4] == greedy and got[4] == sampled.choices[0].message.content
    assert stats["batches"] == 1 and stats["max_batch"] == 5 and stats["requests"] == 5


# ------------------------------------------------------------------------ hostile clients (issue 11)


def health(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
        return json.loads(r.read())


def test_unknown_model_is_404_model_not_found(server, client):
    """Before: any model name was answered."""
    status, payload = post(server[0].url, json.dumps({"model": "gpt-4o", "messages": user("hi")}).encode())
    assert status == 404 and payload["error"]["code"] == "model_not_found" and "gpt-4o" in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="m", prompt="Once", max_tokens=2)


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "finite"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "finite"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', "finite"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "finite"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_non_finite_numbers_and_deep_nesting_get_400(server, body, needle):
    """Before: NaN was accepted (it fails every range check) and 100,000 levels of nesting gave a 500."""
    status, payload = post(server[0].url, body)
    assert status == 400 and needle in payload["error"]["message"], payload


def test_huge_body_is_413_and_long_prompts_leave_health_free(server):
    """Before: a 10 MB prompt was tokenised on the event loop, /health waited 7.5 s behind it."""
    t0 = time.monotonic()
    status, payload = post(server[0].url, json.dumps({"messages": user("word " * 2_000_000)}).encode())
    assert status == 413 and payload["error"]["code"] == "request_too_large" and time.monotonic() - t0 < 5
    big = ThreadPoolExecutor(1).submit(post, server[0].url, json.dumps({"messages": user("word " * 150_000)}).encode())
    waits = []
    while not big.done():
        t0 = time.monotonic()
        assert health(server[0].url)["status"] == "ok"
        waits.append(time.monotonic() - t0)
        time.sleep(0.05)
    status, payload = big.result()
    assert status == 400 and "limit is 200" in payload["error"]["message"]
    assert max(waits, default=0) < 0.5, waits


class Slow:
    """Makes a tiny model take `step_s` per generated token (a forward pre-hook), counting the steps."""

    def __init__(self, app, step_s: float):
        self.steps, self.step_s = 0, step_s
        app.state.model.model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.steps += 1
        time.sleep(self.step_s)


def send(url: str, max_tokens: int, model: str = "model") -> http.client.HTTPConnection:
    """Start a non-streaming chat request and return its connection (read it, or close it to walk away)."""
    conn = http.client.HTTPConnection(url.removeprefix("http://").split("/")[0], timeout=60)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": model, "messages": user("Go on."), "max_tokens": max_tokens}),
        {"Content-Type": "application/json"},
    )
    return conn


def answer(conn: http.client.HTTPConnection) -> tuple[int, dict]:
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def wait_for(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture
def slow_server(tiny_model_dir):
    """The tiny model (which never stops before max_tokens) at 10 ms a token, one request at a time, 3 places."""
    app = serve.create_app(
        tiny_model_dir, max_batch_size=1, batch_wait_ms=0, limits=serve.Limits(max_tokens=900, max_queue=3)
    )
    slow = Slow(app, 0.01)
    running = serve.start_in_thread(app)
    yield running, app, slow
    running.stop()
    app.state.close()


def test_clients_that_leave_cost_nothing_and_the_queue_is_bounded(slow_server):
    """Before: a dropped request generated to its end (the next request waited 71 s behind it) and the queue grew
    without bound."""
    running, app, slow = slow_server
    first = send(running.url, 900)  # 9 s of work
    wait_for(lambda: slow.steps > 1)
    queued = [send(running.url, 900), send(running.url, 900)]
    wait_for(lambda: app.state.stats["busy"] == 3)
    t0 = time.monotonic()
    status, payload = post(
        running.url, json.dumps({"model": "model", "messages": user("hi"), "max_tokens": 2}).encode(), key=None
    )
    assert status == 429 and payload["error"]["code"] == "server_busy" and time.monotonic() - t0 < 2
    for conn in [first, *queued]:
        conn.close()  # all three clients walk away
    wait_for(lambda: app.state.stats["busy"] == 0, timeout=5)
    steps = slow.steps
    t0 = time.monotonic()
    status, payload = answer(send(running.url, 3))
    assert status == 200 and payload["usage"]["completion_tokens"] == 3
    assert time.monotonic() - t0 < 3  # not behind 27 s of orphaned work
    assert app.state.stats["cancelled"] == 3 and slow.steps - steps <= 5  # nothing but the new request ran
    assert app.state.stats["refused_busy"] == 1


def test_a_streaming_client_that_leaves_while_queued_costs_nothing(slow_server):
    running, app, slow = slow_server
    first = send(running.url, 900)
    wait_for(lambda: slow.steps > 1)
    c = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
    stream = c.chat.completions.create(model="model", messages=user("Go on."), max_tokens=900, stream=True)
    stream.close()  # left while waiting behind `first`
    first.close()
    wait_for(lambda: app.state.stats["busy"] == 0, timeout=5)
    steps = slow.steps
    assert answer(send(running.url, 2))[0] == 200 and slow.steps - steps <= 4


def test_shutdown_cancels_queued_work_and_answers_503(slow_server):
    """Before: SIGTERM with orphans queued had not stopped the server after 50 s."""
    running, app, slow = slow_server
    conns = [send(running.url, 900)]
    wait_for(lambda: slow.steps > 1)
    conns += [send(running.url, 900), send(running.url, 900)]
    wait_for(lambda: app.state.stats["busy"] == 3)
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(answer, c) for c in conns]
        t0 = time.monotonic()
        running.stop()  # what SIGTERM calls
        assert not running.thread.is_alive() and time.monotonic() - t0 < 8
        got = [a.result(timeout=10) for a in answers]
    assert [s for s, _ in got] == [503] * 3 and all(p["error"]["code"] == "server_shutting_down" for _, p in got)


def test_cli_serves_its_aliases_and_exits_on_sigterm_with_work_queued(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "selfalign.serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--served-model-name",
            "teacher",
            "--max-batch-size",
            "1",
            "--max-tokens",
            "900",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        end = time.monotonic() + 120
        while True:
            try:
                health(url)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < end, proc.stdout.read()
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["teacher", "model"]
        assert c.chat.completions.create(model="teacher", messages=user("hi"), max_tokens=2).model == "teacher"
        with pytest.raises(openai.NotFoundError) as e:
            c.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=2)
        assert e.value.code == "model_not_found"
        conns = [send(url, 900) for _ in range(4)]  # seconds of work each, one at a time
        wait_for(lambda: health(url)["busy"] == 4)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        statuses = [answer(conn)[0] for conn in conns]
        proc.wait(timeout=15)
        assert time.monotonic() - t0 < 5 and statuses == [503] * 4
        assert "Finished server process" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ------------------------------------------------------------------ the wire format alone (selfalign/api.py)


def test_request_parsing_is_pure_and_checks_in_the_order_a_client_reads():
    from selfalign import api

    limits = api.Limits(max_prompt_tokens=10, max_tokens=64)
    names = ["teacher", "model"]
    chat_body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    }
    p = api.parse_request(json.dumps({**chat_body, "stop": "##", "seed": 3}).encode(), True, names, limits)
    assert p.served == "teacher" and p.messages == [{"role": "user", "content": "ab"}] and p.prompt is None
    assert (p.req.max_tokens, p.req.temperature, p.req.stop, p.req.seed) == (64, 1.0, ["##"], 3)
    raw = api.parse_request(b'{"model": "model", "prompt": "Once", "max_tokens": 5}', False, names, limits)
    assert raw.served == "model" and raw.prompt == "Once" and raw.req.max_tokens == 5
    # an unknown model is reported before a bad message: the 404 names what the server serves
    with pytest.raises(api.BadRequest) as e:
        api.parse_request(b'{"model": "gpt-4o", "messages": []}', True, names, limits)
    assert e.value.status == 404 and e.value.code == "model_not_found" and "teacher, model" in e.value.message
    for body, route, needle in [
        (b'{"prompt": "x", "stream": true}', False, "streaming is only supported"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 2}', True, "only n=1"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}', True, "'stop'"),
        (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', True, "'top_p' must be in (0.0, 1.0]"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', True, "only text parts"),
    ]:
        with pytest.raises(api.BadRequest, match=needle.replace("(", r"\(").replace("[", r"\[")):
            api.parse_request(body, route, names, limits)
    req = api.parse_settings({"max_tokens": 20}, limits)
    api.check_length(10, req, limits, 30)
    with pytest.raises(api.BadRequest, match="the limit is 10"):
        api.check_length(11, req, limits, 1000)
    with pytest.raises(api.BadRequest, match=r"exceeds the model's 29 positions"):
        api.check_length(10, req, limits, 29)
    assert api.error_body(429, "busy")["error"]["type"] == "rate_limit_error"
    assert api.error_body(503, "stopping")["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--gpu-memory-utilization", "1.5"], ["engine.gpu_memory_utilization", "1.5", "<= 1"]),
        (["--dtype", "float64"], ["--dtype", "float64", "fp32", "bf16"]),
    ],
)
def test_bad_engine_settings_exit_2_with_one_line_before_loading(tiny_model_dir, args, words):
    from click.testing import CliRunner

    t0 = time.monotonic()
    res = CliRunner().invoke(serve.main, ["--model", str(tiny_model_dir), *args])
    assert res.exit_code == 2 and all(w in res.output for w in words), res.output
    assert time.monotonic() - t0 < 5  # nothing was loaded

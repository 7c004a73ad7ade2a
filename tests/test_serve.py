"""The OpenAI-compatible server over real HTTP on 127.0.0.1, driven by the real openai client and a tiny model."""

from __future__ import annotations

import json
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
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}]
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


@pytest.mark.parametrize("body, needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"model": "m"}).encode(), "'messages' is required"),
    (json.dumps({"messages": []}).encode(), "non-empty list"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages[0].role"),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages[0].content"),
    (json.dumps({"messages": user("hi"), "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"messages": user("hi"), "max_tokens": 65}).encode(), "max_tokens"),
    (json.dumps({"messages": user("hi"), "max_tokens": "5"}).encode(), "max_tokens"),
    (json.dumps({"messages": user("hi"), "temperature": -1}).encode(), "temperature"),
    (json.dumps({"messages": user("word " * 300)}).encode(), "limit is 200"),
])
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
    assert client.chat.completions.create(model="m", messages=user("hi"), max_tokens=2).choices


def test_raw_completions(client):
    r = client.completions.create(model="model", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert isinstance(r.choices[0].text, str) and r.usage.prompt_tokens == 4


def test_concurrent_requests_are_batched_without_changing_answers(varied_model_dir, client):
    prompts = ["Name a fruit.", "What is the capital of France?", "Say hi.", "Count to three."]
    kw = dict(model="m", max_tokens=8)
    greedy = [client.chat.completions.create(messages=user(p), temperature=0, **kw).choices[0].message.content
              for p in prompts]
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

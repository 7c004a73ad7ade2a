"""Test helpers for the LLM engines, the server and translate: a chattier tiny model and a fault-injecting proxy.

The shared tiny model (conftest) repeats its last input token forever (tied embeddings, small
init), so every greedy reply is "\n\n\n...". `varied_model` gives it an untied random head
whose end-of-turn row is strong enough that some replies stop after a few tokens and others
run to max_tokens: distinct outputs per prompt, both finish reasons, still random text.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

_made: dict[tuple[str, float], Path] = {}


def varied_model(src: Path, dst: Path, eos_scale: float = 0.4) -> Path:
    """The varied copy of `src` at `dst`, made once per test session (later calls return the first copy)."""
    if (str(src), eos_scale) in _made and _made[str(src), eos_scale].exists():
        return _made[str(src), eos_scale]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    g = torch.Generator().manual_seed(1)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.config.vocab_size, model.config.hidden_size, generator=g) * 0.5)
        model.lm_head.weight[tok.eos_token_id] = torch.randn(model.config.hidden_size, generator=g) * eos_scale * 4
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    _made[str(src), eos_scale] = dst
    return dst


def last_user_text(body: bytes) -> str | None:
    try:
        return json.loads(body)["messages"][-1]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class FaultProxy:
    """An HTTP proxy in front of an OpenAI-compatible server that injects faults on chosen requests.

    plan maps a needle (a substring of the last user message) to the faults of its successive
    attempts: "429" (with Retry-After), "500", "timeout" (no answer until the client gives up),
    "garbled" (a 200 with a broken JSON body). An attempt with no fault left is forwarded.
    `forwarded` counts, per last-user-message text, the requests that reached the server.
    With hold_after=N, request N+1 is held (never forwarded) and `held` is set: a test can then
    kill its client knowing exactly N answers were delivered.
    """

    def __init__(
        self,
        upstream: str,
        plan: dict[str, list[str]] | None = None,
        retry_after: str = "7",
        hold_after: int | None = None,
    ):
        u = urlparse(upstream)
        self.host, self.port_up = u.hostname, u.port
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.retry_after = retry_after
        self.hold_after = hold_after
        self.forwarded: Counter = Counter()
        self.faults: Counter = Counter()
        self.answered = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward(b"")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                text = last_user_text(body)
                with proxy.lock:
                    fault = None
                    for needle, faults in proxy.plan.items():
                        if text is not None and needle in text and faults:
                            fault = faults.pop(0)
                            break
                    hold = fault is None and proxy.hold_after is not None and proxy.answered >= proxy.hold_after
                if hold:
                    proxy.held.set()
                    proxy.release.wait(timeout=60)
                    return  # closed without an answer
                if fault:
                    with proxy.lock:
                        proxy.faults[fault] += 1
                    return self._fault(fault)
                self._forward(body, text)

            def _fault(self, fault):
                if fault == "timeout":
                    proxy.release.wait(timeout=10)
                    return
                if fault == "garbled":
                    return self._send(
                        200,
                        b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind',
                        {"Content-Type": "application/json"},
                    )
                status = int(fault)
                body = json.dumps({"error": {"message": f"injected {status}", "type": "injected"}}).encode()
                headers = {"Content-Type": "application/json"}
                if status == 429:
                    headers["Retry-After"] = proxy.retry_after
                self._send(status, body, headers)

            def _forward(self, body, text=None):
                conn = http.client.HTTPConnection(proxy.host, proxy.port_up, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                with proxy.lock:
                    if text is not None:
                        proxy.forwarded[text] += 1
                    proxy.answered += 1
                self._send(resp.status, data, {"Content-Type": resp.getheader("Content-Type", "application/json")})

            def _send(self, status, body, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------ a scripted teacher (repair, localise, verify)


@contextlib.contextmanager
def scripted_teacher(tmp_path: Path, reply: str):
    """A scripted model that always says `reply`, behind selfalign.serve on a free port; yields its /v1 URL."""
    from scripted_model import make_scripted_model

    from selfalign import serve

    name = f"t{abs(hash(reply)) % 10**8}"
    app = serve.create_app(make_scripted_model(tmp_path / name, reply), model_name="teacher")
    running = serve.start_in_thread(app, port=0)
    try:
        yield running.url
    finally:
        app.state.close()
        running.stop()


def teacher_engine(url: str) -> dict:
    """The engine spec of a stage that asks the scripted teacher at `url` (no key, no retries)."""
    return {"kind": "openai", "base_url": url, "model": "teacher", "api_key_env": "", "max_retries": 0}

"""An OpenAI-compatible server for any model directory the pipeline writes.

    python -m selfalign.serve --model models/export --port 8000 [--host 127.0.0.1] [--api-key-env VAR]

Routes: GET /health (with usage counts), GET /v1/models, POST /v1/chat/completions (plain and
`stream: true` SSE), POST /v1/completions (raw prompts, plain). One model is served, under the
model directory's name and any `--served-model-name` aliases; a request naming another model gets
OpenAI's 404 `model_not_found`. Prompts are built by `prompt_for`, i.e.
`chat.render(..., add_generation_prompt=True)` with the model's own chat template, which is
by construction the prompt half of what training saw; generation stops at the template's
end-of-turn token.

Non-streaming requests are micro-batched: a request that arrives while a batch is generating,
or within `batch_wait_ms` of the first, joins the next left-padded batch (up to
`max_batch_size`). Greedy rows come out as they would alone, and sampled rows draw from their
own seeded generator (selfalign.llm.LocalModel), so batching changes speed, not answers.
Streaming requests generate one at a time. All generation holds one lock.

Nothing waits on work for a client that left: a request whose client disconnects is dropped from
the queue, and a batch whose clients have all gone stops at the next token (a row of a batch that
others still wait for runs on with them). At most `max_queue`
requests wait or generate at once; one more gets a 429 with Retry-After at once. SIGTERM cancels
all work (waiting clients get a 503) and the server exits within a few seconds.

A malformed request gets a 400 naming what is wrong (bad or too deeply nested JSON, missing or bad
`messages`, a bad role, `max_tokens` or a non-finite `temperature` out of range, a prompt over
`max_prompt_tokens`), and a body over `max_body_bytes` a 413, never a 500 or a hang. Parsing and
tokenising run off the event loop, so /health answers while a long prompt is being counted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
from fastapi import Request as HTTPRequest  # module level: FastAPI resolves route annotations from here

from selfalign import chat
from selfalign.llm import LocalModel, Request, VLLMModel

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


def prompt_for(tok, messages: list[dict]) -> str:
    """The exact prompt string the server generates from for `messages`."""
    return chat.render(tok, messages, add_generation_prompt=True)


class BadRequest(Exception):
    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.headers = message, param, status, code, headers


class Cancelled(Exception):
    """The request's client left, or the server is shutting down."""


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20  # 1 MiB: hundreds of bytes per prompt token at the default limit
    max_queue: int = 64  # requests waiting or generating at once; one more gets a 429


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number, got {type(value).__name__}", name)
    if not math.isfinite(value):  # JSON's NaN fails every range comparison below
        raise BadRequest(f"'{name}' must be a finite number, got {value}", name)
    if value > hi or value < lo or (lo_open and value == lo):
        raise BadRequest(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", name)
    return value


def _content(value, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # the OpenAI content-parts form: [{"type": "text", "text": ...}]
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"'messages[{i}].content[{j}]': only text parts are supported", f"messages[{i}].content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"'messages[{i}].content' must be a string or a list of text parts", f"messages[{i}].content")


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest("request body is not valid JSON: nested too deeply") from e
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_messages(body: dict) -> list[dict]:
    if "messages" not in body:
        raise BadRequest("'messages' is required", "messages")
    msgs = body["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRequest(f"'messages[{i}]' must be an object with role and content", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise BadRequest(
                f"'messages[{i}].role' must be one of {', '.join(ROLES)}, got {m.get('role')!r}", f"messages[{i}].role"
            )
        if "content" not in m:
            raise BadRequest(f"'messages[{i}].content' is required", f"messages[{i}].content")
        out.append({"role": m["role"], "content": _content(m["content"], i)})
    return out


def parse_settings(body: dict, limits: Limits) -> Request:
    """Generation settings of a request body as an llm.Request (messages filled in later)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise BadRequest(
            f"'max_tokens' must be an integer in [1, {limits.max_tokens}], got {max_tokens!r}", "max_tokens"
        )
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed", 0)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadRequest("'seed' must be an integer", "seed")
    n = body.get("n", 1)
    if n not in (1, None):
        raise BadRequest("only n=1 is supported", "n")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise BadRequest("'stop' must be a string or a list of at most 4 strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    return Request(
        prompt="",
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        stop=stop or None,
    )


@dataclass
class Job:
    text: str
    req: Request
    fut: Future
    gone: threading.Event  # set when the client disconnects or the server stops


class _AllGone:
    """A cancel flag for a batch: set once every request in it is gone (llm's stopping criterion polls it)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(j.gone.is_set() for j in self.jobs)


class Batcher:
    """Collects non-streaming requests into batches and generates them on one worker thread."""

    def __init__(self, model: LocalModel, lock: threading.Lock, max_batch_size: int, wait_s: float, stats: dict):
        self.model, self.lock, self.max_batch_size, self.wait_s, self.stats = model, lock, max_batch_size, wait_s, stats
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, text: str, req: Request, gone: threading.Event) -> Future:
        fut: Future = Future()
        self.q.put(Job(text, req, fut, gone))
        return fut

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=60)

    def _take(self, job: Job) -> bool:
        """Whether `job` is still wanted; a gone one is answered with Cancelled and skipped."""
        if not job.fut.set_running_or_notify_cancel():  # its waiter cancelled it
            return False
        if job.gone.is_set():
            job.fut.set_exception(Cancelled())
            return False
        return True

    def _loop(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            if not self._take(first):
                continue
            batch = [first]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self.q.put(None)
                    break
                if self._take(item):
                    batch.append(item)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.lock:
                gens = self.model.generate([j.text for j in batch], [j.req for j in batch], cancel=_AllGone(batch))
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error, none hangs
            log.exception("batch generation failed")
            for j in batch:
                j.fut.set_exception(e)
            return
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        for j, g in zip(batch, gens, strict=True):
            if j.gone.is_set():
                j.fut.set_exception(Cancelled())
            else:
                j.fut.set_result(g)


async def _disconnected(request: HTTPRequest) -> None:
    """Return once the client has gone (or the response is complete): the ASGI server then answers
    every receive() with http.disconnect. The request body must have been read already."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    model_dir: str | os.PathLike,
    *,
    api_key: str | None = None,
    dtype: str = "float32",
    limits: Limits | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    model_name: str | Sequence[str] | None = None,
    engine: str = "local",
    vllm: dict | None = None,
):
    """The FastAPI app serving `model_dir` under its directory name and the aliases in `model_name`
    (the first alias, if any, is the name /v1/models lists first). `app.state.stop()` cancels all work
    and refuses new requests (SIGTERM calls it); `app.state.close()` stops the batcher thread and frees
    the model's GPU memory. `engine="vllm"` generates with vLLM on the GPU (`vllm` holds the engine spec's
    vllm keys: tensor_parallel_size, gpu_memory_utilization, max_model_len, prefix_caching); the routes,
    limits and batching are the same for both engines."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    limits = limits or Limits()
    if engine == "vllm":
        model = VLLMModel({"model": str(model_dir), "dtype": dtype, **(vllm or {})})
    elif engine == "local":
        model = LocalModel(model_dir, dtype)
    else:
        raise ValueError(f"engine {engine!r}: expected local or vllm")
    aliases = [model_name] if isinstance(model_name, str) else list(model_name or [])
    names = list(dict.fromkeys([*aliases, Path(model_dir).resolve().name]))
    name = names[0]
    lock = threading.Lock()
    stats = {
        "requests": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "batches": 0,
        "max_batch": 0,
        "cancelled": 0,
        "busy": 0,
        "refused_busy": 0,
    }
    stats_lock = threading.RLock()  # re-entrant: SIGTERM's handler (stop) may run while the loop thread holds it
    live: set[threading.Event] = set()  # the cancel flag of every request waiting or generating
    stopping = threading.Event()
    batcher = Batcher(model, lock, max_batch_size, batch_wait_ms / 1000, stats)
    app = FastAPI(title="selfalign", docs_url=None, redoc_url=None)

    def stop() -> None:
        with stats_lock:
            stopping.set()
            for gone in live:
                gone.set()

    app.state.model, app.state.stats, app.state.names = model, stats, names
    app.state.stop = stop

    def close() -> None:
        batcher.close()
        if hasattr(model, "close"):
            model.close()

    app.state.close = close

    def error(
        status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": param, "code": code}},
            status_code=status,
            headers=headers,
        )

    @app.exception_handler(BadRequest)
    async def _bad(_, e: BadRequest):
        return error(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("internal error")
        return error(500, f"internal error: {type(e).__name__}: {e}")

    def check_key(req: HTTPRequest) -> None:
        if api_key is None:
            return
        given = req.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise BadRequest("missing or wrong API key (Authorization: Bearer ...)", status=401, code="invalid_api_key")

    def check_model(body: dict) -> str:
        """The served name the request asked for (the first one if it names none)."""
        asked = body.get("model")
        if asked is None:
            return name
        if not isinstance(asked, str):
            raise BadRequest("'model' must be a string", "model")
        if asked not in names:
            raise BadRequest(
                f"The model `{asked}` does not exist; this server serves {', '.join(names)}",
                "model",
                status=404,
                code="model_not_found",
            )
        return asked

    async def read_body(request: HTTPRequest) -> bytes:
        """The body, or a 413 once it passes max_body_bytes. A moderately larger body is read to its end
        (and dropped) so that the client, still sending, gets to read the 413."""
        cap = limits.max_body_bytes
        too_big = BadRequest(
            f"request body is over the server's limit of {cap} bytes", status=413, code="request_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > 16 * cap:
            raise too_big
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= cap:
                body += chunk
            elif size > 16 * cap:
                break
        if size > cap:
            raise too_big
        return bytes(body)

    @contextmanager
    def admitted(gone: threading.Event):
        """Hold one of the max_queue places while a request waits or generates."""
        with stats_lock:
            if stopping.is_set():
                raise BadRequest("the server is shutting down", status=503, code="server_shutting_down")
            if stats["busy"] >= limits.max_queue:
                stats["refused_busy"] += 1
                raise BadRequest(
                    f"the server is busy ({limits.max_queue} requests waiting or generating); retry later",
                    status=429,
                    code="server_busy",
                    headers={"Retry-After": "1"},
                )
            stats["busy"] += 1
            live.add(gone)
        try:
            yield
        finally:
            with stats_lock:
                stats["busy"] -= 1
                live.discard(gone)

    def count(prompt_tokens: int, completion_tokens: int) -> None:
        with stats_lock:
            stats["requests"] += 1
            stats["prompt_tokens"] += prompt_tokens
            stats["completion_tokens"] += completion_tokens

    def cancelled() -> BadRequest:
        with stats_lock:
            stats["cancelled"] += 1
        if stopping.is_set():
            return BadRequest("the server is shutting down", status=503, code="server_shutting_down")
        return BadRequest("the client closed the request", status=499, code="client_closed_request")

    def checked_prompt(text: str, req: Request) -> int:
        n = model.count_tokens(text)
        if n > limits.max_prompt_tokens:
            raise BadRequest(
                f"prompt is {n} tokens; the limit is {limits.max_prompt_tokens}",
                "messages",
                code="context_length_exceeded",
            )
        if n + req.max_tokens > model.max_positions:
            raise BadRequest(
                f"prompt ({n} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                f"{model.max_positions} positions",
                "max_tokens",
                code="context_length_exceeded",
            )
        return n

    def prepare(raw: bytes, chat_route: bool) -> tuple[dict, str, str, Request]:
        """(body, served name asked for, prompt text, settings) of a request; runs on a worker thread, as
        parsing and tokenising a long body would hold the event loop."""
        body = parse_body(raw)
        served = check_model(body)
        if chat_route:
            messages = parse_messages(body)
        elif not isinstance(body.get("prompt"), str):
            raise BadRequest("'prompt' is required and must be a string", "prompt")
        elif body.get("stream"):
            raise BadRequest("streaming is only supported on /v1/chat/completions", "stream")
        req = parse_settings(body, limits)
        req.prompt = prompt_for(model.tok, messages) if chat_route else body["prompt"]
        checked_prompt(req.prompt, req)
        return body, served, req.prompt, req

    @app.get("/health")
    def health():
        return {"status": "stopping" if stopping.is_set() else "ok", "model": name, **stats}

    @app.get("/v1/models")
    def models(request: HTTPRequest):
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "selfalign"} for n in names],
        }

    async def generate(request: HTTPRequest, text: str, req: Request):
        """The generation for `text`, unless the client leaves first: then its work is cancelled."""
        gone = threading.Event()
        with admitted(gone):
            result = asyncio.wrap_future(batcher.submit(text, req, gone))
            left = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({result, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
            if not result.done():
                gone.set()  # dropped from the queue, or its batch stops at the next token if it was alone
                log.info("client left; its request is cancelled")
                result.cancel()
                raise cancelled()
            try:
                return result.result()
            except Cancelled:
                raise cancelled() from None

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        check_key(request)
        _, served, text, req = await asyncio.to_thread(prepare, await read_body(request), False)
        g = await generate(request, text, req)
        count(g.prompt_tokens, g.completion_tokens)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served,
            "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason}],
            "usage": _usage(g),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        check_key(request)
        body, served, text, req = await asyncio.to_thread(prepare, await read_body(request), True)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage_too = isinstance(opts, dict) and bool(opts.get("include_usage"))
            return StreamingResponse(
                _stream(request, text, req, cid, created, served, usage_too), media_type="text/event-stream"
            )
        g = await generate(request, text, req)
        count(g.prompt_tokens, g.completion_tokens)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": served,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
            ],
            "usage": _usage(g),
        }

    def _stream(request: HTTPRequest, text: str, req: Request, cid: str, created: int, served: str, usage_too: bool):
        """The SSE chunks of one streamed generation. Its place (max_queue) is taken here, so a full server
        answers 429 before the stream starts, and given back by the generating thread."""
        from transformers import TextIteratorStreamer

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
            }
            if usage is not None:
                obj["usage"] = usage
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        streamer = TextIteratorStreamer(model.tok, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        box: dict = {}
        place = admitted(cancel)
        place.__enter__()
        # Starlette notices a client that left only when a chunk fails to send; while this request waits
        # for the lock nothing is sent, so watch the connection too
        watch = asyncio.ensure_future(_disconnected(request))
        watch.add_done_callback(lambda t: t.cancelled() or cancel.set())

        def run():
            try:
                with lock:
                    if cancel.is_set():
                        raise Cancelled()
                    box["gen"] = model.generate([text], [req], cancel=cancel, streamer=streamer)[0]
            except Exception as e:  # noqa: BLE001 - reported to the client below, and the stream ends
                if not isinstance(e, Cancelled):
                    log.exception("streaming generation failed")
                box["error"] = e
                streamer.end()
            finally:
                place.__exit__(None, None, None)

        def chunks():
            # hold back enough characters that a stop string split across pieces is never sent
            hold = max((len(s) for s in req.stop or []), default=1) - 1
            sent = 0
            acc = ""
            try:
                yield chunk({"role": "assistant", "content": ""})
                for piece in streamer:
                    acc += piece
                    safe = len(acc) - hold
                    if req.stop and any(s in acc for s in req.stop):
                        cancel.set()
                        break
                    if safe > sent:
                        yield chunk({"content": acc[sent:safe]})
                        sent = safe
                worker.join()
                if "error" in box:
                    e = cancelled() if isinstance(box["error"], Cancelled) else box["error"]
                    message = e.message if isinstance(e, BadRequest) else str(e)
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    return
                g = box["gen"]
                if len(g.text) > sent:
                    yield chunk({"content": g.text[sent:]})
                count(g.prompt_tokens, g.completion_tokens)
                yield chunk({}, g.finish_reason)
                if usage_too:
                    yield chunk({}, usage=_usage(g))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away: stop generating at the next token

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        return chunks()

    return app


def _usage(g) -> dict:
    return {
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    }


@dataclass
class Running:
    url: str  # base URL for OpenAI clients, e.g. http://127.0.0.1:8123/v1
    port: int
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        """What SIGTERM does to `python -m selfalign.serve`: cancel all work, then shut down."""
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout=30)


def make_server(app, **config):
    """A uvicorn server for `app` whose SIGTERM/SIGINT first cancels all queued and running work, so
    waiting clients get a 503 at once and shutdown takes seconds, not the length of the queue."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.stop()
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, timeout_graceful_shutdown=5, **config))


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Serve `app` from a background thread on a socket that already listens, so clients can
    connect at once (they wait in the backlog until uvicorn accepts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    port = sock.getsockname()[1]
    server = make_server(app, log_level="warning", lifespan="off")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return Running(f"http://{host}:{port}/v1", port, server, thread)


@click.command()
@click.option(
    "--model",
    "model_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="A model directory (weights, tokenizer, chat template).",
)
@click.option(
    "--served-model-name",
    "aliases",
    multiple=True,
    help="A name clients may ask for besides the directory's own (repeatable); the first is listed first.",
)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; 0.0.0.0 exposes the server.")
@click.option("--api-key-env", default=None, help="Name of an env var holding the key clients must send as Bearer.")
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["float32", "bfloat16", "auto"]),
    help="auto: selfalign/device.py's rule (bf16 on a bf16 GPU, on a CPU where measured faster); float32 "
    "keeps greedy answers batch-invariant. The model goes on the process's accelerator, else the CPU.",
)
@click.option("--max-batch-size", default=8, show_default=True, type=int)
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=float)
@click.option("--max-prompt-tokens", default=2048, show_default=True, type=int)
@click.option("--max-tokens", "max_tokens_limit", default=1024, show_default=True, type=int)
@click.option(
    "--max-queue",
    default=Limits.max_queue,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests waiting or generating at once; one more gets a 429 with Retry-After.",
)
@click.option(
    "--max-body-bytes",
    default=Limits.max_body_bytes,
    show_default=True,
    type=click.IntRange(min=1),
    help="A larger request body gets a 413.",
)
@click.option(
    "--engine",
    default="local",
    show_default=True,
    type=click.Choice(["local", "vllm"]),
    help="local: transformers in this process; vllm: vLLM on the GPU (pip install vllm; CUDA only).",
)
@click.option(
    "--tensor-parallel-size",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="vllm: GPUs the model is split over.",
)
@click.option(
    "--gpu-memory-utilization",
    default=0.9,
    show_default=True,
    type=float,
    help="vllm: share of each GPU for weights and KV cache.",
)
@click.option(
    "--max-model-len",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="vllm: context length to reserve KV cache for (0: the model's own).",
)
@click.option(
    "--prefix-caching/--no-prefix-caching",
    default=True,
    show_default=True,
    help="vllm: reuse the KV cache of shared prompt prefixes.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the memory plan (weights + KV cache at the batch and lengths above) and exit; load nothing.",
)
@click.option("--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run is held against.")
def main(
    model_dir,
    aliases,
    port,
    host,
    api_key_env,
    dtype,
    max_batch_size,
    batch_wait_ms,
    max_prompt_tokens,
    max_tokens_limit,
    max_queue,
    max_body_bytes,
    engine,
    tensor_parallel_size,
    gpu_memory_utilization,
    max_model_len,
    prefix_caching,
    dry_run,
    gpu_gib,
):
    """Serve MODEL over an OpenAI-compatible HTTP API."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise click.UsageError(f"--api-key-env {api_key_env}: that env var is not set")
    limits = Limits(
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens_limit,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
    )
    vllm = {
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "prefix_caching": prefix_caching,
    }
    if dry_run:
        from selfalign import memory

        plan = memory.generation_plan(
            "serve",
            model_dir,
            engine={"kind": engine, "dtype": dtype, **vllm},
            batch=max_batch_size,
            prompt_tokens=max_prompt_tokens,
            new_tokens=max_tokens_limit,
            gpu_gib=gpu_gib,
            what="one batch of requests",
        )
        click.echo(memory.dry_run(plan))
        return
    try:
        app = create_app(
            model_dir,
            api_key=api_key,
            dtype=dtype,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            limits=limits,
            model_name=aliases,
            engine=engine,
            vllm=vllm,
        )
    except (RuntimeError, ValueError) as e:  # vllm missing, or a bad vllm setting: one line, no traceback
        raise click.UsageError(str(e)) from e
    log.info(
        "serving %s as %s on http://%s:%d/v1 (engine %s, dtype %s, batches of up to %d, queue of %d, API key %s)",
        model_dir,
        ", ".join(app.state.names),
        host,
        port,
        engine,
        dtype,
        max_batch_size,
        max_queue,
        "required" if api_key else "off",
    )
    try:
        make_server(app, host=host, port=port, log_level="info").run()
    finally:
        app.state.close()


if __name__ == "__main__":
    main()

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
own seeded generator (selfalign.generate.LocalModel), so batching changes speed, not answers.
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

The parts: selfalign/api.py parses and checks requests and shapes answers (the wire format);
`Server` here is the state one app holds (the model, its lock, the batcher, the queue places, the
counts); the route handlers are top-level functions that find it at `request.app.state.server`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
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

from selfalign import api, chat, cli, llm
from selfalign.api import BadRequest, Limits
from selfalign.generate import Generation, LocalModel, Request, VLLMModel

log = logging.getLogger(__name__)


def prompt_for(tok, messages: list[dict]) -> str:
    """The exact prompt string the server generates from for `messages`."""
    return chat.render(tok, messages, add_generation_prompt=True)


class Cancelled(Exception):
    """The request's client left, or the server is shutting down."""


@dataclass
class Job:
    text: str
    req: Request
    fut: Future
    gone: threading.Event  # set when the client disconnects or the server stops


class _AllGone:
    """A cancel flag for a batch: set once every request in it is gone (generate's stopping criterion polls it)."""

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


def load_model(model_dir: str | os.PathLike, engine: str, dtype: str, vllm: dict | None) -> LocalModel | VLLMModel:
    """The generating model: `engine` local (transformers here) or vllm (`vllm`: the engine spec's vllm keys),
    its spec checked as a stage's engine spec is (fp32 | bf16 | fp16 | auto; torch's names still read)."""
    if engine not in ("local", "vllm"):
        raise ValueError(f"engine {engine!r}: expected local or vllm")
    spec = llm.engine_spec({"kind": engine, "model": str(model_dir), "dtype": dtype, **(vllm or {})})
    if engine == "vllm":
        return VLLMModel(llm.vllm_llm_kwargs(spec))
    return LocalModel(model_dir, spec.dtype)


class Server:
    """What one app serves and shares between requests: the model and its generation lock, the batcher, the
    served names, the limits, the counts behind /health, and the cancel flag of every request in flight."""

    def __init__(
        self,
        model: LocalModel | VLLMModel,
        names: list[str],
        limits: Limits,
        api_key: str | None,
        max_batch_size: int,
        batch_wait_ms: float,
    ):
        self.model, self.names, self.limits, self.api_key = model, names, limits, api_key
        self.lock = threading.Lock()  # all generation, batched or streamed
        self.stats = {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "batches": 0,
            "max_batch": 0,
            "cancelled": 0,
            "busy": 0,
            "refused_busy": 0,
        }
        # re-entrant: SIGTERM's handler (stop) may run while the loop thread holds it
        self.stats_lock = threading.RLock()
        self.live: set[threading.Event] = set()  # the cancel flag of every request waiting or generating
        self.stopping = threading.Event()
        self.batcher = Batcher(model, self.lock, max_batch_size, batch_wait_ms / 1000, self.stats)

    def stop(self) -> None:
        """Cancel all work and refuse new requests (SIGTERM calls it)."""
        with self.stats_lock:
            self.stopping.set()
            for gone in self.live:
                gone.set()

    def close(self) -> None:
        """Stop the batcher thread and free the model's GPU memory."""
        self.batcher.close()
        if hasattr(self.model, "close"):
            self.model.close()

    def check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise BadRequest("missing or wrong API key (Authorization: Bearer ...)", status=401, code="invalid_api_key")

    def prepare(self, raw: bytes, chat_route: bool) -> tuple[api.Parsed, str]:
        """(the parsed request, the prompt text) with the prompt's length checked; runs on a worker thread, as
        parsing and tokenising a long body would hold the event loop."""
        parsed = api.parse_request(raw, chat_route, self.names, self.limits)
        text = prompt_for(self.model.tok, parsed.messages) if chat_route else parsed.prompt
        parsed.req.prompt = text
        api.check_length(self.model.count_tokens(text), parsed.req, self.limits, self.model.max_positions)
        return parsed, text

    @contextmanager
    def admitted(self, gone: threading.Event):
        """Hold one of the max_queue places while a request waits or generates."""
        with self.stats_lock:
            if self.stopping.is_set():
                raise BadRequest("the server is shutting down", status=503, code="server_shutting_down")
            if self.stats["busy"] >= self.limits.max_queue:
                self.stats["refused_busy"] += 1
                raise BadRequest(
                    f"the server is busy ({self.limits.max_queue} requests waiting or generating); retry later",
                    status=429,
                    code="server_busy",
                    headers={"Retry-After": "1"},
                )
            self.stats["busy"] += 1
            self.live.add(gone)
        try:
            yield
        finally:
            with self.stats_lock:
                self.stats["busy"] -= 1
                self.live.discard(gone)

    def count(self, g: Generation) -> None:
        with self.stats_lock:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += g.prompt_tokens
            self.stats["completion_tokens"] += g.completion_tokens

    def cancelled(self) -> BadRequest:
        """The answer to a request that was cancelled: 503 when the server is stopping, else 499."""
        with self.stats_lock:
            self.stats["cancelled"] += 1
        if self.stopping.is_set():
            return BadRequest("the server is shutting down", status=503, code="server_shutting_down")
        return BadRequest("the client closed the request", status=499, code="client_closed_request")

    async def generate(self, request: HTTPRequest, text: str, req: Request) -> Generation:
        """The generation for `text`, unless the client leaves first: then its work is cancelled."""
        gone = threading.Event()
        with self.admitted(gone):
            result = asyncio.wrap_future(self.batcher.submit(text, req, gone))
            left = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({result, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                left.cancel()
            if not result.done():
                gone.set()  # dropped from the queue, or its batch stops at the next token if it was alone
                log.info("client left; its request is cancelled")
                result.cancel()
                raise self.cancelled()
            try:
                return result.result()
            except Cancelled:
                raise self.cancelled() from None

    def stream(self, request: HTTPRequest, text: str, req: Request, cid: str, created: int, served: str, usage_too):
        """The SSE chunks of one streamed generation. Its place (max_queue) is taken here, so a full server
        answers 429 before the stream starts, and given back by the generating thread."""
        from transformers import TextIteratorStreamer

        model = self.model
        streamer = TextIteratorStreamer(model.tok, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        box: dict = {}
        place = self.admitted(cancel)
        place.__enter__()
        # Starlette notices a client that left only when a chunk fails to send; while this request waits
        # for the lock nothing is sent, so watch the connection too
        watch = asyncio.ensure_future(_disconnected(request))
        watch.add_done_callback(lambda t: t.cancelled() or cancel.set())

        def run():
            try:
                with self.lock:
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

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            return api.chunk(cid, created, served, delta, finish, usage)

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
                    e = self.cancelled() if isinstance(box["error"], Cancelled) else box["error"]
                    yield api.stream_error(e.message if isinstance(e, BadRequest) else str(e))
                    return
                g = box["gen"]
                if len(g.text) > sent:
                    yield chunk({"content": g.text[sent:]})
                self.count(g)
                yield chunk({}, g.finish_reason)
                if usage_too:
                    yield chunk({}, usage=api.usage(g))
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away: stop generating at the next token

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        return chunks()


# ------------------------------------------------------------------------------------------ handlers


def _server(request: HTTPRequest) -> Server:
    return request.app.state.server


def _error(status: int, message: str, param=None, code=None, headers=None):
    from fastapi.responses import JSONResponse

    return JSONResponse(api.error_body(status, message, param, code), status_code=status, headers=headers)


async def on_bad_request(_, e: BadRequest):
    return _error(e.status, e.message, e.param, e.code, e.headers)


async def on_internal_error(_, e: Exception):
    log.exception("internal error")
    return _error(500, f"internal error: {type(e).__name__}: {e}")


async def read_body(request: HTTPRequest, cap: int) -> bytes:
    """The body, or a 413 once it passes `cap` bytes. A moderately larger body is read to its end (and
    dropped) so that the client, still sending, gets to read the 413."""
    too_big = BadRequest(
        f"request body is over the server's limit of {cap} bytes", status=413, code="request_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 16 * cap:
        raise too_big
    body, size = bytearray(), 0
    async for piece in request.stream():
        size += len(piece)
        if size <= cap:
            body += piece
        elif size > 16 * cap:
            break
    if size > cap:
        raise too_big
    return bytes(body)


def health(request: HTTPRequest):
    s = _server(request)
    return {"status": "stopping" if s.stopping.is_set() else "ok", "model": s.names[0], **s.stats}


def list_models(request: HTTPRequest):
    s = _server(request)
    s.check_key(request)
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "selfalign"} for n in s.names],
    }


async def completions(request: HTTPRequest):
    s = _server(request)
    s.check_key(request)
    parsed, text = await asyncio.to_thread(s.prepare, await read_body(request, s.limits.max_body_bytes), False)
    g = await s.generate(request, text, parsed.req)
    s.count(g)
    return api.completion_body(g, f"cmpl-{uuid.uuid4().hex}", int(time.time()), parsed.served)


async def chat_completions(request: HTTPRequest):
    from fastapi.responses import StreamingResponse

    s = _server(request)
    s.check_key(request)
    parsed, text = await asyncio.to_thread(s.prepare, await read_body(request, s.limits.max_body_bytes), True)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if parsed.body.get("stream"):
        opts = parsed.body.get("stream_options") or {}
        usage_too = isinstance(opts, dict) and bool(opts.get("include_usage"))
        return StreamingResponse(
            s.stream(request, text, parsed.req, cid, created, parsed.served, usage_too), media_type="text/event-stream"
        )
    g = await s.generate(request, text, parsed.req)
    s.count(g)
    return api.chat_body(g, cid, created, parsed.served)


def create_app(
    model_dir: str | os.PathLike,
    *,
    api_key: str | None = None,
    dtype: str = "fp32",
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

    model = load_model(model_dir, engine, dtype, vllm)
    aliases = [model_name] if isinstance(model_name, str) else list(model_name or [])
    names = list(dict.fromkeys([*aliases, Path(model_dir).resolve().name]))
    server = Server(model, names, limits or Limits(), api_key, max_batch_size, batch_wait_ms)
    app = FastAPI(title="selfalign", docs_url=None, redoc_url=None)
    app.state.server = server
    app.state.model, app.state.stats, app.state.names = model, server.stats, names
    app.state.stop, app.state.close = server.stop, server.close
    app.add_exception_handler(BadRequest, on_bad_request)
    app.add_exception_handler(Exception, on_internal_error)
    app.get("/health")(health)
    app.get("/v1/models")(list_models)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    return app


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
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16", "auto"]),
    help="auto: selfalign/device.py's rule (bf16 on a bf16 GPU, on a CPU where measured faster); fp32 "
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
    cli.setup_logging()
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

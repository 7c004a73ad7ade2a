"""LLM engines behind one call, with a persistent content-addressed cache in front of all of them.

    req = Request(messages=[{"role": "user", "content": "Hi"}], max_tokens=64)    # or Request(prompt="raw text")
    engine = make_engine(cfg.engine.with_model(model_dir), cache_dir="cache/translate")   # cfg.engine: an EngineSpec
    results = engine.complete([req], template_id="translate-v1")                  # list[Result], in order
    engine.stats   # calls, cache_hits, failures, retries, prompt_tokens, completion_tokens, cost_usd

Engines: `local` (in-process transformers through selfalign/generate.py's LocalModel: batched and
left-padded, prompts rendered with the model's own chat template, stops at its end-of-turn token),
`openai` (any OpenAI-compatible endpoint: bounded thread concurrency, retries with backoff on
429/5xx/timeouts/garbled bodies, honouring Retry-After) and `vllm` (GPU only, import-guarded).
`EngineSpec` is the one spec a stage's `engine:` mapping is read into; every field is checked
before an engine is built.

Every call goes through the cache first. Its key is the engine's identity (a fingerprint of the
local model's files and the torch dtype name, or the endpoint and model name), the prompt template
id, the generation settings and the input, so a rerun, or a rerun after a crash, asks nothing
twice. Entries are appended one JSON line at a time to sharded files and fsync'ed; a torn last line
(kill -9 during a write) is ignored on reading. Only successes are cached: a failure is asked again
next run. The API key is read from the environment at call time and never enters a key, a log or a
metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from selfalign import device as placement
from selfalign.config import Config, Dtype, ParamsError, opt
from selfalign.generate import LocalModel, Request, VLLMModel, import_vllm, torch_dtype_name

log = logging.getLogger(__name__)

_sleep = time.sleep  # tests replace this to check backoff without waiting


@dataclass
class EngineSpec(Config):
    """One engine spec, the same in every stage that generates (a stage's default overrides a few fields)."""

    kind: Literal["local", "openai", "vllm"] = "local"
    model: str = ""  # local/vllm: a model directory ("" = the stage's --model); openai: the model name
    batch_size: int = opt(8, lo=1)  # local: sequences generated together (left-padded); vllm: max_num_seqs
    dtype: Dtype = "fp32"  # local/vllm weights; auto: selfalign/device.py's rule
    threads: int = opt(0, lo=0)  # local: torch CPU threads for this process; 0 keeps torch's default
    base_url: str | list[str] = "http://127.0.0.1:8000/v1"  # openai: one endpoint, or several serving the same model
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the env var holding the key, never the key
    concurrency: int = opt(4, lo=1)  # openai: requests in flight
    timeout: float = opt(60.0, lo=0, lo_open=True)  # openai: seconds per attempt
    max_retries: int = opt(5, lo=0)  # openai: attempts after the first
    backoff_base: float = opt(0.5, lo=0)  # openai: first backoff in seconds, doubled per retry, with jitter
    backoff_max: float = opt(30.0, lo=0)  # openai: cap on one backoff (Retry-After is honoured up to retry_after_max)
    retry_after_max: float = opt(120.0, lo=0)
    price_per_1k_input: float = opt(0.0, lo=0)  # USD, for the cost estimate in metrics
    price_per_1k_output: float = opt(0.0, lo=0)
    tensor_parallel_size: int = opt(1, lo=1)  # vllm: GPUs one model is split over
    gpu_memory_utilization: float = opt(0.9, lo=0, hi=1, lo_open=True)  # vllm: share of each GPU for weights + KV cache
    max_model_len: int = opt(0, lo=0)  # vllm: context length to reserve KV cache for; 0 = the model's own
    prefix_caching: bool = True  # vllm: reuse the KV cache of a shared prompt prefix

    def check(self, where: str) -> None:
        urls = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        if not urls or not all(u.startswith(("http://", "https://")) for u in urls):
            raise ParamsError(
                f"{where}.base_url: {self.base_url!r}: base_url must be a URL or a non-empty list of URLs, "
                "each http:// or https://"
            )

    def with_model(self, model_dir: str | os.PathLike | None) -> EngineSpec:
        """This spec with `model` filled from the stage's --model when params leave it empty."""
        return self if self.model else self.replace(model=str(model_dir or "models/base"))


class SpecError(ParamsError, ValueError):
    """A bad engine spec: one line naming the key, the value and what is allowed. A ParamsError, so a stage
    exits 2 with that line; a ValueError, so callers that catch a failed engine start as one still do."""


def engine_spec(spec: EngineSpec | dict, where: str = "engine") -> EngineSpec:
    """`spec` validated (an EngineSpec built by hand is checked too; a mapping is read with EngineSpec.from_dict)
    with `model` filled (models/base when empty). Its dtype may still be a torch name (float32, bfloat16,
    float16) from callers written before the one dtype vocabulary."""
    if isinstance(spec, EngineSpec):
        spec = spec.to_dict()
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: {spec!r} is not an engine spec (an EngineSpec or a mapping)")
    dtype = spec.get("dtype")
    if isinstance(dtype, str) and dtype in placement.PRECISION_OF:
        spec = {**spec, "dtype": placement.PRECISION_OF[dtype]}
    try:
        return EngineSpec.from_dict(spec, where).with_model(None)
    except ParamsError as e:
        raise SpecError(e.message) from None


@dataclass
class Result:
    text: str | None
    ok: bool
    error: str | None = None
    cached: bool = False
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    finish_reason: str | None = None

    @classmethod
    def failure(cls, error: str) -> Result:
        return cls(text=None, ok=False, error=error)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class Cache:
    """Append-only JSON Lines shards under `root`, keyed by sha256; safe against kill -9 mid-write."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._shards: dict[str, dict[str, dict]] = {}
        self._checked_tail: set[str] = set()
        self._lock = threading.Lock()
        self.corrupt_lines = 0

    def _path(self, key: str) -> Path:
        return self.root / f"{key[:2]}.jsonl"

    def _load(self, shard: str) -> dict[str, dict]:
        if shard not in self._shards:
            entries: dict[str, dict] = {}
            path = self.root / f"{shard}.jsonl"
            if path.exists():
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                            entries[entry["key"]] = entry
                        except (json.JSONDecodeError, KeyError, TypeError):
                            self.corrupt_lines += 1  # a torn write: that call is simply asked again
            self._shards[shard] = entries
        return self._shards[shard]

    def get(self, key: str) -> dict | None:
        with self._lock:
            return self._load(key[:2]).get(key)

    def put(self, key: str, value: dict) -> None:
        entry = {"key": key, **value}
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        path = self._path(key)
        with self._lock:
            self._load(key[:2])[key] = entry
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if key[:2] not in self._checked_tail:
                    # a previous process killed mid-write left a line without its newline: end it first
                    self._checked_tail.add(key[:2])
                    size = os.fstat(fd).st_size
                    if size and _last_byte(path) != b"\n":
                        data = b"\n" + data
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


class Engine:
    """The cache and the bookkeeping every engine shares; subclasses implement `_run`."""

    kind = "base"

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.cache = Cache(cache_dir) if cache_dir else None
        self._stats = {
            "requests": 0,
            "calls": 0,
            "cache_hits": 0,
            "failures": 0,
            "retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": 0.0,
        }
        self._stats_lock = threading.Lock()
        self.price_in = self.price_out = 0.0

    @property
    def identity(self) -> dict:
        raise NotImplementedError

    @property
    def stats(self) -> dict:
        with self._stats_lock:
            out = dict(self._stats)
        out["cost_usd"] = round(out["cost_usd"], 6)
        return out

    def _count(self, **inc) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                self._stats[k] += v

    def key(self, req: Request, template_id: str) -> str:
        inp = {"messages": req.messages} if req.messages is not None else {"prompt": req.prompt}
        return _sha({"engine": self.identity, "template": template_id, "settings": req.settings(), "input": inp})

    def complete(self, requests: list[Request], template_id: str = "none", progress: bool = False) -> list[Result]:
        """Results in the order of `requests`; cache hits are free, identical requests are asked once."""
        keys = [self.key(r, template_id) for r in requests]
        results: list[Result | None] = [None] * len(requests)
        todo: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache else None
            if hit is not None:
                results[i] = Result(
                    text=hit["text"],
                    ok=True,
                    cached=True,
                    usage=hit.get("usage", {}),
                    finish_reason=hit.get("finish_reason"),
                )
            else:
                todo.setdefault(k, []).append(i)
        self._count(requests=len(requests), cache_hits=len(requests) - sum(len(v) for v in todo.values()))
        order = list(todo)
        if order:
            log.info(
                "%s engine: %d requests, %d cached, %d to ask",
                self.kind,
                len(requests),
                len(requests) - sum(len(v) for v in todo.values()),
                len(order),
            )

        def done(j: int, res: Result) -> None:
            k = order[j]
            if res.ok:
                usage = res.usage or {}
                cost = (
                    usage.get("prompt_tokens", 0) * self.price_in + usage.get("completion_tokens", 0) * self.price_out
                ) / 1000
                self._count(
                    prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0),
                    cost_usd=cost,
                )
                if self.cache:
                    self.cache.put(k, {"text": res.text, "usage": usage, "finish_reason": res.finish_reason})
            else:
                self._count(failures=1)
            for i in todo[k]:
                results[i] = res

        if order:
            self._count(calls=len(order))
            self._run([requests[todo[k][0]] for k in order], done, progress)
        return [r if r is not None else Result.failure("engine returned no result") for r in results]

    def _run(self, requests: list[Request], done: Callable[[int, Result], None], progress: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- local


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A hash of everything in a model directory that changes its outputs (weights, config, tokenizer)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for p in sorted(root.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".jinja", ".bin", ".model", ".txt")):
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:20]


class LocalEngine(Engine):
    kind = "local"

    def __init__(self, spec: EngineSpec | dict, cache_dir):
        spec = engine_spec(spec)
        super().__init__(cache_dir)
        self.model_dir = spec.model
        if not Path(self.model_dir, "config.json").exists():
            raise FileNotFoundError(f"engine.model {self.model_dir!r}: not a model directory (no config.json)")
        self.batch_size = spec.batch_size
        self.threads = spec.threads
        # one rule (selfalign/device.py), resolved here so the cache identity names the dtype that answers;
        # the identity keeps torch's name (float32, bfloat16), as caches written before fp32/bf16 hold
        self.device = placement.resolve_device("auto")
        self.dtype = torch_dtype_name(spec.dtype)
        if self.dtype == "auto":
            self.dtype = placement.resolve_dtype("auto", self.device, self.model_dir, "engine dtype")[0]
        self._identity = {"kind": "local", "model": model_fingerprint(self.model_dir), "dtype": self.dtype}
        if self.device != "cpu":  # a GPU's kernels round differently; CPU identities stay as they were
            self._identity["device"] = self.device.split(":")[0]
        self._model: LocalModel | None = None

    @property
    def identity(self) -> dict:
        return self._identity

    @property
    def stats(self) -> dict:
        return {**super().stats, "device": self.device, "dtype": self.dtype}  # where the answers were computed

    @property
    def model(self) -> LocalModel:
        if self._model is None:  # loaded only when something is not in the cache
            if self.threads:
                import torch

                # process-wide; on a CPU shared with other jobs one thread can beat two by 5x (spin-waiting)
                torch.set_num_threads(self.threads)
            self._model = LocalModel(self.model_dir, self.dtype, self.device)
        return self._model

    def _run(self, requests, done, progress):
        m = self.model
        texts = [m.render(r) for r in requests]
        lengths = [m.count_tokens(t) for t in texts]
        ok = []
        for i, (r, n) in enumerate(zip(requests, lengths, strict=True)):
            if n + r.max_tokens > m.max_positions:
                done(
                    i,
                    Result.failure(
                        f"prompt of {n} tokens + max_tokens {r.max_tokens} exceeds the model's "
                        f"{m.max_positions} positions"
                    ),
                )
            else:
                ok.append(i)
        # longest first, so batches hold similar lengths (less padding) and a slow batch shows early
        ok.sort(key=lambda i: (-requests[i].max_tokens, -lengths[i]))
        bar = _tracker(len(ok), "generate", progress)
        for s in range(0, len(ok), self.batch_size):
            idx = ok[s : s + self.batch_size]
            try:
                gens = m.generate([texts[i] for i in idx], [requests[i] for i in idx])
            except Exception as e:  # noqa: BLE001 - a failed batch becomes explicit failures, not a crash
                log.exception("batch generation failed")
                for i in idx:
                    done(i, Result.failure(f"generation failed: {type(e).__name__}: {e}"))
            else:
                for i, g in zip(idx, gens, strict=True):
                    done(
                        i,
                        Result(
                            text=g.text,
                            ok=True,
                            finish_reason=g.finish_reason,
                            usage={"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens},
                        ),
                    )
            bar.update(len(idx))
        bar.close()


# -------------------------------------------------------------------------------------------- openai


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(headers) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                continue
    return None


class OpenAIEngine(Engine):
    kind = "openai"

    def __init__(self, spec: EngineSpec | dict, cache_dir):
        spec = engine_spec(spec)  # base_url is checked there: one http(s) URL or a non-empty list of them
        super().__init__(cache_dir)
        import openai

        self._openai = openai
        urls = [spec.base_url] if isinstance(spec.base_url, str) else spec.base_url
        # several endpoints serving one model share the load: each attempt goes to the next one (round-robin),
        # so a retry after a 5xx or a timeout also moves off a server that is down
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self.model_name = spec.model
        self.concurrency = spec.concurrency
        self.max_retries = spec.max_retries
        self.backoff_base = spec.backoff_base
        self.backoff_max = spec.backoff_max
        self.retry_after_max = spec.retry_after_max
        self.price_in = spec.price_per_1k_input
        self.price_out = spec.price_per_1k_output
        env = spec.api_key_env
        key = os.environ.get(env) if env else None
        if env and not key:
            log.warning("env var %s is not set; calling %s without an API key", env, ", ".join(self.base_urls))
        # the client does no retrying of its own: ours counts retries and honours Retry-After
        self.clients = [
            openai.OpenAI(base_url=u, api_key=key or "none", max_retries=0, timeout=spec.timeout)
            for u in self.base_urls
        ]
        self.client = self.clients[0]
        self.sent = [0] * len(self.clients)  # attempts per endpoint
        self._turn = 0
        self._rng = random.Random(0)

    @property
    def identity(self) -> dict:
        # a list is one pool whatever its order, so the cache serves a rerun that lists the endpoints differently
        urls = self.base_url if len(self.base_urls) == 1 else sorted(set(self.base_urls))
        return {"kind": "openai", "base_url": urls, "model": self.model_name}

    def _client(self):
        with self._stats_lock:
            i, self._turn = self._turn, (self._turn + 1) % len(self.clients)
            self.sent[i] += 1
        return self.clients[i]

    def _once(self, req: Request) -> Result:
        client = self._client()
        oa = self._openai
        kw = {"model": self.model_name, "max_tokens": req.max_tokens, "temperature": req.temperature}
        if req.temperature > 0:
            kw.update(top_p=req.top_p, seed=req.seed)
        if req.stop:
            kw["stop"] = list(req.stop)
        try:
            if req.messages is not None:
                resp = client.chat.completions.create(messages=req.messages, **kw)
                choice = resp.choices[0]
                text = choice.message.content
            else:
                resp = client.completions.create(prompt=req.prompt, **kw)
                choice = resp.choices[0]
                text = choice.text
        except oa.APIStatusError as e:
            code = e.status_code
            if code in (408, 409, 429) or code >= 500:
                raise _Retryable(f"HTTP {code}", _retry_after(e.response.headers)) from e
            return Result.failure(f"HTTP {code}: {_short(e.message)}")
        except oa.APIConnectionError as e:  # includes APITimeoutError
            raise _Retryable(f"{type(e).__name__}: {_short(str(e))}") from e
        except (ValueError, TypeError, AttributeError, IndexError, oa.APIResponseValidationError) as e:
            raise _Retryable(f"garbled response: {type(e).__name__}: {_short(str(e))}") from e
        if not isinstance(text, str):
            raise _Retryable(f"garbled response: no text in the first choice ({type(resp).__name__})")
        usage = getattr(resp, "usage", None)
        return Result(
            text=text,
            ok=True,
            finish_reason=getattr(choice, "finish_reason", None),
            usage={
                "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
                "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
            },
        )

    def call(self, req: Request) -> Result:
        """One request with retries; a final failure is an explicit failed Result."""
        for attempt in range(self.max_retries + 1):
            try:
                return self._once(req)
            except _Retryable as e:
                if attempt == self.max_retries:
                    return Result.failure(f"gave up after {attempt + 1} attempts; last error: {e}")
                if e.retry_after is not None:
                    wait = min(e.retry_after, self.retry_after_max)
                else:
                    wait = min(self.backoff_base * 2**attempt, self.backoff_max) * (0.75 + 0.25 * self._rng.random())
                log.info("retrying in %.2fs after %s (attempt %d of %d)", wait, e, attempt + 1, self.max_retries + 1)
                self._count(retries=1)
                _sleep(wait)
        raise AssertionError("unreachable")

    def _run(self, requests, done, progress):
        bar = _tracker(len(requests), "requests", progress)
        bar_lock = threading.Lock()

        def work(i: int) -> None:
            done(i, self.call(requests[i]))  # the cache write happens here, before the next request
            with bar_lock:
                bar.update(1)

        with ThreadPoolExecutor(self.concurrency) as pool:
            for f in [pool.submit(work, i) for i in range(len(requests))]:
                f.result()
        bar.close()

    def close(self) -> None:
        for c in self.clients:
            c.close()


class _Quiet:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _tracker(total: int, desc: str, on: bool):
    """Requests/s and ETA: redrawn on a TTY, a log line every 30 s otherwise (a SLURM or DVC log)."""
    from selfalign import progress as pg

    return pg.Tracker(total, desc) if on else _Quiet()


def _short(s: str, n: int = 300) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------- vllm


def vllm_llm_kwargs(spec: EngineSpec) -> dict:
    """vllm.LLM's keyword arguments from a validated engine spec (so a typo in a 7B run fails before vllm is
    imported). batch_size is vLLM's max_num_seqs: the sequences its scheduler runs at once (the KV cache they
    need is what --dry-run prints); dtype auto is vLLM's own auto (the checkpoint's dtype); max_model_len 0
    leaves the model's own context length."""
    kw = {
        "model": str(spec.model),
        "dtype": torch_dtype_name(spec.dtype),
        "tensor_parallel_size": spec.tensor_parallel_size,
        "gpu_memory_utilization": float(spec.gpu_memory_utilization),
        "enable_prefix_caching": spec.prefix_caching,
        "max_num_seqs": spec.batch_size,
        "seed": 0,
    }
    if spec.max_model_len:
        kw["max_model_len"] = spec.max_model_len
    return kw


class VLLMEngine(Engine):
    """vLLM offline batched generation (CUDA only; not installable on the CPU image). Use it as a
    context manager, or call close(), to free the GPU before the next model loads."""

    kind = "vllm"

    def __init__(self, spec: EngineSpec | dict, cache_dir):
        spec = engine_spec(spec)
        kwargs = vllm_llm_kwargs(spec)
        import_vllm()
        super().__init__(cache_dir)
        self.model_dir = spec.model
        if not Path(self.model_dir, "config.json").exists():
            raise FileNotFoundError(f"engine.model {self.model_dir!r}: not a model directory (no config.json)")
        self.dtype = kwargs["dtype"]  # torch's name in the identity, as caches written before fp32/bf16 hold
        # tensor_parallel_size, memory share, context length and prefix caching change speed, not outputs
        self._identity = {"kind": "vllm", "model": model_fingerprint(self.model_dir), "dtype": self.dtype}
        self.model = VLLMModel(kwargs)

    @property
    def identity(self) -> dict:
        return self._identity

    def _run(self, requests, done, progress):
        m = self.model
        texts = [m.render(r) for r in requests]
        ok = []
        for i, (r, t) in enumerate(zip(requests, texts, strict=True)):
            n = m.count_tokens(t)
            if n + r.max_tokens > m.max_positions:
                done(
                    i,
                    Result.failure(
                        f"prompt of {n} tokens + max_tokens {r.max_tokens} exceeds max_model_len {m.max_positions}"
                    ),
                )
            else:
                ok.append(i)
        if not ok:
            return
        try:
            gens = m.generate([texts[i] for i in ok], [requests[i] for i in ok], progress=progress)
        except Exception as e:  # noqa: BLE001 - a failed batch becomes explicit failures, not a crash
            log.exception("vllm generation failed")
            for i in ok:
                done(i, Result.failure(f"generation failed: {type(e).__name__}: {e}"))
            return
        for i, g in zip(ok, gens, strict=True):
            done(
                i,
                Result(
                    text=g.text,
                    ok=True,
                    finish_reason=g.finish_reason,
                    usage={"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens},
                ),
            )

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


ENGINES = {"local": LocalEngine, "openai": OpenAIEngine, "vllm": VLLMEngine}


def make_engine(spec: EngineSpec | dict, cache_dir: str | os.PathLike | None = None) -> Engine:
    """An engine from an EngineSpec (a stage's `cfg.engine.with_model(model_dir)`), or from a plain mapping
    read with EngineSpec.from_dict; a bad key, type, choice or range is a one-line SpecError naming it."""
    spec = engine_spec(spec)
    return ENGINES[spec.kind](spec, cache_dir)

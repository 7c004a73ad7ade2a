"""LLM engines behind one call, with a persistent content-addressed cache in front of all of them.

    req = Request(messages=[{"role": "user", "content": "Hi"}], max_tokens=64)    # or Request(prompt="raw text")
    engine = make_engine({"kind": "local", "model": "models/base"}, cache_dir="cache/translate")
    results = engine.complete([req], template_id="translate-v1")                  # list[Result], in order
    engine.stats   # calls, cache_hits, failures, retries, prompt_tokens, completion_tokens, cost_usd

Engines: `local` (in-process transformers, batched and left-padded, prompts rendered with the
model's own chat template, stops at its end-of-turn token), `openai` (any OpenAI-compatible
endpoint: bounded thread concurrency, retries with backoff on 429/5xx/timeouts/garbled bodies,
honouring Retry-After) and `vllm` (GPU only, import-guarded).

Every call goes through the cache first. Its key is the engine's identity (a fingerprint of the
local model's files, or the endpoint and model name), the prompt template id, the generation
settings and the input, so a rerun, or a rerun after a crash, asks nothing twice. Entries are
appended one JSON line at a time to sharded files and fsync'ed; a torn last line (kill -9 during
a write) is ignored on reading. Only successes are cached: a failure is asked again next run.
The API key is read from the environment at call time and never enters a key, a log or a metric.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from selfalign.config import Config, ParamsError, opt

log = logging.getLogger(__name__)

_sleep = time.sleep  # tests replace this to check backoff without waiting

# Every key an engine spec may hold, whatever its kind: params.yaml lists them all under one
# `engine:` mapping, and an unknown key is a typo to reject, not to ignore.
SPEC_DEFAULTS = {
    "kind": "local",  # local | openai | vllm
    "model": "models/base",  # local/vllm: a model directory; openai: the model name sent to the endpoint
    "batch_size": 8,  # local: sequences generated together (left-padded); vllm: max_num_seqs
    "dtype": "float32",  # local/vllm: float32 | bfloat16 (bf16 batched generation is ~2x faster on AMX CPUs)
    "threads": 0,  # local: torch CPU threads for this process; 0 keeps torch's default
    "base_url": "http://127.0.0.1:8000/v1",  # openai: one endpoint, or a list of endpoints serving the same model
    "api_key_env": "OPENAI_API_KEY",  # the NAME of the env var holding the key, never the key
    "concurrency": 4,  # openai: requests in flight
    "timeout": 60.0,  # openai: seconds per attempt
    "max_retries": 5,  # openai: attempts after the first
    "backoff_base": 0.5,  # openai: first backoff in seconds, doubled per retry, with jitter
    "backoff_max": 30.0,  # openai: cap on one backoff (a Retry-After header is honoured up to retry_after_max)
    "retry_after_max": 120.0,
    "price_per_1k_input": 0.0,  # USD, for the cost estimate in metrics
    "price_per_1k_output": 0.0,
    "tensor_parallel_size": 1,  # vllm: GPUs one model is split over
    "gpu_memory_utilization": 0.9,  # vllm: share of each GPU for weights + KV cache
    "max_model_len": 0,  # vllm: context length to reserve KV cache for; 0 = the model's own
    "prefix_caching": True,  # vllm: reuse the KV cache of a shared prompt prefix (one system/template prompt)
}


@dataclass
class EngineSpec(Config):
    """One engine spec, the same in every stage that generates (a stage's default overrides a few fields)."""

    kind: Literal["local", "openai", "vllm"] = "local"
    model: str = ""  # local/vllm: a model directory ("" = the stage's --model); openai: the model name
    batch_size: int = opt(8, lo=1)  # local: sequences generated together (left-padded); vllm: max_num_seqs
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = (
        "fp32"  # local/vllm weights; bf16 batched generation is ~2x faster on AMX CPUs
    )
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
            raise ParamsError(f"{where}.base_url: {self.base_url!r} is not an http(s) URL or a list of them")

    def with_model(self, model_dir: str | os.PathLike | None) -> EngineSpec:
        """This spec with `model` filled from the stage's --model when params leave it empty."""
        return self if self.model else self.replace(model=str(model_dir or "models/base"))


@dataclass
class Request:
    messages: list[dict] | None = None
    prompt: str | None = None  # a raw completion prompt, sent without a chat template
    max_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] | None = None  # cut the text at the first of these

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Request needs exactly one of messages or prompt")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")

    def settings(self) -> dict:
        """The generation settings that change the output (seed and top_p do not matter when greedy)."""
        s = {"max_tokens": self.max_tokens, "temperature": self.temperature, "stop": list(self.stop or [])}
        if self.temperature > 0:
            s.update(top_p=self.top_p, seed=self.seed)
        return s


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


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int


class LocalModel:
    """A model directory loaded for generation: batched, left-padded, stopping at the end-of-turn token.

    Greedy rows are plain argmax. Sampled rows draw from their own generator seeded by
    (seed, prompt), so a sampled output depends on its request only, not on its batch neighbours.
    Shared by the local engine and the server.
    """

    def __init__(self, model_dir: str | os.PathLike, dtype: str = "float32", device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        from selfalign import chat
        from selfalign import device as placement

        self.device = placement.resolve_device(device)  # auto: the process's accelerator, else the CPU
        if dtype == "auto":  # the precision rule: bf16 on a bf16 GPU, on a CPU where it measures faster
            dtype = placement.resolve_dtype(dtype, self.device, model_dir, "engine dtype")[0]
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"dtype {dtype!r}: expected auto or one of {', '.join(dtypes)}")
        self.model_dir = str(model_dir)
        self.dtype = dtype
        self.tok = chat.load_tokenizer(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtypes[dtype]).to(self.device)
        self.model.eval()
        log.info("%s loaded on %s in %s", model_dir, self.device, dtype)
        eot = self.tok.convert_tokens_to_ids(chat.end_of_turn(self.tok))
        gen_eos = self.model.generation_config.eos_token_id
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.stop_ids = sorted({i for i in [eot, self.tok.eos_token_id, *gen_eos] if i is not None})
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    def render(self, req: Request) -> str:
        from selfalign import chat

        if req.prompt is not None:
            return req.prompt
        return chat.render(self.tok, req.messages, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def generate(
        self, texts: list[str], reqs: list[Request], cancel: threading.Event | None = None, streamer=None
    ) -> list[Generation]:
        """One left-padded batch; row i follows reqs[i]'s settings (its own max_tokens, sampling and stops)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        width = enc["input_ids"].shape[1]
        limits = [r.max_tokens for r in reqs]
        config = GenerationConfig(
            max_new_tokens=max(limits),
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tok.pad_token_id,
            bos_token_id=self.tok.bos_token_id,
        )
        processors = LogitsProcessorList()
        if any(r.temperature > 0 for r in reqs):
            processors.append(_RowSampler(reqs, texts))
        stops = [list(r.stop or []) for r in reqs]
        criteria = StoppingCriteriaList([_RowStop(width, limits, stops, self.tok, cancel)])
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=criteria,
                streamer=streamer,
            )
        gens = []
        for i, row in enumerate(out[:, width:].tolist()):
            n_prompt = int(enc["attention_mask"][i].sum())
            row = row[: limits[i]]
            cut = next((j for j, t in enumerate(row) if t in self.stop_ids), None)
            finish = "stop" if cut is not None else "length"
            kept = row[:cut] if cut is not None else row
            text = self.tok.decode(kept, skip_special_tokens=True)
            hit = _first_stop(text, stops[i])
            if hit is not None:
                text, finish = text[:hit], "stop"
            gens.append(Generation(text, finish, n_prompt, len(kept) + (cut is not None)))
        return gens


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _row_seed(seed: int, text: str) -> int:
    return int(hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()[:15], 16)


class _RowSampler:
    """Samples each sampled row with its own temperature, top_p and generator, then leaves only that
    token for greedy decoding to pick; greedy rows are left untouched."""

    def __init__(self, reqs: list[Request], texts: list[str]):
        import torch

        self.reqs = reqs
        self.gens = [
            torch.Generator().manual_seed(_row_seed(r.seed, t)) if r.temperature > 0 else None
            for r, t in zip(reqs, texts, strict=True)
        ]

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.clone()
        for i, (r, g) in enumerate(zip(self.reqs, self.gens, strict=True)):
            if g is None:
                continue
            logits = scores[i].float().cpu() / r.temperature  # the row's generator lives on the CPU
            if r.top_p < 1.0:
                sorted_logits, idx = torch.sort(logits, descending=True)
                probs = torch.softmax(sorted_logits, -1)
                drop = torch.cumsum(probs, -1) - probs > r.top_p
                sorted_logits[drop] = float("-inf")
                logits = torch.full_like(logits, float("-inf")).scatter(0, idx, sorted_logits)
            choice = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
            row = torch.full_like(scores[i], float("-inf"))
            row[choice.to(row.device)] = 0.0
            scores[i] = row
        return scores


class _RowStop:
    """Per-row stopping: the row's own max_tokens, its stop strings, or a cancel event (client gone)."""

    def __init__(self, width: int, limits: list[int], stops: list[list[str]], tok, cancel: threading.Event | None):
        self.width, self.limits, self.stops, self.tok, self.cancel = width, limits, stops, tok, cancel

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        n = input_ids.shape[1] - self.width
        done = torch.tensor([n >= lim for lim in self.limits], dtype=torch.bool, device=input_ids.device)
        if self.cancel is not None and self.cancel.is_set():
            done[:] = True
        for i, stops in enumerate(self.stops):
            if stops and not done[i]:
                text = self.tok.decode(input_ids[i, self.width :], skip_special_tokens=True)
                done[i] = _first_stop(text, stops) is not None
        return done


class LocalEngine(Engine):
    kind = "local"

    def __init__(self, spec: dict, cache_dir):
        super().__init__(cache_dir)
        self.model_dir = spec["model"]
        if not Path(self.model_dir, "config.json").exists():
            raise FileNotFoundError(f"engine.model {self.model_dir!r}: not a model directory (no config.json)")
        self.batch_size = int(spec.get("batch_size") or 8)
        self.threads = int(spec.get("threads") or 0)
        from selfalign import device as placement

        # one rule (selfalign/device.py), resolved here so the cache identity names the dtype that answers
        self.device = placement.resolve_device(spec.get("device") or "auto")
        self.dtype = spec.get("dtype") or "float32"
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

    def __init__(self, spec: dict, cache_dir):
        super().__init__(cache_dir)
        import openai

        self._openai = openai
        urls = [spec["base_url"]] if isinstance(spec["base_url"], str) else spec["base_url"]
        if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError(
                f"engine spec: base_url must be a URL or a non-empty list of URLs, got {spec['base_url']!r}"
            )
        # several endpoints serving one model share the load: each attempt goes to the next one (round-robin),
        # so a retry after a 5xx or a timeout also moves off a server that is down
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self.model_name = str(spec["model"])
        self.concurrency = max(1, int(spec.get("concurrency") or 1))
        self.max_retries = int(spec.get("max_retries") or 0)
        self.backoff_base = float(spec.get("backoff_base", 0.5))
        self.backoff_max = float(spec.get("backoff_max", 30.0))
        self.retry_after_max = float(spec.get("retry_after_max", 120.0))
        self.price_in = float(spec.get("price_per_1k_input") or 0.0)
        self.price_out = float(spec.get("price_per_1k_output") or 0.0)
        env = spec.get("api_key_env") or ""
        key = os.environ.get(env) if env else None
        if env and not key:
            log.warning("env var %s is not set; calling %s without an API key", env, ", ".join(self.base_urls))
        # the client does no retrying of its own: ours counts retries and honours Retry-After
        self.clients = [
            openai.OpenAI(base_url=u, api_key=key or "none", max_retries=0, timeout=float(spec.get("timeout") or 60.0))
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

# engine spec keys only the vllm kind reads, and vllm.LLM's name for each
VLLM_KEYS = {
    "tensor_parallel_size": "tensor_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "max_model_len": "max_model_len",
    "prefix_caching": "enable_prefix_caching",
}


def vllm_llm_kwargs(spec: dict) -> dict:
    """vllm.LLM's keyword arguments from an engine spec, validated before vllm is imported (a typo in a
    7B run fails at once); max_model_len 0 leaves the model's own context length."""
    tp, util, max_len = (
        spec.get("tensor_parallel_size", 1),
        spec.get("gpu_memory_utilization", 0.9),
        spec.get("max_model_len", 0),
    )
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"engine spec: tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
        raise ValueError(f"engine spec: gpu_memory_utilization must be in (0, 1], got {util!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        raise ValueError(f"engine spec: max_model_len must be an integer >= 0 (0: the model's own), got {max_len!r}")
    prefix = spec.get("prefix_caching", True)
    if not isinstance(prefix, bool):
        raise ValueError(f"engine spec: prefix_caching must be true or false, got {prefix!r}")
    dtype = spec.get("dtype") or "bfloat16"
    if dtype not in ("auto", "float32", "bfloat16", "float16"):  # vLLM's auto: the checkpoint's own dtype
        raise ValueError(f"engine spec: dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    batch = spec.get("batch_size", 256)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"engine spec: batch_size must be an integer >= 1, got {batch!r}")
    # batch_size is vLLM's max_num_seqs: the sequences its scheduler runs at once (the KV cache they need is
    # what --dry-run prints)
    kw = {
        "model": str(spec["model"]),
        "dtype": dtype,
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": float(util),
        "enable_prefix_caching": prefix,
        "max_num_seqs": batch,
        "seed": 0,
    }
    if max_len:
        kw["max_model_len"] = max_len
    return kw


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise RuntimeError(
            "engine kind 'vllm' needs the vllm package, which is GPU-only and not installed here; "
            "use kind 'local' or 'openai' (e.g. a vLLM server via its OpenAI-compatible endpoint)"
        ) from e
    return vllm


class VLLMModel:
    """A model directory loaded into vLLM (CUDA only), with LocalModel's interface (tok, render,
    count_tokens, max_positions, generate), so the engine and the server drive either one.

    Each row keeps its own settings: max_tokens, temperature/top_p, a seed per request (vLLM seeds
    per request, so a sampled answer does not depend on its batch), and stop strings. Generation
    stops at the chat template's end-of-turn token as LocalModel's does. `close()` gives the GPU
    memory back, so the next stage step (evaluate's perplexity, the reward model) can load.
    """

    def __init__(self, spec: dict):
        from selfalign import chat

        kwargs = vllm_llm_kwargs(spec)
        self._vllm = _import_vllm()
        self.model_dir = str(spec["model"])
        self.dtype = kwargs["dtype"]
        self.tok = chat.load_tokenizer(self.model_dir)
        eot = self.tok.convert_tokens_to_ids(chat.end_of_turn(self.tok))
        self.stop_ids = sorted({i for i in (eot, self.tok.eos_token_id) if i is not None})
        log.info(
            "vllm: loading %s (%s)", self.model_dir, ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "model")
        )
        self.llm = self._vllm.LLM(**kwargs)
        self.max_positions = int(kwargs.get("max_model_len") or _config_positions(self.model_dir))

    def render(self, req: Request) -> str:
        from selfalign import chat

        if req.prompt is not None:
            return req.prompt
        return chat.render(self.tok, req.messages, add_generation_prompt=True)

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def sampling_params(self, req: Request):
        greedy = req.temperature == 0
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=1.0 if greedy else req.top_p,
            seed=None if greedy else req.seed,
            stop=list(req.stop or []) or None,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )

    def generate(
        self,
        texts: list[str],
        reqs: list[Request],
        cancel: threading.Event | None = None,
        streamer=None,
        progress: bool = False,
    ) -> list[Generation]:
        """One batch (vLLM schedules it continuously); a streamer gets the whole text at the end, as the
        offline engine does not stream. `cancel` is checked before the batch: vLLM cannot stop mid-batch."""
        if cancel is not None and cancel.is_set():
            raise RuntimeError("cancelled before generation")
        outs = self.llm.generate(list(texts), [self.sampling_params(r) for r in reqs], use_tqdm=progress)
        gens = []
        for o in outs:
            c = o.outputs[0]
            finish = "length" if c.finish_reason == "length" else "stop"
            gens.append(Generation(c.text, finish, len(o.prompt_token_ids), len(c.token_ids)))
        if streamer is not None:
            streamer.on_finalized_text(gens[0].text if gens else "", stream_end=True)
        return gens

    def close(self) -> None:
        """Free the GPU: drop the LLM (its workers and KV cache), tear down vLLM's model-parallel
        groups, collect, and empty torch's cache. Safe to call twice."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        del llm
        for module, names in (
            ("vllm.distributed.parallel_state", ("destroy_model_parallel", "destroy_distributed_environment")),
            ("vllm.model_executor.parallel_utils.parallel_state", ("destroy_model_parallel",)),
        ):
            try:
                mod = __import__(module, fromlist=list(names))
            except ImportError:
                continue
            for name in names:
                fn = getattr(mod, name, None)
                if fn is not None:
                    fn()
            break
        gc.collect()
        try:
            import torch
        except ImportError:
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("vllm: %s released", self.model_dir)


def _config_positions(model_dir: str) -> int:
    cfg = json.loads(Path(model_dir, "config.json").read_text(encoding="utf-8"))
    return int(cfg.get("max_position_embeddings") or 1 << 30)


class VLLMEngine(Engine):
    """vLLM offline batched generation (CUDA only; not installable on the CPU image). Use it as a
    context manager, or call close(), to free the GPU before the next model loads."""

    kind = "vllm"

    def __init__(self, spec: dict, cache_dir):
        vllm_llm_kwargs(spec)
        _import_vllm()
        super().__init__(cache_dir)
        self.model_dir = spec["model"]
        if not Path(self.model_dir, "config.json").exists():
            raise FileNotFoundError(f"engine.model {self.model_dir!r}: not a model directory (no config.json)")
        self.dtype = spec.get("dtype") or "bfloat16"
        # tensor_parallel_size, memory share, context length and prefix caching change speed, not outputs
        self._identity = {"kind": "vllm", "model": model_fingerprint(self.model_dir), "dtype": self.dtype}
        self.model = VLLMModel(spec)

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


def make_engine(spec: dict, cache_dir: str | os.PathLike | None = None) -> Engine:
    """An engine from a params `engine:` mapping; unknown keys and kinds are errors naming them."""
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise ValueError(f"engine spec: unknown key(s) {', '.join(unknown)}; known: {', '.join(SPEC_DEFAULTS)}")
    full = {**SPEC_DEFAULTS, **spec}
    kind = full["kind"]
    if kind not in ENGINES:
        raise ValueError(f"engine spec: kind {kind!r} is not one of {', '.join(ENGINES)}")
    return ENGINES[kind](full, cache_dir)


def result_dict(r: Result) -> dict:
    return asdict(r)

"""In-process generation, shared by the local and vllm engines (selfalign/llm.py) and the server (selfalign/serve.py).

    model = LocalModel("models/base", dtype="fp32")          # or VLLMModel(llm.vllm_llm_kwargs(spec)) on a GPU
    reqs = [Request(messages=[{"role": "user", "content": "Hi"}], max_tokens=64)]
    texts = [model.render(r) for r in reqs]                    # the model's own chat template
    gens = model.generate(texts, reqs)                         # list[Generation], in order

One left-padded batch per `generate` call; each row keeps its own settings (max_tokens, greedy or
sampled with its own seeded generator, stop strings) and stops at the chat template's end-of-turn
token, so batching changes speed, not answers. A `cancel` flag (a client that left) stops a batch
at the next token. Engines add the cache, batching of many requests and bookkeeping on top.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from selfalign import device as placement

log = logging.getLogger(__name__)


@dataclass
class Request:
    """What to generate: chat messages (rendered with the model's template) or a raw prompt, and how."""

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


def torch_dtype_name(dtype: str) -> str:
    """float32 | bfloat16 | float16 | auto for a dtype in the params vocabulary (fp32 | bf16 | fp16 | auto);
    a torch name is taken as given (callers written before the vocabulary was one)."""
    if dtype in placement.DTYPE_OF:
        return placement.DTYPE_OF[dtype]
    if dtype == "auto" or dtype in placement.PRECISION_OF:
        return dtype
    raise ValueError(f"dtype {dtype!r}: expected one of fp32, bf16, fp16, auto")


@dataclass
class Generation:
    """One row's answer: the text cut at its stop, why it ended, and its token counts."""

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

    def __init__(self, model_dir: str | os.PathLike, dtype: str = "fp32", device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        from selfalign import chat

        self.device = placement.resolve_device(device)  # auto: the process's accelerator, else the CPU
        dtype = torch_dtype_name(dtype)
        if dtype == "auto":  # the precision rule: bf16 on a bf16 GPU, on a CPU where it measures faster
            dtype = placement.resolve_dtype(dtype, self.device, model_dir, "engine dtype")[0]
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


# ---------------------------------------------------------------------------------------------- vllm


def import_vllm():
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
    `llm_kwargs` are vllm.LLM's keyword arguments (llm.vllm_llm_kwargs builds them from an engine spec).

    Each row keeps its own settings: max_tokens, temperature/top_p, a seed per request (vLLM seeds
    per request, so a sampled answer does not depend on its batch), and stop strings. Generation
    stops at the chat template's end-of-turn token as LocalModel's does. `close()` gives the GPU
    memory back, so the next stage step (evaluate's perplexity, the reward model) can load.
    """

    def __init__(self, llm_kwargs: dict):
        from selfalign import chat

        kwargs = dict(llm_kwargs)
        self._vllm = import_vllm()
        self.model_dir = str(kwargs["model"])
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

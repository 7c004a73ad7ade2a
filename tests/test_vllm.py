"""The vllm engine and `serve --engine vllm` on a machine without a GPU.

vllm is CUDA-only, so a stand-in `vllm` module is put in sys.modules: its LLM records the keyword
arguments it is built with and generates greedily with the tiny model through transformers (the
work vLLM's kernels would do on a GPU), honouring each SamplingParams' max_tokens, stop strings and
stop_token_ids. Everything around it is the real code: the spec validation, request building, the
engine's cache, the release of the GPU, and the server over real HTTP through the openai client.
"""

from __future__ import annotations

import sys
import types

import openai
import pytest
from click.testing import CliRunner

from selfalign import llm, serve

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Completion:
    def __init__(self, text, token_ids, finish_reason):
        self.text, self.token_ids, self.finish_reason = text, token_ids, finish_reason


class _Output:
    def __init__(self, prompt_token_ids, completion):
        self.prompt_token_ids, self.outputs = prompt_token_ids, [completion]


def fake_vllm() -> types.ModuleType:
    """A module shaped like vllm's public API (LLM, SamplingParams, distributed.parallel_state)."""
    mod = types.ModuleType("vllm")
    mod.built, mod.sampling, mod.destroyed, mod.alive = [], [], [], 0

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            mod.sampling.append(kw)

    class LLM:
        def __init__(self, **kw):
            import torch
            from transformers import AutoModelForCausalLM

            from selfalign import chat

            mod.built.append(kw)
            mod.alive += 1
            self.tok = chat.load_tokenizer(kw["model"])
            self.model = AutoModelForCausalLM.from_pretrained(kw["model"], dtype=torch.float32).eval()

        def __del__(self):
            if isinstance(mod.alive, int):  # not at interpreter exit
                mod.alive -= 1

        def generate(self, prompts, params, use_tqdm=True):
            import torch

            outs = []
            for text, sp in zip(prompts, params, strict=True):
                kw = sp.kw
                ids = self.tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                with torch.inference_mode():
                    row = self.model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=False,
                        max_new_tokens=kw["max_tokens"],
                        eos_token_id=kw["stop_token_ids"],
                        pad_token_id=self.tok.pad_token_id,
                    )[0, ids.shape[1] :].tolist()
                new = row[: next((j + 1 for j, t in enumerate(row) if t in kw["stop_token_ids"]), len(row))]
                done = new and new[-1] in kw["stop_token_ids"]
                out = self.tok.decode([t for t in new if t not in kw["stop_token_ids"]], skip_special_tokens=True)
                hit = [out.find(s) for s in kw["stop"] or [] if s in out]
                finish = "stop" if done or hit else "length"
                outs.append(_Output(ids[0].tolist(), _Completion(out[: min(hit)] if hit else out, new, finish)))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    dist = types.ModuleType("vllm.distributed")
    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.destroy_model_parallel = lambda: mod.destroyed.append("model_parallel")
    ps.destroy_distributed_environment = lambda: mod.destroyed.append("distributed_environment")
    dist.parallel_state = ps
    mod.distributed = dist
    return mod


@pytest.fixture
def vllm_module(monkeypatch):
    mod = fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.distributed", mod.distributed)
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", mod.distributed.parallel_state)
    return mod


@pytest.mark.parametrize(
    "key, value",
    [
        ("tensor_parallel_size", 0),
        ("tensor_parallel_size", 1.5),
        ("gpu_memory_utilization", 1.2),
        ("gpu_memory_utilization", 0),
        ("max_model_len", -1),
        ("prefix_caching", "yes"),
        ("dtype", "int8"),
        ("batch_size", 0),
    ],
)
def test_bad_vllm_settings_fail_naming_the_key_before_vllm_is_needed(tiny_model_dir, key, value):
    with pytest.raises(ValueError, match=key):
        llm.make_engine({"kind": "vllm", "model": str(tiny_model_dir), key: value})


def test_without_vllm_the_engine_and_the_server_say_so(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RuntimeError, match="needs the vllm package"):
        llm.make_engine({"kind": "vllm", "model": str(tiny_model_dir)})
    res = CliRunner().invoke(serve.main, ["--model", str(tiny_model_dir), "--engine", "vllm"])
    assert res.exit_code == 2 and "needs the vllm package" in res.output


def test_spec_keys_reach_vllm_and_answers_match_the_local_engine(tiny_model_dir, vllm_module, tmp_path):
    spec = {
        "kind": "vllm",
        "model": str(tiny_model_dir),
        "dtype": "fp32",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.55,
        "max_model_len": 96,
        "prefix_caching": False,
    }
    reqs = [llm.Request(messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=6 + i) for i in range(3)]
    reqs.append(llm.Request(prompt="Once upon", max_tokens=5, temperature=0.7, top_p=0.9, seed=11, stop=["zz"]))
    too_long = llm.Request(prompt="word " * 80, max_tokens=40)
    with llm.make_engine(spec, cache_dir=tmp_path / "cache") as engine:
        assert vllm_module.built == [
            {
                "model": str(tiny_model_dir),
                "dtype": "float32",
                "tensor_parallel_size": 2,
                "gpu_memory_utilization": 0.55,
                "enable_prefix_caching": False,
                "max_num_seqs": 8,
                "seed": 0,
                "max_model_len": 96,
            }
        ]
        got = engine.complete(reqs + [too_long], template_id="t")
        assert engine.model.max_positions == 96
    assert vllm_module.destroyed == ["model_parallel", "distributed_environment"] and vllm_module.alive == 0
    assert not got[-1].ok and "exceeds max_model_len 96" in got[-1].error
    greedy, sampled = vllm_module.sampling[:3], vllm_module.sampling[3]
    stop_ids = greedy[0]["stop_token_ids"]
    assert all(
        p["temperature"] == 0 and p["seed"] is None and p["stop"] is None and p["stop_token_ids"] == stop_ids
        for p in greedy
    ) and [p["max_tokens"] for p in greedy] == [6, 7, 8]
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["seed"] == 11
    assert sampled["stop"] == ["zz"]

    local = llm.make_engine({"kind": "local", "model": str(tiny_model_dir), "batch_size": 1})
    want = local.complete(reqs[:3])
    assert [r.text for r in got[:3]] == [r.text for r in want]
    assert [r.usage for r in got[:3]] == [r.usage for r in want]
    assert [r.finish_reason for r in got[:3]] == [r.finish_reason for r in want]

    again = llm.make_engine(spec, cache_dir=tmp_path / "cache")  # a rerun asks vllm nothing
    assert [r.text for r in again.complete(reqs[:3], template_id="t")] == [r.text for r in got[:3]]
    assert again.stats["cache_hits"] == 3 and len(vllm_module.sampling) == 4
    again.close()
    again.close()  # twice is harmless


def test_serve_engine_vllm_answers_over_http_like_the_local_server(varied_model_dir, vllm_module):
    question = [{"role": "user", "content": "Name a colour."}]
    answers, apps = {}, {}
    for engine in ("local", "vllm"):
        app = serve.create_app(
            varied_model_dir,
            engine=engine,
            limits=serve.Limits(max_prompt_tokens=200),
            vllm={"gpu_memory_utilization": 0.3, "max_model_len": 512},
        )
        running = serve.start_in_thread(app)
        try:
            client = openai.OpenAI(base_url=running.url, api_key="none", max_retries=0, timeout=60)
            ask = {"model": app.state.names[0], "messages": question, "max_tokens": 12, "temperature": 0}
            plain = client.chat.completions.create(**ask)
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**ask, stream=True)
                if c.choices
            )
            too_long = None
            try:
                client.chat.completions.create(model=app.state.names[0], messages=question, max_tokens=600)
            except openai.BadRequestError as e:
                too_long = e.status_code
            answers[engine] = (
                plain.choices[0].message.content,
                plain.choices[0].finish_reason,
                plain.usage.completion_tokens,
                streamed,
                too_long,
            )
        finally:
            running.stop()
            app.state.close()
        apps[engine] = app
    assert vllm_module.built[0]["gpu_memory_utilization"] == 0.3 and vllm_module.built[0]["max_model_len"] == 512
    assert answers["vllm"][:4] == answers["local"][:4] and answers["vllm"][3] == answers["vllm"][0]
    assert answers["vllm"][4] == 400  # 600 new tokens do not fit max_model_len 512
    assert vllm_module.destroyed and vllm_module.alive == 0 and apps["vllm"].state.model.llm is None

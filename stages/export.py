"""Export the chosen model as a self-contained directory with a model card that records its lineage.

    python stages/export.py --params params.yaml --model models/ppo --evaluation metrics/evaluate.json \
        --lock dvc.lock --output models/export --metrics metrics/export.json

dvc.yaml passes `--model NAME=DIR` for each model export may ship and `export.model` picks one: preferred
(default: the model params.yaml's top-level `prefer` names; with `both`, the one evaluate judged better
head to head, else ppo: selfalign.dpo.exported_model), ppo, dpo, final or m0. A single `--model DIR` is
exported as is.
A LoRA adapter directory is merged into its base first. The export holds safetensors weights, the
tokenizer, the chat template, a generation config whose eos is the end-of-turn token, the source's
selfalign.json (the inference system prompt) and README.md, the model card: lineage from dvc.lock
(stage commands, dep/out md5s, params values), the upstream stages' metrics and the evaluate numbers,
and, when distill is upstream, a plain statement of whether its teacher is the student's own base.

dvc.lock is read but not declared as a dependency: DVC rewrites it after every stage, this one
included, so as a dependency it would make export stale forever. Its content is the lineage of
the declared dependencies, so nothing the card shows escapes DVC's tracking.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from selfalign import chat, cli, device, dpo, io, models, params, records
from selfalign import export as ex

log = logging.getLogger("export")


def choose_source(opts: tuple[str, ...], wanted: str, prefer: str, evaluation) -> tuple[str, str, str]:
    """(name, directory, why) of the model to export: the one `--model DIR`, or the NAME=DIR that export.model names
    (preferred: the one params.yaml's top-level `prefer` names, read by dpo.read_prefer)."""
    why = f"export.model: {wanted}"
    if wanted == "preferred":
        ev_json = io.read_json(evaluation) if evaluation and Path(evaluation).is_file() else None
        wanted, why = dpo.exported_model(prefer, ev_json)
    named = dict(o.split("=", 1) for o in opts if "=" in o)
    if len(named) != len(opts):
        if len(opts) > 1:
            raise click.UsageError("give one --model DIR, or --model NAME=DIR options")
        source = opts[0]
    elif wanted not in named:
        raise click.UsageError(
            f"export.model picks {wanted!r} ({why}) but no --model {wanted}=DIR gives it (given: {', '.join(named)})"
        )
    else:
        source = named[wanted]
    if not Path(source).is_dir():
        raise click.UsageError(f"--model {source}: not a directory")
    return wanted, source, why


def reload_check(model, export_dir: Path, tok, prompt: str, dev: str = "cpu") -> float:
    """Largest logit difference between the model in memory and the one reloaded from the export, both on `dev`."""
    import torch

    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(dev)
    model.to(dev)
    reloaded = models.load_model(export_dir, None).to(dev)
    with torch.no_grad():
        a = model(**enc).logits.float()
        b = reloaded(**enc).logits.float()
    return float((a - b).abs().max())


@click.command()
@params.params_option
@params.set_option
@click.option(
    "--model",
    "model_opts",
    required=True,
    multiple=True,
    metavar="DIR | NAME=DIR",
    help="The model directory (or LoRA adapter directory) to export; or NAME=DIR, repeatable, of which "
    "export.model picks one.",
)
@click.option("--evaluation", type=click.Path(dir_okay=False), default=None, help="metrics/evaluate.json, if any.")
@click.option("--lock", "lock_path", type=click.Path(dir_okay=False), default="dvc.lock", show_default=True)
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option("--metrics", "metrics_path", required=True, type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the memory plan of the models this stage runs; load nothing.")
@click.option(
    "--gpu-gib", type=float, default=24.0, show_default=True, help="GPU size the --dry-run estimate is held against."
)
def main(params_file, overrides, model_opts, evaluation, lock_path, output, metrics_path, dry_run, gpu_gib):
    cfg = params.resolve(ex.ExportConfig, params_file, "export", overrides)
    prefer = dpo.read_prefer(params_file)  # the top-level key, checked against ppo | dpo | both where it is read
    cli.setup_logging()
    name, source, why = choose_source(model_opts, cfg.model, prefer, evaluation)
    if dry_run:
        from selfalign import memory

        plans = memory.stage_inference_plans("export", cfg, source, params_file, gpu_gib=gpu_gib)
        click.echo(memory.dry_run_plans(plans))
        return
    try:
        model, tok, merged_from = ex.load_source(source, cfg.dtype, cfg.base or None)
        eot_id = ex.set_generation_config(model, tok)
    except (ex.ExportError, models.ModelError) as e:
        raise click.ClickException(str(e)) from e
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    info = models.read_info(source)
    lock = ex.read_lock(lock_path)
    stages = ex.lineage(lock, source, exclude=("export",))
    teacher = ex.distill_teacher(lock) if "distill" in stages else None
    if teacher and teacher["teacher_is_student_base"]:
        log.warning("distill's teacher %s is the student's own base model: the card says so", teacher["teacher"])
    log.info(
        "exporting %s (%s): %d parameters in %s, %s; end-of-turn %r (id %d); %d upstream stages in %s",
        name,
        source,
        n_params,
        dtype,
        f"adapter merged into {merged_from}" if merged_from else "merged",
        chat.end_of_turn(tok),
        eot_id,
        len(stages),
        lock_path if lock else "(no dvc.lock)",
    )

    example = chat.render(
        tok,
        records.with_system(
            info.get("system"),
            [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"}],
        ),
    )
    with models.atomic_dir(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="50GB")
        tok.save_pretrained(tmp)
        if not (tmp / "chat_template.jinja").is_file():
            (tmp / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
        (tmp / models.MODEL_INFO).write_text(
            json.dumps({**info, "exported_from": str(source), "merged_from": merged_from}, indent=2, ensure_ascii=False)
            + "\n",
            encoding="utf-8",
        )
        dev = device.resolve_device("auto")  # the process's accelerator, else the CPU (selfalign/device.py)
        diff = reload_check(model, tmp, tok, example, dev)
        if diff > 1e-4:
            raise click.ClickException(f"the exported weights do not reload to the same model (max logit diff {diff})")
        card = ex.render_card(
            name=name,
            source=str(source),
            merged_from=merged_from,
            info=info,
            example_prompt=example,
            eot=chat.end_of_turn(tok),
            eot_id=eot_id,
            n_params=n_params,
            dtype=dtype,
            files=ex.file_table(tmp),
            lineage_rows=ex.lineage_entries(lock, stages),
            metrics=ex.stage_metrics(lock, stages),
            evaluation=io.read_json(evaluation) if evaluation and Path(evaluation).is_file() else None,
            evaluation_path=evaluation,
            lock_path=str(lock_path),
            lock_md5=ex.file_md5(lock_path) if lock else None,
            teacher=teacher,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        files = ex.file_table(tmp)
    io.write_json(
        metrics_path,
        {
            "model": name,
            "model_choice": why,
            "source": str(source),
            "merged_adapter": merged_from is not None,
            "params": n_params,
            "dtype": dtype,
            "bytes": sum(f["bytes"] for f in files),
            "eos_token_id": eot_id,
            "reload_max_logit_diff": diff,
            "reload_device": dev,
            "lineage_stages": len(stages),
            "teacher_is_student_base": teacher["teacher_is_student_base"] if teacher else None,
            "weights_sha256": next((f["sha256"] for f in files if f["file"].endswith(".safetensors")), None),
        },
    )
    log.info(
        "wrote %s (%d files, %.1f MB) and %s", output, len(files), sum(f["bytes"] for f in files) / 1e6, metrics_path
    )


if __name__ == "__main__":
    main()

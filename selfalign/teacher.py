"""One teacher call, the same in translate, repair, localise and verify.

Each of those stages fills a prompt template per record (or field), asks an engine (selfalign.llm) for every
prompt at once and reads the replies back. What they share is here: the engine is opened from the stage's
`engine:` spec, every request carries the template's id (`<stage>:<sha256 of the template, 12 hex>`) in its
cache key, so another wording asks again and a killed run resumes from what is cached, the batch runs with a
progress bar, and the engine is closed whatever happens. An engine that cannot be opened (an unknown model
directory, a bad spec) is a one-line error, not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from selfalign import io, llm

# (engine, requests, template id) -> results in order: a stage that shards its work (translate) asks through this
Complete = Callable[[llm.Engine, list[llm.Request], str], list[llm.Result]]


def template_id(stage: str, template: str) -> str:
    """The template's part of every cache key: the stage and a digest of the template's text."""
    return f"{stage}:{io.text_digest(template)}"


def ask(
    spec: llm.EngineSpec,
    cache: str | None,
    stage: str,
    template: str,
    requests: list[llm.Request],
    complete: Complete | None = None,
) -> tuple[list[llm.Result], dict]:
    """(the results of `requests` in order, the engine's stats): the engine of `spec` with its cache at `cache`
    answers them (through `complete` when given), then is closed."""
    try:
        engine = llm.make_engine(spec, cache_dir=cache)
    except (ValueError, OSError) as e:
        raise click.ClickException(f"{stage}: engine: {e}") from e
    tid = template_id(stage, template)
    try:
        if complete is not None:
            results = complete(engine, requests, tid)
        else:
            results = engine.complete(requests, template_id=tid, progress=True) if requests else []
    finally:
        engine.close()
    return results, engine.stats


def request(prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int, stop=None) -> llm.Request:
    """One user turn to the teacher with the stage's generation settings."""
    return llm.Request(
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
    )

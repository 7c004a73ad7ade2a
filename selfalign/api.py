"""The OpenAI wire format the server speaks: a request body parsed and checked into an llm Request, and the
bodies of its answers (completions, chat completions, stream chunks, errors).

Pure functions over JSON values, no model and no HTTP: a malformed request raises `BadRequest`
naming what is wrong (the server answers it as OpenAI's error object with that status), so every
rule here is a unit a test can call. selfalign/serve.py holds the server around them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from selfalign.generate import Generation, Request

ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    """A request the server answers with an error object: `status` (400 unless said), the offending `param`,
    OpenAI's error `code` where there is one, and extra response `headers` (Retry-After)."""

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


@dataclass
class Limits:
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20  # 1 MiB: hundreds of bytes per prompt token at the default limit
    max_queue: int = 64  # requests waiting or generating at once; one more gets a 429


@dataclass
class Parsed:
    """A checked request: the body, the served name it asked for, its messages (chat) or prompt (raw), and
    its generation settings (the prompt text is filled in once rendered with the model's template)."""

    body: dict
    served: str
    messages: list[dict] | None
    prompt: str | None
    req: Request


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
    """Generation settings of a request body as an llm.Request (its prompt filled in later)."""
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


def served_name(body: dict, names: list[str]) -> str:
    """The served name the request asked for (the first of `names` if it names none); another is a 404."""
    asked = body.get("model")
    if asked is None:
        return names[0]
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


def parse_request(raw: bytes, chat_route: bool, names: list[str], limits: Limits) -> Parsed:
    """A request body of /v1/chat/completions (`chat_route`) or /v1/completions, checked in the order a
    client reads its errors: JSON, the model name, messages or prompt, then the settings."""
    body = parse_body(raw)
    served = served_name(body, names)
    messages = prompt = None
    if chat_route:
        messages = parse_messages(body)
    elif not isinstance(body.get("prompt"), str):
        raise BadRequest("'prompt' is required and must be a string", "prompt")
    elif body.get("stream"):
        raise BadRequest("streaming is only supported on /v1/chat/completions", "stream")
    else:
        prompt = body["prompt"]
    return Parsed(body, served, messages, prompt, parse_settings(body, limits))


def check_length(n_prompt: int, req: Request, limits: Limits, max_positions: int) -> None:
    """A prompt of `n_prompt` tokens must fit max_prompt_tokens, and with max_tokens the model's positions."""
    if n_prompt > limits.max_prompt_tokens:
        raise BadRequest(
            f"prompt is {n_prompt} tokens; the limit is {limits.max_prompt_tokens}",
            "messages",
            code="context_length_exceeded",
        )
    if n_prompt + req.max_tokens > max_positions:
        raise BadRequest(
            f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds the model's {max_positions} positions",
            "max_tokens",
            code="context_length_exceeded",
        )


# ------------------------------------------------------------------------------------------ answers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(g: Generation) -> dict:
    return {
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    }


def completion_body(g: Generation, cid: str, created: int, served: str) -> dict:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": served,
        "choices": [{"index": 0, "text": g.text, "finish_reason": g.finish_reason}],
        "usage": usage(g),
    }


def chat_body(g: Generation, cid: str, created: int, served: str) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": served,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}
        ],
        "usage": usage(g),
    }


def chunk(
    cid: str, created: int, served: str, delta: dict, finish: str | None = None, usage: dict | None = None
) -> str:
    """One server-sent event of a streamed chat completion (with `usage`: the final usage-only chunk)."""
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


def stream_error(message: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"

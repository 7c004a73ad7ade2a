"""Readers for the foreign formats the pipeline ingests, all producing the one record schema.

Every reader is a plain function `read_<format>(path, lang, source, ...) -> Iterator[record | rejected]`
over a real file. It yields, in file order, canonical records (`records.make`) and rejected
records (`records.rejected`, naming file, line and reason). One input unit (a JSON line, an item
of a JSON array, a conversation block, a text document) gives one or more records (RM pairs,
seed-task instances, web segments) or exactly one rejected record: nothing is dropped silently.
Exact duplicates are kept; removing them is `clean`'s job.

`READERS` maps each format name to its reader, the kind of record it makes and the options it
takes beyond (path, lang, source); the ingest stage builds its `--format` choices from it.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from selfalign import io, records

STAGE = "ingest"
ROLE_KIND = {"seed": "chat", "web": "web", "preference": "preference", "prompts": "prompt"}
KIND_ROLE = {kind: role for role, kind in ROLE_KIND.items()}


@dataclass(frozen=True)
class Reader:
    fn: Callable[..., Iterator[dict]]
    kind: str | None  # None: the file says (canonical records)
    options: tuple[str, ...]  # keyword options beyond (path, lang, source)

    @property
    def role(self) -> str | None:
        return KIND_ROLE.get(self.kind) if self.kind else None


READERS: dict[str, Reader] = {}


def register(name: str, kind: str | None):
    def wrap(fn):
        options = tuple(p for p in inspect.signature(fn).parameters if p not in ("path", "lang", "source"))
        READERS[name] = Reader(fn, kind, options)
        return fn

    return wrap


def read(fmt: str, path: str, lang: str, source: str, **options) -> Iterator[dict]:
    """Run the reader of `fmt`, passing only the options it takes."""
    reader = READERS[fmt]
    return reader.fn(str(path), lang, source, **{k: v for k, v in options.items() if k in reader.options})


def is_rejected(item: dict) -> bool:
    return "reason" in item and "stage" in item


class Reject(Exception):
    """Raised while converting one unit; becomes a rejected record naming file and line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# Units: (line, object or error, raw text) from JSON Lines or one JSON array


def json_units(path: str) -> Iterator[tuple[int, Any, str]]:
    """JSON Lines, or one JSON array (KoChatGPT's `.jsonl` files are arrays); sniffed from the first character.

    A bad line yields an io.JsonlLineError in place of the object. In an array, items are
    decoded one by one so each keeps the line it starts on; a syntax error stops the array and
    the rest of the file becomes that one error. Both stream: memory holds a line, or an array's
    current item and a read chunk (the rest of the file only after a syntax error, to report it).
    """
    if not io.starts_json_array(path):
        for n, obj in io.read_jsonl(path):
            raw = obj.raw if isinstance(obj, io.JsonlLineError) else None
            yield n, obj, raw
        return
    with io.open_text(path) as f:
        yield from _array_units(path, f)


_ARRAY_CHUNK = 1 << 20
_WS = re.compile(r"\s*")


def _array_units(path: str, f, chunk: int = _ARRAY_CHUNK) -> Iterator[tuple[int, Any, str]]:
    """The items of one JSON array read from `f` a chunk at a time; what json_units did on the whole text, with
    the same lines, columns and raw texts. `buf` holds the file from a consumed item's end on; `base`/`col` are the
    line number and column of buf[0], so positions in buf translate back to the file's."""
    buf, base, col, eof = "", 1, 0, False
    counted = [0, 0]  # (position in buf, newlines before it): line numbers are counted once per character

    def more() -> bool:
        nonlocal buf, eof
        if not eof:
            got = f.read(max(chunk, len(buf)))  # doubles buf while one item is longer than a chunk
            if got:
                buf += got
                return True
            eof = True
        return False

    def line_at(pos: int) -> int:
        if pos < counted[0]:
            counted[:] = [0, 0]
        counted[1] += buf.count("\n", counted[0], pos)
        counted[0] = pos
        return base + counted[1]

    def skip_ws(pos: int) -> int:
        while (end := _WS.match(buf, pos).end()) == len(buf) and more():
            pass
        return end

    def rest(pos: int) -> str:
        while more():
            pass
        return buf[pos:]

    def trim(pos: int) -> int:
        """Drop buf[:pos] (a consumed item); returns the new position, 0."""
        nonlocal buf, base, col
        nl = buf.rfind("\n", 0, pos)
        col = pos - nl - 1 if nl >= 0 else col + pos
        base = line_at(pos)
        buf = buf[pos:]
        counted[:] = [0, 0]
        return 0

    decoder = json.JSONDecoder()
    pos = skip_ws(0) + 1
    expect_item = True
    while True:
        pos = skip_ws(pos)
        line = line_at(pos)
        if buf.startswith("]", pos):
            return
        if not expect_item:
            if not buf.startswith(",", pos):
                raw = io.printable(rest(pos))
                yield line, io.JsonlLineError(path, line, "invalid JSON array: expected ',' or ']'", raw), raw
                return
            pos = skip_ws(pos + 1)
            line = line_at(pos)
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except (json.JSONDecodeError, RecursionError) as e:
                if more():
                    continue
                # the rest of the file is this one error; bytes that are not UTF-8 in it are the likelier cause
                bad = io.not_utf8(path, line, buf[pos:])
                if bad is None:
                    if isinstance(e, json.JSONDecodeError):
                        colno = e.colno + (col if buf.rfind("\n", 0, e.pos) < 0 else 0)
                        bad = io.JsonlLineError(
                            path, base + e.lineno - 1, f"invalid JSON: {e.msg} at column {colno}", buf[pos:]
                        )
                    else:
                        bad = io.JsonlLineError(path, line, "invalid JSON: nested too deeply", buf[pos:])
                yield bad.line, bad, bad.raw
                return
            if end < len(buf) or not more():  # a number at the end of the chunk may go on in the next one
                break
        raw = buf[pos:end]
        bad = io.not_utf8(path, line, raw)
        if bad is not None:  # inside a string: the item is rejected, the array goes on
            yield line, bad, bad.raw
        elif isinstance(obj, dict):
            yield line, obj, raw
        else:
            yield line, io.JsonlLineError(path, line, f"expected a JSON object, got {type(obj).__name__}", raw), raw
        pos, expect_item = end, False
        if pos > chunk // 2:
            pos = trim(pos)


def _convert(path: str, units, convert: Callable[[dict, int], list[dict]]) -> Iterator[dict]:
    """Apply `convert(obj, line)` to every unit, turning bad JSON, Reject and RecordError into rejected records."""
    for line, obj, raw in units:
        if isinstance(obj, io.JsonlLineError):
            yield records.rejected(None, obj.code, STAGE, detail=obj.reason, file=path, line=obj.line, raw=obj.raw)
            continue
        try:
            out = convert(obj, line)
        except Reject as e:
            yield records.rejected(
                None,
                e.reason,
                STAGE,
                detail=e.detail,
                file=path,
                line=line,
                raw=raw if raw is not None else json.dumps(obj, ensure_ascii=False),
            )
            continue
        except records.RecordError as e:
            yield records.rejected(
                None,
                "invalid_record",
                STAGE,
                detail=str(e),
                file=path,
                line=line,
                raw=raw if raw is not None else json.dumps(obj, ensure_ascii=False),
            )
            continue
        yield from out


def _str(obj: dict, field: str, *, optional: bool = False) -> str:
    if field not in obj or obj[field] is None:
        if optional:
            return ""
        raise Reject("missing_field", f"field {field!r} is missing")
    if not isinstance(obj[field], str):
        raise Reject("wrong_field", f"field {field!r}: expected a string, got {type(obj[field]).__name__}")
    return obj[field]


def _extra(obj: dict, used: tuple[str, ...], line: int) -> dict:
    """meta: the line, plus the unit's other scalar fields (e.g. gpt4all's `source`, KoChatGPT's `tokens`)."""
    meta: dict[str, Any] = {"line": line}
    for k, v in obj.items():
        if k not in used and isinstance(v, (str, int, float, bool)):
            meta[k if k not in ("line", "lang", "source", "kind", "id") else f"orig_{k}"] = v
    return meta


def _chat(turns: list[tuple[str, str]], *, lang: str, source: str, meta: dict, system: str | None = None) -> dict:
    """A chat record from (role, content) turns that start with the user, alternate, and end with the assistant."""
    if not turns:
        raise Reject("invalid_record", "turns: no turns")
    for i, (role, _) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise Reject(
                "invalid_record", f"turns: turn {i + 1} is {role}, expected {want} (turns must alternate, user first)"
            )
    if turns[-1][0] != "assistant":
        raise Reject("invalid_record", "turns: the last turn is the user's; a chat record ends with the assistant")
    return records.chat(
        [{"role": r, "content": c} for r, c in turns], lang=lang, source=source, meta=meta, system=system
    )


def _user_text(instruction: str, inp: str) -> str:
    """Alpaca's instruction and optional input as one user turn (the input below, after a blank line)."""
    return f"{instruction}\n\n{inp}" if inp.strip() else instruction


# ---------------------------------------------------------------------------------------------
# Chat (seed) formats

_GUANACO_TURN = re.compile(r"### (Human|Assistant):")


@register("guanaco", "chat")
def read_guanaco(path: str, lang: str, source: str, multi_turn: bool = False) -> Iterator[dict]:
    """openassistant-guanaco lines `{"text": "### Human: ...### Assistant: ..."}`.

    By default only single-turn pairs are kept, by the Humpback seed preparation's rule (exactly
    one `### Human:` and one `### Assistant:`); other lines are rejected as `multi_turn`.
    Contents are stripped: the space after the colon is the format's, not the text's.
    """

    def convert(obj, line):
        text = _str(obj, "text")
        meta = _extra(obj, ("text",), line)
        n_h, n_a = text.count("### Human:"), text.count("### Assistant:")
        if not multi_turn and (n_h > 1 or n_a > 1):
            raise Reject("multi_turn", f"{n_h} Human and {n_a} Assistant turns; multi_turn is off")
        parts = _GUANACO_TURN.split(text)
        if parts[0].strip():
            raise Reject("invalid_record", "turns: text before the first '### Human:'")
        roles = {"Human": "user", "Assistant": "assistant"}
        turns = [(roles[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
        return [_chat(turns, lang=lang, source=source, meta=meta)]

    yield from _convert(path, json_units(path), convert)


def _eligible(msg: dict) -> bool:
    return not msg.get("deleted") and msg.get("review_result") is not False and not msg.get("synthetic")


@register("oasst", "chat")
def read_oasst(path: str, lang: str, source: str) -> Iterator[dict]:
    """OpenAssistant message trees (one `{message_tree_id, prompt: {text, role, replies: [...]}}` per line).

    Follows the best-ranked path: at each turn the eligible reply (not deleted, review_result not
    false, not synthetic) with the lowest `rank`, or the only eligible one when none is ranked;
    it stops when no choice is possible and drops a trailing prompter turn (kept in meta).
    """

    def convert(obj, line):
        root = obj.get("prompt")
        if not isinstance(root, dict):
            raise Reject(
                "missing_field" if root is None else "wrong_field", "field 'prompt': expected a message object"
            )
        if not _eligible(root):
            why = "deleted" if root.get("deleted") else "synthetic" if root.get("synthetic") else "review_result false"
            raise Reject("ineligible_prompt", f"the root prompt is {why}")
        path_msgs, node = [root], root
        while True:
            kids = [m for m in node.get("replies") or [] if isinstance(m, dict) and _eligible(m)]
            ranked = [m for m in kids if isinstance(m.get("rank"), int)]
            if ranked:
                node = min(ranked, key=lambda m: m["rank"])
            elif len(kids) == 1:
                node = kids[0]
            else:
                break
            path_msgs.append(node)
        meta = {"line": line, "message_tree_id": obj.get("message_tree_id")}
        if path_msgs[-1].get("role") == "prompter" and len(path_msgs) > 1:
            meta["dropped_turn"] = path_msgs.pop().get("text")
        if len(path_msgs) < 2:
            raise Reject("no_reply", "the prompt has no eligible assistant reply")
        roles = {"prompter": "user", "assistant": "assistant"}
        turns = []
        for m in path_msgs:
            if m.get("role") not in roles or not isinstance(m.get("text"), str):
                raise Reject(
                    "wrong_field", f"message {m.get('message_id')}: expected role prompter|assistant and a text"
                )
            turns.append((roles[m["role"]], m["text"]))
        return [_chat(turns, lang=lang, source=source, meta=meta)]

    yield from _convert(path, json_units(path), convert)


@register("alpaca", "chat")
def read_alpaca(path: str, lang: str, source: str) -> Iterator[dict]:
    """Alpaca records `{instruction, input, output}`, as one JSON array or JSON Lines."""

    def convert(obj, line):
        user = _user_text(_str(obj, "instruction"), _str(obj, "input", optional=True))
        meta = _extra(obj, ("instruction", "input", "output"), line)
        return [_chat([("user", user), ("assistant", _str(obj, "output"))], lang=lang, source=source, meta=meta)]

    yield from _convert(path, json_units(path), convert)


@register("self_instruct", "chat")
def read_self_instruct(path: str, lang: str, source: str) -> Iterator[dict]:
    """Self-instruct seed tasks `{id, name, instruction, instances: [{input, output}], ...}`: one chat record per instance."""

    def convert(obj, line):
        instruction = _str(obj, "instruction")
        instances = obj.get("instances")
        if not isinstance(instances, list) or not instances:
            raise Reject(
                "missing_field" if instances is None else "wrong_field", "field 'instances': expected a non-empty list"
            )
        out = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise Reject("wrong_field", f"field 'instances[{i}]': expected an object")
            try:
                user, output = _user_text(instruction, _str(inst, "input", optional=True)), _str(inst, "output")
            except Reject as e:
                raise Reject(e.reason, e.detail.replace("field '", f"field 'instances[{i}].", 1)) from None
            meta = {**_extra(obj, ("instruction", "instances"), line), "instance": i}
            out.append(_chat([("user", user), ("assistant", output)], lang=lang, source=source, meta=meta))
        return out

    yield from _convert(path, json_units(path), convert)


@register("sft", "chat")
def read_sft(path: str, lang: str, source: str) -> Iterator[dict]:
    """KoChatGPT / MYChatGPT SFT `{prompt, completion, tokens}`; also gpt4all's `{prompt, response, source}`."""

    def convert(obj, line):
        prompt = _str(obj, "prompt")
        answer_field = "response" if "response" in obj and "completion" not in obj else "completion"
        meta = _extra(obj, ("prompt", answer_field), line)
        return [_chat([("user", prompt), ("assistant", _str(obj, answer_field))], lang=lang, source=source, meta=meta)]

    yield from _convert(path, json_units(path), convert)


# Speaker tags seen in KoChatGPT (<사람>/<챗봇>) and MYChatGPT (<Orang>/<Chatbot>, and the
# variants Orang:, <orang>:, <Chabot>:, <AI>: that its translation left behind).
_USER_TAGS = ("사람", "orang", "human", "user")
_ASSISTANT_TAGS = ("챗봇", "chatbot", "chabot", "ai", "assistant", "bot")
_TAG = re.compile(r"^\s*<?\s*(" + "|".join(_USER_TAGS + _ASSISTANT_TAGS) + r")\s*>?\s*:\s?(.*)$", re.IGNORECASE)
_START = "<<start conversation>>"


def _conversation_blocks(path: str) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """(marker line, [(line, text), ...]) per `<<start conversation>>` block.

    Lines before the first marker form a block of their own unless all blank (so a file with
    no marker is one conversation).
    """
    start, block, marked = 1, [], False
    with io.open_text(path) as f:
        for n, raw in enumerate(f, 1):
            text = raw.rstrip("\n")
            if text.strip() == _START:
                if marked or any(t.strip() for _, t in block):
                    yield start, block
                start, block, marked = n, [], True
            else:
                block.append((n, text))
    if marked or any(t.strip() for _, t in block):
        yield start, block


@register("conversation", "chat")
def read_conversation(path: str, lang: str, source: str) -> Iterator[dict]:
    """KoChatGPT / MYChatGPT conversation text: `<<start conversation>>` blocks of `<사람>:` / `<챗봇>:` turns.

    An untagged line continues the turn above it. A trailing user turn is cut off (and kept in
    meta as `dropped_turn`); a block whose turns do not alternate is rejected.
    """
    for start, lines in _conversation_blocks(path):
        raw = "\n".join(t for _, t in lines)
        bad = io.not_utf8(path, lines[0][0] if lines else start, raw)
        if bad is not None:
            yield records.rejected(None, bad.code, STAGE, detail=bad.reason, file=path, line=bad.line, raw=bad.raw)
            continue
        turns: list[list[str]] = []
        try:
            if not any(t.strip() for _, t in lines):
                raise Reject("invalid_record", "turns: empty conversation block")
            gap = False
            for n, text in lines:
                m = _TAG.match(text)
                if m:
                    role = "user" if m.group(1).lower() in _USER_TAGS else "assistant"
                    turns.append([role, m.group(2).strip()])
                elif text.strip():
                    if not turns:
                        raise Reject("invalid_record", f"turns: line {n}: text before the first speaker tag")
                    turns[-1][1] += ("\n\n" if gap else "\n") + text.strip()
                gap = not text.strip() and bool(turns)
            meta: dict[str, Any] = {"line": start}
            if len(turns) > 1 and turns[-1][0] == "user":
                meta["dropped_turn"] = turns.pop()[1]
            record = _chat([(r, c) for r, c in turns], lang=lang, source=source, meta=meta)
        except Reject as e:
            yield records.rejected(None, e.reason, STAGE, detail=e.detail, file=path, line=start, raw=raw)
            continue
        except records.RecordError as e:
            yield records.rejected(None, "invalid_record", STAGE, detail=str(e), file=path, line=start, raw=raw)
            continue
        yield record


@register("messages", "chat")
def read_messages(path: str, lang: str, source: str) -> Iterator[dict]:
    """Vigogne chat `{id, messages: [{role, content}]}`; a leading `system` message becomes the record's system."""

    def convert(obj, line):
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            raise Reject("missing_field" if msgs is None else "wrong_field", "field 'messages': expected a list")
        system = None
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise Reject("wrong_field", f"field 'messages[{i}]': expected {{role, content: str}}")
            role = m.get("role")
            if role == "system" and i == 0:
                system = m["content"]
            elif role in ("user", "assistant"):
                turns.append((role, m["content"]))
            else:
                raise Reject(
                    "wrong_field",
                    f"field 'messages[{i}].role': {role!r} is not user|assistant" + ("" if i else "|system"),
                )
        return [_chat(turns, lang=lang, source=source, meta=_extra(obj, ("messages",), line), system=system)]

    yield from _convert(path, json_units(path), convert)


# ---------------------------------------------------------------------------------------------
# Preference and prompt formats


@register("rm", "preference")
def read_rm(path: str, lang: str, source: str) -> Iterator[dict]:
    """KoChatGPT / MYChatGPT RM `{prompt, completion_0..k, ranking}`, ranking = completion indices best first.

    Expanded to every ordered pair (better, worse): 3 completions give 3 preference records.

    What `ranking` means is settled by the code that wrote it, airobotlab/KoChatGPT
    `kochatgpt_data_230320.ipynb` (commit dfe46ec6), which ordered each prompt's answers best first
    (ChatGPT > GPT-3 davinci > GPT-3 ada) and stored them as
        ranking = [0, 1, 2]; random.shuffle(ranking)
        completion_tmp[ranking[k]] = tmp_sentences[k]     # the k-th best answer goes to completion_{ranking[k]}
    so ranking[k] is the index of the k-th best completion. The same repo's training notebook
    (`1_kochatgpt_code_231122.ipynb`, "make ranking data to chosen, rejected data") reads it the other
    way, choosing completion_i over completion_j when `ranking[i] < ranking[j]` (ranking[i] as the rank of
    completion_i). The two readings agree on the 4 of 6 orders that are their own inverse ([0,1,2],
    [1,0,2], [2,1,0], [0,2,1]) and contradict each other on the 3-cycles [1,2,0] and [2,0,1], a third of
    the rows, where the notebook trains on partly inverted pairs. We follow the generator; on MYChatGPT's
    3-cycle rows it is the reading that puts the off-topic (ada) answer last (tests/test_ingest.py).
    """

    def convert(obj, line):
        prompt = _str(obj, "prompt")
        idx = sorted(int(k.split("_")[1]) for k in obj if re.fullmatch(r"completion_\d+", k))
        if not idx:
            raise Reject("missing_field", "field 'completion_0' is missing")
        completions = {i: _str(obj, f"completion_{i}") for i in idx}
        ranking = obj.get("ranking")
        if ranking is None:
            raise Reject("missing_field", "field 'ranking' is missing")
        if not isinstance(ranking, list) or sorted(ranking) != idx or not all(isinstance(r, int) for r in ranking):
            raise Reject(
                "wrong_field", f"field 'ranking': {ranking!r} is not a permutation of the completion indices {idx}"
            )
        out = []
        for a in range(len(ranking)):
            for b in range(a + 1, len(ranking)):
                better, worse = ranking[a], ranking[b]
                meta = {"line": line, "ranking": ranking, "chosen_index": better, "rejected_index": worse}
                out.append(
                    records.make(
                        "preference",
                        prompt=prompt,
                        chosen=completions[better],
                        rejected=completions[worse],
                        lang=lang,
                        source=source,
                        meta=meta,
                    )
                )
        return out

    yield from _convert(path, json_units(path), convert)


@register("sharegpt_preference", "preference")
def read_sharegpt_preference(path: str, lang: str, source: str) -> Iterator[dict]:
    """ShareGPT-style preference records (LLaMA-Factory's dpo_en_demo.json): `{conversations: [{from, value}], chosen, rejected}`.

    `from` is system / human / gpt. The record schema holds one prompt, so a conversation with
    more than one human turn is rejected as `multi_turn`.
    """

    def convert(obj, line):
        conv = obj.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise Reject(
                "missing_field" if conv is None else "wrong_field", "field 'conversations': expected a non-empty list"
            )
        for i, m in enumerate(conv):
            if (
                not isinstance(m, dict)
                or m.get("from") not in ("system", "human", "gpt")
                or not isinstance(m.get("value"), str)
            ):
                raise Reject(
                    "wrong_field", f"field 'conversations[{i}]': expected {{from: system|human|gpt, value: str}}"
                )
        system = conv[0]["value"] if conv[0]["from"] == "system" else None
        rest = conv[1:] if system is not None else conv
        if len(rest) > 1:
            raise Reject(
                "multi_turn", f"{sum(m['from'] == 'human' for m in rest)} human turns; the schema holds one prompt"
            )
        if rest[0]["from"] != "human":
            raise Reject("invalid_record", f"turns: the prompt turn is from {rest[0]['from']!r}, expected 'human'")
        answers = {}
        for field in ("chosen", "rejected"):
            a = obj.get(field)
            if a is None:
                raise Reject("missing_field", f"field {field!r} is missing")
            if not isinstance(a, dict) or not isinstance(a.get("value"), str):
                raise Reject("wrong_field", f"field {field!r}: expected {{from: gpt, value: str}}")
            answers[field] = a["value"]
        return [
            records.make(
                "preference",
                prompt=rest[0]["value"],
                **answers,
                system=system,
                lang=lang,
                source=source,
                meta={"line": line},
            )
        ]

    yield from _convert(path, json_units(path), convert)


@register("ppo", "prompt")
def read_ppo(path: str, lang: str, source: str) -> Iterator[dict]:
    """PPO prompts `{"prompt": ...}`, as JSON Lines or one JSON array (KoChatGPT's layout)."""

    def convert(obj, line):
        return [
            records.make(
                "prompt", prompt=_str(obj, "prompt"), lang=lang, source=source, meta=_extra(obj, ("prompt",), line)
            )
        ]

    yield from _convert(path, json_units(path), convert)


@register("canonical", None)
def read_canonical(path: str, lang: str, source: str) -> Iterator[dict]:
    """This pipeline's own records. A given id is kept (a translation keeps its original's id); lang and source default."""

    def convert(obj, line):
        record = dict(obj)
        record.setdefault("lang", lang)
        record.setdefault("source", source)
        record.setdefault("meta", {})
        if "id" not in record:
            record["id"] = ""
            record["id"] = records.record_id(record)
        records.validate(record)
        return [record]

    yield from _convert(path, json_units(path), convert)


# ---------------------------------------------------------------------------------------------
# Web text: documents split into segments with length bounds

_SENTENCE_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*\s+")


def _cut(text: str, max_chars: int) -> list[str]:
    """Cut an over-long paragraph into pieces of at most max_chars, of even length, at sentence ends where possible."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        goal = start + (len(text) - start) / math.ceil((len(text) - start) / max_chars)
        fits = [e for e in ends if start < e <= start + max_chars]
        if fits:
            cut = min(fits, key=lambda e: abs(e - goal))
        else:  # one sentence longer than max_chars: cut at a word boundary, else anywhere
            space = text.rfind(" ", start + 1, start + max_chars + 1)
            cut = space if space > start else start + max_chars
        pieces.append(text[start:cut].strip())
        start = cut
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]


def segment(text: str, min_chars: int, max_chars: int) -> list[str]:
    """Split a document into segments: paragraphs (split on newlines), over-long ones cut at sentence ends,
    tiny ones merged with a neighbour while the result fits in max_chars.

    Every segment is at most max_chars. One can be shorter than min_chars only when it fits with
    neither neighbour (or is the whole document); the caller rejects it.
    """
    if min_chars > max_chars:
        raise ValueError(f"segment bounds: min_chars {min_chars} > max_chars {max_chars}")
    pieces: list[tuple[str, str]] = []  # (joiner to the previous piece, text)
    for para in text.split("\n"):
        for i, piece in enumerate(_cut(para.strip(), max_chars)):
            pieces.append((" " if i else "\n", piece))
    out: list[str] = []
    for joiner, piece in pieces:
        if out and (len(out[-1]) < min_chars or len(piece) < min_chars) and len(out[-1]) + 1 + len(piece) <= max_chars:
            out[-1] += joiner + piece
        else:
            out.append(piece)
    return out


def _segments(
    path: str, docs: Iterator[tuple[int, Any, str]], lang: str, source: str, min_chars: int, max_chars: int
) -> Iterator[dict]:
    def convert(obj, line):
        text = _str(obj, "text")
        segs = segment(text, min_chars, max_chars)
        if not segs:
            raise Reject("empty_text", "field 'text' has no non-blank line")
        out = []
        for i, seg in enumerate(segs):
            meta = {**_extra(obj, ("text",), line), "segment": i, "segments": len(segs)}
            record = records.make("web", text=seg, lang=lang, source=source, meta=meta)
            if len(seg) < min_chars:
                record = records.rejected(
                    record,
                    "segment_too_short",
                    STAGE,
                    file=path,
                    line=line,
                    detail=f"{len(seg)} chars < min_chars {min_chars}",
                )
            out.append(record)
        return out

    yield from _convert(path, docs, convert)


@register("c4", "web")
def read_c4(path: str, lang: str, source: str, min_chars: int = 200, max_chars: int = 1500) -> Iterator[dict]:
    """C4-style JSON Lines `{"text": ..., ...}`, one document per line, split into segments."""
    yield from _segments(path, json_units(path), lang, source, min_chars, max_chars)


def _lines(path: str) -> Iterator[str]:
    """The file's lines without their "\\n", as `f.read().split("\\n")` gives them (a last "" after a final newline),
    one at a time."""
    with io.open_text(path) as f:
        last = ""
        for last in f:
            yield last[:-1] if last.endswith("\n") else last
        if last == "" or last.endswith("\n"):
            yield ""


def has_blank_line(lines: Iterator[str]) -> bool:
    """Whether the text has a blank line between two non-blank ones: the regex \\S\\n[ \\t]*\\n+[ \\t]*\\S on the
    joined lines, decided a line at a time (a line ending in a non-space, a line of spaces or tabs, empty lines,
    a line starting with spaces or tabs and a non-space)."""
    gap = after_text = False
    for line in lines:
        if gap and _FIRST_TEXT.match(line):
            return True
        if gap and line == "":
            continue
        gap = after_text and _SPACES.fullmatch(line) is not None
        after_text = line[-1:] != "" and not line[-1].isspace()
    return False


_FIRST_TEXT = re.compile(r"[ \t]*\S")
_SPACES = re.compile(r"[ \t]*")


def text_documents(path: str, documents: str = "auto") -> Iterator[tuple[int, Any, str]]:
    """(first line, {"text"} or an io.JsonlLineError for bytes that are not UTF-8, raw) per document: one per
    line, or blocks separated by blank lines.

    `auto` means blocks when the file has a blank line between two non-blank ones, else lines (a first
    pass over the file decides). Lines are split on "\\n" only (Leipzig's French has Unicode line
    separators inside sentences). Memory holds one document.
    """
    if documents not in ("auto", "line", "blank"):
        raise ValueError(f"text documents: {documents!r} is not auto|line|blank")
    if documents == "auto":
        documents = "blank" if has_blank_line(_lines(path)) else "line"
    if documents == "line":
        for n, text in enumerate(_lines(path), 1):
            if text.strip():
                bad = io.not_utf8(path, n, text)
                yield (n, {"text": text}, text) if bad is None else (n, bad, bad.raw)
        return
    block: list[str] = []
    start = 0
    for n, text in enumerate(itertools.chain(_lines(path), [""]), 1):
        if text.strip():
            if not block:
                start = n
            block.append(text)
        elif block:
            doc = "\n".join(block)
            bad = io.not_utf8(path, start, doc)
            yield (start, {"text": doc}, doc) if bad is None else (start, bad, bad.raw)
            block = []


@register("text", "web")
def read_text(
    path: str, lang: str, source: str, documents: str = "auto", min_chars: int = 200, max_chars: int = 1500
) -> Iterator[dict]:
    """Plain text: one document per line, or documents separated by blank lines; split into segments."""
    yield from _segments(path, text_documents(path, documents), lang, source, min_chars, max_chars)

"""Human review of a stage's automatic verdicts: export a sample to Label Studio and Argilla, read the
annotators' export (Label Studio's JSON export, or Argilla's records) back, and let their verdicts override the
automatic ones.

A reviewable source is a stage's kept.jsonl and rejected.jsonl (rejected lines wrap the record with
`reason`, `detail`). Each record is keyed by `uid`, a hash of what the annotator saw (id, lang, system,
messages): an annotation made on one text never overrides a record whose text has since changed.

Label Studio formats (https://labelstud.io/guide/tasks, /guide/export): the import is a JSON list of tasks
{data, predictions: [{model_version, score, result}]}; the export is the same tasks with `annotations`,
each a list of `result` items {from_name, to_name, type: choices, value: {choices: [...]}}.
Argilla 2.x: `Settings.serialize()` (fields, questions, metadata) and `Record.to_dict()` per record, the
answers coming back as its `responses` ({question: [{value, user_id, status}]}).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from selfalign import curate, io
from selfalign.config import Config, ParamsError, opt

STAGE = "review"
VERDICTS = ("accept", "reject")
SOURCES = ("curate", "verify", "localise")  # review.source: one of these, verify as verify/<input name>
# What each source's automatic step wrote in meta beside the record, shown to the annotator as context.
META_KEY = {"curate": "curate", "verify": "verify", "localise": "localise"}


class ReviewError(ValueError):
    """A malformed annotations file or source: the message names the file and the task or line."""


@dataclasses.dataclass
class SampleConfig(Config):
    """Records exported for annotation from each side, seeded (-1 = all)."""

    kept: int = opt(20, lo=-1)
    rejected: int = opt(20, lo=-1)


@dataclasses.dataclass
class ReviewConfig(Config):
    """params.yaml `review:`."""

    source: str = "curate"  # whose verdicts are reviewed: curate | verify/<name> | localise
    sample: SampleConfig = opt(SampleConfig())
    seed: int = 0  # which records the sample draws

    def check(self, where: str) -> None:
        try:
            source_kind(self.source)
        except ReviewError as e:
            raise ParamsError(f"{where}.source: {self.source!r} is not curate, verify/<name> or localise") from e


def uid(record: dict) -> str:
    """Key of what an annotator reviews: the record's id, language, system prompt and turns."""
    seen = {k: record.get(k) for k in ("id", "lang", "system", "messages")}
    return hashlib.sha1(json.dumps(seen, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:20]


def source_kind(source: str) -> str:
    """The adapter of a review.source: curate, verify (verify/seed: verify@seed's output) or localise."""
    kind = source.split("/")[0]
    if kind not in SOURCES or (kind == "verify") != ("/" in source):
        raise ReviewError(f"review.source: {source!r} is not curate, verify/<name> (a verify.inputs key) or localise")
    return kind


def source_files(source: str, path: str | Path, params_file) -> tuple[Path, Path]:
    """(kept, rejected) files of a source (dvc.yaml passes data/<source>): curate, the last round of data/curate
    (by curate.iterations, as distill does); verify/<name>, data/verify/<name>/kept.jsonl and rejected.jsonl;
    localise, data/localise/seed.jsonl and rejected.jsonl."""
    kind = source_kind(source)
    if kind == "curate":
        return curate.round_file(path, params_file, "kept.jsonl"), curate.round_file(
            path, params_file, "rejected.jsonl"
        )
    return Path(path) / ("seed.jsonl" if kind == "localise" else "kept.jsonl"), Path(path) / "rejected.jsonl"


def _lines(path: Path) -> list[tuple[int, str]]:
    with io.open_text(path) as f:
        return [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]


def reviewable(record) -> bool:
    """A chat record an annotator can read: turns with a role and text (a rejected record may be malformed)."""
    msgs = record.get("messages") if isinstance(record, dict) else None
    return isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    )


def load_source(kept_path: Path, rejected_path: Path) -> list[dict]:
    """Every line of both files as an item {uid, auto, reason, detail, record, line, file, n}; `line` is
    the original text, written back unchanged when no annotation overrides it. A rejected line that
    carries no record (an unreadable input the stage already rejected) gets uid None: nothing to review."""
    items, seen = [], {}
    for path, auto in ((kept_path, "accept"), (rejected_path, "reject")):
        for n, line in _lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReviewError(f"{path}:{n}: invalid JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise ReviewError(f"{path}:{n}: expected a JSON object")
            record = obj if auto == "accept" else obj.get("record")
            if auto == "accept" and not reviewable(obj):
                raise ReviewError(f"{path}:{n}: field 'messages': a kept record must be a chat record")
            key = uid(record) if reviewable(record) else None
            if key is not None and key in seen:
                raise ReviewError(f"{path}:{n}: the same record as {seen[key]} (uid {key})")
            if key is not None:
                seen[key] = f"{path}:{n}"
            items.append(
                {
                    "uid": key,
                    "auto": auto,
                    "reason": None if auto == "accept" else obj.get("reason"),
                    "detail": None if auto == "accept" else obj.get("detail"),
                    "record": record,
                    "line": line,
                    "file": str(path),
                    "n": n,
                }
            )
    return items


def sample(items: list[dict], n_kept: int, n_rejected: int, seed: int) -> list[dict]:
    """A seeded sample of up to n_kept kept and n_rejected rejected reviewable items (-1 = all), ranked by a
    hash of (seed, uid): the same records are drawn however the files are ordered, and raising n only adds."""

    def rank(it):
        return hashlib.sha1(f"{seed}:{it['uid']}".encode()).hexdigest()

    out = []
    for auto, n in (("accept", n_kept), ("reject", n_rejected)):
        pool = sorted((it for it in items if it["uid"] is not None and it["auto"] == auto), key=rank)
        out += pool if n < 0 else pool[:n]
    return out


def view(item: dict, source: str) -> dict[str, Any]:
    """What the annotator sees: the last instruction and response, the automatic verdict and why."""
    record = item["record"]
    msgs = record["messages"]
    users = [m["content"] for m in msgs if m.get("role") == "user"]
    answers = [m["content"] for m in msgs if m.get("role") == "assistant"]
    meta = record.get("meta") or {}
    context = {k: meta[k] for k in (META_KEY[source_kind(source)], "score") if k in meta}
    return {
        "uid": item["uid"],
        "id": record.get("id"),
        "lang": record.get("lang"),
        "source": source,
        "system": record.get("system") or "",
        "instruction": users[-1] if users else "",
        "response": answers[-1] if answers else "",
        "auto_verdict": item["auto"],
        "auto_reason": item["reason"] or "kept",
        "auto_detail": item["detail"] or "",
        "context": json.dumps(context, ensure_ascii=False, sort_keys=True),
    }


def label_studio_config(source: str) -> str:
    """The labeling config: instruction and response as text, the automatic verdict shown, one choice
    (accept / reject, required) and an optional note that becomes the rejected record's detail."""
    return f"""<View>
  <Header value="Review of {source}: is this a good training example for the instruction?"/>
  <Text name="system" value="$system"/>
  <Header value="Instruction" size="5"/>
  <Text name="instruction" value="$instruction"/>
  <Header value="Response" size="5"/>
  <Text name="response" value="$response"/>
  <Header value="Automatic verdict: $auto_verdict ($auto_reason) $auto_detail" size="6"/>
  <Text name="context" value="$context"/>
  <Choices name="verdict" toName="response" choice="single" showInline="true" required="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
  </Choices>
  <TextArea name="note" toName="response" placeholder="Why (optional)" maxSubmissions="1" editable="true"/>
</View>
"""


def label_studio_tasks(items: list[dict], source: str) -> list[dict]:
    """Label Studio import tasks: the view as `data`, the automatic verdict as a prediction (pre-annotation)."""
    tasks = []
    for it in items:
        score = (it["record"].get("meta") or {}).get("score")
        pred = {
            "model_version": f"selfalign-{source}",
            "result": [
                {"from_name": "verdict", "to_name": "response", "type": "choices", "value": {"choices": [it["auto"]]}}
            ],
        }
        if isinstance(score, int | float):
            pred["score"] = float(score)
        tasks.append({"data": view(it, source), "predictions": [pred]})
    return tasks


def argilla_settings(source: str) -> dict:
    """Argilla 2.x dataset settings, in the shape of `argilla.Settings.serialize()`."""

    def text_field(name, title, required=True):
        return {
            "name": name,
            "title": title,
            "required": required,
            "description": None,
            "settings": {"type": "text", "use_markdown": False},
            "type": "text",
        }

    def terms(name):
        return {
            "name": name,
            "title": name,
            "visible_for_annotators": True,
            "settings": {"type": "terms", "values": None, "visible_for_annotators": True},
        }

    return {
        "guidelines": f"Review of {source}: accept a record that is a good training example for its instruction, "
        "reject one that is not. The suggestion is the automatic verdict.",
        "questions": [
            {
                "name": "verdict",
                "title": "Keep this example?",
                "description": None,
                "required": True,
                "settings": {
                    "type": "label_selection",
                    "visible_options": None,
                    "options": [{"text": v, "value": v} for v in VERDICTS],
                },
                "type": "label_selection",
            },
            {
                "name": "note",
                "title": "Why (optional)",
                "description": None,
                "required": False,
                "settings": {"type": "text", "use_markdown": False},
                "type": "text",
            },
        ],
        "fields": [
            text_field("instruction", "Instruction"),
            text_field("response", "Response"),
            text_field("system", "System prompt", required=False),
            text_field("context", "What the automatic step recorded", required=False),
        ],
        "vectors": [],
        "metadata": [terms("uid"), terms("auto_verdict"), terms("auto_reason"), terms("lang")],
        "allow_extra_metadata": False,
        "distribution": {"strategy": "overlap", "min_submitted": 1},
        "mapping": None,
    }


def argilla_records(items: list[dict], source: str) -> list[dict]:
    """Argilla 2.x records (`argilla.Record.to_dict()` shape), the automatic verdict as a suggestion."""
    out = []
    for it in items:
        v = view(it, source)
        fields = {
            k: v[k]
            for k in ("instruction", "response", "system", "context")
            if v[k] or k in ("instruction", "response")
        }
        out.append(
            {
                "id": v["uid"],
                "fields": fields,
                "metadata": {k: v[k] for k in ("uid", "auto_verdict", "auto_reason", "lang") if v[k] is not None},
                "suggestions": {"verdict": {"value": it["auto"], "score": None, "agent": f"selfalign-{source}"}},
                "responses": {},
                "vectors": {},
                "status": "pending",
            }
        )
    return out


def _choice(result: list, where: str) -> tuple[str | None, str]:
    """(verdict, note) of one annotation's result list."""
    verdict, note = None, ""
    if not isinstance(result, list):
        raise ReviewError(f"{where}: field 'result': expected a list")
    for r in result:
        if not isinstance(r, dict):
            raise ReviewError(f"{where}: field 'result': expected objects")
        value = r.get("value") or {}
        if r.get("from_name") == "verdict":
            choices = value.get("choices")
            if not (isinstance(choices, list) and len(choices) == 1 and choices[0] in VERDICTS):
                raise ReviewError(f"{where}: field 'value.choices': expected one of {list(VERDICTS)}, got {choices!r}")
            verdict = choices[0]
        elif r.get("from_name") == "note":
            text = value.get("text")
            note = " ".join(text) if isinstance(text, list) else str(text or "")
    return verdict, note.strip()


def _decide(votes: list[str], notes: list[str]) -> dict:
    """Several annotators: the majority verdict; a tie is a conflict and overrides nothing."""
    top = Counter(votes).most_common()
    conflict = len(top) > 1 and top[0][1] == top[1][1]
    return {
        "verdict": None if conflict else top[0][0],
        "note": "; ".join(notes),
        "annotations": len(votes),
        "conflict": conflict,
    }


def read_annotations(path: str | Path) -> dict[str, dict]:
    """uid -> {verdict, note, annotations, conflict} from the annotators' export: Label Studio's JSON export
    (a list of tasks with `data`) or Argilla 2.x records (a list of `Record.to_dict()`, with `responses`).

    Cancelled (skipped) annotations and records nobody annotated override nothing. An absent or empty file
    means no overrides.
    """
    path = Path(path)
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReviewError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(rows, list):
        raise ReviewError(f"{path}: expected a JSON list of tasks (Label Studio) or records (Argilla)")
    argilla = bool(rows) and isinstance(rows[0], dict) and "fields" in rows[0] and "data" not in rows[0]
    out: dict[str, dict] = {}
    for i, row in enumerate(rows):
        what = "record" if argilla else "task"
        where = f"{path}: {what} {i} (id {row.get('id') if isinstance(row, dict) else None})"
        votes, notes = _argilla_votes(row, where) if argilla else _label_studio_votes(row, where)
        key = row["metadata"]["uid"] if argilla else row["data"]["uid"]
        if not votes:
            continue
        if key in out:
            raise ReviewError(f"{where}: uid {key} is annotated twice")
        out[key] = _decide(votes, notes)
    return out


def _label_studio_votes(task, where: str) -> tuple[list[str], list[str]]:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise ReviewError(f"{where}: field 'data': expected an object")
    key = task["data"].get("uid")
    if not isinstance(key, str) or not key:
        raise ReviewError(f"{where}: field 'data.uid': missing (was the project imported from selfalign's tasks?)")
    anns = task.get("annotations", [])
    if not isinstance(anns, list):
        raise ReviewError(f"{where}: field 'annotations': expected a list")
    votes, notes = [], []
    for j, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise ReviewError(f"{where}: annotation {j}: expected an object")
        if ann.get("was_cancelled"):
            continue
        verdict, note = _choice(ann.get("result", []), f"{where}: annotation {j}")
        if verdict is not None:
            votes.append(verdict)
            if note:
                notes.append(note)
    return votes, notes


def _argilla_votes(record, where: str) -> tuple[list[str], list[str]]:
    if not isinstance(record, dict) or not isinstance(record.get("metadata"), dict):
        raise ReviewError(f"{where}: field 'metadata': expected an object")
    key = record["metadata"].get("uid")
    if not isinstance(key, str) or not key:
        raise ReviewError(f"{where}: field 'metadata.uid': missing (was the dataset logged from selfalign's records?)")
    responses = record.get("responses") or {}
    if not isinstance(responses, dict):
        raise ReviewError(f"{where}: field 'responses': expected an object")
    votes = []
    for j, r in enumerate(responses.get("verdict", [])):
        if not isinstance(r, dict):
            raise ReviewError(f"{where}: field 'responses.verdict[{j}]': expected an object")
        value = r.get("value")
        if r.get("status", "submitted") != "submitted":  # a draft or discarded response decides nothing
            continue
        if value not in VERDICTS:
            raise ReviewError(
                f"{where}: field 'responses.verdict[{j}].value': expected one of {list(VERDICTS)}, got {value!r}"
            )
        votes.append(value)
    notes = [str(r.get("value")).strip() for r in responses.get("note", []) if isinstance(r, dict) and r.get("value")]
    return votes, notes


def apply(items: list[dict], verdicts: dict[str, dict]) -> tuple[list[str], list[str], dict]:
    """(kept lines, rejected lines, counts): kept + human-accepted rejected - human-rejected kept.

    A record whose verdict stands is written back as its original line (no annotations: byte-identical
    files). A human-rejected kept record becomes a rejected line with reason human_rejected; a human-accepted
    rejected record is kept with meta.review saying what it overrode.
    """
    kept, rejected = [], []
    c = Counter()
    for it in items:
        v = verdicts.get(it["uid"]) if it["uid"] is not None else None
        human = v["verdict"] if v else None
        if v:
            c["annotated"] += 1
            c["conflicts"] += v["conflict"]
            c["agreed"] += human == it["auto"]
        if it["auto"] == "accept" and human == "reject":
            c["human_rejected"] += 1
            r = {
                "reason": "human_rejected",
                "stage": STAGE,
                "detail": v["note"] or "rejected by a reviewer",
                "record": it["record"],
                "id": it["record"].get("id"),
            }
            rejected.append(json.dumps(r, ensure_ascii=False))
        elif it["auto"] == "reject" and human == "accept":
            c["human_accepted"] += 1
            record = dict(it["record"])
            record["meta"] = {
                **(record.get("meta") or {}),
                "review": {
                    "verdict": "accept",
                    "overrode": it["reason"],
                    "note": v["note"],
                    "annotations": v["annotations"],
                },
            }
            kept.append(json.dumps(record, ensure_ascii=False))
        elif it["auto"] == "accept":
            kept.append(it["line"])
        else:
            rejected.append(it["line"])
    c["stale"] = len(set(verdicts) - {it["uid"] for it in items})
    return kept, rejected, dict(c)


def write_lines(path: str | Path, lines: list[str]) -> None:
    """Lines as a JSON Lines file, whole or not at all."""
    with io.atomic_path(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

"""Localisation of chat records into a target locale, as pure functions: build the prompt, read the changes,
apply them.

The teacher does not rewrite the record: it lists what is culture-bound (names, places, currencies,
institutions, holidays) and what each becomes in the locale (Malaysia for `ms`), as
{"changes": [{"from": "John", "to": "Ahmad", "kind": "name"}, ...]}; an empty list means there is nothing
to localise. The changes are applied here, by exact replacement in every text field (system prompt and
every turn), so a name changes the same way in the question and the answer, the rest of the record stays
byte for byte as clean and the gate left it, and the list of changes is exactly what happened (kept in
meta.localise for review). A reply that is not such a list is UnparsableChanges; a change whose `from` is
not in the record is ChangeNotFound (the teacher described another text): the stage rejects both.
Small models and scripted teachers may also answer one change per line, "kind: from -> to", or "NONE".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass

from selfalign import llm
from selfalign.config import Config, ParamsError, opt

LOCALES = {"ms": "Malaysia"}
_LANG_CODE = re.compile(r"^[a-z]{2,3}$")


@dataclasses.dataclass
class LocaliseConfig(Config):
    """params.yaml `localise:` (the comments there say what each value does)."""

    locales: dict[str, str] = opt(dict(LOCALES))  # language code: locale; other languages pass without a call
    max_records: int = opt(12, lo=0)  # sent to the teacher at most (0 = all); the rest pass unchanged
    max_new_tokens: int = opt(128, lo=1)  # room for the JSON list of changes
    temperature: float = opt(0.0, lo=0)
    top_p: float = opt(1.0, lo=0, hi=1, lo_open=True)
    seed: int = 0
    engine: llm.EngineSpec = opt(llm.EngineSpec())  # the teacher; model "" = the stage's --model

    def check(self, where: str) -> None:
        if not self.locales:
            raise ParamsError(f"{where}.locales: {{}} names no language; expected language: locale (ms: Malaysia)")
        for lang, locale in self.locales.items():
            if not _LANG_CODE.match(lang):
                raise ParamsError(
                    f"{where}.locales.{lang}: {locale!r} is under {lang!r}, not a language code (2-3 lower-case "
                    "letters: ms)"
                )
            if not locale.strip():
                raise ParamsError(f"{where}.locales.{lang}: {locale!r} is not a locale name (Malaysia)")


_JSON = re.compile(r"[\[{].*[\]}]", re.S)
_LINE = re.compile(r"^\s*(?:[-*]\s*)?([A-Za-z ]{2,20})\s*:\s*(.+?)\s*(?:->|=>|\u2192)\s*(.+?)\s*$")
_NONE = re.compile(r"^\W*(?:none|nothing(?: to localise| to localize)?|no changes?)\W*$", re.I)


class UnparsableChanges(ValueError):
    pass


class ChangeNotFound(ValueError):
    pass


@dataclass(frozen=True)
class Change:
    old: str
    new: str
    kind: str

    def as_dict(self) -> dict:
        return {"from": self.old, "to": self.new, "kind": self.kind}


def text_fields(record: dict) -> list[tuple[tuple, str]]:
    """(path, text) of the system prompt and every turn of a chat record."""
    out: list[tuple[tuple, str]] = [(("system",), record["system"])] if record.get("system") else []
    return out + [(("messages", i, "content"), m["content"]) for i, m in enumerate(record["messages"])]


def render(record: dict) -> str:
    parts = [f"[system]\n{record['system']}"] if record.get("system") else []
    return "\n\n".join(parts + [f"[{m['role']}]\n{m['content']}" for m in record["messages"]])


def build_prompt(template: str, record: dict, locale: str, language: str) -> str:
    """Fill {locale}, {language} and {text}; plain replacement, so braces in the record are safe."""
    if "{text}" not in template or "{locale}" not in template:
        raise ValueError("the localise prompt template needs {locale} and {text} placeholders")
    return template.replace("{locale}", locale).replace("{language}", language).replace("{text}", render(record))


def _change(obj, where: str) -> Change:
    if not isinstance(obj, dict):
        raise UnparsableChanges(f"{where}: a change must be an object with from, to, kind; got {obj!r}"[:200])
    old, new, kind = obj.get("from"), obj.get("to"), obj.get("kind")
    if not all(isinstance(x, str) and x.strip() for x in (old, new, kind)):
        raise UnparsableChanges(f"{where}: a change needs non-empty strings from, to and kind; got {obj!r}"[:200])
    return Change(old.strip(), new.strip(), kind.strip().lower())


def parse_changes(reply: str) -> list[Change]:
    """The teacher's changes ([] for nothing to localise), or UnparsableChanges."""
    text = (reply or "").strip()
    if not text:
        raise UnparsableChanges("empty reply")
    if _NONE.match(text):
        return []
    m = _JSON.search(text)
    if m:
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("changes"), list):
            obj = obj["changes"]
        if isinstance(obj, list):
            return [_change(c, f"change {i + 1}") for i, c in enumerate(obj)]
    lines = [x for x in text.splitlines() if x.strip()]
    found = [_LINE.match(x) for x in lines]
    if lines and all(found):
        return [Change(f.group(2), f.group(3), f.group(1).strip().lower()) for f in found]
    raise UnparsableChanges('expected {"changes": [{"from", "to", "kind"}, ...]}, \'kind: from -> to\' lines or NONE')


def apply(record: dict, changes: list[Change]) -> tuple[dict, list[Change]]:
    """(the localised record, the changes that changed something). Longer `from`s first, so "New York City"
    is not half-replaced by a change of "New York"; a change whose `from` is in no field raises ChangeNotFound."""
    fields = text_fields(record)
    for c in changes:
        if not any(c.old in t for _, t in fields):
            raise ChangeNotFound(f"{c.kind} {c.old!r} -> {c.new!r}: {c.old!r} is not in the record")
    done = [c for c in changes if c.old != c.new]
    out = copy.deepcopy(record)
    for path, text in fields:
        for c in sorted(done, key=lambda c: -len(c.old)):
            text = text.replace(c.old, c.new)
        node = out
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = text
    return out, done


def choose(recs: list[dict], locales: dict[str, str], max_records: int) -> tuple[list[int], Counter]:
    """(indices of the records to send to the teacher, counts of the others by why): records in a language of
    `locales`, the first `max_records` of them (0 = all)."""
    chosen, passed = [], Counter()
    for i, r in enumerate(recs):
        if r["lang"] not in locales:
            passed["other_lang"] += 1
        elif max_records and len(chosen) >= max_records:
            passed["over_max_records"] += 1
        else:
            chosen.append(i)
    return chosen, passed


def localise_one(record: dict, reply: llm.Result, locale: str, teacher: str) -> tuple[dict | None, str, str]:
    """(the record to write or None, reject reason, detail) for one teacher reply."""
    if not reply.ok:
        return None, "teacher_failed", reply.error or "unknown error"
    try:
        changes = parse_changes(reply.text)
        out, done = apply(record, changes)
    except UnparsableChanges as e:
        return None, "unparsable_changes", f"{e}; reply {reply.text!r}"[:500]
    except ChangeNotFound as e:
        return None, "change_not_found", f"{e}; reply {reply.text!r}"[:500]
    meta = {"locale": locale, "changes": [c.as_dict() for c in done], "teacher": teacher}
    return {**out, "meta": {**(record.get("meta") or {}), "localise": meta}}, "", ""
